#!/usr/bin/env python3
"""Compares two builds of examples/xbzrle_bench (say, before and after a
change to the encoder): runs them alternately ROUNDS times and prints, per
density, each build's median encode rates (streamed and in cache) and the
median of the per-round ratios to the first build, which is less swayed by
the machine's state than the medians are.

    xbzrle_ab.py ROUNDS BENCH_A BENCH_B [BENCH_C ...]
"""
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"changed=(\d+)%.*encode_GBps=([\d.]+).*encode_cached_GBps=([\d.]+)")


def run(binary):
    out = subprocess.run([binary], capture_output=True, text=True, check=True).stdout
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in map(LINE.search, out.splitlines()) if m}


def main():
    rounds, binaries = int(sys.argv[1]), sys.argv[2:]
    res = {b: [] for b in binaries}
    for _ in range(rounds):
        for b in binaries:
            res[b].append(run(b))
    first = res[binaries[0]]
    for pct in first[0]:
        for b in binaries:
            line = f"{pct:>2}% {b}:"
            for i, what in enumerate(("streamed", "in cache")):
                v = [r[pct][i] for r in res[b]]
                ratio = statistics.median(r[pct][i] / q[pct][i] for r, q in zip(res[b], first))
                line += f" {what} {statistics.median(v):.2f} GB/s ({min(v):.2f}-{max(v):.2f}), x{ratio:.2f};"
            print(line)


if __name__ == "__main__":
    main()
