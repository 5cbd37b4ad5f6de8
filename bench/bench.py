#!/usr/bin/env python3
"""dmsnap benchmarks. Every figure is a ratio against a reference measured in
the same run (the machines are shared and noisy), medians of --runs runs, each
on fresh images and a fresh server (first writes are first writes).

Groups (see bench/RESULTS.md for a recorded run):
  nbd   fio --ioengine=nbd (libnbd): dmsnap serve (origin with 0/1/2/4
        snapshots, a snapshot; 4 KiB and 16 KiB chunks) vs qemu-nbd serving
        the raw file; qemu-nbd serving a qcow2 overlay on it stands for
        "writes to a snapshot" in qemu. Sequential 1 MiB writes (QD4), random
        4 KiB writes QD16 (first writes and rewrites), sequential reads.
  fuse  dmsnap serve --fuse, a loop device (direct I/O) over the FUSE file:
        sequential 1 MiB writes buffered + fsync and O_DIRECT, mkfs.ext2;
        vs the same on a loop device over the raw file. `serve` keeps the
        images in the host page cache unless --direct (one row has it).
  merge dmsnap merge of SIZE of exceptions (sequential; scattered: at most
        64 MiB), cold cache, vs a plain copy of the same number of bytes (dd,
        cold cache, fsync), the two alternated. Timed until the merge is
        complete (process start, activation, loading the COW included);
        "whole command" adds the manifest update and the COW file deletion.
  load  metadata load of a COW with 1,000,000 exceptions vs a sequential read
        of the same bytes (dmsnap bench load); in-core memory per exception
        vs the 16-byte on-disk record (dmsnap bench memory).

Usage: bench/bench.py [--runs 3] [--size 256M] [--quick] [--groups nbd fuse merge load]
                      [--only SUBSTRING...] [--json FILE]
Needs: root (loop devices), fio with the nbd engine, qemu-nbd, qemu-img,
e2fsprogs, util-linux, /dev/fuse; dmsnap built: cargo build --release.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMSNAP = Path(os.environ.get("DMSNAP", ROOT / "target" / "release" / "dmsnap"))

# The targets: (group, target name) -> minimum ratio.
GOALS = {
    ("nbd: sequential 1 MiB writes QD4", "dmsnap snapshot, 4k (full chunks)"): 0.85,
    ("nbd: sequential 1 MiB writes QD4", "dmsnap origin, 1 snap 4k"): 0.45,
    ("nbd: sequential 1 MiB writes QD4", "dmsnap origin, 4 snaps 4k"): 0.16,
    ("nbd: sequential 1 MiB writes QD4", "dmsnap origin, 0 snaps"): 1.0,
    ("nbd: random 4 KiB writes QD16", "dmsnap snapshot 4k, first"): 0.7,
    ("merge", "sequential exceptions"): 0.8,
    ("merge", "scattered exceptions"): 0.8,
    ("load", "1M exceptions, buffered"): 0.8,
    ("load", "1M exceptions, O_DIRECT"): 0.8,
}


def run(cmd, **kw):
    try:
        return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({e.returncode}): {e.stderr.strip()[-2000:]}") from None


def parse_size(s):
    units = {"k": 10, "m": 20, "g": 30}
    s = s.strip().lower().rstrip("ib")
    if s and s[-1] in units:
        return int(s[:-1]) << units[s[-1]]
    return int(s)


def drop_cache(path):
    """Write back and evict one file's pages (not the whole machine's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loadavg():
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class Server:
    """A running NBD server (dmsnap serve or qemu-nbd) on a Unix socket."""

    def __init__(self, argv, sock, ready_line=None):
        self.sock = sock
        self.p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        if ready_line:
            while True:
                line = self.p.stdout.readline()
                if not line:
                    self.stop()
                    raise RuntimeError(f"{argv[0]} did not start")
                if line.strip() == ready_line:
                    break
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


class Loop:
    """A loop device over a file (direct I/O when the kernel allows it)."""

    def __init__(self, path):
        try:
            self.dev = run(["losetup", "--find", "--show", "--direct-io=on", path]).stdout.strip()
        except RuntimeError:
            self.dev = run(["losetup", "--find", "--show", path]).stdout.strip()

    def stop(self):
        for _ in range(50):
            if subprocess.run(["losetup", "-d", self.dev], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)


class Setup:
    """What a job runs against: .uri(export) for NBD, .path for a block
    device; stop() tears it all down."""

    def __init__(self, server=None, loop=None, extra=()):
        self.server, self.loop, self.extra = server, loop, list(extra)

    def uri(self, export):
        return self.server.uri(export)

    @property
    def path(self):
        return self.loop.dev

    def stop(self):
        if self.loop:
            self.loop.stop()
        for e in self.extra:
            e()
        if self.server:
            self.server.stop()


