//! One snapshot: its exception store and tables, its device (reads and
//! writes), and the per-snapshot half of the COW trigger.

use crate::copier::{Copier, OrderedCompletions, Region};
use crate::device::{check_request, DevError, Device};
use crate::exception::ExceptionTable;
use crate::format::DiskException;
use crate::io::{DevRef, WriteFlags};
use crate::store::{ExceptionStore, StoreError, StoreType, Usage};
use crate::units::{Chunk, ChunkSize};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// What `dmsetup status` would say about a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SnapState {
    Active,
    Invalid,
    Overflow,
    Merging,
    MergeFailed,
}

/// A snapshot's state and usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SnapStatus {
    pub state: SnapState,
    pub usage: Usage,
}

impl SnapStatus {
    /// The INFO part of `dmsetup status`: `Invalid`, `Merge failed`,
    /// `Overflow`, or `<allocated>/<total> <metadata>`.
    pub fn dm_status(&self) -> String {
        match self.state {
            SnapState::Invalid => "Invalid".into(),
            SnapState::MergeFailed => "Merge failed".into(),
            SnapState::Overflow => "Overflow".into(),
            SnapState::Active | SnapState::Merging => self.usage.to_string(),
        }
    }
}

pub(crate) struct CommitState {
    pub(crate) store: Box<dyn ExceptionStore>,
    /// Sequence number of the next allocation (kernel `exception_start_sequence`).
    next_seq: u64,
    ordered: OrderedCompletions<(DiskException, bool)>,
    /// A [`SyncJob`](crate::store::SyncJob) is running outside the lock
    /// (one at a time; others wait on `Snapshot::commit_cond`).
    syncing: bool,
}

pub(crate) struct Inner {
    pub(crate) valid: bool,
    pub(crate) overflow: bool,
    /// Removed from its origin: its device answers `Gone`.
    pub(crate) gone: bool,
    /// Being merged (or merged): its device answers `Gone`, no exceptions
    /// are triggered in it.
    pub(crate) merging: bool,
    pub(crate) merge_failed: bool,
    /// Runs of origin chunks `(first, n)` being copied back by the merge
    /// (one batch), sorted by `first`, disjoint.
    pub(crate) merging_runs: Vec<(u64, u64)>,
    pub(crate) table: ExceptionTable,
    /// Origin chunks with a pending exception (copy or record in flight).
    pub(crate) pending: HashSet<u64>,
    /// Exceptions in `table` whose record is not durable yet: origin chunk
    /// → record sequence number, and the same in record order for pruning.
    unsynced: HashMap<u64, u64>,
    unsynced_order: VecDeque<(u64, u64)>,
    /// Snapshot reads in flight that were sent to the origin, per chunk.
    reads: HashMap<u64, u32>,
    /// Writes to the COW in flight through the merging origin, per chunk.
    pub(crate) merge_writes: HashMap<u64, u32>,
    /// Requests in flight through this snapshot's own device.
    active_io: u32,
}

/// A snapshot of an [`Origin`](super::Origin), shared as `Arc<Snapshot>`.
pub struct Snapshot {
    me: std::sync::Weak<Snapshot>,
    name: String,
    store_type: StoreType,
    chunk_size: ChunkSize,
    pub(crate) origin_dev: DevRef,
    pub(crate) origin_size: u64,
    pub(crate) cow: DevRef,
    pub(crate) copier: Arc<Copier>,
    pub(crate) commit: Mutex<CommitState>,
    /// Signalled when a sync job ends.
    commit_cond: Condvar,
    /// Acknowledge a write that created an exception only once its record
    /// is durable (the kernel's behaviour), not at the next FLUSH/FUA.
    durable_writes: bool,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) cond: Condvar,
    /// Write spans and block-status fences (`extents.rs`).
    pub(crate) fences: super::extents::Fences,
}

/// A pending exception whose copy must be started: origin chunk `old` →
/// COW chunk `new`, allocation sequence `seq`.
pub(crate) struct CopyItem {
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) old: u64,
    pub(crate) new: u64,
    pub(crate) seq: u64,
}

