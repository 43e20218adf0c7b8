#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each (default 60) from a copy
# of its seed corpus, after replaying fuzz/regressions/<target>-*.bin.
#
#   fuzz/run.sh [SECONDS]
#
# Installs cargo-fuzz if it is missing. The machine's stable toolchain is
# used with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags such as
# -Zsanitizer=address). Exits non-zero if any target crashes; the crashing
# input is left under fuzz/artifacts/<target>/. The last line is
# "fuzz: N passed, N failed" (N = targets).
set -uo pipefail

SECS="${1:-60}"
case "$SECS" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
# Build flags, identical for the build and every run (else cargo rebuilds):
# release, with debug assertions and overflow checks, AddressSanitizer.
FLAGS=(-a --sanitizer address)
start=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz || {
        echo "fuzz: cannot install cargo-fuzz" >&2
        exit 1
    }
fi

mapfile -t TARGETS < <(cargo fuzz list)
if [ "${#TARGETS[@]}" -eq 0 ]; then
    echo "fuzz: no targets found" >&2
    exit 1
fi

echo "== building ${TARGETS[*]}"
if ! cargo fuzz build "${FLAGS[@]}"; then
    echo "fuzz: 0 passed, ${#TARGETS[@]} failed (build)"
    exit 1
fi
echo "   built in $(($(date +%s) - start)) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/livemig-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
summary=()
for t in "${TARGETS[@]}"; do
    ok=1

    # 1. Regressions: libFuzzer runs each file given as an argument once.
    regs=()
    for f in regressions/"$t"-*.bin; do
        [ -e "$f" ] && regs+=("$f")
    done
    if [ "${#regs[@]}" -gt 0 ]; then
        echo "== $t: replaying ${#regs[@]} regression input(s)"
        if ! cargo fuzz run "${FLAGS[@]}" "$t" "${regs[@]}" -- -runs=1 >"$work/$t.regress.log" 2>&1; then
            tail -n 40 "$work/$t.regress.log"
            echo "!! $t: a regression input fails again"
            ok=0
        fi
    fi

    # 2. Fuzzing, from a copy of the seed corpus (the repo's is not grown).
    mkdir -p "$work/corpus/$t"
    if [ -d "corpus/$t" ]; then
        cp -R "corpus/$t/." "$work/corpus/$t/"
    fi
    dict=()
    case "$t" in load_stream | ram_section) dict=(-dict=dict/stream.dict) ;; esac
    echo "== $t: fuzzing for $SECS s"
    t0=$(date +%s)
    # The outer timeout is a safety net; -timeout catches slow inputs.
    timeout --signal=INT --kill-after=30 $((SECS + 300)) \
        cargo fuzz run "${FLAGS[@]}" "$t" "$work/corpus/$t" -- \
        -max_total_time="$SECS" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
        >"$work/$t.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$t.log" | tail -n 1 | sed -E 's/^#([0-9]+)[[:space:]]+DONE[[:space:]]+/runs: \1 /')
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$work/$t.log"
        echo "!! $t: crashed (exit $rc); input saved under fuzz/artifacts/$t/"
        echo "   reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${FLAGS[*]} $t artifacts/$t/<file>)"
        ok=0
    fi
    summary+=("$(printf '%-14s %-4s %4ss  %s' "$t" "$([ $ok = 1 ] && echo ok || echo FAIL)" "$dt" "${stats:-no stats}")")
    if [ $ok = 1 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done

echo
echo "== summary ($(($(date +%s) - start)) s in all)"
printf '  %s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
