#!/usr/bin/python3
"""Soak dmsnap: random NBD clients on the origin and snapshots, snapshot
create/remove, merges, PO overflows and full P stores (small COWs), restarts
via SIGTERM and kill -9, checked against an in-memory model at every restart.

    bench/soak.py --minutes N [--seed S] [--without FAULT,...] [--dmsnap PATH]

Clients are libnbd (Debian: python3-libnbd) over the daemon's Unix socket.
Requests go out in batches of up to 8 in parallel on several connections; a
batch never has two requests on overlapping bytes of one export where the
order would matter, so the model (origin bytes + per snapshot the 4 KiB
blocks it holds apart from the origin, i.e. copy-on-write itself) knows the
outcome. Before every restart each export is FLUSHed and writing stops, so
everything written must survive a kill -9. At every check (after each
restart, and at the end): each snapshot's state (`status --json`) is one the
model allows (exact where it can predict it; near a small COW's capacity,
which write fills it is not predictable, so a set), an Invalid state stays
Invalid across restarts, every snapshot the model says readable reads
exactly its model content, and the origin reads its model content.

An operation (NBD request, dmsnap command, daemon stop or start) taking more
than 30 s is a hang: the run stops there, with details. Exit 0 only with no
mismatch and no hang.

Faults (--without to leave some out): po-overflow (PO snapshots on small
COWs written past their end), p-full (P snapshots on small COWs filled by
origin writes: invalidated), merge, kill9, sigterm.
"""

import argparse
import concurrent.futures as cf
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

try:
    import nbd
except ImportError:
    sys.exit("soak.py needs libnbd's Python bindings: apt-get install python3-libnbd "
             "(and run it with /usr/bin/python3)")

HANG = 30.0
BLOCK = 4096
MiB = 1 << 20


class Hang(Exception):
    pass


class Mismatch(Exception):
    pass


