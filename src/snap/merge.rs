//! Snapshot merge (`snapshot-merge` target, §1.11): the origin shows the
//! merging snapshot's content at once while a background thread copies its
//! exceptions back, last run first, durably recording the progress in the
//! store (`commit_merge`) so a crash resumes.
//!
//! Unlike the kernel, which flushes the origin and the COW once per run, a
//! step takes a batch of runs (many areas' worth, bounded by
//! [`MERGE_BATCH_CHUNKS`] / [`MERGE_BATCH_BYTES`]) and pays those two
//! flushes once for all of them; the store's state after a step is the
//! kernel's after the same runs one at a time (see
//! `PersistentStore::commit_merge_batch` for why clearing many areas is
//! crash-safe). A batch is copied back in big reads of the COW in COW
//! order (scattered exceptions were allocated one after the other), and
//! while it is copied the batch before it is flushed and committed
//! (pipelined; `merge_loop` argues why that is crash-safe).

use super::origin::Origin;
use super::snapshot::{pieces, MergeMap, Snapshot};
use super::SnapError;
use crate::device::DevError;
use crate::io::{DevRef, WriteFlags};
use crate::store::MergeRun;
use crate::units::{Chunk, ChunkSize};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Progress of the origin's merge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergeStatus {
    pub name: String,
    #[serde(skip)]
    pub chunk_size: ChunkSize,
    pub total_chunks_at_start: u64,
    pub chunks_left: u64,
    pub failed: Option<String>,
    pub done: bool,
}

/// Default bound on the exceptions one merge step takes.
pub const MERGE_BATCH_CHUNKS: u64 = 8192;
/// Default bound on the data one merge step copies. Origin writes to
/// chunks of the batch wait for all of it and for the copy of the next
/// batch (pipelined): this bounds their latency.
pub const MERGE_BATCH_BYTES: u64 = 64 << 20;

/// `(first, n)` runs sorted, overlapping or touching ones joined.
fn coalesce(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (f, n) in runs {
        match out.last_mut() {
            Some(l) if f <= l.0 + l.1 => l.1 = l.1.max(f + n - l.0),
            _ => out.push((f, n)),
        }
    }
    out
}

/// Environment variable overriding the exceptions per merge step (`1`:
/// one run per step, as the kernel), for tests that need a slow merge.
pub const MERGE_BATCH_ENV: &str = "DMSNAP_MERGE_BATCH_CHUNKS";

/// Environment variable: a pause in milliseconds before each merge step,
/// for tests that must observe a merge in progress (the pipelined merge of
/// a small snapshot is over in milliseconds even one run per step).
pub const MERGE_STEP_DELAY_ENV: &str = "DMSNAP_MERGE_STEP_DELAY_MS";

/// One run of a batch: origin chunks `first_old..first_old + n` take COW
/// chunks `first_new..first_new + n`; `off`/`len`: its origin bytes (the
/// last origin chunk may be partial).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first_old: u64,
    first_new: u64,
    n: u64,
    off: u64,
    len: u64,
}

/// A batch staged for copying.
struct Batch {
    runs: Vec<Run>,
    /// Exceptions in it.
    nr: u64,
    /// Its origin chunks, as published in `merging_runs`.
    published: Vec<(u64, u64)>,
}

/// Bytes one read of the COW covers at most when copying a batch back.
const MERGE_READ_BYTES: u64 = 1 << 20;
/// Threads copying a batch back (reads of a cold COW in flight at once).
const MERGE_COPY_THREADS: usize = 4;

/// One read of the COW, `len` bytes at `cow_off`, and the origin writes it
/// feeds: `(offset in the read, origin offset, length)`.
#[derive(Debug, PartialEq, Eq)]
struct CowRead {
    cow_off: u64,
    len: u64,
    writes: Vec<(u64, u64, u64)>,
}

