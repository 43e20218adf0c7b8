#!/usr/bin/env python3
"""Scenario (e) of the bench (a minivmm guest dirtying 150 MB/s of its
256 MiB, downtime limit 100 ms, unthrottled), run alternately with the two
minivmm processes left to the scheduler and pinned (source on CPU 0,
destination on CPU 1), traced with RUST_LOG=livemig=debug. Prints per run
the reported downtime and expected downtime (ms), then, from the trace,
the estimate unrounded, the VM's stop and the destination's confirmation
(ms after the stop began); and per mode how often the estimate was within
±25 % of the downtime, by the reported figures (as the bench counts) and
by the traced ones.

    make -C c-tests build/minivmm
    e_ab.py [ROUNDS]   (default 8)
"""
import os
import re
import statistics
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minivmm", "demo.sh")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "e_ab")


def ms(text):
    """A Rust Duration's Debug form (e.g. 12.5µs) in milliseconds."""
    v, unit = re.match(r"([\d.]+)(ns|µs|ms|s)$", text).groups()
    return float(v) * {"ns": 1e-6, "µs": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run(pinned):
    args = [DEMO, "--out", OUT, "--ram", "256", "--dirty-rate", "150", "--speed", "0", "--downtime-ms", "100",
            "--run-ms", "500"] + (["--pin-src", "0", "--pin-dst", "1"] if pinned else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, RUST_LOG="livemig=debug"))
    t = r.stdout + r.stderr
    if "every check passed" not in t:
        raise RuntimeError(f"the demo failed:\n{t}")
    return (int(re.search(r"^downtime:\s+(\d+)", t, re.M).group(1)),
            int(re.search(r"expected downtime at switchover:\s+(-?\d+)", t).group(1)),
            ms(re.search(r"switchover decided: \d+ bytes pending, expected downtime (\S+)", t).group(1)),
            ms(re.search(r"VM stopped in (\S+?),", t).group(1)),
            ms(re.search(r"destination confirmed by (\S+?) ", t).group(1)))


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    res = {False: [], True: []}
    for _ in range(rounds):
        for pinned in (False, True):
            r = run(pinned)
            res[pinned].append(r)
            print(f"{'pinned' if pinned else 'free  '} downtime {r[0]} ms, expected {r[1]} ms; "
                  f"traced: estimate {r[2]:.3f}, stop {r[3]:.3f}, confirmed {r[4]:.3f} ms", flush=True)
    for pinned, v in res.items():
        reported = sum(1 for dt, ex, *_ in v if ex > 0 and abs(ex - dt) <= 0.25 * dt)
        traced = sum(1 for *_, est, _, conf in v if abs(est - conf) <= 0.25 * conf)
        print(f"{'pinned' if pinned else 'free'}: downtime median {statistics.median(x[0] for x in v)} ms "
              f"(max {max(x[0] for x in v)}), stop median {statistics.median(x[3] for x in v):.3f} ms "
              f"(max {max(x[3] for x in v):.3f}); estimate within ±25 %: {reported}/{len(v)} reported, "
              f"{traced}/{len(v)} traced")


if __name__ == "__main__":
    main()