/// `(chunk, offset in chunk, offset in buffer, length)` for each chunk
/// `[offset, offset+len)` touches.
pub(crate) fn pieces(cs: ChunkSize, offset: u64, len: u64) -> Vec<(u64, u64, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let c = cs.chunk_of_byte(pos).0;
        let in_chunk = cs.offset_in_chunk(pos);
        let n = (cs.bytes() - in_chunk).min(end - pos);
        out.push((c, in_chunk, (pos - offset) as usize, n as usize));
        pos += n;
    }
    out
}

/// A contiguous device I/O covering part of a request buffer.
struct Seg {
    to_cow: bool,
    dev_off: u64,
    buf_off: usize,
    len: usize,
}

fn push_seg(segs: &mut Vec<Seg>, to_cow: bool, dev_off: u64, buf_off: usize, len: usize) {
    if let Some(l) = segs.last_mut() {
        if l.to_cow == to_cow && l.dev_off + l.len as u64 == dev_off && l.buf_off + l.len == buf_off
        {
            l.len += len;
            return;
        }
    }
    segs.push(Seg {
        to_cow,
        dev_off,
        buf_off,
        len,
    });
}

/// Decrements `active_io` when a device request ends.
struct IoGuard<'a>(&'a Snapshot);

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        let mut i = self.0.inner.lock();
        i.active_io -= 1;
        if i.active_io == 0 {
            self.0.cond.notify_all();
        }
    }
}

