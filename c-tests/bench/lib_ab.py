#!/usr/bin/env python3
"""Compares two builds of liblivemig on scenario (a) or (b) of the bench:
1 GiB of random RAM migrated between two qemu_peer processes over loopback
TCP, pinned as the bench pins them (source on CPU 0, destination on CPU 1),
the builds alternated ROUNDS times. Each build is a directory holding its
liblivemig.so.0, chosen with LD_LIBRARY_PATH (qemu_peer's runpath is
overridden by it). Prints per build the median total time and the median
CPU time of each side over the migration (`cpu-migration-us:`).

    make -C c-tests build/qemu_peer
    lib_ab.py [--prefault] ROUNDS LIBDIR_A LIBDIR_B

--prefault is scenario (a), without it (b).
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "qemu_peer")


def run(lib, img, tmp, prefault):
    subprocess.run(["cat", img], stdout=subprocess.DEVNULL, check=True)  # in the page cache
    env = dict(os.environ, LD_LIBRARY_PATH=lib)
    pf = os.path.join(tmp, "port")
    if os.path.exists(pf):
        os.unlink(pf)
    d = subprocess.Popen(["taskset", "-c", "1", PEER, "--incoming", "tcp:127.0.0.1:0", "--port-file", pf,
                          "--ram-size", "1024M"] + (["--prefault"] if prefault else []),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + 60
    while not (os.path.exists(pf) and open(pf).read().strip()):
        if time.time() > end or d.poll() is not None:
            raise RuntimeError("destination did not start")
        time.sleep(0.005)
    s = subprocess.run(["taskset", "-c", "0", PEER, "--migrate", f"tcp:127.0.0.1:{open(pf).read().strip()}",
                        "--ram-size", "1024M", "--speed", "0", "--downtime-ms", "300", "--ram-file", img],
                       capture_output=True, text=True, env=env, timeout=120)
    dout = d.communicate(timeout=60)[0]
    if s.returncode or d.returncode:
        raise RuntimeError(f"migration failed: {s.stdout}{s.stderr}")
    cpu = lambda out: int(re.search(r"cpu-migration-us: (\d+)", out).group(1)) / 1e6
    return int(re.search(r"total-time:?\s+(\d+)", s.stdout).group(1)), cpu(s.stdout), cpu(dout)


def main():
    args = sys.argv[1:]
    prefault = "--prefault" in args
    args = [a for a in args if a != "--prefault"]
    rounds, libs = int(args[0]), args[1:]
    res = {lib: [] for lib in libs}
    with tempfile.TemporaryDirectory(prefix="livemig-lib-ab-") as tmp:
        img = os.path.join(tmp, "random.img")
        with open(img, "wb") as f:
            for _ in range(16):
                f.write(os.urandom(64 << 20))
        for _ in range(rounds):
            for lib in libs:
                res[lib].append(run(lib, img, tmp, prefault))
    for lib in libs:
        t, cs, cd = zip(*res[lib])
        print(f"{lib}: total {statistics.median(t)} ms ({min(t)}-{max(t)}), "
              f"CPU over the migration: source {statistics.median(cs):.3f} s, destination {statistics.median(cd):.3f} s")


if __name__ == "__main__":
    main()