/// The reads that copy `runs` back: runs cut at `max` bytes, sorted by COW
/// offset, neighbours on the COW (at most one chunk apart: the metadata
/// chunk between two areas' data) read together up to `max` bytes. A
/// batch of scattered 4 KiB runs, allocated one after the other, is read
/// in a few big sequential reads instead of one read per chunk.
fn plan_reads(runs: &[Run], cs: ChunkSize, max: u64) -> Vec<CowRead> {
    let max = max.max(cs.bytes());
    let mut pieces: Vec<(u64, u64, u64)> = Vec::with_capacity(runs.len());
    for r in runs {
        let cow = cs.chunk_to_byte(Chunk(r.first_new));
        let mut o = 0;
        while o < r.len {
            let l = max.min(r.len - o);
            pieces.push((cow + o, r.off + o, l));
            o += l;
        }
    }
    pieces.sort_unstable();
    let mut out: Vec<CowRead> = Vec::new();
    for (cow, orig, l) in pieces {
        match out.last_mut() {
            Some(rd)
                if cow >= rd.cow_off + rd.len
                    && cow - (rd.cow_off + rd.len) <= cs.bytes()
                    && cow + l - rd.cow_off <= max =>
            {
                rd.writes.push((cow - rd.cow_off, orig, l));
                rd.len = cow + l - rd.cow_off;
            }
            _ => out.push(CowRead {
                cow_off: cow,
                len: l,
                writes: vec![(0, orig, l)],
            }),
        }
    }
    out
}

/// Copy `runs` from the COW back to the origin ([`plan_reads`]), on
/// [`MERGE_COPY_THREADS`] threads taking the reads in COW order. The first
/// error, as a message.
fn copy_back(cow: &DevRef, origin: &DevRef, cs: ChunkSize, runs: &[Run]) -> Result<(), String> {
    let reads = plan_reads(runs, cs, MERGE_READ_BYTES);
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let work = || {
        let mut buf = Vec::new();
        loop {
            if failed.lock().is_some() {
                return;
            }
            let Some(rd) = reads.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            buf.resize(rd.len as usize, 0);
            let r = cow
                .read_at(&mut buf, rd.cow_off)
                .map_err(|e| format!("reading COW bytes {}+{} back: {e}", rd.cow_off, rd.len))
                .and_then(|()| {
                    rd.writes.iter().try_for_each(|&(at, orig, l)| {
                        let piece = buf.get(at as usize..(at + l) as usize).unwrap_or(&[]);
                        origin.write_at(piece, orig, WriteFlags::NONE).map_err(|e| {
                            let first = cs.chunk_of_byte(orig).0;
                            let last = cs.chunk_of_byte(orig + l - 1).0;
                            format!("copying chunks {first}..={last} back: {e}")
                        })
                    })
                });
            if let Err(why) = r {
                failed.lock().get_or_insert(why);
                return;
            }
        }
    };
    let threads = MERGE_COPY_THREADS.min(reads.len());
    std::thread::scope(|sc| {
        for _ in 1..threads {
            sc.spawn(work);
        }
        work();
    });
    match failed.into_inner() {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

#[derive(Default)]
pub(crate) struct MergeCtl {
    status: Option<MergeStatus>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// A `start_merge` is between its checks and its thread's start (it
    /// waits for the snapshot's I/O with `merge` released).
    starting: bool,
    /// [`Origin::set_merge_batch_chunks`].
    batch_chunks: Option<u64>,
}

/// Clears `MergeCtl::starting` when `start_merge` returns, however.
struct Starting<'a>(&'a Origin);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.merge.lock().starting = false;
    }
}

