#!/usr/bin/env python3
"""livemig against QEMU 7.2, the same scenarios alternated in one run.

  bench.py [--runs N] [--size-mib M] [--out DIR] [--only a,b,...]

Scenarios (1 GiB of RAM unless --size-mib says otherwise; loopback TCP):
  a  random data, unthrottled, destination RAM prefaulted
  b  random data, unthrottled, destination not prefaulted
  c  all-zero RAM, unthrottled (the image is a sparse file: holes)
  z  all-zero RAM, unthrottled, the image written out (no holes): every
     page is read on both sides, so this times the zero scan itself
  d  random data at a 128 MiB/s limit: achieved rate against the limit
  e  a guest dirtying memory while it migrates (minivmm, KVM): downtime
     against the limit, expected downtime against actual (QEMU omitted:
     -machine none has no CPU to run a comparable guest)
  f  XBZRLE encode/decode throughput (livemig only; QEMU has no standalone
     encoder to time)

livemig's side is c-tests/build/qemu_peer (source and destination); QEMU's
is qemu-system-x86_64 -machine none -nodefaults -S -m SIZE with RAM from a
memory-backend-file holding the same content, driven over QMP. Each run of
a scenario is made with livemig and with QEMU alternately. Reported per
side: median and min-max of total time, downtime, bytes on the wire (RAM
bytes, as query-migrate counts them), throughput, CPU seconds of source +
destination processes; and the livemig/QEMU ratio of the medians.
Writes DIR/results.csv and DIR/results.md.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
PEER = os.path.join(TOP, "c-tests/build/qemu_peer")
MINIVMM = os.path.join(TOP, "c-tests/build/minivmm")
QEMU = "qemu-system-x86_64"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_cpu(pid):
    """CPU seconds (user + system) a running process has used so far, all
    of its threads, ended ones included (/proc/PID/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait4(p, timeout=600):
    """Waits for a Popen child; returns (exit status, CPU seconds)."""
    end = time.time() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, ru.ru_utime + ru.ru_stime
        if time.time() > end:
            p.kill()
            raise RuntimeError("process did not finish in time")
        time.sleep(0.005)


class Qmp:
    def __init__(self, path):
        end = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.02)
        # Every reply within two minutes: a QEMU that stops answering
        # fails the run instead of hanging it.
        self.s.settimeout(120)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r.get("return")

    def wait(self, timeout=600):
        end = time.time() + timeout
        while True:
            r = self.cmd("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                return r
            if time.time() > end:
                raise RuntimeError("QEMU migration did not finish")
            time.sleep(0.01)


# CPUs the source and destination processes run on (both sides alike);
# None: wherever the scheduler puts them.
PIN = None


def pinned(args, side):
    """`args` prefixed with taskset for `side` ("src"/"dst") when pinning."""
    if PIN is None:
        return args
    return ["taskset", "-c", str(PIN[0] if side == "src" else PIN[1])] + args


def qemu_proc(tmp, name, img, share, extra):
    sock = os.path.join(tmp, f"{name}.qmp")
    if os.path.exists(sock):
        os.unlink(sock)
    args = [QEMU, "-machine", "none,memory-backend=m", "-nodefaults", "-nographic", "-S",
            "-m", f"{SIZE_MIB}M", "-object",
            f"memory-backend-file,id=m,size={SIZE_MIB}M,mem-path={img},share={'on' if share else 'off'}"
            + (",prealloc=on" if "prealloc" in extra else ""),
            "-qmp", f"unix:{sock},server=on,wait=off"] + [e for e in extra if e != "prealloc"]
    p = subprocess.Popen(pinned(args, name), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, Qmp(sock)


def warm(img):
    """Reads the source image through, so that every run (either side)
    starts with it in the page cache, whatever the kernel reclaimed since."""
    with open(img, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def run_qemu(tmp, img, prefault, speed):
    """One QEMU → QEMU migration; returns the figures."""
    warm(img)
    port = free_port()
    dimg = os.path.join(tmp, "qemu-dst.img")
    with open(dimg, "wb") as f:
        f.truncate(SIZE_MIB << 20)
    d, dq = qemu_proc(tmp, "dst", dimg, False, (["prealloc"] if prefault else []) + ["-incoming", f"tcp:127.0.0.1:{port}"])
    s, sq = qemu_proc(tmp, "src", img, False, [])
    sq.cmd("migrate-set-parameters", **{"max-bandwidth": speed if speed else 100 << 30, "downtime-limit": 300})
    # CPU of the migration alone: from here to the end (both processes
    # are set up and the destination prefaulted).
    ws, wd = proc_cpu(s.pid), proc_cpu(d.pid)
    sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    r = sq.wait()
    dq.wait()
    ws, wd = proc_cpu(s.pid) - ws, proc_cpu(d.pid) - wd
    sq.cmd("quit")
    dq.cmd("quit")
    _, cs = wait4(s)
    _, cd = wait4(d)
    os.unlink(dimg)
    if r["status"] != "completed":
        raise RuntimeError(f"QEMU migration: {r}")
    ram = r["ram"]
    return {"total_ms": r["total-time"], "downtime_ms": r["downtime"], "bytes": ram["transferred"],
            "precopy_bytes": ram["transferred"] - ram["downtime-bytes"], "cpu_s": cs + cd, "cpu_src_s": cs, "cpu_dst_s": cd,
            "mig_cpu_s": ws + wd}


def run_livemig(tmp, img, prefault, speed, extra_src=()):
    """One qemu_peer → qemu_peer migration; returns the figures."""
    if img:
        warm(img)
    pf = os.path.join(tmp, "port")
    if os.path.exists(pf):
        os.unlink(pf)
    dargs = [PEER, "--incoming", "tcp:127.0.0.1:0", "--port-file", pf, "--ram-size", f"{SIZE_MIB}M"]
    if prefault:
        dargs.append("--prefault")
    d = subprocess.Popen(pinned(dargs, "dst"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    while not (os.path.exists(pf) and open(pf).read().strip()):
        if time.time() > end or d.poll() is not None:
            raise RuntimeError("livemig destination did not start")
        time.sleep(0.005)
    port = open(pf).read().strip()
    sargs = [PEER, "--migrate", f"tcp:127.0.0.1:{port}", "--ram-size", f"{SIZE_MIB}M", "--speed", str(speed),
             "--downtime-ms", "300"] + (["--ram-file", img] if img else []) + list(extra_src)
    s = subprocess.Popen(pinned(sargs, "src"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = s.stdout.read()
    rs, cs = wait4(s)
    dout = d.stdout.read()
    rd, cd = wait4(d)
    if rs or rd:
        raise RuntimeError(f"livemig migration failed: {out}")
    num = lambda k: int(re.search(rf"{k}:?\s+(-?\d+)", out).group(1))
    return {"total_ms": num("total-time"), "downtime_ms": num("downtime"), "bytes": num("transferred"),
            "precopy_bytes": num("transferred") - num("downtime-bytes"), "cpu_s": cs + cd, "cpu_src_s": cs, "cpu_dst_s": cd,
            "mig_cpu_s": (num("cpu-migration-us") + int(re.search(r"cpu-migration-us: (\d+)", dout).group(1))) / 1e6}


def stats(vals):
    return statistics.median(vals), min(vals), max(vals)


def fmt(v, unit=""):
    return f"{v:.3g}{unit}"


def main():
    global SIZE_MIB, PIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(TOP, "c-tests/build/bench"))
    ap.add_argument("--only", default="a,b,c,z,d,e,f")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the scheduler place the processes (default: source and destination on CPUs of their own)")
    ap.add_argument("--runs-e", type=int, default=20, help="runs of (e): a share of runs needs more than 5")
    a = ap.parse_args()
    SIZE_MIB = a.size_mib
    if not a.no_pin and len(os.sched_getaffinity(0)) >= 2:
        PIN = sorted(os.sched_getaffinity(0))[:2]
    only = set(a.only.split(","))
    os.makedirs(a.out, exist_ok=True)
    have_qemu = subprocess.run(["which", QEMU], capture_output=True).returncode == 0
    rows = []
    lines = []

    # The loopback stream pinned as the migrations are: sender on the
    # source's CPU, receiver on the destination's.
    lim = subprocess.run(["cargo", "run", "-q", "--release", "--example", "machine_limits", "--"]
                         + (["--pin", f"{PIN[0]},{PIN[1]}"] if PIN else []), cwd=TOP,
                         capture_output=True, text=True).stdout
    limits = dict(l.split("=") for l in lim.split())
    lines.append(f"machine: {os.cpu_count()} cores; single-thread memcpy {limits['memcpy_GBps']} GB/s; "
                 f"one loopback TCP stream {limits['loopback_tcp_GBps']} GB/s (1 MiB buffer, in cache; "
                 f"{limits['loopback_tcp_ram_GBps']} GB/s moving 1 GiB between faulted-in buffers, "
                 f"for {limits['loopback_tcp_ram_cpu_s']} CPU s of its sender and receiver); "
                 + (f"source processes on CPU {PIN[0]}, destination processes on CPU {PIN[1]} (both sides alike)" if PIN
                    else "processes not pinned"))

    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        rnd = os.path.join(tmp, "random.img")
        zero = os.path.join(tmp, "zero.img")
        with open(rnd, "wb") as f:
            left = SIZE_MIB << 20
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
        with open(zero, "wb") as f:
            f.truncate(SIZE_MIB << 20)
        written = os.path.join(tmp, "zero-written.img")
        with open(written, "wb") as f:
            for _ in range(SIZE_MIB):
                f.write(bytes(1 << 20))
        scen = [("a", "random, unthrottled, prefaulted", rnd, True, 0),
                ("b", "random, unthrottled, not prefaulted", rnd, False, 0),
                ("c", "all zero, unthrottled", zero, False, 0),
                ("z", "all zero written out (no holes: every page read), unthrottled", written, False, 0),
                ("d", "random, 128 MiB/s limit", rnd, False, 128 << 20)]
        for key, title, img, prefault, speed in scen:
            if key not in only:
                continue
            res = {"livemig": [], "qemu": []}
            for i in range(a.runs):
                res["livemig"].append(run_livemig(tmp, img, prefault, speed))
                if have_qemu:
                    res["qemu"].append(run_qemu(tmp, img, prefault, speed))
                print(f"  ({key}) run {i + 1}/{a.runs} done", file=sys.stderr)
            for side in ("livemig", "qemu"):
                for r in res[side]:
                    rows.append({"scenario": key, "side": side, **r})
            lines.append(table(key, title, res, speed, SIZE_MIB))
        if "e" in only:
            lines.append(dirtying(tmp, a.runs_e))
        if "f" in only:
            x = subprocess.run(["cargo", "run", "-q", "--release", "--example", "xbzrle_bench"], cwd=TOP,
                               capture_output=True, text=True).stdout
            lines.append("(f) XBZRLE, one core (livemig; target: encode >= 3 GB/s at 10 % changed)\n\n```\n" + x.strip() + "\n```")

    with open(os.path.join(a.out, "results.csv"), "w") as f:
        f.write("scenario,side,total_ms,downtime_ms,bytes,cpu_s,cpu_src_s,cpu_dst_s,mig_cpu_s\n")
        for r in rows:
            f.write(f"{r['scenario']},{r['side']},{r['total_ms']},{r['downtime_ms']},{r['bytes']},{r['cpu_s']:.3f},"
                    f"{r['cpu_src_s']:.3f},{r['cpu_dst_s']:.3f},{r['mig_cpu_s']:.3f}\n")
    md = "\n\n".join(lines) + "\n"
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)


def table(key, title, res, speed, size_mib):
    out = [f"({key}) {title}, {size_mib} MiB, {len(res['livemig'])} runs each, alternated",
           "", "| | livemig median (min–max) | QEMU 7.2 median (min–max) | livemig/QEMU |", "|---|---|---|---|"]
    def col(side, f):
        if not res[side]:
            return None, "not run (no qemu-system-x86_64)"
        m, lo, hi = stats([f(r) for r in res[side]])
        return m, f"{fmt(m)} ({fmt(lo)}–{fmt(hi)})"
    metrics = [("total time (ms)", lambda r: r["total_ms"]),
               ("downtime (ms)", lambda r: r["downtime_ms"]),
               ("bytes on the wire (MiB)", lambda r: r["bytes"] / 1048576),
               ("throughput (MiB/s)", lambda r: r["bytes"] / 1048576 / max(r["total_ms"], 1) * 1000),
               ("CPU s (source + destination)", lambda r: r["cpu_s"]),
               ("CPU s per GiB", lambda r: r["cpu_s"] / (size_mib / 1024)),
               # The same, counted from the migrate command to the end:
               # without starting the processes, filling or prefaulting
               # their RAM, and tearing it down at exit.
               ("CPU s per GiB, migration only", lambda r: r["mig_cpu_s"] / (size_mib / 1024))]
    for name, f in metrics:
        lm, ls = col("livemig", f)
        qm, qs = col("qemu", f)
        ratio = f"{lm / qm:.2f}" if lm is not None and qm else "–"
        out.append(f"| {name} | {ls} | {qs} | {ratio} |")
    if speed:
        # The limit applies while the VM runs; the stop-and-copy is
        # unthrottled (as in QEMU), so the rate is taken over the pre-copy.
        if res["livemig"]:
            rates = [r["precopy_bytes"] / ((r["total_ms"] - r["downtime_ms"]) / 1000) for r in res["livemig"]]
            m = statistics.median(rates)
            out.append(f"| pre-copy rate, livemig | {m / 1048576:.1f} MiB/s = {100 * (m / speed - 1):+.1f} % against the limit"
                       " | n/a: QEMU 7.2 counts every byte in downtime-bytes | |")
    return "\n".join(out)


def dirtying(tmp, runs):
    """(e): minivmm guest dirtying memory (KVM where available)."""
    out = ["(e) a running guest dirtying memory (minivmm, 256 MiB, guest at 150 MB/s, "
           "unthrottled link, downtime limit 100 ms); QEMU omitted: -machine none runs no guest",
           "", "| run | downtime (ms) | limit (ms) | expected downtime at switchover (ms) | total (ms) | passes |",
           "|---|---|---|---|---|---|"]
    ok = close = 0
    errs, dts = [], []
    for i in range(runs):
        r = subprocess.run([os.path.join(TOP, "c-tests/minivmm/demo.sh"), "--out", os.path.join(tmp, "e"),
                            "--ram", "256", "--dirty-rate", "150", "--speed", "0", "--downtime-ms", "100",
                            "--run-ms", "500"], capture_output=True, text=True)
        txt = r.stdout + r.stderr
        dt = int(re.search(r"downtime:\s+(\d+)", txt).group(1))
        tot = int(re.search(r"total time:\s+(\d+)", txt).group(1))
        passes = int(re.search(r"passes:\s+(\d+)", txt).group(1))
        exp_v = int(re.search(r"expected downtime at switchover:\s+(-?\d+)", txt).group(1))
        ok += dt <= 100
        close += exp_v > 0 and abs(exp_v - dt) <= 0.25 * dt
        errs.append(abs(exp_v - dt))
        dts.append(dt)
        out.append(f"| {i + 1} | {dt} | 100 | {exp_v} | {tot} | {passes} |")
    out.append(f"\ndowntime within the limit in {ok}/{runs} runs (median {statistics.median(dts):g} ms, max {max(dts)} ms); "
               f"expected downtime within ±25 % of actual in {close}/{runs} runs; "
               f"|expected − actual| median {statistics.median(errs):g} ms, max {max(errs)} ms")
    return "\n".join(out)


if __name__ == "__main__":
    main()
