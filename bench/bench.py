#!/usr/bin/env python3
"""dmsnap benchmarks: every figure is a ratio against a reference measured in
the same run (these machines are noisy), medians of several runs.

Workloads go through fio's nbd engine (libnbd) to:
  - dmsnap serve: the origin with 0, 1, 2, 4 snapshots, and a snapshot;
  - qemu-nbd serving the raw file (the reference for NBD figures);
  - qemu-nbd serving a qcow2 overlay on it ("writes to a snapshot" in qemu);
and, as a floor, fio on the raw file directly.

Usage: bench/bench.py [--runs 3] [--size 256M] [--quick] [--only NAME...]
Needs: fio (with the nbd engine), qemu-nbd, qemu-img; dmsnap built in release.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMSNAP = ROOT / "target" / "release" / "dmsnap"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def parse_size(s):
    units = {"k": 10, "m": 20, "g": 30}
    s = s.strip().lower().rstrip("ib")
    if s and s[-1] in units:
        return int(s[:-1]) << units[s[-1]]
    return int(s)


class Server:
    """A running NBD server (dmsnap serve or qemu-nbd) on a Unix socket."""

    def __init__(self, argv, sock, ready_line=None):
        self.sock = sock
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if ready_line:
            line = self.p.stdout.readline().strip()
            if line != ready_line:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        else:
            for _ in range(500):
                if os.path.exists(sock):
                    break
                time.sleep(0.01)
            time.sleep(0.05)

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def fio(target, rw, bs, size, iodepth=1, direct=False, fsync_end=True, engine="nbd", extra=()):
    """Run one fio job; returns MiB/s (write or read)."""
    argv = [
        "fio", "--name=b", "--output-format=json", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
        f"--iodepth={iodepth}", "--randrepeat=0", "--norandommap", "--group_reporting",
    ]
    if engine == "nbd":
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += [f"--ioengine={engine}", f"--filename={target}", f"--direct={1 if direct else 0}"]
    if fsync_end:
        argv.append("--end_fsync=1")
    argv += list(extra)
    out = run(argv).stdout
    j = json.loads(out[out.index("{"):])
    job = j["jobs"][0]
    side = "read" if "read" in rw and "write" not in rw else "write"
    return job[side]["bw_bytes"] / (1 << 20)


class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size
        self.dir = Path(tempfile.mkdtemp(prefix="dmsnap-bench-", dir=args.dir))
        self.results = []  # (group, name, reference name, median ratio, median MiB/s, ref MiB/s)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def fresh_file(self, name, fill=False):
        p = self.dir / name
        if p.exists():
            p.unlink()
        with open(p, "wb") as f:
            f.truncate(self.size)
        if fill:
            # Real data in the origin so copies are real copies, not holes.
            run(["fio", "--name=fill", f"--filename={p}", "--rw=write", "--bs=1M", f"--size={self.size}",
                 "--ioengine=psync", "--end_fsync=1", "--output-format=terse"])
        return p

    # ---- servers -------------------------------------------------------
    def dmsnap_pool(self, nsnap, chunk="4k", store="P"):
        pool = self.dir / "pool"
        shutil.rmtree(pool, ignore_errors=True)
        origin = self.fresh_file("origin.img", fill=True)
        run([str(DMSNAP), "create", str(pool), "--origin", str(origin)])
        for i in range(nsnap):
            run([str(DMSNAP), "snapshot", "create", str(pool), f"s{i}", "--chunk-size", chunk, "--store", store])
        s = Server([str(DMSNAP), "serve", str(pool)], str(pool / "nbd.sock"), ready_line="ready")
        return s

    def qemu_raw(self):
        img = self.fresh_file("qraw.img", fill=True)
        sock = str(self.dir / "q.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        return Server(["qemu-nbd", "-f", "raw", "-k", sock, "-x", "origin", "--cache=writeback", str(img)], sock)

    def qemu_overlay(self, cluster="64k"):
        base = self.fresh_file("qbase.img", fill=True)
        ov = self.dir / "overlay.qcow2"
        if ov.exists():
            ov.unlink()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", str(base), "-F", "raw", str(ov)])
        sock = str(self.dir / "q.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        return Server(["qemu-nbd", "-f", "qcow2", "-k", sock, "-x", "origin", "--cache=writeback", str(ov)], sock)

    # ---- measurement ---------------------------------------------------
    def measure(self, make_server, export, job):
        """Median MiB/s of `job` over fresh servers (first writes each time)."""
        vals = []
        for _ in range(self.args.runs):
            s = make_server()
            try:
                vals.append(job(s.uri(export)))
            finally:
                s.stop()
        return statistics.median(vals)

    def compare(self, group, name, make_server, export, ref_name, ref_vals, job):
        v = self.measure(make_server, export, job)
        ratio = v / ref_vals if ref_vals else float("nan")
        self.results.append((group, name, ref_name, ratio, v, ref_vals))
        print(f"  {group:<34} {name:<32} {ratio:6.2f}x of {ref_name:<18} ({v:8.1f} vs {ref_vals:8.1f} MiB/s)", flush=True)

    def workload(self, group, job, targets):
        print(f"{group}:", flush=True)
        ref = self.measure(self.qemu_raw, "origin", job)
        self.results.append((group, "qemu-nbd raw", "qemu-nbd raw", 1.0, ref, ref))
        for name, make, export in targets:
            if self.args.only and not any(o in name for o in self.args.only):
                continue
            self.compare(group, name, make, export, "qemu-nbd raw", ref, job)

    def go(self):
        size = self.size
        seq = lambda uri: fio(uri, "write", "1M", size, iodepth=4)
        rnd = lambda uri: fio(uri, "randwrite", "4k", min(size, 64 << 20), iodepth=16)
        rd = lambda uri: fio(uri, "read", "1M", size, iodepth=4, fsync_end=False)

        # Floor: the file itself, same workload, no NBD.
        raw = self.fresh_file("floor.img", fill=True)
        floor = statistics.median(
            fio(str(raw), "write", "1M", size, iodepth=1, engine="psync", direct=True) for _ in range(self.args.runs))
        print(f"raw file, O_DIRECT sequential 1 MiB writes: {floor:.1f} MiB/s (floor reference)")

        self.workload("sequential 1 MiB writes (QD4)", seq, [
            ("dmsnap origin, 0 snapshots", lambda: self.dmsnap_pool(0), "origin"),
            ("dmsnap origin, 1 snap (first)", lambda: self.dmsnap_pool(1), "origin"),
            ("dmsnap origin, 2 snaps", lambda: self.dmsnap_pool(2), "origin"),
            ("dmsnap origin, 4 snaps", lambda: self.dmsnap_pool(4), "origin"),
            ("dmsnap snapshot (full chunks)", lambda: self.dmsnap_pool(1), "s0"),
            ("dmsnap snapshot, 16k chunks", lambda: self.dmsnap_pool(1, chunk="16k"), "s0"),
            ("qemu-nbd qcow2 overlay", self.qemu_overlay, "origin"),
        ])
        self.workload("random 4 KiB writes (QD16, first)", rnd, [
            ("dmsnap origin, 0 snapshots", lambda: self.dmsnap_pool(0), "origin"),
            ("dmsnap origin, 1 snap", lambda: self.dmsnap_pool(1), "origin"),
            ("dmsnap snapshot", lambda: self.dmsnap_pool(1), "s0"),
            ("qemu-nbd qcow2 overlay", self.qemu_overlay, "origin"),
        ])
        self.workload("sequential 1 MiB reads (QD4)", rd, [
            ("dmsnap origin, 1 snap", lambda: self.dmsnap_pool(1), "origin"),
            ("dmsnap snapshot (unchanged)", lambda: self.dmsnap_pool(1), "s0"),
            ("qemu-nbd qcow2 overlay", self.qemu_overlay, "origin"),
        ])

    def table(self):
        host = os.uname()
        print()
        print(f"dmsnap benchmark, {time.strftime('%Y-%m-%d')}, {host.nodename} {host.release}, "
              f"{os.cpu_count()} cores, size {self.size >> 20} MiB, median of {self.args.runs}")
        print(f"| workload | target | ratio | vs | MiB/s | ref MiB/s |")
        print(f"|---|---|---|---|---|---|")
        for g, n, r, ratio, v, rv in self.results:
            print(f"| {g} | {n} | {ratio:.2f} | {r} | {v:.1f} | {rv:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"),
                    help="where to put the images (a real disk, not tmpfs)")
    ap.add_argument("--only", nargs="*", help="run only targets whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="1 run of 64 MiB: a smoke test, not a measurement")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.size = 1, 64 << 20
    if not DMSNAP.exists():
        sys.exit(f"build first: cargo build --release ({DMSNAP} missing)")
    b = Bench(args)
    try:
        b.go()
    finally:
        b.cleanup()
    b.table()


if __name__ == "__main__":
    main()