impl Snapshot {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        store_type: StoreType,
        store: Box<dyn ExceptionStore>,
        table: ExceptionTable,
        origin_dev: DevRef,
        cow: DevRef,
        copier: Arc<Copier>,
        durable_writes: bool,
    ) -> Arc<Snapshot> {
        let chunk_size = store.chunk_size();
        let valid = store.is_valid();
        Arc::new_cyclic(|me| Snapshot {
            me: me.clone(),
            name: name.to_string(),
            store_type,
            chunk_size,
            origin_size: origin_dev.len(),
            origin_dev,
            cow,
            copier,
            commit: Mutex::new(CommitState {
                store,
                next_seq: 0,
                ordered: OrderedCompletions::new(),
                syncing: false,
            }),
            commit_cond: Condvar::new(),
            durable_writes,
            inner: Mutex::new(Inner {
                valid,
                overflow: false,
                gone: false,
                merging: false,
                merge_failed: false,
                merging_runs: Vec::new(),
                table,
                pending: HashSet::new(),
                unsynced: HashMap::new(),
                unsynced_order: VecDeque::new(),
                reads: HashMap::new(),
                merge_writes: HashMap::new(),
                active_io: 0,
            }),
            cond: Condvar::new(),
            fences: Default::default(),
        })
    }

    fn arc(&self) -> Arc<Snapshot> {
        self.me.upgrade().expect("a snapshot in use is alive")
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }
    pub fn store_type(&self) -> StoreType {
        self.store_type
    }
    /// The COW device.
    pub fn cow(&self) -> &DevRef {
        &self.cow
    }

    pub fn status(&self) -> SnapStatus {
        let usage = self.commit.lock().store.usage();
        let i = self.inner.lock();
        let state = if !i.valid {
            SnapState::Invalid
        } else if i.merge_failed {
            SnapState::MergeFailed
        } else if i.overflow {
            SnapState::Overflow
        } else if i.merging {
            SnapState::Merging
        } else {
            SnapState::Active
        };
        SnapStatus { state, usage }
    }

    /// Completed exceptions, in origin order (tests and tools).
    pub fn exceptions(&self) -> Vec<(Chunk, Chunk)> {
        self.inner.lock().table.iter().collect()
    }

    /// Number of completed exceptions.
    pub fn nr_exceptions(&self) -> u64 {
        self.inner.lock().table.len()
    }

    /// Byte length of origin chunk `c` (the last one may be partial).
    pub(crate) fn chunk_len(&self, c: u64) -> u64 {
        let start = self.chunk_size.chunk_to_byte(Chunk(c));
        self.chunk_size.bytes().min(self.origin_size - start)
    }

    /// Mark invalid (`drop_snapshot`: header valid = 0). Caller holds `commit`.
    fn invalidate_locked(&self, c: &mut CommitState) {
        if c.store.is_valid() {
            if let Err(e) = c.store.drop_snapshot() {
                tracing::error!(snapshot = %self.name, error = %e, "invalidating the snapshot failed to write its header");
            }
        }
        let mut i = self.inner.lock();
        if i.valid {
            tracing::warn!(snapshot = %self.name, "invalidating snapshot");
        }
        i.valid = false;
        drop(i);
        self.cond.notify_all();
    }

    /// Allocate COW chunks for `chunks` (already marked pending). On a full
    /// COW the rest are unmarked and `on_full` decides the state change.
    /// Returns the allocated items and whether the COW was full.
    fn allocate(&self, chunks: &[u64], overflow_mode: bool) -> (Vec<CopyItem>, bool) {
        let mut items = Vec::with_capacity(chunks.len());
        let mut full = false;
        {
            let mut c = self.commit.lock();
            for &old in chunks {
                match c.store.prepare_exception() {
                    Ok(new) => {
                        let seq = c.next_seq;
                        c.next_seq += 1;
                        items.push(CopyItem {
                            snap: self.arc(),
                            old,
                            new: new.0,
                            seq,
                        });
                    }
                    Err(e) => {
                        full = true;
                        if !matches!(e, StoreError::Full { .. }) {
                            tracing::error!(snapshot = %self.name, error = %e, "allocating an exception failed");
                        }
                        if overflow_mode && matches!(e, StoreError::Full { .. }) {
                            self.inner.lock().overflow = true;
                        } else {
                            self.invalidate_locked(&mut c);
                        }
                        break;
                    }
                }
            }
        }
        if full {
            let mut i = self.inner.lock();
            for &old in &chunks[items.len()..] {
                i.pending.remove(&old);
            }
            drop(i);
            self.cond.notify_all();
        }
        (items, full)
    }

    /// The per-snapshot half of `__origin_write`: make sure origin chunks
    /// `first..=last` (this snapshot's chunk size) have, or will have, an
    /// exception. Returns the copies to start. A full COW invalidates the
    /// snapshot (even `PO`); the origin write proceeds.
    pub(crate) fn trigger(&self, first: u64, last: u64) -> Vec<CopyItem> {
        let mut new = Vec::new();
        {
            let mut i = self.inner.lock();
            if !i.valid || i.gone || i.merging {
                return Vec::new();
            }
            let i = &mut *i;
            for c in first..=last {
                if i.table.lookup(Chunk(c)).is_none() && i.pending.insert(c) {
                    new.push(c);
                }
            }
        }
        if new.is_empty() {
            return Vec::new();
        }
        self.allocate(&new, false).0
    }

    /// True while any chunk in `first..=last` has a pending exception or a
    /// tracked origin read.
    fn busy(i: &Inner, first: u64, last: u64) -> bool {
        let span = last - first + 1;
        let inside = |c: &u64| *c >= first && *c <= last;
        if span > (i.pending.len() + i.reads.len()) as u64 {
            i.pending.iter().any(inside) || i.reads.keys().any(inside)
        } else {
            (first..=last).any(|c| i.pending.contains(&c) || i.reads.contains_key(&c))
        }
    }

    /// Wait until no chunk in `first..=last` has a pending exception or a
    /// snapshot read in flight on the origin (kernel
    /// `__check_for_conflicting_io`); after this and
    /// [`sync_range`](Self::sync_range) the origin may be written.
    pub(crate) fn wait_range(&self, first: u64, last: u64) {
        let mut i = self.inner.lock();
        while Self::busy(&i, first, last) {
            self.cond.wait(&mut i);
        }
    }

    /// A copy (or the full-chunk write standing for it) finished: hand it to
    /// the store in allocation order (`record_exception`), and make the
    /// exceptions recorded so far usable at once (kernel `pending_complete`,
    /// which waits for the area write: here durability is tracked apart, in
    /// `unsynced`, and waited for where it matters — see [`Self::sync_to`]).
    /// Filled areas are written before returning, unless another thread is
    /// writing (it picks them up).
    pub(crate) fn copy_done(&self, seq: u64, old: u64, new: u64, ok: bool) {
        let full;
        {
            let mut c = self.commit.lock();
            let mut recorded: Vec<(DiskException, Option<u64>)> = Vec::new();
            let mut failed = false;
            {
                let CommitState { store, ordered, .. } = &mut *c;
                let e = DiskException {
                    old_chunk: Chunk(old),
                    new_chunk: Chunk(new),
                };
                ordered.complete(seq, (e, ok), |_, (e, ok)| {
                    let r = store.record_exception(e, ok).ok();
                    failed |= r.is_none();
                    recorded.push((e, r));
                });
            }
            if recorded.is_empty() {
                return;
            }
            if failed {
                self.invalidate_locked(&mut c);
            }
            let durable = c.store.durable_seq();
            full = c.store.has_full_areas();
            let mut i = self.inner.lock();
            for (e, r) in recorded {
                if let (Some(rseq), true) = (r, i.valid) {
                    i.table.insert(e.old_chunk, e.new_chunk);
                    if rseq > durable {
                        i.unsynced.insert(e.old_chunk.0, rseq);
                        i.unsynced_order.push_back((rseq, e.old_chunk.0));
                    }
                }
                i.pending.remove(&e.old_chunk.0);
            }
        }
        self.cond.notify_all();
        if full {
            // An error invalidates the snapshot; the callers see it there.
            let _ = self.sync_to(None);
        }
    }

    /// Drive the store's metadata writes, one sync job at a time, without
    /// holding the commit lock across the I/O: until every record numbered
    /// up to `target` is durable (`Some`), or (`None`) until the filled
    /// areas waiting are written or another thread is writing them.
    /// `Err(Invalid)` when a needed record can no longer become durable.
    pub(crate) fn sync_to(&self, target: Option<u64>) -> Result<(), DevError> {
        let mut c = self.commit.lock();
        loop {
            let need = target.is_some_and(|t| t > c.store.durable_seq());
            if !need && !c.store.has_full_areas() {
                return Ok(());
            }
            if c.syncing {
                if !need {
                    return Ok(());
                }
                self.commit_cond.wait(&mut c);
                continue;
            }
            let Some(job) = c.store.start_sync() else {
                // Invalid (or, for `need`, nothing to write, which an
                // invalid store also gives).
                return if need { Err(DevError::Invalid) } else { Ok(()) };
            };
            c.syncing = true;
            drop(c);
            let res = job.run();
            c = self.commit.lock();
            c.syncing = false;
            let failed = res.is_err();
            c.store.finish_sync(job.upto(), res);
            if failed {
                self.invalidate_locked(&mut c);
            }
            let durable = c.store.durable_seq();
            {
                let mut i = self.inner.lock();
                let i = &mut *i;
                while let Some(&(rseq, chunk)) = i.unsynced_order.front() {
                    if rseq > durable {
                        break;
                    }
                    i.unsynced_order.pop_front();
                    if i.unsynced.get(&chunk) == Some(&rseq) {
                        i.unsynced.remove(&chunk);
                    }
                }
            }
            self.commit_cond.notify_all();
        }
    }

    /// Make every record so far durable and wait for any sync job running.
    pub(crate) fn sync_all(&self) -> Result<(), DevError> {
        let target = self.commit.lock().store.recorded_seq();
        self.sync_to(Some(target))?;
        let mut c = self.commit.lock();
        while c.syncing {
            self.commit_cond.wait(&mut c);
        }
        Ok(())
    }

    /// `sync_range` for several snapshots' ranges, each snapshot's sync
    /// jobs running in parallel with the others' (their COWs are separate
    /// devices). Errors are ignored: an invalid snapshot no longer holds the
    /// origin back.
    pub(crate) fn sync_ranges(ranges: &[(&Arc<Snapshot>, u64, u64)]) {
        let mut need: Vec<(&Arc<Snapshot>, u64)> = Vec::new();
        for &(s, first, last) in ranges {
            if let Some(seq) = s.unsynced_max(first, last) {
                match need.iter_mut().find(|(n, _)| Arc::ptr_eq(n, s)) {
                    Some((_, m)) => *m = (*m).max(seq),
                    None => need.push((s, seq)),
                }
            }
        }
        match need.as_slice() {
            [] => {}
            [(s, seq)] => {
                let _ = s.sync_to(Some(*seq));
            }
            [(first, seq), rest @ ..] => std::thread::scope(|scope| {
                for &(s, seq) in rest {
                    scope.spawn(move || {
                        let _ = s.sync_to(Some(seq));
                    });
                }
                let _ = first.sync_to(Some(*seq));
            }),
        }
    }

    /// The highest record number among chunks `first..=last` whose record
    /// is not durable yet.
    fn unsynced_max(&self, first: u64, last: u64) -> Option<u64> {
        let i = self.inner.lock();
        if i.unsynced.is_empty() {
            return None;
        }
        if last - first + 1 > i.unsynced.len() as u64 {
            i.unsynced
                .iter()
                .filter(|(c, _)| **c >= first && **c <= last)
                .map(|(_, s)| *s)
                .max()
        } else {
            (first..=last)
                .filter_map(|c| i.unsynced.get(&c).copied())
                .max()
        }
    }

    /// Make the records of chunks `first..=last` durable (before the origin
    /// overwrites them, or for a FUA / durable write). An invalid snapshot
    /// answers `Err(Invalid)`. Callers waiting for several ranges wait for
    /// all of them first, then sync: the first sync covers every record made
    /// meanwhile (the kernel's group commit: one area write for all).
    pub(crate) fn sync_range(&self, first: u64, last: u64) -> Result<(), DevError> {
        match self.unsynced_max(first, last) {
            Some(seq) => self.sync_to(Some(seq)),
            None => Ok(()),
        }
    }

    /// Wait until nothing is pending (removal, merge start).
    pub(crate) fn wait_idle(&self) {
        let mut i = self.inner.lock();
        while !i.pending.is_empty() || i.active_io > 0 {
            self.cond.wait(&mut i);
        }
    }

    fn check_io_state(i: &Inner) -> Result<(), DevError> {
        if i.gone || i.merging {
            Err(DevError::Gone)
        } else if !i.valid {
            Err(DevError::Invalid)
        } else {
            Ok(())
        }
    }

    fn start_io(&self) -> Result<(MutexGuard<'_, Inner>, IoGuard<'_>), DevError> {
        let mut i = self.inner.lock();
        Self::check_io_state(&i)?;
        i.active_io += 1;
        Ok((i, IoGuard(self)))
    }

    fn read_snapshot(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.origin_size)?;
        let cs = self.chunk_size;
        let mut segs = Vec::new();
        let mut tracked = Vec::new();
        let (mut i, _io) = self.start_io()?;
        for (c, in_chunk, bo, n) in pieces(cs, offset, buf.len() as u64) {
            match i.table.lookup(Chunk(c)) {
                Some(new) => push_seg(&mut segs, true, cs.chunk_to_byte(new) + in_chunk, bo, n),
                None => {
                    *i.reads.entry(c).or_insert(0) += 1;
                    tracked.push(c);
                    push_seg(&mut segs, false, offset + bo as u64, bo, n);
                }
            }
        }
        drop(i);
        let mut res = Ok(());
        for s in &segs {
            let dev = if s.to_cow {
                &self.cow
            } else {
                &self.origin_dev
            };
            if let Err(e) = dev.read_at(&mut buf[s.buf_off..s.buf_off + s.len], s.dev_off) {
                res = Err(DevError::Io(e));
                break;
            }
        }
        if !tracked.is_empty() {
            let mut i = self.inner.lock();
            let mut freed = false;
            for c in tracked {
                if let Some(n) = i.reads.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        i.reads.remove(&c);
                        freed = true;
                    }
                }
            }
            drop(i);
            if freed {
                self.cond.notify_all();
            }
        }
        res
    }

    /// Write a run of whole chunks straight to their new COW chunks (one
    /// write: both the origin and the COW chunk numbers are consecutive), then
    /// push each through the ordered completion path as its copy. Empties `run`.
    fn write_full_chunks(
        &self,
        buf: &[u8],
        run: &mut Vec<(u64, u64, u64)>,
        (start, len): (usize, usize),
        direct_done: &mut HashSet<u64>,
    ) {
        let Some(&(_, _, first_new)) = run.first() else {
            return;
        };
        let ok = match self.cow.write_at(
            &buf[start..start + len],
            self.chunk_size.chunk_to_byte(Chunk(first_new)),
            WriteFlags::NONE,
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(snapshot = %self.name, error = %e, "COW write failed");
                false
            }
        };
        for (seq, old, new) in run.drain(..) {
            direct_done.insert(old);
            self.copy_done(seq, old, new, ok);
        }
    }

    fn write_snapshot(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.origin_size)?;
        // Before any lock: a block-status fence may hold this write back.
        let _span = self.fences.write(offset, buf.len() as u64);
        let cs = self.chunk_size;
        let ps = pieces(cs, offset, buf.len() as u64);
        let mut create = Vec::new();
        let mut full_piece: HashMap<u64, usize> = HashMap::new(); // chunk → piece index
        let mut wait = Vec::new();
        let (mut i, _io) = self.start_io()?;
        if i.overflow {
            return Err(DevError::Overflow);
        }
        for (pi, &(c, _, _, n)) in ps.iter().enumerate() {
            if i.table.lookup(Chunk(c)).is_some() {
                continue;
            }
            wait.push(c);
            if i.pending.insert(c) {
                create.push(c);
                if n as u64 == cs.bytes() {
                    full_piece.insert(c, pi);
                }
            }
        }
        drop(i);
        let mut direct_done: HashSet<u64> = HashSet::new();
        let mut full = false;
        if !create.is_empty() {
            let overflow_mode = self.store_type == StoreType::PersistentOverflow;
            let (items, was_full) = self.allocate(&create, overflow_mode);
            full = was_full;
            let mut copies = Vec::new();
            // Kernel a6e50b40: a write covering the whole chunk skips the
            // origin read; its data is the copy. Chunks whose origin and COW
            // numbers are both consecutive (a long write gets consecutive COW
            // chunks) go to the COW in one write, then complete one by one
            // in allocation order.
            let mut run: Vec<(u64, u64, u64)> = Vec::new(); // (seq, old, new)
            let mut run_buf: (usize, usize) = (0, 0); // (start, len) in buf
            for it in items {
                match full_piece.get(&it.old) {
                    Some(&pi) if !full => {
                        let (_, _, bo, n) = ps[pi];
                        let extends = run.last().is_some_and(|&(_, old, new)| {
                            it.old == old + 1 && it.new == new + 1 && bo == run_buf.0 + run_buf.1
                        });
                        if !extends {
                            self.write_full_chunks(buf, &mut run, run_buf, &mut direct_done);
                            run_buf = (bo, 0);
                        }
                        run.push((it.seq, it.old, it.new));
                        run_buf.1 += n;
                    }
                    _ => copies.push(it),
                }
            }
            self.write_full_chunks(buf, &mut run, run_buf, &mut direct_done);
            submit_copies(&self.copier, &self.origin_dev, copies);
        }
        // Wait for our and others' pending exceptions on these chunks.
        {
            let mut i = self.inner.lock();
            while wait.iter().any(|c| i.pending.contains(c)) {
                self.cond.wait(&mut i);
            }
        }
        if full {
            return Err(
                if self.store_type == StoreType::PersistentOverflow && self.inner.lock().valid {
                    DevError::Overflow
                } else {
                    DevError::Invalid
                },
            );
        }
        let mut segs = Vec::new();
        {
            let i = self.inner.lock();
            Self::check_io_state(&i)?;
            for &(c, in_chunk, bo, n) in &ps {
                if direct_done.contains(&c) {
                    continue;
                }
                let new = i.table.lookup(Chunk(c)).ok_or(DevError::Invalid)?;
                push_seg(&mut segs, true, cs.chunk_to_byte(new) + in_chunk, bo, n);
            }
        }
        for s in &segs {
            self.cow.write_at(
                &buf[s.buf_off..s.buf_off + s.len],
                s.dev_off,
                WriteFlags { fua },
            )?;
        }
        if fua && !direct_done.is_empty() && !self.store_type.is_persistent() {
            self.cow.flush()?;
        }
        // A record not yet durable: a FUA write (or, with `durable_writes`,
        // any write) waits for its sync job, whose flush also makes the
        // data durable that went to the new chunks without FUA.
        if fua || self.durable_writes {
            if let (Some(&(first, ..)), Some(&(last, ..))) = (ps.first(), ps.last()) {
                self.sync_range(first, last)?;
            }
        }
        Ok(())
    }
}