impl Origin {
    /// Start merging snapshot `name` into the origin (or resume a stopped
    /// merge of it). From the return on, the origin reads and writes as the
    /// snapshot; the snapshot's own device answers `Gone`. The `merge` lock
    /// is held only for checks and bookkeeping, never across a wait: the
    /// waits here (an earlier merge thread's end, the snapshot's I/O, its
    /// last sync job) have wakers that may take `merge`.
    pub fn start_merge(self: &Arc<Self>, name: &str) -> Result<(), SnapError> {
        let snap = self
            .snapshot(name)
            .ok_or_else(|| SnapError::NotFound(name.to_string()))?;
        if !snap.store_type().is_persistent() {
            return Err(SnapError::NotMergeable(
                "only persistent (P/PO) snapshots can be merged".into(),
            ));
        }
        let old_thread = {
            let mut ctl = self.merge.lock();
            if ctl.starting {
                return Err(SnapError::AlreadyMerging);
            }
            if let Some(m) = self.merging.read().as_ref() {
                if !Arc::ptr_eq(m, &snap) {
                    return Err(SnapError::AlreadyMerging);
                }
                if ctl.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                    return Err(SnapError::AlreadyMerging);
                }
            }
            if !snap.is_valid() {
                return Err(SnapError::NotMergeable("the snapshot is invalid".into()));
            }
            ctl.starting = true;
            ctl.thread.take()
        };
        let _starting = Starting(self);
        if let Some(t) = old_thread {
            let _ = t.join();
        }
        {
            // The switch: no origin write in flight, none starts meanwhile.
            let _g = self.gate.write();
            snap.set_merging();
            *self.merging.write() = Some(snap.clone());
        }
        // Its own device I/O and pending exceptions drain, and every
        // record is durable (the merge works on durable records only).
        snap.wait_idle();
        let _ = snap.sync_all();
        snap.clear_merge_failed();
        let total = snap.nr_exceptions();
        let mut ctl = self.merge.lock();
        ctl.status = Some(MergeStatus {
            name: name.to_string(),
            chunk_size: snap.chunk_size(),
            total_chunks_at_start: total,
            chunks_left: total,
            failed: None,
            done: false,
        });
        let stop = Arc::new(AtomicBool::new(false));
        ctl.stop = stop.clone();
        let origin = self.me.clone();
        ctl.thread = Some(
            std::thread::Builder::new()
                .name(format!("dmsnap-merge-{name}"))
                .spawn(move || {
                    if let Some(o) = origin.upgrade() {
                        o.run_merge(&snap, &stop);
                    }
                })
                .map_err(|source| SnapError::Io {
                    what: "merge thread",
                    source,
                })?,
        );
        drop(ctl);
        tracing::info!(snapshot = name, chunks = total, "merge started");
        Ok(())
    }

    pub fn merge_status(&self) -> Option<MergeStatus> {
        let mut st = self.merge.lock().status.clone()?;
        if let Some(m) = self.merging.read().as_ref() {
            if m.name() == st.name && !st.done {
                st.chunks_left = m.nr_exceptions();
            }
        }
        Some(st)
    }

    /// Wait until the merge is done or failed (or was stopped).
    pub fn wait_merge(&self) -> Result<(), SnapError> {
        let mut ctl = self.merge.lock();
        loop {
            match &ctl.status {
                None => return Ok(()),
                Some(s) if s.done => return Ok(()),
                Some(s) if s.failed.is_some() => {
                    return Err(SnapError::MergeFailed(s.failed.clone().unwrap_or_default()))
                }
                _ => {}
            }
            if ctl.thread.as_ref().is_none_or(|t| t.is_finished())
                && ctl.stop.load(Ordering::Acquire)
            {
                return Ok(());
            }
            self.merge_cond.wait(&mut ctl);
        }
    }

    /// Wait until the merge is done, failed or stopped, or `timeout` passed
    /// (a progress display's tick): returns at once when it ends, where a
    /// fixed poll interval would add up to the interval to every merge.
    pub fn wait_merge_for(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut ctl = self.merge.lock();
        loop {
            match &ctl.status {
                None => return,
                Some(s) if s.done || s.failed.is_some() => return,
                _ => {}
            }
            if ctl.thread.as_ref().is_none_or(|t| t.is_finished())
                && ctl.stop.load(Ordering::Acquire)
            {
                return;
            }
            if self.merge_cond.wait_until(&mut ctl, deadline).timed_out() {
                return;
            }
        }
    }

    /// Stop the merge thread (shutdown). The origin keeps showing the
    /// snapshot; `start_merge` of the same snapshot resumes. The thread is
    /// joined with `merge` released (it takes `merge` to report).
    pub fn stop_merge(&self) {
        let t = {
            let mut ctl = self.merge.lock();
            ctl.stop.store(true, Ordering::Release);
            ctl.thread.take()
        };
        if let Some(m) = self.merging.read().as_ref() {
            m.wake();
        }
        if let Some(t) = t {
            let _ = t.join();
        }
        self.merge_cond.notify_all();
    }

    fn set_merge_result(&self, failed: Option<String>, done: bool) {
        let mut ctl = self.merge.lock();
        if let Some(s) = ctl.status.as_mut() {
            s.failed = failed;
            s.done = done;
            if done {
                s.chunks_left = 0;
            }
        }
        drop(ctl);
        self.merge_cond.notify_all();
    }

    fn merge_fail(&self, snap: &Snapshot, why: String) {
        tracing::error!(snapshot = snap.name(), error = %why, "merge failed");
        snap.set_merge_failed();
        self.set_merge_result(Some(why), false);
    }

    /// The merge thread's body: [`merge_loop`](Self::merge_loop), with a
    /// panic in it (a bug, or a device that panicked in a copy thread)
    /// turned into a failed merge, which releases every chunk published
    /// as merging: writes waiting for a batch get on.
    fn run_merge(self: &Arc<Self>, snap: &Arc<Snapshot>, stop: &AtomicBool) {
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.merge_loop(snap, stop)));
        if r.is_err() {
            self.merge_fail(snap, "a panic in the merge thread".into());
        }
    }

    /// `snapshot_merge_next_chunks` until the store is empty, batched and
    /// pipelined. Each step takes many runs (up to
    /// [`MergeCtl::batch_chunks`] exceptions, across metadata areas),
    /// triggers the other snapshots' exceptions for all of them, publishes
    /// them as merging and copies them back ([`copy_back`]: big reads of
    /// the COW in COW order, one write per run). While a batch is copied,
    /// the batch before it is made durable ([`Origin::finish_batch`]: one
    /// origin flush, then `commit_merge_batch`: one COW flush, one FUA
    /// write). The kernel pays an origin flush and a COW flush per run and
    /// copies nothing meanwhile.
    ///
    /// Crash safety of the overlap: a batch's records are cleared only
    /// after the origin flush that follows the end of all its copies, so
    /// they are never cleared before its data is durable on the origin;
    /// the next batch's copies, running meanwhile, overwrite origin chunks
    /// whose records are all still on disk (its batch is committed only
    /// after its own copies and flush), and copying a run whose record
    /// survives a crash again is idempotent (the COW chunk is unchanged:
    /// writes to chunks of both batches are held). Chunks of both batches
    /// are published as merging until their batch is committed, and the
    /// other snapshots' exceptions for a batch are triggered before any of
    /// its copies, as for a lone batch.
    ///
    /// The merge thread never takes the origin's gate: snapshots cannot be
    /// added while a merge runs, and a removed one triggers nothing.
    fn merge_loop(self: &Arc<Self>, snap: &Arc<Snapshot>, stop: &AtomicBool) {
        let cs = snap.chunk_size();
        let pipelined = snap.with_store(|s| {
            s.abandon_merge_batches();
            s.queues_merge_batches()
        });
        // The batch copied back and not yet durable.
        let mut copied: Option<Batch> = None;
        let step_delay = std::env::var(MERGE_STEP_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        loop {
            if let Some(d) = step_delay {
                std::thread::sleep(d);
            }
            let stopping = stop.load(Ordering::Acquire);
            if !stopping && !snap.is_valid() {
                return self.merge_fail(snap, "Snapshot is invalid: can't merge".into());
            }
            if stopping || !pipelined {
                if let Some(b) = copied.take() {
                    if let Err(why) = self.finish_batch(snap, &b, Vec::new()) {
                        return self.merge_fail(snap, why);
                    }
                }
                if stopping {
                    self.merge_cond.notify_all();
                    return;
                }
            }
            let budget = self.merge_batch_chunks(cs);
            let next = snap.with_store(|s| s.prepare_merge_batch(budget));
            let runs = match next {
                Ok(b) if b.is_empty() => {
                    if let Some(b) = copied.take() {
                        if let Err(why) = self.finish_batch(snap, &b, Vec::new()) {
                            return self.merge_fail(snap, why);
                        }
                    }
                    tracing::info!(snapshot = snap.name(), "merge complete");
                    return self.set_merge_result(None, true);
                }
                Ok(b) => b,
                Err(e) => {
                    return self.merge_fail(snap, format!("reading the exception store: {e}"))
                }
            };
            let batch = match self.stage_batch(snap, runs, copied.as_ref(), stop) {
                Ok(b) => b,
                Err(why) => return self.merge_fail(snap, why),
            };
            // Copy this batch back while the previous one is made durable.
            let t0 = std::time::Instant::now();
            let (copy, finish, copy_time) = std::thread::scope(|sc| {
                let finish = copied.as_ref().map(|prev| {
                    let still = batch.published.clone();
                    sc.spawn(move || {
                        let r = self.finish_batch(snap, prev, still);
                        (r, t0.elapsed())
                    })
                });
                let copy = copy_back(&snap.cow, &self.dev, cs, &batch.runs);
                let copy_time = t0.elapsed();
                (copy, finish.map(|h| h.join()), copy_time)
            });
            tracing::debug!(
                snapshot = snap.name(),
                chunks = batch.nr,
                runs = batch.runs.len(),
                copy_ms = copy_time.as_secs_f64() * 1e3,
                finish_prev_ms = finish
                    .as_ref()
                    .and_then(|f| f.as_ref().ok())
                    .map(|f| f.1.as_secs_f64() * 1e3),
                "merge batch copied"
            );
            let finish = finish.map(|f| f.map(|f| f.0));
            match finish {
                None | Some(Ok(Ok(()))) => {}
                Some(Ok(Err(why))) => return self.merge_fail(snap, why),
                Some(Err(_)) => return self.merge_fail(snap, "committing the merge: panic".into()),
            }
            if let Err(why) = copy {
                return self.merge_fail(snap, why);
            }
            copied = Some(batch);
        }
    }

    /// Check a prepared batch against the in-memory table, trigger the
    /// other snapshots' exceptions for it, publish it as merging (with
    /// `prev`, the batch still being made durable) and wait for writes in
    /// flight to its chunks.
    fn stage_batch(
        &self,
        snap: &Snapshot,
        batch: Vec<MergeRun>,
        prev: Option<&Batch>,
        stop: &AtomicBool,
    ) -> Result<Batch, String> {
        let cs = snap.chunk_size();
        let mut runs = Vec::with_capacity(batch.len());
        let mut nr = 0u64;
        for r in batch {
            let (old, new, n) = (r.last_old.0, r.last_new.0, r.n);
            if n == 0 || n > old + 1 || n > new {
                return Err(format!("bad merge run of {n} ending at {old}→{new}"));
            }
            let first_old = old + 1 - n;
            let off = cs.chunk_to_byte(Chunk(first_old));
            if off >= self.size() {
                return Err(format!("exception for chunk {first_old} beyond the origin"));
            }
            let len = (n * cs.bytes()).min(self.size() - off);
            runs.push(Run {
                first_old,
                first_new: new + 1 - n,
                n,
                off,
                len,
            });
            nr += n;
        }
        // Exceptions on disk must be in memory too.
        let check: Vec<(u64, u64, u64)> = runs
            .iter()
            .map(|r| (r.first_old, r.first_new, r.n))
            .collect();
        if let Err(c) = snap.check_runs_in_table(&check) {
            return Err(format!(
                "Corruption detected: exception for block {c} is on disk but not in memory"
            ));
        }
        let published = coalesce(runs.iter().map(|r| (r.first_old, r.n)).collect());
        // 1. Other snapshots keep their content: trigger their exceptions
        // for every run as origin writes would.
        let snaps: Vec<Arc<Snapshot>> = self
            .snapshots()
            .into_iter()
            .filter(|s| !std::ptr::eq(s.as_ref(), snap))
            .collect();
        let ranges: Vec<(u64, u64)> = runs.iter().map(|r| (r.off, r.len)).collect();
        Snapshot::trigger_and_wait(&self.copier, &self.dev, &snaps, &ranges);
        // 2. Publish the batch (with the one being made durable), wait for
        // writes in flight to it.
        let mut both = published.clone();
        if let Some(p) = prev {
            both.extend_from_slice(&p.published);
        }
        snap.publish_merge_batch(coalesce(both), &|| stop.load(Ordering::Acquire));
        Ok(Batch {
            runs,
            nr,
            published,
        })
    }

    /// Make a copied batch durable: flush the origin (its copies are on
    /// it), clear its records (`commit_merge_batch`: the resume point),
    /// forget them in memory and release writes queued on its chunks;
    /// `still` stays published as merging (the batch copied meanwhile).
    fn finish_batch(
        &self,
        snap: &Snapshot,
        b: &Batch,
        still: Vec<(u64, u64)>,
    ) -> Result<(), String> {
        self.dev
            .flush()
            .map_err(|e| format!("flushing the origin: {e}"))?;
        snap.with_store(|s| s.commit_merge_batch(b.nr))
            .map_err(|e| format!("committing the merge: {e}"))?;
        let merged: Vec<(u64, u64)> = b.runs.iter().map(|r| (r.first_old, r.n)).collect();
        snap.release_merge_batch(&merged, still);
        Ok(())
    }

    /// Exceptions per merge step: the limit set by
    /// [`set_merge_batch_chunks`](Self::set_merge_batch_chunks), else the
    /// environment's [`MERGE_BATCH_ENV`], else [`MERGE_BATCH_CHUNKS`] or
    /// [`MERGE_BATCH_BYTES`] of data, whichever is less.
    fn merge_batch_chunks(&self, cs: ChunkSize) -> u64 {
        let set = self.merge.lock().batch_chunks;
        set.or_else(|| {
            std::env::var(MERGE_BATCH_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| MERGE_BATCH_CHUNKS.min(MERGE_BATCH_BYTES / cs.bytes()))
        .max(1)
    }

    /// Limit how many exceptions one merge step takes (`1`: one run per
    /// step, as the kernel; `None`: the default). For tests and tuning.
    pub fn set_merge_batch_chunks(&self, chunks: Option<u64>) {
        self.merge.lock().batch_chunks = chunks;
    }

    /// A read of the origin while merging: chunks with an exception come
    /// from the COW, the rest from the origin (`snapshot_merge_map`).
    pub(crate) fn merge_read(
        &self,
        snap: &Snapshot,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), DevError> {
        for s in snap.map_merge_read(offset, buf.len() as u64) {
            let dev = if s.to_cow { &snap.cow } else { &self.dev };
            dev.read_at(&mut buf[s.buf_off..s.buf_off + s.len], s.dev_off)?;
        }
        Ok(())
    }

    /// A write to the origin while merging: chunks with an exception go to
    /// the COW (tracked until written); the rest go to the origin through
    /// the COW trigger of the other snapshots. `Ok(None)`: a chunk of it is
    /// in a batch being merged; the caller waits for the batch with the
    /// gate released ([`Snapshot::wait_merge_runs`]) and retries. Caller
    /// holds the gate shared.
    pub(crate) fn merge_write(
        &self,
        snap: &Snapshot,
        buf: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<Option<()>, DevError> {
        let ps = pieces(snap.chunk_size(), offset, buf.len() as u64);
        let (cow, origin, tracked) = match snap.map_merge_write(&ps, offset) {
            MergeMap::Busy => return Ok(None),
            MergeMap::Mapped {
                cow,
                origin,
                tracked,
            } => (cow, origin, tracked),
        };
        for &(dev_off, bo, n) in &cow {
            snap.cow
                .write_at(&buf[bo..bo + n], dev_off, WriteFlags { fua })?;
        }
        drop(tracked);
        if !origin.is_empty() {
            let snaps: Vec<Arc<Snapshot>> = self
                .snapshots()
                .into_iter()
                .filter(|s| !std::ptr::eq(s.as_ref(), snap))
                .collect();
            for &(dev_off, bo, n) in &origin {
                Snapshot::trigger_and_wait(&self.copier, &self.dev, &snaps, &[(dev_off, n as u64)]);
                self.dev
                    .write_at(&buf[bo..bo + n], dev_off, WriteFlags { fua })?;
            }
        }
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::snapshot::in_runs;
    use super::{coalesce, plan_reads, Run};
    use crate::units::ChunkSize;
    use rand::{Rng, SeedableRng};

    /// Runs like a batch's: disjoint origin chunks, COW chunks allocated
    /// in some order with a metadata chunk every 256.
    fn batch(rng: &mut rand::rngs::StdRng, cs: ChunkSize, scattered: bool) -> Vec<Run> {
        let mut olds: Vec<u64> = (0..600).collect();
        if scattered {
            for i in (1..olds.len()).rev() {
                olds.swap(i, rng.gen_range(0..=i));
            }
        }
        let mut new = 2u64;
        let mut runs: Vec<Run> = Vec::new();
        for old in olds {
            if new % 257 == 1 {
                new += 1;
            }
            match runs.last_mut() {
                Some(r) if r.first_old + r.n == old && r.first_new + r.n == new => {
                    r.n += 1;
                    r.len += cs.bytes();
                }
                _ => runs.push(Run {
                    first_old: old,
                    first_new: new,
                    n: 1,
                    off: old * cs.bytes(),
                    len: cs.bytes(),
                }),
            }
            new += 1;
        }
        // The last origin chunk partial, as at the end of an origin.
        if let Some(r) = runs.iter_mut().find(|r| r.first_old + r.n == 600) {
            r.len -= cs.bytes() / 2;
        }
        runs
    }

    #[test]
    fn planned_reads_copy_every_run_exactly_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let cs = ChunkSize::from_sectors(8).unwrap();
        for round in 0..40 {
            let runs = batch(&mut rng, cs, round % 2 == 1);
            let max = cs.bytes() * rng.gen_range(1..40);
            let reads = plan_reads(&runs, cs, max);
            // Apply the plan to a COW whose every byte names its offset
            // (mod 251) and compare with copying run by run.
            let end = 600 * cs.bytes();
            let mut got = vec![0u8; end as usize];
            let mut hits = vec![0u8; end as usize];
            for (k, rd) in reads.iter().enumerate() {
                assert!(rd.len <= max, "round {round}: read of {} > {max}", rd.len);
                if let Some(prev) = k.checked_sub(1).map(|p| &reads[p]) {
                    assert!(prev.cow_off + prev.len <= rd.cow_off, "round {round}");
                }
                let mut at = 0;
                for &(b, orig, l) in &rd.writes {
                    assert!(b >= at && b - at <= cs.bytes(), "round {round}: gap");
                    at = b + l;
                    for i in 0..l {
                        got[(orig + i) as usize] = ((rd.cow_off + b + i) % 251) as u8;
                        hits[(orig + i) as usize] += 1;
                    }
                }
                assert_eq!(at, rd.len, "round {round}: the read ends at its last write");
            }
            let mut want = vec![0u8; end as usize];
            let mut want_hits = vec![0u8; end as usize];
            for r in &runs {
                for i in 0..r.len {
                    want[(r.off + i) as usize] = ((r.first_new * cs.bytes() + i) % 251) as u8;
                    want_hits[(r.off + i) as usize] = 1;
                }
            }
            assert!(got == want && hits == want_hits, "round {round}");
        }
    }

    #[test]
    fn scattered_chunks_allocated_in_a_row_are_read_together() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let cs = ChunkSize::from_sectors(8).unwrap();
        let runs = batch(&mut rng, cs, true);
        assert!(runs.len() > 300, "{} runs", runs.len());
        // 600 chunks over 3 areas' data, 1 MiB reads: three reads.
        let reads = plan_reads(&runs, cs, 1 << 20);
        assert_eq!(
            reads.len(),
            3,
            "{:?}",
            reads.iter().map(|r| r.len).collect::<Vec<_>>()
        );
    }

    #[test]
    fn published_runs_answer_membership() {
        let runs = coalesce(vec![(50, 1), (10, 5), (12, 2), (15, 3), (100, 4)]);
        assert_eq!(runs, vec![(10, 8), (50, 1), (100, 4)]);
        let inside: Vec<u64> = (0..120).filter(|&c| in_runs(&runs, c)).collect();
        let want: Vec<u64> = (10..18).chain([50]).chain(100..104).collect();
        assert_eq!(inside, want);
        assert!(!in_runs(&[], 0));
    }
}
