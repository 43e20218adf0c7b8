#!/usr/bin/env bash
# The demo: live-migrate a running minivmm guest over loopback and prove it
# moved. Starts a destination and a source, lets the guest run, migrates
# it with a progress line, prints the final report and the checks:
#   - RAM at the switchover (source) equals RAM as loaded (destination);
#   - QEMU's single-edge check holds on both;
#   - the guest runs on the destination, the source stays stopped.
# Writes a timeline CSV (and a PNG plot where gnuplot is installed).
#
#   demo.sh [--transport tcp|unix] [--out DIR] [minivmm options...]
# Options are passed to both sides (e.g. --no-kvm, --ram 512) except the
# source-only ones (--speed, --downtime-ms, --xbzrle, --cache-size,
# --run-ms, --raise-speed-after-syncs). --pin-src CPU / --pin-dst CPU run
# that side on one CPU (taskset). Exit status 0 only if all passed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
M="$here/../build/minivmm"
transport=tcp
out="$here/../build/demo"
both=()
src_only=()
src_pin=()
dst_pin=()
while [ $# -gt 0 ]; do
    case "$1" in
    --transport) transport=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --speed|--downtime-ms|--cache-size|--run-ms|--raise-speed-after-syncs) src_only+=("$1" "$2"); shift 2 ;;
    --xbzrle) src_only+=("$1"); shift ;;
    --pin-src) src_pin=(taskset -c "$2"); shift 2 ;;
    --pin-dst) dst_pin=(taskset -c "$2"); shift 2 ;;
    --ram|--dirty-rate) both+=("$1" "$2"); shift 2 ;;
    *) both+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT

case "$transport" in
tcp) dst_uri=tcp:127.0.0.1:0 ;;
unix) dst_uri="unix:$T/migrate.sock" ;;
*) echo "unknown transport $transport"; exit 2 ;;
esac

timeout 600 "${dst_pin[@]}" "$M" --incoming "$dst_uri" --port-file "$T/port" "${both[@]}" >"$T/dst.log" 2>&1 &
dst=$!
for _ in $(seq 1 2000); do
    { [ -s "$T/port" ] || [ -S "$T/migrate.sock" ]; } && break
    kill -0 $dst 2>/dev/null || break
    sleep 0.01
done
if [ "$transport" = tcp ]; then
    src_uri="tcp:127.0.0.1:$(cat "$T/port" 2>/dev/null)"
else
    src_uri="unix:$T/migrate.sock"
fi
echo "== source: migrating to $src_uri =="
timeout 600 "${src_pin[@]}" "$M" --migrate "$src_uri" --csv "$out/timeline.csv" "${both[@]}" "${src_only[@]}" | tee "$T/src.log"
src_status=${PIPESTATUS[0]}
wait $dst
dst_status=$?
echo "== destination =="
cat "$T/dst.log"

fail=0
[ "$src_status" -eq 0 ] || { echo "source exited with $src_status"; fail=1; }
[ "$dst_status" -eq 0 ] || { echo "destination exited with $dst_status"; fail=1; }
src_hash=$(awk '/^RAMHASH/ {print $2}' "$T/src.log")
dst_hash=$(awk '/^RAMHASH/ {print $2}' "$T/dst.log")
if [ -n "$src_hash" ] && [ "$src_hash" = "$dst_hash" ]; then
    echo "CHECK ram-at-switchover: ok (source $src_hash = destination $dst_hash)"
else
    echo "CHECK ram-at-switchover: FAILED (source '$src_hash', destination '$dst_hash')"
    fail=1
fi
grep -h "^CHECK" "$T/src.log" "$T/dst.log" | grep -q FAILED && fail=1
grep -h "^stats:" "$T/src.log" >"$out/stats.txt" 2>/dev/null || true

if command -v gnuplot >/dev/null 2>&1 && [ -s "$out/timeline.csv" ]; then
    downtime=$(awk '/^downtime:/ {print $2}' "$T/src.log")
    end=$(tail -1 "$out/timeline.csv" | cut -d, -f1)
    stop=$(awk -v e="$end" -v d="${downtime:-0}" 'BEGIN {printf "%.3f", e - d / 1000}')
    gnuplot <<GP 2>/dev/null && echo "plot: $out/timeline.png"
set terminal pngcairo size 900,450
set output "$out/timeline.png"
set datafile separator ","
set key autotitle columnhead below
set title "livemig: live migration of a running minivmm guest"
set xlabel "time since migrate (s)"
set ylabel "remaining (MiB)"
set y2label "throughput, dirty rate (MB/s)"
set ytics nomirror
set y2tics
set arrow from $stop, graph 0 to $stop, graph 1 nohead dt 2 lc rgb "red"
set label "stop-and-copy" at $stop, graph 0.9 right offset -0.5,0 tc rgb "red"
plot "$out/timeline.csv" using 1:(\$3/1048576) with lines lw 2 title "remaining (MiB)", \
     "" using 1:5 axes x1y2 with lines title "throughput (MB/s)", \
     "" using 1:6 axes x1y2 with lines dt 3 title "dirty rate (MB/s)"
GP
fi
echo "timeline: $out/timeline.csv"
if [ $fail -eq 0 ]; then
    echo "demo: the guest moved; every check passed"
else
    echo "demo: FAILED"
fi
exit $fail