impl Device for Snapshot {
    fn size(&self) -> u64 {
        self.origin_size
    }
    fn preferred_block_size(&self) -> u32 {
        self.chunk_size.bytes().min(u32::MAX as u64) as u32
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.read_snapshot(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        self.write_snapshot(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        Self::check_io_state(&self.inner.lock())?;
        self.sync_all()?;
        self.cow.flush()?;
        self.origin_dev.flush()?;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        check_request(offset, len, self.origin_size)?;
        Self::check_io_state(&self.inner.lock())?;
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        check_request(offset, len, self.origin_size)?;
        write_zeroes_via(offset, len, fua, |b, o, f| self.write_snapshot(b, o, f))
    }
}

/// Write-zeroes as writes of a zero buffer (≤ 1 MiB at a time).
pub(crate) fn write_zeroes_via(
    offset: u64,
    len: u64,
    fua: bool,
    mut write: impl FnMut(&[u8], u64, bool) -> Result<(), DevError>,
) -> Result<(), DevError> {
    const STEP: u64 = 1 << 20;
    let zero = vec![0u8; STEP.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done);
        write(&zero[..n as usize], offset + done, fua && done + n == len)?;
        done += n;
    }
    Ok(())
}

/// One destination of a copy job: a run of a snapshot's COW.
struct DestRun {
    snap: Arc<Snapshot>,
    off: u64,
    len: u64,
    items: Vec<(u64, u64, u64)>, // (old, new, seq)
}

/// Start the copies for `items`: chunks with the same origin range share
/// one read (several destinations); neighbouring chunks whose COW chunks
/// are neighbours too become one job. Each chunk's completion goes to its
/// snapshot's ordered commit path.
pub(crate) fn submit_copies(copier: &Copier, origin: &DevRef, items: Vec<CopyItem>) {
    if items.is_empty() {
        return;
    }
    // (origin offset, length) → destinations.
    let mut by_src: BTreeMap<(u64, u64), Vec<DestRun>> = BTreeMap::new();
    for it in items {
        let cs = it.snap.chunk_size;
        let off = cs.chunk_to_byte(Chunk(it.old));
        let len = it.snap.chunk_len(it.old);
        let dest_off = cs.chunk_to_byte(Chunk(it.new));
        by_src.entry((off, len)).or_default().push(DestRun {
            snap: it.snap,
            off: dest_off,
            len,
            items: vec![(it.old, it.new, it.seq)],
        });
    }
    let mut jobs: Vec<(u64, u64, Vec<DestRun>)> = Vec::new();
    for ((off, len), dests) in by_src {
        if let Some((joff, jlen, jd)) = jobs.last_mut() {
            let joinable = *joff + *jlen == off
                && jd.len() == dests.len()
                && *jlen + len <= 8 << 20
                && jd
                    .iter()
                    .zip(&dests)
                    .all(|(a, b)| Arc::ptr_eq(&a.snap, &b.snap) && a.off + a.len == b.off);
            if joinable {
                *jlen += len;
                for (a, b) in jd.iter_mut().zip(dests) {
                    a.len += b.len;
                    a.items.extend(b.items);
                }
                continue;
            }
        }
        jobs.push((off, len, dests));
    }
    for (off, len, dests) in jobs {
        let regions = dests
            .iter()
            .map(|d| Region {
                dev: d.snap.cow.clone(),
                offset: d.off,
                len: d.len,
            })
            .collect();
        let src = Region {
            dev: origin.clone(),
            offset: off,
            len,
        };
        copier.copy(src, regions, move |res| {
            for (i, d) in dests.iter().enumerate() {
                let ok = res.dest_ok(i);
                if !ok {
                    tracing::error!(snapshot = %d.snap.name, read = ?res.read_err, write = ?res.write_errs.get(i), "copy to the COW failed");
                }
                for &(old, new, seq) in &d.items {
                    d.snap.copy_done(seq, old, new, ok);
                }
            }
        });
    }
}
