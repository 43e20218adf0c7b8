#!/usr/bin/env bash
# Runs the C harness scenarios, each in separate source and destination
# processes, every process bounded by a timeout. Prints one line per case
# and "N passed, N failed" at the end; exits non-zero on any failure.
#   run-tests.sh HARNESS [quick]
set -u
H=$(realpath "$1")
MODE=${2:-all}
V=${VALGRIND:-}
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
pass=0
fail=0
TO="timeout 120"

run() {
    local name=$1
    shift
    if "$@" >"$T/$name.log" 2>&1; then
        pass=$((pass + 1))
        echo "ok   $name"
        sed 's/^/       /' "$T/$name.log" | grep -E '^ *(src|dst)' || true
    else
        fail=$((fail + 1))
        echo "FAIL $name"
        tail -40 "$T/$name.log" | sed 's/^/       /'
    fi
}

# dst in the background, src in the foreground; both must succeed.
pair() {
    local dst=$1 src=$2
    eval "$TO $V $H dst $dst" &
    local d=$!
    eval "$TO $V $H src $src"
    local s=$?
    wait $d
    local r=$?
    [ $s -eq 0 ] && [ $r -eq 0 ]
}

case_tcp4() { pair "tcp:127.0.0.1:0 --port-file $T/tcp4.port" "'tcp:127.0.0.1:@$T/tcp4.port=completed'"; }
case_tcp6() { pair "'tcp:[::1]:0' --port-file $T/tcp6.port" "'tcp:[::1]:@$T/tcp6.port=completed'"; }
# Waits (bounded) until a path exists: the destination has bound its socket.
wait_path() {
    for _ in $(seq 1 3000); do [ -e "$1" ] && return 0; sleep 0.01; done
    return 1
}
case_unix() {
    $TO $V $H dst "unix:$T/mig.sock" &
    local d=$!
    wait_path "$T/mig.sock" && $TO $V $H src "unix:$T/mig.sock=completed"
    local s=$?
    wait $d && [ $s -eq 0 ]
}
case_exec() {
    $TO $V $H src "exec:cat > $T/stream.bin=completed" && $TO $V $H dst "exec:cat $T/stream.bin"
}
case_fd_number() {
    mkfifo "$T/fifo1"
    $TO $V $H dst fd:4 4<"$T/fifo1" &
    local d=$!
    $TO $V $H src "fd:3=completed" 3>"$T/fifo1"
    local s=$?
    wait $d && [ $s -eq 0 ]
}
case_fd_named() {
    mkfifo "$T/fifo2"
    $TO $V $H dst fd:mig --fd-name mig:4 4<"$T/fifo2" &
    local d=$!
    $TO $V $H src "fd:3=completed" 3>"$T/fifo2"
    local s=$?
    wait $d && [ $s -eq 0 ]
}
case_blocker_then_migrate() {
    pair "tcp:127.0.0.1:0 --port-file $T/b.port" "'tcp:127.0.0.1:1=blocked' 'tcp:127.0.0.1:@$T/b.port=completed'"
}
case_cancel_then_migrate() {
    $TO $V $H dst tcp:127.0.0.1:0 --port-file "$T/c1.port" --expect failed --error "unexpected end of migration stream" &
    local d1=$!
    $TO $V $H dst tcp:127.0.0.1:0 --port-file "$T/c2.port" &
    local d2=$!
    $TO $V $H src --speed 4000000 "tcp:127.0.0.1:@$T/c1.port=cancelled" "tcp:127.0.0.1:@$T/c2.port=completed"
    local s=$?
    wait $d1 && wait $d2 && [ $s -eq 0 ]
}
case_failed_destination_then_migrate() {
    # 16 MiB at 8 MB/s: far more than socket buffers hold, so the source is
    # still sending when the destination gives up, however slow it starts.
    local sz=16777216
    $TO $V $H dst tcp:127.0.0.1:0 --size $sz --port-file "$T/f1.port" --fail-load --expect failed \
        --error "error while loading state for instance 0x0 of device 'dev': 'dev' load handler failed (-22)" &
    local d1=$!
    $TO $V $H dst tcp:127.0.0.1:0 --size $sz --port-file "$T/f2.port" &
    local d2=$!
    $TO $V $H src --size $sz --speed 8000000 "tcp:127.0.0.1:@$T/f1.port=failed" "tcp:127.0.0.1:@$T/f2.port=completed"
    local s=$?
    wait $d1 && wait $d2 && [ $s -eq 0 ]
}
case_refused_connection_then_migrate() {
    # Nothing listens on port 1: the source fails cleanly, then migrates.
    $TO $V $H dst "unix:$T/r.sock" &
    local d=$!
    wait_path "$T/r.sock" && $TO $V $H src "tcp:127.0.0.1:1=failed" "unix:$T/r.sock=completed"
    local s=$?
    wait $d && [ $s -eq 0 ]
}

cases="tcp4 tcp6 unix exec fd_number fd_named blocker_then_migrate cancel_then_migrate failed_destination_then_migrate refused_connection_then_migrate"
[ "$MODE" = quick ] && cases="tcp4 exec"
for c in $cases; do
    run "$c" "case_$c"
done
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