def fio(rw, bs, size, iodepth=1, uri=None, path=None, direct=False, fsync_end=True, randommap=True):
    """Run one fio job; returns MiB/s."""
    argv = ["fio", "--name=b", "--output-format=json", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
            f"--iodepth={iodepth}", "--randrepeat=0", "--group_reporting"]
    if not randommap:
        argv.append("--norandommap")
    if uri:
        argv += ["--ioengine=nbd", f"--uri={uri}"]
    else:
        argv += ["--ioengine=psync" if iodepth == 1 else "--ioengine=libaio", f"--filename={path}",
                 f"--direct={1 if direct else 0}"]
    if fsync_end:
        argv.append("--end_fsync=1")
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
        self.template = None
        # (group, target, reference, ratio, value, ref value, unit)
        self.results = []
        self.load = [loadavg()]

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- images ----------------------------------------------------------
    def fresh_file(self, name, fill=True):
        """A SIZE file; filled with real (non-zero) data from a template so
        copies are real copies, not holes."""
        p = self.dir / name
        if p.exists():
            p.unlink()
        if not fill:
            with open(p, "wb") as f:
                f.truncate(self.size)
            return p
        if self.template is None:
            self.template = self.dir / "template.img"
            run(["fio", "--name=fill", f"--filename={self.template}", "--rw=write", "--bs=1M",
                 f"--size={self.size}", "--ioengine=psync", "--end_fsync=1", "--output-format=terse",
                 "--refill_buffers"])
        shutil.copyfile(self.template, p)
        drop_cache(p)
        return p

    # ---- setups ----------------------------------------------------------
    def dmsnap_pool(self, nsnap, chunk="4k"):
        pool = self.dir / "pool"
        shutil.rmtree(pool, ignore_errors=True)
        origin = self.fresh_file("origin.img")
        run([DMSNAP, "create", pool, "--origin", origin])
        for i in range(nsnap):
            run([DMSNAP, "snapshot", "create", pool, f"s{i}", "--chunk-size", chunk])
        return pool

    def dmsnap_nbd(self, nsnap, chunk="4k"):
        pool = self.dmsnap_pool(nsnap, chunk)
        return Setup(Server([DMSNAP, "serve", pool], str(pool / "nbd.sock"), ready_line="ready"))

    def dmsnap_fuse(self, nsnap, export, chunk="4k", direct=False):
        pool = self.dmsnap_pool(nsnap, chunk)
        mnt = self.dir / "mnt"
        mnt.mkdir(exist_ok=True)
        argv = [DMSNAP, "serve", pool, "--fuse", mnt] + (["--direct"] if direct else [])
        s = Server(argv, str(pool / "nbd.sock"), ready_line="ready")
        try:
            lp = Loop(mnt / export)
        except Exception:
            s.stop()
            raise
        return Setup(s, lp)

    def raw_loop(self):
        return Setup(loop=Loop(self.fresh_file("raw.img")))

    def _qsock(self):
        sock = str(self.dir / "q.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        return sock

    def qemu_raw(self):
        img = self.fresh_file("qraw.img")
        sock = self._qsock()
        return Setup(Server(["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", sock, "-x", "origin",
                             "--cache=writeback", img], sock))

    def qemu_overlay(self, cluster="64k"):
        base = self.fresh_file("qbase.img")
        ov = self.dir / "overlay.qcow2"
        if ov.exists():
            ov.unlink()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b", base,
             "-F", "raw", ov])
        sock = self._qsock()
        return Setup(Server(["qemu-nbd", "-t", "-e", "8", "-f", "qcow2", "-k", sock, "-x", "origin",
                             "--cache=writeback", ov], sock))

    # ---- measurement -----------------------------------------------------
    def measure(self, make, job):
        """Median of `job(setup)` over fresh setups."""
        vals = []
        for _ in range(self.args.runs):
            s = make()
            try:
                vals.append(job(s))
            finally:
                s.stop()
        return statistics.median(vals)

    def record(self, group, name, ref_name, v, ref, unit="MiB/s"):
        ratio = v / ref if ref else float("nan")
        self.results.append((group, name, ref_name, ratio, v, ref, unit))
        goal = GOALS.get((group, name))
        mark = "" if goal is None else f"  (goal >= {goal}: {'met' if ratio >= goal else 'NOT met'})"
        print(f"  {name:<36} {ratio:6.2f}x of {ref_name:<16} ({v:9.2f} vs {ref:9.2f} {unit}){mark}",
              flush=True)

    def workload(self, group, job, ref_name, ref_make, targets, unit="MiB/s"):
        wanted = [t for t in targets if not self.args.only or any(o in t[0] for o in self.args.only)]
        if not wanted:
            return
        print(f"{group}:  [load {loadavg()}]", flush=True)
        ref = self.measure(ref_make, job)
        self.record(group, ref_name, ref_name, ref, ref, unit)
        for name, make, j in wanted:
            self.record(group, name, ref_name, self.measure(make, j or job), ref, unit)

    # ---- groups ----------------------------------------------------------
    def group_nbd(self):
        size = self.size
        rsize = min(size, 32 << 20)

        def nbd(export, fn):
            return lambda s: fn(s.uri(export))

        seq = lambda uri: fio("write", "1M", size, iodepth=4, uri=uri)
        rnd = lambda uri: fio("randwrite", "4k", rsize, iodepth=16, uri=uri)

        def rnd_rewrite(uri):
            rnd(uri)
            return rnd(uri)

        rd = lambda uri: fio("read", "1M", size, iodepth=4, uri=uri, fsync_end=False)

        def rd_after_write(uri):
            seq(uri)
            return rd(uri)

        P = lambda n, c="4k": (lambda: self.dmsnap_nbd(n, c))
        self.workload("nbd: sequential 1 MiB writes QD4", nbd("origin", seq), "qemu-nbd raw", self.qemu_raw, [
            ("dmsnap origin, 0 snaps", P(0), None),
            ("dmsnap origin, 1 snap 4k", P(1), None),
            ("dmsnap origin, 2 snaps 4k", P(2), None),
            ("dmsnap origin, 4 snaps 4k", P(4), None),
            ("dmsnap origin, 1 snap 16k", P(1, "16k"), None),
            ("dmsnap origin, 4 snaps 16k", P(4, "16k"), None),
            ("dmsnap snapshot, 4k (full chunks)", P(1), nbd("s0", seq)),
            ("dmsnap snapshot, 16k (full chunks)", P(1, "16k"), nbd("s0", seq)),
            ("qemu-nbd qcow2 overlay", self.qemu_overlay, None),
        ])
        self.workload("nbd: random 4 KiB writes QD16", nbd("origin", rnd), "qemu-nbd raw", self.qemu_raw, [
            ("dmsnap origin, 0 snaps", P(0), None),
            ("dmsnap origin 1 snap 4k, first", P(1), None),
            ("dmsnap origin 1 snap 4k, rewrite", P(1), nbd("origin", rnd_rewrite)),
            ("dmsnap snapshot 4k, first", P(1), nbd("s0", rnd)),
            ("dmsnap snapshot 4k, rewrite", P(1), nbd("s0", rnd_rewrite)),
            ("dmsnap snapshot 16k, first", P(1, "16k"), nbd("s0", rnd)),
            ("qemu-nbd qcow2 overlay, first", self.qemu_overlay, None),
            ("qemu-nbd qcow2 overlay, rewrite", self.qemu_overlay, nbd("origin", rnd_rewrite)),
        ])
        self.workload("nbd: sequential 1 MiB reads QD4", nbd("origin", rd), "qemu-nbd raw", self.qemu_raw, [
            ("dmsnap origin, 1 snap", P(1), None),
            ("dmsnap snapshot, unchanged", P(1), nbd("s0", rd)),
            ("dmsnap snapshot, all in COW", P(1), nbd("s0", rd_after_write)),
            ("qemu-nbd qcow2 overlay", self.qemu_overlay, None),
        ])

    def group_fuse(self):
        size = self.size
        buffered = lambda s: fio("write", "1M", size, path=s.path, direct=False)
        direct = lambda s: fio("write", "1M", size, path=s.path, direct=True, fsync_end=False)

        def mkfs(s):
            t = time.monotonic()
            run(["mkfs.ext2", "-q", "-F", s.path])
            return 1.0 / (time.monotonic() - t)

        for wname, job, unit in [("seq 1 MiB writes, buffered+fsync", buffered, "MiB/s"),
                                 ("seq 1 MiB writes, O_DIRECT", direct, "MiB/s"),
                                 ("mkfs.ext2", mkfs, "1/s")]:
            F = lambda n, e, c="4k", d=False: (lambda: self.dmsnap_fuse(n, e, c, d))
            self.workload(f"fuse+loop: {wname}", job, "loop on raw file", self.raw_loop, [
                ("dmsnap origin, 0 snaps", F(0, "origin"), None),
                # serve --direct: no host page cache under the FUSE file
                # either, as under the reference's loop device.
                ("dmsnap origin, 0 snaps, --direct", F(0, "origin", d=True), None),
                ("dmsnap origin, 1 snap 4k", F(1, "origin"), None),
                ("dmsnap origin, 2 snaps 4k", F(2, "origin"), None),
                ("dmsnap origin, 4 snaps 4k", F(4, "origin"), None),
                ("dmsnap origin, 1 snap 16k", F(1, "origin", "16k"), None),
                ("dmsnap origin, 4 snaps 16k", F(4, "origin", "16k"), None),
                ("dmsnap snapshot, 4k", F(1, "s0"), None),
                ("dmsnap snapshot, 16k", F(1, "s0", "16k"), None),
            ], unit)

    def merge_once(self, scattered, size):
        """An offline `dmsnap merge` of `size` bytes of exceptions: seconds
        until the merge is complete (durable on the origin, records
        cleared: its `merge complete` log line), and until the command
        returns (it then also updates the manifest and deletes the COW
        file: 60-250 ms for 257 MiB on this ext4 mounted with `discard`,
        work a copy does not do)."""
        s = self.dmsnap_nbd(1)
        try:
            uri = s.uri("origin")
            if scattered:
                # Every 4 KiB chunk once, in random order: allocation order
                # (the COW) and origin order disagree everywhere.
                fio("randwrite", "4k", size, iodepth=16, uri=uri)
            else:
                fio("write", "1M", size, iodepth=4, uri=uri)
        finally:
            s.stop()
        pool = self.dir / "pool"
        for f in ("origin.img", "pool/s0.cow"):
            drop_cache(self.dir / f)
        env = dict(os.environ, RUST_LOG="dmsnap::snap::merge=info", NO_COLOR="1")
        t0, t = time.time(), time.monotonic()
        out = run([DMSNAP, "merge", pool, "s0"], env=env)
        total = time.monotonic() - t
        log = re.sub(r"\x1b\[[0-9;]*m", "", out.stderr)
        m = re.search(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z .*merge complete", log, re.M)
        if not m:
            return total, total
        done = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
        return min(done.timestamp() - t0, total), total

    def copy_once(self, size):
        """Seconds of a plain copy of `size` bytes: dd, cold cache, fsync."""
        src, dst = self.fresh_file("copy-src.img"), self.fresh_file("copy-dst.img")
        t = time.monotonic()
        run(["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={size >> 20}",
             "conv=notrunc,fsync", "status=none"])
        return time.monotonic() - t

    def group_merge(self):
        if self.args.only and not any(o in "merge" for o in self.args.only):
            return
        print(f"merge:  [load {loadavg()}]", flush=True)
        # Scattered: every 4 KiB chunk of at most 64 MiB written once in
        # random order through the origin (setting that up is slow: each
        # write is a first write), so the COW's order and the origin's differ.
        # Each merge is compared with a plain copy of the same number of
        # bytes (a copy's fixed costs weigh more on 64 MiB than on 256 MiB),
        # the two measured alternately so both see the same machine.
        refs = {}
        for name, sc, size in [("sequential exceptions", False, self.size),
                               ("scattered exceptions", True, min(self.size, 64 << 20))]:
            copies, merges = [], []
            for _ in range(self.args.runs):
                copies.append(self.copy_once(size))
                merges.append(self.merge_once(sc, size))
            mib = size / (1 << 20)
            ref = mib / statistics.median(copies)
            refs.setdefault(size, []).extend(copies)
            vs = f"plain copy {mib:.0f} MiB"
            self.record("merge", name, vs, mib / statistics.median(m[0] for m in merges), ref)
            self.record("merge", f"{name}, whole command", vs, mib / statistics.median(m[1] for m in merges), ref)
        for size, copies in sorted(refs.items(), reverse=True):
            mib = size / (1 << 20)
            ref = mib / statistics.median(copies)
            self.record("merge", f"plain copy (dd, fsync), {mib:.0f} MiB", f"plain copy {mib:.0f} MiB", ref, ref)

    def group_load(self):
        if self.args.only and not any(o in "load" for o in self.args.only):
            return
        print(f"load:  [load {loadavg()}]", flush=True)
        n = self.args.exceptions
        label = f"{n // 1000000}M" if n % 1000000 == 0 else f"{n}"
        # 4 KiB chunks: 3,907 areas of 4 KiB 1 MiB apart (IOPS-bound);
        # 64 KiB chunks: 245 areas of 64 KiB 256 MiB apart.
        for chunk, suffix in [("4K", ""), ("64K", ", 64 KiB chunks")]:
            out = run([DMSNAP, "bench", "load", "--dir", self.dir, "--exceptions", n,
                       "--runs", self.args.runs, "--chunk-size", chunk])
            j = json.loads(out.stdout)
            for m in j["modes"]:
                self.record("load", f"{label} exceptions{suffix}, {m['mode']}", "sequential read",
                            1.0 / m["load_s"], 1.0 / m["reference_s"], "1/s")
        mem = json.loads(run([DMSNAP, "bench", "memory", "--exceptions", n]).stdout)
        for k, name in [("scattered_bulk_bytes_per_exception", "memory, scattered (bulk load)"),
                        ("scattered_insert_bytes_per_exception", "memory, scattered (inserts)"),
                        ("sequential_bytes_per_exception", "memory, sequential")]:
            # Ratio = on-disk record / in-core bytes (higher is better, like the rest).
            v = mem[k]
            self.results.append(("load", name, "16 B disk record", 16.0 / v, v, 16.0, "B/exception"))
            print(f"  {name:<36} {16.0 / v:6.2f}x of 16 B disk record ({v:.2f} B/exception)", flush=True)
        # Block status of a 1 TiB export with 10M scattered exceptions (1M
        # with --quick): full-range answers per second (capped at 16 Ki
        # extents per context, as the NBD spec allows) against walking the
        # whole table once; and the peak RSS growth while answering.
        bn = 10_000_000 if not self.args.quick else 1_000_000
        bl = f"{bn // 1000000}M"
        j = json.loads(run([DMSNAP, "bench", "block-status", "--dir", self.dir,
                            "--exceptions", bn, "--size", "1T", "--seconds", 2]).stdout)
        self.record("load", f"block status 1 TiB, {bl} exceptions, full range (dirty bitmap)",
                    "full table walk", j["full_range_dirty_rps"], j["table_scan_rps"], "1/s")
        grow = j["rss_growth_during_queries_kib"]
        self.results.append(("load", f"block status 1 TiB, {bl} exceptions, peak RSS growth",
                             "RSS after load", grow / j["rss_after_load_kib"], grow,
                             j["rss_after_load_kib"], "KiB"))
        print(f"  block status peak RSS growth: {grow} KiB (RSS after load {j['rss_after_load_kib']} KiB); "
              f"4 GiB requests: {j['random_4g_dirty_rps']:.0f}/s, three contexts full range: "
              f"{j['full_range_three_contexts_rps']:.0f}/s", flush=True)

    def go(self):
        for g in self.args.groups:
            getattr(self, f"group_{g}")()
            self.load.append(loadavg())

    def table(self):
        host = os.uname()
        cpu = ""
        try:
            cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        lines = [
            f"dmsnap benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, {host.nodename}, Linux {host.release}, "
            f"{os.cpu_count()} cores ({cpu}), size {self.size >> 20} MiB, median of {self.args.runs}",
            f"load average during the run: {' -> '.join(self.load)}",
            "",
            "| workload | target | ratio | vs | value | reference | unit | goal |",
            "|---|---|---:|---|---:|---:|---|---|",
        ]
        for g, n, r, ratio, v, rv, unit in self.results:
            goal = GOALS.get((g, n))
            gs = "" if goal is None else f"≥ {goal} {'met' if ratio >= goal else '**not met**'}"
            lines.append(f"| {g} | {n} | {ratio:.2f} | {r} | {v:.2f} | {rv:.2f} | {unit} | {gs} |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--exceptions", type=int, default=1_000_000, help="for the load benchmark")
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"),
                    help="where to put the images (a real disk, not tmpfs)")
    ap.add_argument("--groups", nargs="*", default=["nbd", "fuse", "merge", "load"],
                    choices=["nbd", "fuse", "merge", "load"])
    ap.add_argument("--only", nargs="*", help="run only targets whose name contains one of these")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--quick", action="store_true",
                    help="1 run of 32 MiB, 100k exceptions: a smoke test, not a measurement")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.size, args.exceptions = 1, 32 << 20, 100_000
    if not DMSNAP.exists():
        sys.exit(f"build first: cargo build --release ({DMSNAP} missing)")
    for tool in ["fio", "qemu-nbd", "qemu-img", "losetup", "mkfs.ext2", "dd"]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install fio qemu-utils util-linux e2fsprogs coreutils)")
    b = Bench(args)
    try:
        b.go()
    finally:
        b.cleanup()
        t = b.table()
        print()
        print(t)
        if args.json:
            Path(args.json).write_text(json.dumps({"table": t, "results": b.results}, indent=1))


if __name__ == "__main__":
    main()
