//! Snapshot merge (`snapshot-merge` target, §1.11): the origin shows the
//! merging snapshot's content at once while a background thread copies its
//! exceptions back, last run first, one I/O per run, durably recording the
//! progress in the store (`commit_merge`) so a crash resumes.
//!
//! Unlike the kernel, which flushes the origin and the COW once per run, a
//! step takes a batch of runs (many areas' worth, bounded by
//! [`MERGE_BATCH_CHUNKS`] / [`MERGE_BATCH_BYTES`]) and pays those two
//! flushes once for all of them; the store's state after a step is the
//! kernel's after the same runs one at a time (see
//! `PersistentStore::commit_merge_batch` for why clearing many areas is
//! crash-safe).

use super::origin::Origin;
use super::snapshot::{pieces, submit_copies, Snapshot};
use super::SnapError;
use crate::copier::Region;
use crate::device::DevError;
use crate::io::WriteFlags;
use crate::units::{Chunk, ChunkSize};
use std::sync::atomic::{AtomicBool, Ordering};
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
/// chunks of the batch wait for all of it: this bounds their latency.
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

/// Is origin chunk `c` in one of `runs` (`(first, n)`, sorted, disjoint)?
fn in_runs(runs: &[(u64, u64)], c: u64) -> bool {
    let k = runs.partition_point(|r| r.0 <= c);
    k > 0 && runs.get(k - 1).is_some_and(|&(f, n)| c < f + n)
}

#[derive(Default)]
pub(crate) struct MergeCtl {
    status: Option<MergeStatus>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// [`Origin::set_merge_batch_chunks`].
    batch_chunks: Option<u64>,
}