def cap_chunks(cow_bytes):
    """Data chunks of a 4 KiB-chunk persistent COW: header, then areas of
    256 records each followed by its 256 data chunks."""
    n = cow_bytes // BLOCK
    rest = n - 1
    areas = -(-rest // 257)
    return rest - areas


class Snap:
    def __init__(self, name, store, chunk, cow_size, small):
        self.name = name
        self.store = store          # "P" | "PO"
        self.chunk = chunk
        self.small = small
        self.cap = cap_chunks(cow_size) if small else None
        self.blocks = {}            # block -> bytes: where it differs from the origin's history
        self.invalid = False        # observed Invalid (sticky)
        self.overflowed = False     # observed a snapshot write refused (PO), until a restart
        self.origin_overfill = False  # an origin write needed a copy past the capacity
        self.merging = False

    def need(self):
        return len(self.blocks)

    def near_full(self):
        return self.small and self.need() >= self.cap - 1

    def over_full(self):
        return self.small and self.need() >= self.cap + 2

    def allowed(self):
        """States the model allows now."""
        if self.merging:
            return {"merging"}
        if self.invalid:
            return {"invalid"}
        if not self.small:
            return {"active"}
        s = set()
        if self.store == "P":
            if self.need() <= self.cap - 1:
                s.add("active")
            elif self.over_full():
                s.add("invalid")
            else:
                s |= {"active", "invalid"}
        else:
            if self.origin_overfill:
                s.add("invalid")
            elif self.need() >= self.cap:
                s |= {"active", "overflow", "invalid"}
            elif self.overflowed:
                s.add("overflow")
            else:
                s.add("active")
            if self.near_full():
                s |= {"active", "overflow", "invalid"}
        return s

    def readable(self):
        return not self.invalid and not self.merging


class Model:
    def __init__(self, size):
        self.size = size
        self.origin = bytearray(size)
        self.snaps = {}

    def snap_read(self, s, off, n):
        out = bytearray(self.origin[off:off + n])
        b0, b1 = off // BLOCK, (off + n - 1) // BLOCK
        for b in range(b0, b1 + 1):
            d = s.blocks.get(b)
            if d is None:
                continue
            lo = max(off, b * BLOCK)
            hi = min(off + n, (b + 1) * BLOCK)
            out[lo - off:hi - off] = d[lo - b * BLOCK:hi - b * BLOCK]
        return bytes(out)

    def snap_content(self, s):
        out = bytearray(self.origin)
        for b, d in s.blocks.items():
            out[b * BLOCK:(b + 1) * BLOCK] = d
        return out

    def capture(self, s, b):
        """Origin block b is about to change: s keeps its old content."""
        if b not in s.blocks:
            if s.small and s.need() >= s.cap + 1 and not s.invalid:
                s.origin_overfill = True
            s.blocks[b] = bytes(self.origin[b * BLOCK:(b + 1) * BLOCK])

    def origin_write(self, off, data):
        for s in self.snaps.values():
            if s.invalid or s.merging:
                continue
            for b in range(off // BLOCK, (off + len(data) - 1) // BLOCK + 1):
                self.capture(s, b)
        self.origin[off:off + len(data)] = data

    def snap_write(self, s, off, data):
        for b in range(off // BLOCK, (off + len(data) - 1) // BLOCK + 1):
            cur = bytearray(s.blocks.get(b) or self.origin[b * BLOCK:(b + 1) * BLOCK])
            lo = max(off, b * BLOCK)
            hi = min(off + len(data), (b + 1) * BLOCK)
            cur[lo - b * BLOCK:hi - b * BLOCK] = data[lo - off:hi - off]
            s.blocks[b] = bytes(cur)


class Soak:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.dir = args.dir or tempfile.mkdtemp(prefix="dmsnap-soak-")
        self.pool = os.path.join(self.dir, "pool")
        self.sock = os.path.join(self.pool, "nbd.sock")
        self.model = Model(args.origin_mib * MiB)
        self.proc = None
        self.handles = {}
        self.pool_exec = cf.ThreadPoolExecutor(max_workers=8)
        self.stats = dict(ops=0, reads=0, writes=0, flushes=0, bytes_written=0, batches=0,
                          snap_create=0, snap_remove=0, merges=0, merges_done=0,
                          restarts_sigterm=0, restarts_kill9=0, checks=0,
                          po_overflows=0, p_invalidations=0, refused_writes=0,
                          mismatches=0, hangs=0)
        self.max_stop = 0.0
        self.next_name = 0
        self.log_lines = []
        self.faults = set(["po-overflow", "p-full", "merge", "kill9", "sigterm"]) - set(args.without)

    # -- helpers -----------------------------------------------------------

    def log(self, msg):
        line = "[%7.1fs] %s" % (time.monotonic() - self.t0, msg)
        self.log_lines.append(line)
        if self.a.verbose:
            print(line, flush=True)

    def mismatch(self, msg):
        self.stats["mismatches"] += 1
        print("MISMATCH: " + msg, flush=True)
        if self.stats["mismatches"] >= 5:
            raise Mismatch(msg)

    def dmsnap(self, *args, check=True):
        t = time.monotonic()
        try:
            r = subprocess.run([self.a.dmsnap] + list(args), capture_output=True, text=True,
                               timeout=HANG)
        except subprocess.TimeoutExpired:
            raise Hang("dmsnap %s did not answer within %d s" % (" ".join(args), HANG))
        dt = time.monotonic() - t
        if check and r.returncode != 0:
            raise Mismatch("dmsnap %s failed (%d): %s" % (" ".join(args), r.returncode, r.stderr.strip()))
        return r, dt

    def status(self):
        r, _ = self.dmsnap("status", self.pool, "--json")
        return {s["name"]: s for s in json.loads(r.stdout)["snapshots"]}

    # -- daemon ------------------------------------------------------------

    def start(self):
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.err = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen([self.a.dmsnap, "serve", self.pool], stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)
        got = []

        def rd():
            got.append(self.proc.stdout.readline())
        t = threading.Thread(target=rd, daemon=True)
        t.start()
        t.join(HANG)
        if not got or got[0].strip() != b"ready":
            raise Hang("dmsnap serve did not print ready within %d s (got %r, exit %r)"
                       % (HANG, got, self.proc.poll()))
        self.handles = {}

    def handle(self, name, i):
        key = (name, i)
        h = self.handles.get(key)
        if h is None:
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(self.sock)
            self.handles[key] = h
        return h

    def close_handles(self):
        for h in self.handles.values():
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles = {}

    def flush_all(self):
        names = ["origin"] + [s.name for s in self.model.snaps.values() if s.readable()]
        futs = []
        for n in names:
            self.handle(n, 0)
            futs.append((n, self.pool_exec.submit(self.nbd_op, "flush", n, 0, 0, None)))
        for n, f in futs:
            err = self.wait(f, "flush %s before a restart" % n)
            s = self.model.snaps.get(n)
            if err is not None and not (s and (s.small or s.invalid)):
                self.mismatch("flush of %s before a restart failed: %s" % (n, err))

    def stop(self, how):
        self.flush_all()
        self.close_handles()
        before = self.status()
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:
            rc = self.proc.wait(HANG)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Hang("the daemon did not end within %d s of %s" % (HANG, how))
        dt = time.monotonic() - t
        self.err.close()
        if how == "sigterm":
            self.max_stop = max(self.max_stop, dt)
            if rc != 0:
                self.mismatch("SIGTERM: the daemon exited %d" % rc)
            if dt > 10:
                self.mismatch("SIGTERM: the daemon took %.1f s to end (> 10 s)" % dt)
        self.stats["restarts_" + ("sigterm" if how == "sigterm" else "kill9")] += 1
        self.log("%s: ended in %.2f s (exit %s)" % (how, dt, rc))
        for s in self.model.snaps.values():
            s.overflowed = False   # overflow is not persisted (kernel)
        return before

    # -- NBD operations ----------------------------------------------------

    def nbd_op(self, op, name, off, n, data, slot=0, fua=False):
        """Runs in a pool thread. Returns None or an error string; for
        reads, (None, bytes)."""
        try:
            h = self.handle(name, slot)
            if op == "read":
                return (None, h.pread(n, off))
            if op == "write":
                h.pwrite(data, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
                return None
            h.flush()
            return None
        except nbd.Error as e:
            return ("errno %s: %s" % (e.errnum, e.string)) if op != "read" else ("errno %s: %s" % (e.errnum, e.string), None)

    def wait(self, fut, what):
        try:
            return fut.result(timeout=HANG)
        except cf.TimeoutError:
            raise Hang("%s: no reply within %d s" % (what, HANG))

    def io_batch(self):
        m = self.model
        exports = ["origin"] + [s.name for s in m.snaps.values() if not s.merging and not s.invalid]
        k = self.rng.randint(1, 8)
        ops, busy = [], {}
        snap_writes, origin_writes = [], []
        for _ in range(k):
            name = self.rng.choice(exports)
            s = m.snaps.get(name)
            r = self.rng.random()
            op = "read" if r < 0.45 else ("write" if r < 0.93 else "flush")
            if s is not None and s.small and op == "write":
                # one block: a refused write changes nothing
                off = self.rng.randrange(m.size // BLOCK) * BLOCK
                n = BLOCK
            else:
                n = self.rng.choice([512, 4096, 4096, 8192, 16384, 65536, 262144, 1 << 20])
                if self.rng.random() < 0.5:
                    n = self.rng.randint(1, n // 512) * 512
                off = self.rng.randrange(0, (m.size - n) // 512 + 1) * 512
            if s is not None and s.small and op == "write" and "po-overflow" not in self.faults \
                    and s.store == "PO" and s.need() >= s.cap - 2:
                op = "read"
            if op == "flush":
                off, n = 0, 0
            rng = (off, off + n)
            # no two requests on overlapping bytes of one export if one writes
            clash = any(not (rng[1] <= a or b <= rng[0]) and (op == "write" or o == "write")
                        for (a, b, o) in busy.get(name, []))
            if op != "flush" and clash:
                continue
            busy.setdefault(name, []).append((rng[0], rng[1], op))
            data = os.urandom(n) if op == "write" else None
            slot = sum(1 for (nm, *_r) in ops if nm == name) % 3
            ops.append((name, op, off, n, data, slot))
        # expected read results: the model before the batch
        expect = []
        for (name, op, off, n, data, slot) in ops:
            if op == "read":
                s = m.snaps.get(name)
                expect.append(m.origin[off:off + n] if s is None else m.snap_read(s, off, n))
            else:
                expect.append(None)
        for (name, op, off, n, data, slot) in ops:
            self.handle(name, slot)   # connect here, not racing in the pool threads
        futs = [self.pool_exec.submit(self.nbd_op, op, name, off, n, data, slot,
                                      self.rng.random() < 0.05)
                for (name, op, off, n, data, slot) in ops]
        results = [self.wait(f, "%s %s offset %d length %d" % (op, name, off, n))
                   for f, (name, op, off, n, data, slot) in zip(futs, ops)]
        self.stats["batches"] += 1
        # apply: snapshot writes first (their base is the origin before the batch)
        order = sorted(range(len(ops)), key=lambda i: ops[i][0] == "origin")
        # Refusals by small snapshots are judged once the whole batch is in
        # the model: an origin write of the same batch may have filled it.
        deferred = []
        for i in order:
            name, op, off, n, data, slot = ops[i]
            res = results[i]
            s = m.snaps.get(name)
            self.stats["ops"] += 1
            if op == "read":
                self.stats["reads"] += 1
                err, got = res
                if err is not None:
                    if s is not None and s.small:
                        deferred.append((s, "read", off, n, err))
                        continue
                    self.mismatch("read %s offset %d length %d failed: %s" % (name, off, n, err))
                elif s is not None and s.invalid:
                    pass
                elif bytes(got) != bytes(expect[i]):
                    self.mismatch("read %s offset %d length %d: content differs from the model" % (name, off, n))
            elif op == "write":
                self.stats["writes"] += 1
                self.stats["bytes_written"] += n
                if res is None:
                    if s is None:
                        m.origin_write(off, data)
                    elif s.overflowed and s.store == "PO":
                        self.mismatch("%s: a write succeeded after an earlier one overflowed the PO store" % name)
                        m.snap_write(s, off, data)
                    else:
                        m.snap_write(s, off, data)
                else:
                    self.stats["refused_writes"] += 1
                    if s is not None and s.small:
                        deferred.append((s, "write", off, n, res))
                    else:
                        self.mismatch("write %s offset %d length %d failed: %s" % (name, off, n, res))
            else:
                self.stats["flushes"] += 1
                if res is not None and not (s is not None and (s.small or s.invalid)):
                    self.mismatch("flush %s failed: %s" % (name, res))
        for (s, op, off, n, err) in deferred:
            name = s.name
            if not s.near_full():
                self.mismatch("%s %s offset %d length %d failed at %d of %d chunks: %s"
                              % (op, name, off, n, s.need(), s.cap, err))
            elif op == "read":
                s.invalid = True   # reads fail only on an Invalid snapshot
                self.log("%s: read refused near capacity (%s): now Invalid" % (name, err))
            elif s.store == "PO" and not s.origin_overfill:
                if not s.overflowed:
                    self.stats["po_overflows"] += 1
                s.overflowed = True
                self.log("%s: write refused at %d of %d chunks (%s): Overflow" % (name, s.need(), s.cap, err))
            else:
                if not s.invalid:
                    self.stats["p_invalidations"] += 1
                s.invalid = True
                self.log("%s: write refused at %d of %d chunks (%s): Invalid" % (name, s.need(), s.cap, err))

    # -- pool operations ---------------------------------------------------

    def merging(self):
        return [s for s in self.model.snaps.values() if s.merging]

    def snap_create(self):
        m = self.model
        if len(m.snaps) >= 4 or self.merging():
            return
        kinds = [("P", False)] * 3 + [("PO", False)]
        if "po-overflow" in self.faults:
            kinds += [("PO", True)] * 2
        if "p-full" in self.faults:
            kinds += [("P", True)] * 2
        store, small = self.rng.choice(kinds)
        self.next_name += 1
        name = "s%d" % self.next_name
        args = ["snapshot", "create", self.pool, name, "--store", store]
        if small:
            cow = self.rng.choice([64, 128, 256, 1024, 1100]) * 1024
            chunk = BLOCK
            args += ["--cow-size", str(cow), "--chunk-size", "4K"]
        else:
            cow = None
            chunk = self.rng.choice([4096, 4096, 8192, 16384])
            args += ["--chunk-size", str(chunk)]
        # writing stops while the snapshot is taken: its content is the origin now
        self.dmsnap(*args)
        m.snaps[name] = Snap(name, store, chunk, cow or 0, small)
        self.stats["snap_create"] += 1
        self.log("created %s (%s%s, chunk %d)" % (name, store, ", COW %d KiB" % (cow // 1024) if cow else "", chunk))
        if small and store == "PO" and self.rng.random() < 0.7:
            self.overflow(m.snaps[name])

    def overflow(self, s):
        """Write single blocks to PO snapshot s, nothing else in flight,
        until it refuses one, then two more (refused too: once overflowed,
        every snapshot write fails)."""
        m = self.model
        self.handle(s.name, 0)
        refused = 0
        while refused < 3 and s.need() <= s.cap + 2:
            b = self.rng.randrange(m.size // BLOCK)
            data = os.urandom(BLOCK)
            err = self.wait(self.pool_exec.submit(self.nbd_op, "write", s.name, b * BLOCK, BLOCK, data),
                            "overflow: write %s block %d at %d of %d chunks" % (s.name, b, s.need(), s.cap))
            self.stats["ops"] += 1
            self.stats["writes"] += 1
            if err is None:
                if s.overflowed:
                    self.mismatch("%s: a write succeeded after an earlier one overflowed the PO store" % s.name)
                m.snap_write(s, b * BLOCK, data)
                continue
            refused += 1
            self.stats["refused_writes"] += 1
            if not s.near_full() and b not in s.blocks:
                self.mismatch("overflow: write %s block %d refused at %d of %d chunks: %s"
                              % (s.name, b, s.need(), s.cap, err))
            if not s.overflowed:
                self.stats["po_overflows"] += 1
                self.log("%s: overflowed at %d of %d chunks (%s)" % (s.name, s.need(), s.cap, err))
            s.overflowed = True

    def snap_remove(self):
        cands = [s for s in self.model.snaps.values() if not s.merging]
        if not cands:
            return
        s = self.rng.choice(cands)
        self.close_handles()
        self.dmsnap("snapshot", "remove", self.pool, s.name)
        del self.model.snaps[s.name]
        self.stats["snap_remove"] += 1
        self.log("removed %s" % s.name)

    def merge_start(self):
        m = self.model
        if self.merging():
            return
        cands = [s for s in m.snaps.values() if not s.small and not s.invalid]
        if not cands:
            return
        s = self.rng.choice(cands)
        self.close_handles()
        content = m.snap_content(s)
        # The merge writes every chunk of s's COW to the origin; the other
        # snapshots get their copies first.
        touched = set()
        per = s.chunk // BLOCK
        for b in s.blocks:
            c = b // per
            touched.update(range(c * per, (c + 1) * per))
        self.dmsnap("merge", self.pool, s.name)
        for o in m.snaps.values():
            if o is s or o.invalid or o.merging:
                continue
            for b in sorted(touched):
                m.capture(o, b)
        m.origin[:] = content
        s.merging = True
        self.stats["merges"] += 1
        self.log("merge of %s started (%d chunks)" % (s.name, len(touched)))

    def poll_merge(self, st=None):
        st = st if st is not None else self.status()
        for s in self.merging():
            if s.name not in st:
                del self.model.snaps[s.name]
                self.stats["merges_done"] += 1
                self.log("merge of %s done" % s.name)

    # -- checks ------------------------------------------------------------

    def check(self, before=None):
        """States against the model, then every readable export read whole."""
        self.stats["checks"] += 1
        st = self.status()
        self.poll_merge(st)
        m = self.model
        for name in st:
            if name not in m.snaps:
                self.mismatch("status lists %s, which the model does not have" % name)
        for s in list(m.snaps.values()):
            got = st.get(s.name)
            if got is None:
                self.mismatch("snapshot %s is missing from status" % s.name)
                continue
            state = got["state"]
            allowed = s.allowed()
            if before is not None and before.get(s.name, {}).get("state") == "invalid" and state != "invalid":
                self.mismatch("%s was Invalid before the restart and is %s after it" % (s.name, state))
            if state not in allowed:
                self.mismatch("%s is %s; the model allows %s (store %s, %s chunks needed of %s)"
                              % (s.name, state, sorted(allowed), s.store, s.need(), s.cap))
            if state == "invalid":
                if not s.invalid and s.small and s.store == "P":
                    self.stats["p_invalidations"] += 1
                s.invalid = True
                # Every I/O to an Invalid snapshot fails (kernel).
                self.handle(s.name, 0)
                err, _ = self.wait(self.pool_exec.submit(self.nbd_op, "read", s.name, 0, BLOCK, None),
                                   "check: read of Invalid %s" % s.name)
                if err is None:
                    self.mismatch("check: a read of %s succeeded; it is Invalid" % s.name)
            elif state == "overflow":
                s.overflowed = True
        # whole reads
        names = ["origin"] + [s.name for s in m.snaps.values() if s.readable()]
        for name in names:
            s = m.snaps.get(name)
            want = m.origin if s is None else m.snap_content(s)
            got = bytearray()
            off = 0
            self.handle(name, 0)
            while off < m.size:
                n = min(4 * MiB, m.size - off)
                res = self.wait(self.pool_exec.submit(self.nbd_op, "read", name, off, n, None),
                                "check: read %s offset %d" % (name, off))
                err, data = res
                if err is not None:
                    self.mismatch("check: read %s offset %d failed: %s" % (name, off, err))
                    break
                got += data
                off += n
            else:
                if got != want:
                    first = next(i for i in range(0, m.size, BLOCK)
                                 if got[i:i + BLOCK] != want[i:i + BLOCK])
                    self.mismatch("check: %s differs from the model, first at byte %d (block %d; model %s)"
                                  % (name, first, first // BLOCK,
                                     "has its own copy" if s is not None and first // BLOCK in s.blocks else "reads the origin"))
        self.log("check %d: %s" % (self.stats["checks"], ", ".join(
            "%s=%s" % (n, st[n]["state"]) for n in sorted(st))))

    # -- main loop ---------------------------------------------------------

    def run(self):
        self.t0 = time.monotonic()
        end = self.t0 + self.a.minutes * 60
        os.makedirs(self.dir, exist_ok=True)
        self.dmsnap("create", self.pool, "--size", str(self.model.size))
        self.start()
        restart_every = max(8.0, self.a.minutes * 60 / 8)
        next_restart = self.t0 + restart_every * self.rng.uniform(0.5, 1.0)
        restart_kinds = [k for k in ("sigterm", "kill9") if k in self.faults]
        while time.monotonic() < end:
            r = self.rng.random()
            if r < 0.012:
                self.snap_create()
            elif r < 0.018:
                self.snap_remove()
            elif r < 0.022 and "merge" in self.faults:
                self.merge_start()
            elif r < 0.03:
                self.poll_merge()
            else:
                self.io_batch()
            if restart_kinds and time.monotonic() >= next_restart:
                how = self.rng.choice(restart_kinds)
                before = self.stop(how)
                self.start()
                self.check(before)
                next_restart = time.monotonic() + restart_every * self.rng.uniform(0.5, 1.5)
        self.flush_all()
        self.check()
        self.close_handles()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(HANG)
        except subprocess.TimeoutExpired:
            raise Hang("the daemon did not end within %d s of the final SIGTERM" % HANG)
        if rc != 0:
            self.mismatch("final SIGTERM: exit %d" % rc)

    def report(self, failure):
        s = self.stats
        faults = s["restarts_kill9"] + s["restarts_sigterm"] + s["po_overflows"] + s["p_invalidations"]
        print("soak: %.1f min, seed %d, origin %d MiB, faults %s"
              % ((time.monotonic() - self.t0) / 60, self.a.seed, self.a.origin_mib, ",".join(sorted(self.faults))))
        print("operations: %d (%d reads, %d writes = %.1f MiB, %d flushes, %d batches); "
              "snapshots created %d, removed %d; merges %d started, %d done"
              % (s["ops"], s["reads"], s["writes"], s["bytes_written"] / MiB, s["flushes"], s["batches"],
                 s["snap_create"], s["snap_remove"], s["merges"], s["merges_done"]))
        print("restarts: %d (SIGTERM %d, longest stop %.2f s; kill -9 %d); checks %d"
              % (s["restarts_sigterm"] + s["restarts_kill9"], s["restarts_sigterm"], self.max_stop,
                 s["restarts_kill9"], s["checks"]))
        print("faults injected: %d (restarts %d, PO overflows %d, P invalidations %d; refused writes %d)"
              % (faults, s["restarts_sigterm"] + s["restarts_kill9"], s["po_overflows"],
                 s["p_invalidations"], s["refused_writes"]))
        print("mismatches: %d" % s["mismatches"])
        print("hangs: %d" % s["hangs"])
        if failure:
            print("FAILED: %s" % failure)
            print("last events:")
            for l in self.log_lines[-15:]:
                print("  " + l)
            print("pool kept in %s (daemon log: daemon.log)" % self.dir)
        print("model at the end: " + ", ".join(
            "%s %s%s needs %d/%s allowed %s" % (n, sn.store, " small" if sn.small else "", sn.need(),
                                                sn.cap, sorted(sn.allowed()))
            for n, sn in sorted(self.model.snaps.items())) or "no snapshots")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--origin-mib", type=int, default=64)
    ap.add_argument("--dmsnap", default=None, help="the binary [target/release/dmsnap]")
    ap.add_argument("--dir", default=None, help="work directory [a new temporary one]")
    ap.add_argument("--without", default="", help="comma-separated faults to leave out: "
                    "po-overflow,p-full,merge,kill9,sigterm")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    a.without = [w for w in a.without.split(",") if w]
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    if a.dmsnap is None:
        a.dmsnap = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "dmsnap")
    if not os.access(a.dmsnap, os.X_OK):
        sys.exit("no dmsnap binary at %s (cargo build --release, or --dmsnap PATH)" % a.dmsnap)
    soak = Soak(a)
    failure = None
    try:
        soak.run()
    except Hang as e:
        soak.stats["hangs"] += 1
        failure = "HANG: %s" % e
    except Mismatch as e:
        failure = "stopped after mismatches: %s" % e
    finally:
        if soak.proc is not None and soak.proc.poll() is None:
            if failure and failure.startswith("HANG"):
                try:
                    tasks = os.listdir("/proc/%d/task" % soak.proc.pid)
                    seen = {}
                    for t in tasks:
                        base = "/proc/%d/task/%s/" % (soak.proc.pid, t)
                        comm = open(base + "comm").read().strip().rstrip("0123456789-")
                        wchan = open(base + "wchan").read().strip()
                        seen[(comm, wchan)] = seen.get((comm, wchan), 0) + 1
                    print("daemon threads at the hang: " + ", ".join(
                        "%d %s (%s)" % (n, c, w) for (c, w), n in sorted(seen.items())))
                except OSError:
                    pass
            soak.proc.kill()
            soak.proc.wait()
    if soak.stats["mismatches"] and not failure:
        failure = "%d mismatches" % soak.stats["mismatches"]
    soak.report(failure)
    if not failure and not a.keep and not a.dir:
        shutil.rmtree(soak.dir, ignore_errors=True)
    os._exit(1 if failure else 0)


if __name__ == "__main__":
    main()