impl Origin {
    /// Start merging snapshot `name` into the origin (or resume a stopped
    /// merge of it). From the return on, the origin reads and writes as the
    /// snapshot; the snapshot's own device answers `Gone`.
    pub fn start_merge(self: &Arc<Self>, name: &str) -> Result<(), SnapError> {
        let snap = self
            .snapshot(name)
            .ok_or_else(|| SnapError::NotFound(name.to_string()))?;
        if !snap.store_type().is_persistent() {
            return Err(SnapError::NotMergeable(
                "only persistent (P/PO) snapshots can be merged".into(),
            ));
        }
        let mut ctl = self.merge.lock();
        if let Some(m) = self.merging.read().as_ref() {
            if !Arc::ptr_eq(m, &snap) {
                return Err(SnapError::AlreadyMerging);
            }
            if ctl.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                return Err(SnapError::AlreadyMerging);
            }
        }
        {
            let i = snap.inner.lock();
            if !i.valid {
                return Err(SnapError::NotMergeable("the snapshot is invalid".into()));
            }
        }
        {
            // The switch: no origin write in flight, none starts meanwhile.
            let _g = self.gate.write();
            snap.inner.lock().merging = true;
            *self.merging.write() = Some(snap.clone());
        }
        // Its own device I/O and pending exceptions drain.
        snap.wait_idle();
        {
            let mut i = snap.inner.lock();
            i.merge_failed = false;
        }
        if let Some(t) = ctl.thread.take() {
            let _ = t.join();
        }
        let total = snap.nr_exceptions();
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
                        o.merge_loop(&snap, &stop);
                    }
                })
                .map_err(|source| SnapError::Io {
                    what: "merge thread",
                    source,
                })?,
        );
        tracing::info!(snapshot = name, chunks = total, "merge started");
        Ok(())
    }

    pub fn merge_status(&self) -> Option<MergeStatus> {
        let ctl = self.merge.lock();
        let mut st = ctl.status.clone()?;
        if let Some(m) = self.merging.read().as_ref() {
            if m.name() == st.name {
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
    /// snapshot; `start_merge` of the same snapshot resumes.
    pub fn stop_merge(&self) {
        let t = {
            let mut ctl = self.merge.lock();
            ctl.stop.store(true, Ordering::Release);
            ctl.thread.take()
        };
        if let Some(m) = self.merging.read().as_ref() {
            m.cond.notify_all();
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
        {
            let mut i = snap.inner.lock();
            i.merge_failed = true;
            i.merging_runs = Vec::new();
        }
        snap.cond.notify_all();
        self.set_merge_result(Some(why), false);
    }

    /// `snapshot_merge_next_chunks` until the store is empty, batched: each
    /// step takes many runs (up to [`MergeCtl::batch_chunks`] exceptions,
    /// across metadata areas), triggers the other snapshots' exceptions for
    /// all of them, copies them all back in parallel (one copier job per
    /// run), flushes the origin **once**, then clears their records
    /// durably (`commit_merge_batch`: one COW flush, one FUA write per
    /// area). The kernel pays an origin flush and a COW flush per run.
    fn merge_loop(self: &Arc<Self>, snap: &Arc<Snapshot>, stop: &AtomicBool) {
        let cs = snap.chunk_size();
        loop {
            if stop.load(Ordering::Acquire) {
                self.merge_cond.notify_all();
                return;
            }
            if !snap.inner.lock().valid {
                return self.merge_fail(snap, "Snapshot is invalid: can't merge".into());
            }
            let budget = self.merge_batch_chunks(cs);
            let next = snap.commit.lock().store.prepare_merge_batch(budget);
            let batch = match next {
                Ok(b) if b.is_empty() => {
                    tracing::info!(snapshot = snap.name(), "merge complete");
                    return self.set_merge_result(None, true);
                }
                Ok(b) => b,
                Err(e) => {
                    return self.merge_fail(snap, format!("reading the exception store: {e}"))
                }
            };
            // (first_old, first_new, n, byte offset, byte length) per run.
            let mut runs = Vec::with_capacity(batch.len());
            let mut nr = 0u64;
            for (old, new, n) in batch {
                let (old, new) = (old.0, new.0);
                if n == 0 || n > old + 1 || n > new {
                    return self
                        .merge_fail(snap, format!("bad merge run of {n} ending at {old}→{new}"));
                }
                let first_old = old + 1 - n;
                let off = cs.chunk_to_byte(Chunk(first_old));
                if off >= self.size() {
                    return self.merge_fail(
                        snap,
                        format!("exception for chunk {first_old} beyond the origin"),
                    );
                }
                let len = (n * cs.bytes()).min(self.size() - off);
                runs.push((first_old, new + 1 - n, n, off, len));
                nr += n;
            }
            // Exceptions on disk must be in memory too.
            {
                let i = snap.inner.lock();
                for &(first_old, first_new, n, _, _) in &runs {
                    for k in 0..n {
                        if i.table.lookup(Chunk(first_old + k)) != Some(Chunk(first_new + k)) {
                            drop(i);
                            return self.merge_fail(
                                snap,
                                format!("Corruption detected: exception for block {} is on disk but not in memory", first_old + k),
                            );
                        }
                    }
                }
            }
            let published = coalesce(runs.iter().map(|r| (r.0, r.2)).collect());
            {
                let _g = self.gate.read();
                // 1. Other snapshots keep their content: trigger their
                // exceptions for every run as origin writes would.
                let snaps = self.snapshots();
                let ranges: Vec<(u64, u64)> = runs.iter().map(|r| (r.3, r.4)).collect();
                self.trigger_ranges_and_wait(&snaps, &ranges);
                // 2. Publish the batch, wait for writes in flight to it.
                let mut i = snap.inner.lock();
                i.merging_runs = published;
                while i.merge_writes.keys().any(|&c| in_runs(&i.merging_runs, c)) {
                    snap.cond.wait(&mut i);
                }
            }
            // 3. Copy every run back, one job (one I/O) per run, in parallel;
            // submitted in ascending COW order (the batch comes last run
            // first) so reads of a cold COW go forwards.
            let (tx, rx) = crossbeam_channel::unbounded();
            for &(first_old, first_new, _, off, len) in runs.iter().rev() {
                let tx = tx.clone();
                self.copier.copy(
                    Region {
                        dev: snap.cow.clone(),
                        offset: cs.chunk_to_byte(Chunk(first_new)),
                        len,
                    },
                    vec![Region {
                        dev: self.dev.clone(),
                        offset: off,
                        len,
                    }],
                    move |res| {
                        let _ = tx.send((first_old, len, res));
                    },
                );
            }
            drop(tx);
            let mut failed = None;
            let mut copied = 0;
            for (first_old, len, res) in rx.iter() {
                copied += 1;
                if !res.is_ok() && failed.is_none() {
                    let n = len.div_ceil(cs.bytes());
                    failed = Some(format!(
                        "copying chunks {first_old}..={} back: {:?}",
                        first_old + n - 1,
                        res.read_err.or(res.write_errs.into_iter().flatten().next())
                    ));
                }
            }
            if copied != runs.len() && failed.is_none() {
                failed = Some("copying back: the copier stopped".into());
            }
            if let Some(why) = failed {
                return self.merge_fail(snap, why);
            }
            // 4. Durable on the origin before the records go: one flush for
            // the whole batch.
            if let Err(e) = self.dev.flush() {
                return self.merge_fail(snap, format!("flushing the origin: {e}"));
            }
            // 5. commit_merge: the cleared records are the resume point.
            if let Err(e) = snap.commit.lock().store.commit_merge_batch(nr) {
                return self.merge_fail(snap, format!("committing the merge: {e}"));
            }
            // 6. Forget them in memory, release writes queued on the batch.
            {
                let mut i = snap.inner.lock();
                for &(first_old, _, n, _, _) in &runs {
                    i.table.remove_range(Chunk(first_old), n);
                }
                i.merging_runs = Vec::new();
            }
            snap.cond.notify_all();
        }
    }

    /// The COW trigger for several byte ranges at once: every copy is
    /// started before waiting for any (see `trigger_and_wait`). Caller holds
    /// the gate shared.
    fn trigger_ranges_and_wait(&self, snaps: &[Arc<Snapshot>], ranges: &[(u64, u64)]) {
        if snaps.is_empty() {
            return;
        }
        let mut items = Vec::new();
        let mut waits = Vec::new();
        for s in snaps {
            let scs = s.chunk_size();
            for &(offset, len) in ranges.iter().filter(|r| r.1 > 0) {
                let first = scs.chunk_of_byte(offset).0;
                let last = scs.chunk_of_byte(offset + len - 1).0;
                items.extend(s.trigger(first, last));
                waits.push((s, first, last));
            }
        }
        submit_copies(&self.copier, &self.dev, items);
        for (s, first, last) in waits {
            s.wait_range(first, last);
        }
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
        let cs = snap.chunk_size();
        let mut segs: Vec<(bool, u64, usize, usize)> = Vec::new();
        {
            let i = snap.inner.lock();
            for (c, in_chunk, bo, n) in pieces(cs, offset, buf.len() as u64) {
                let cow = if i.valid {
                    i.table.lookup(Chunk(c))
                } else {
                    None
                };
                let (to_cow, dev_off) = match cow {
                    Some(new) => (true, cs.chunk_to_byte(new) + in_chunk),
                    None => (false, offset + bo as u64),
                };
                match segs.last_mut() {
                    Some(l) if l.0 == to_cow && l.1 + l.3 as u64 == dev_off => l.3 += n,
                    _ => segs.push((to_cow, dev_off, bo, n)),
                }
            }
        }
        for (to_cow, dev_off, bo, n) in segs {
            let dev = if to_cow { &snap.cow } else { &self.dev };
            dev.read_at(&mut buf[bo..bo + n], dev_off)?;
        }
        Ok(())
    }

    /// A write to the origin while merging: chunks with an exception go to
    /// the COW (tracked; writes into the run being merged wait for its
    /// commit, then go to the origin); the rest go to the origin through the
    /// COW trigger of the other snapshots. Caller holds the gate shared.
    pub(crate) fn merge_write(
        &self,
        snap: &Snapshot,
        buf: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), DevError> {
        let cs = snap.chunk_size();
        let ps = pieces(cs, offset, buf.len() as u64);
        let mut cow_segs: Vec<(u64, usize, usize)> = Vec::new();
        let mut origin_segs: Vec<(u64, usize, usize)> = Vec::new();
        let mut tracked = Vec::new();
        {
            let mut i = snap.inner.lock();
            let mut waited = false;
            loop {
                let busy = ps.iter().any(|p| in_runs(&i.merging_runs, p.0));
                if !busy {
                    break;
                }
                waited = true;
                snap.cond.wait(&mut i);
            }
            if waited && i.merge_failed {
                return Err(DevError::MergeFailed);
            }
            for &(c, in_chunk, bo, n) in &ps {
                let cow = if i.valid {
                    i.table.lookup(Chunk(c))
                } else {
                    None
                };
                match cow {
                    Some(new) => {
                        *i.merge_writes.entry(c).or_insert(0) += 1;
                        tracked.push(c);
                        cow_segs.push((cs.chunk_to_byte(new) + in_chunk, bo, n));
                    }
                    None => match origin_segs.last_mut() {
                        Some(l) if l.1 + l.2 == bo => l.2 += n,
                        _ => origin_segs.push((offset + bo as u64, bo, n)),
                    },
                }
            }
        }
        let mut res: Result<(), DevError> = Ok(());
        for &(dev_off, bo, n) in &cow_segs {
            if let Err(e) = snap
                .cow
                .write_at(&buf[bo..bo + n], dev_off, WriteFlags { fua })
            {
                res = Err(e.into());
                break;
            }
        }
        if !tracked.is_empty() {
            let mut i = snap.inner.lock();
            for c in tracked {
                if let Some(k) = i.merge_writes.get_mut(&c) {
                    *k -= 1;
                    if *k == 0 {
                        i.merge_writes.remove(&c);
                    }
                }
            }
            drop(i);
            snap.cond.notify_all();
        }
        res?;
        if !origin_segs.is_empty() {
            let snaps = self.snapshots();
            for &(dev_off, bo, n) in &origin_segs {
                self.trigger_and_wait(&snaps, dev_off, n as u64);
                self.dev
                    .write_at(&buf[bo..bo + n], dev_off, WriteFlags { fua })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{coalesce, in_runs};

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
