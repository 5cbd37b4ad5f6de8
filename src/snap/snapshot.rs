//! One snapshot: its exception store and tables, its device (reads and
//! writes), and the per-snapshot half of the COW trigger.
//!
//! The snapshot owns its invariants: its state lives in two private locks
//! (`commit`, then `inner`) that only this file takes, and the origin and
//! the merge reach it through the narrow API below (trigger and wait, sync,
//! publish / release a merge batch, track a write through the merging
//! origin). Every registration that another thread waits for (a pending
//! exception, a tracked origin read, a request in flight, a write through
//! the merging origin, a running sync job) is removed by a drop guard or on
//! every path, panics included, so no wait outlives its cause. See
//! ARCHITECTURE.md, "Locks and waits".

use crate::copier::{Copier, OrderedCompletions, Region};
use crate::device::{check_request, DevError, Device};
use crate::exception::ExceptionTable;
use crate::format::DiskException;
use crate::io::{catch_panic, DevRef, WriteFlags};
use crate::store::{ExceptionStore, StoreError, StoreType, Usage};
use crate::units::{Chunk, ChunkSize};
use parking_lot::{Condvar, Mutex};
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

/// A new exception: origin chunk `old` takes COW chunk `new`, allocated
/// with sequence number `seq` (completions reach the store in `seq` order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewException {
    pub(crate) seq: u64,
    pub(crate) old: Chunk,
    pub(crate) new: Chunk,
}

struct CommitState {
    store: Box<dyn ExceptionStore>,
    /// Sequence number of the next allocation (kernel `exception_start_sequence`).
    next_seq: u64,
    ordered: OrderedCompletions<(DiskException, bool)>,
    /// A [`SyncJob`](crate::store::SyncJob) is running outside the lock
    /// (one at a time; others wait on `Snapshot::commit_cond`). Reset by
    /// [`SyncingFlag`] on every path, panics included.
    syncing: bool,
}

struct Inner {
    /// The snapshot's own validity (kernel `s->valid`); the store's flag
    /// may go false first (a failed area write), and invalidation keys on
    /// this one, so the header is written exactly once.
    valid: bool,
    overflow: bool,
    /// Removed from its origin: its device answers `Gone`.
    gone: bool,
    /// Being merged (or merged): its device answers `Gone`, no exceptions
    /// are triggered in it.
    merging: bool,
    merge_failed: bool,
    /// Runs of origin chunks `(first, n)` being copied back by the merge
    /// (one batch, or two while pipelined), sorted by `first`, disjoint.
    merging_runs: Vec<(u64, u64)>,
    table: ExceptionTable,
    /// Origin chunks with a pending exception (copy or record in flight).
    pending: HashSet<u64>,
    /// Exceptions in `table` whose record is not durable yet: origin chunk
    /// → record sequence number, and the same in record order for pruning.
    unsynced: HashMap<u64, u64>,
    unsynced_order: VecDeque<(u64, u64)>,
    /// Snapshot reads in flight that were sent to the origin, per chunk.
    reads: HashMap<u64, u32>,
    /// Writes to the COW in flight through the merging origin, per chunk.
    merge_writes: HashMap<u64, u32>,
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
    copier: Arc<Copier>,
    commit: Mutex<CommitState>,
    /// Signalled when a sync job ends.
    commit_cond: Condvar,
    /// Acknowledge a write that created an exception only once its record
    /// is durable (the kernel's behaviour), not at the next FLUSH/FUA.
    durable_writes: bool,
    inner: Mutex<Inner>,
    /// Signalled when a pending exception, a tracked read, a request, a
    /// merge write or a merge batch ends, or the state changes.
    cond: Condvar,
    /// The store's usage as of its last change (a leaf lock): `status`
    /// never waits behind the commit lock, which a merge step or an
    /// invalidation holds across store I/O.
    usage: Mutex<Usage>,
    /// Write spans and block-status fences (`extents.rs`).
    pub(crate) fences: super::extents::Fences,
}

/// A pending exception whose copy must be started.
pub(crate) struct CopyItem {
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) e: NewException,
}

/// One piece of a request: the part `[offset, offset+len)` of a request
/// buffer that falls in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) chunk: u64,
    /// Byte offset of the piece inside its chunk.
    pub(crate) in_chunk: u64,
    /// Byte offset of the piece inside the request buffer.
    pub(crate) buf_off: usize,
    pub(crate) len: usize,
}

/// The pieces of `[offset, offset+len)`, one per chunk it touches.
pub(crate) fn pieces(cs: ChunkSize, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let c = cs.chunk_of_byte(pos).0;
        let in_chunk = cs.offset_in_chunk(pos);
        let n = (cs.bytes() - in_chunk).min(end - pos);
        out.push(Piece {
            chunk: c,
            in_chunk,
            buf_off: (pos - offset) as usize,
            len: n as usize,
        });
        pos += n;
    }
    out
}

/// A contiguous device I/O covering part of a request buffer.
pub(crate) struct Seg {
    pub(crate) to_cow: bool,
    pub(crate) dev_off: u64,
    pub(crate) buf_off: usize,
    pub(crate) len: usize,
}

pub(crate) fn push_seg(
    segs: &mut Vec<Seg>,
    to_cow: bool,
    dev_off: u64,
    buf_off: usize,
    len: usize,
) {
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

/// Decrements `active_io` when a device request ends. Never created while
/// `inner` is held by the same thread (its drop takes `inner`).
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

/// Chunks registered, one count each, in a per-chunk map of `Inner` until
/// the guard drops: the origin chunks a snapshot read is reading from the
/// origin (`reads`: an origin write to them waits), or the chunks a write
/// through the merging origin is writing on the COW (`merge_writes`: the
/// merge waits for them before it copies a batch holding them back).
pub(crate) struct ChunkRefs<'a> {
    snap: &'a Snapshot,
    map: fn(&mut Inner) -> &mut HashMap<u64, u32>,
    chunks: Vec<u64>,
}

impl<'a> ChunkRefs<'a> {
    fn new(snap: &'a Snapshot, map: fn(&mut Inner) -> &mut HashMap<u64, u32>) -> Self {
        ChunkRefs {
            snap,
            map,
            chunks: Vec::new(),
        }
    }
    /// Count `c` once more (caller holds `inner`, as `i`).
    fn add(&mut self, i: &mut Inner, c: u64) {
        *(self.map)(i).entry(c).or_insert(0) += 1;
        self.chunks.push(c);
    }
}

impl Drop for ChunkRefs<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let mut i = self.snap.inner.lock();
        let map = (self.map)(&mut i);
        let mut freed = false;
        for c in self.chunks.drain(..) {
            if let Some(n) = map.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&c);
                    freed = true;
                }
            }
        }
        drop(i);
        if freed {
            self.snap.cond.notify_all();
        }
    }
}

fn reads_map(i: &mut Inner) -> &mut HashMap<u64, u32> {
    &mut i.reads
}

fn merge_writes_map(i: &mut Inner) -> &mut HashMap<u64, u32> {
    &mut i.merge_writes
}

/// The sync job running flag while the leader runs the job without the
/// lock: if the leader unwinds in that window (the job's own I/O is
/// caught; this covers the rest) the flag is cleared, the waiters are
/// woken and the snapshot is invalidated, since its records can no longer
/// be trusted to become durable. Disarmed as soon as the leader holds
/// `commit` again (its drop takes `commit`).
struct SyncingFlag<'a> {
    snap: &'a Snapshot,
    armed: bool,
}

impl Drop for SyncingFlag<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut c = self.snap.commit.lock();
        c.syncing = false;
        if std::thread::panicking() {
            self.snap
                .invalidate_locked(&mut c, "a panic in a metadata sync job");
        }
        drop(c);
        self.snap.commit_cond.notify_all();
    }
}

/// Where a write through the merging origin goes, chunk by chunk.
pub(crate) enum MergeMap<'a> {
    /// A chunk of it is in a batch being merged: wait
    /// ([`Snapshot::wait_merge_runs`]) without holding the gate, then retry.
    Busy,
    /// Pieces for the COW (`(COW offset, buffer offset, length)`, tracked
    /// until the guard drops) and for the origin (`(origin offset, buffer
    /// offset, length)`).
    Mapped {
        cow: Vec<(u64, usize, usize)>,
        origin: Vec<(u64, usize, usize)>,
        tracked: ChunkRefs<'a>,
    },
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
        let usage = store.usage();
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
            usage: Mutex::new(usage),
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

    /// State and usage. Takes only `inner` and the usage leaf lock, both
    /// never held across I/O: it answers whatever the devices do.
    pub fn status(&self) -> SnapStatus {
        let usage = *self.usage.lock();
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

    /// The snapshot's own validity.
    pub fn is_valid(&self) -> bool {
        self.inner.lock().valid
    }

    /// Byte length of origin chunk `c` (the last one may be partial).
    pub(crate) fn chunk_len(&self, c: u64) -> u64 {
        let start = self.chunk_size.chunk_to_byte(Chunk(c));
        self.chunk_size.bytes().min(self.origin_size - start)
    }

    /// Publish the store's usage for [`status`](Self::status). Caller
    /// holds `commit`.
    fn publish_usage(&self, c: &CommitState) {
        *self.usage.lock() = c.store.usage();
    }

    /// The kernel's `__invalidate_snapshot`: keyed on the snapshot's own
    /// flag (the store may have flagged itself invalid already, after a
    /// failed area write), it writes the invalid header (`drop_snapshot`:
    /// valid = 0, then a flush) *before* anyone is told, so that the state
    /// survives a restart. Caller holds `commit`; the header write is one
    /// of the two store I/Os done under it (see ARCHITECTURE.md).
    fn invalidate_locked(&self, c: &mut CommitState, why: &str) {
        if !self.inner.lock().valid {
            return;
        }
        tracing::warn!(snapshot = %self.name, reason = why, "invalidating snapshot");
        if let Err(e) = catch_panic("writing the invalid header", || {
            c.store.drop_snapshot().map_err(std::io::Error::other)
        }) {
            tracing::error!(snapshot = %self.name, error = %e, "invalidating the snapshot failed to write its header");
        }
        self.publish_usage(c);
        {
            let mut i = self.inner.lock();
            i.valid = false;
            // Nothing waits for an invalid snapshot's exceptions: origin
            // writes go on, its own requests fail. Copies still in flight
            // complete into a store that records nothing more.
            i.pending.clear();
        }
        self.cond.notify_all();
    }

    /// Invalidate (a failure outside the store's own calls).
    fn invalidate(&self, why: &str) {
        let mut c = self.commit.lock();
        self.invalidate_locked(&mut c, why);
    }

    /// Allocate COW chunks for `chunks` (already marked pending). On a full
    /// COW the rest are unmarked: in overflow mode (`PO`, snapshot writes)
    /// the snapshot overflows, otherwise it is invalidated.
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
                            e: NewException {
                                seq,
                                old: Chunk(old),
                                new,
                            },
                        });
                    }
                    Err(e) => {
                        full = true;
                        let is_full = matches!(e, StoreError::Full { .. });
                        if !is_full {
                            tracing::error!(snapshot = %self.name, error = %e, "allocating an exception failed");
                        }
                        if overflow_mode && is_full {
                            self.inner.lock().overflow = true;
                        } else {
                            self.invalidate_locked(&mut c, "the COW device is full");
                        }
                        break;
                    }
                }
            }
            self.publish_usage(&c);
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
    fn trigger(&self, first: u64, last: u64) -> Vec<CopyItem> {
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

    /// The COW trigger of an origin write (`__origin_write` for every
    /// snapshot): start the copies the origin byte ranges `ranges`
    /// (`(offset, len)`) need in `snaps`, read once for all snapshots, and
    /// wait until every copy and record is durable and no snapshot read of
    /// those chunks is still on the origin. Every copy is started before
    /// any wait. The one implementation, used by origin writes and by the
    /// merge (before it overwrites a batch). The waits depend only on the
    /// copier's workers and on sync-job leaders, never on the origin's gate
    /// or the merge, so the caller may hold the gate shared.
    pub(crate) fn trigger_and_wait(
        copier: &Copier,
        origin: &DevRef,
        snaps: &[Arc<Snapshot>],
        ranges: &[(u64, u64)],
    ) {
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
        submit_copies(copier, origin, items);
        for &(s, first, last) in &waits {
            s.wait_range(first, last);
        }
        // Their records must be durable before the origin is overwritten
        // (an invalid snapshot no longer holds the origin back, as in the
        // kernel: its error is ignored).
        Snapshot::sync_ranges(&waits);
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
    /// [`sync_range`](Self::sync_range) the origin may be written. Wakers:
    /// [`copy_done`](Self::copy_done) (copier workers, or the thread of a
    /// full-chunk write), [`ChunkRefs`] drops, a failed allocation.
    fn wait_range(&self, first: u64, last: u64) {
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
    /// writing (it picks them up). A failed copy invalidates the snapshot
    /// (kernel: `pending_complete` with `success == 0`).
    pub(crate) fn copy_done(&self, e: NewException, ok: bool) {
        let full;
        {
            let mut c = self.commit.lock();
            let mut recorded: Vec<(DiskException, Option<u64>)> = Vec::new();
            let mut failed = false;
            {
                let CommitState { store, ordered, .. } = &mut *c;
                let d = DiskException {
                    old_chunk: e.old,
                    new_chunk: e.new,
                };
                ordered.complete(e.seq, (d, ok), |_, (d, ok)| {
                    let r = store.record_exception(d, ok).ok();
                    failed |= r.is_none();
                    recorded.push((d, r));
                });
            }
            if recorded.is_empty() {
                // Held back behind an earlier copy; an invalid snapshot
                // has no order to keep.
                return;
            }
            if failed {
                self.invalidate_locked(&mut c, "a copy to the COW or its record failed");
            }
            self.publish_usage(&c);
            let durable = c.store.durable_seq();
            full = c.store.has_full_areas();
            let mut i = self.inner.lock();
            for (d, r) in recorded {
                if let (Some(rseq), true) = (r, i.valid) {
                    i.table.insert(d.old_chunk, d.new_chunk);
                    if rseq > durable {
                        i.unsynced.insert(d.old_chunk.0, rseq);
                        i.unsynced_order.push_back((rseq, d.old_chunk.0));
                    }
                }
                i.pending.remove(&d.old_chunk.0);
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
    /// A waiter waits on `commit_cond` holding nothing but `commit` (which
    /// the wait releases) and, for origin writes, the gate shared, which
    /// the job's leader never takes.
    fn sync_to(&self, target: Option<u64>) -> Result<(), DevError> {
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
            let mut flag = SyncingFlag {
                snap: self,
                armed: true,
            };
            // A panic in the job's I/O is a failed job.
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                .unwrap_or(Err(StoreError::Panicked("writing metadata areas")));
            c = self.commit.lock();
            // Disarm at once: the flag's drop takes `commit`, held from here.
            flag.armed = false;
            c.syncing = false;
            let failed = res.is_err();
            c.store.finish_sync(job.upto(), res);
            if failed {
                self.invalidate_locked(&mut c, "a metadata area write failed");
            }
            self.publish_usage(&c);
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
    fn sync_ranges(ranges: &[(&Arc<Snapshot>, u64, u64)]) {
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
    /// answers `Err(Invalid)`.
    fn sync_range(&self, first: u64, last: u64) -> Result<(), DevError> {
        match self.unsynced_max(first, last) {
            Some(seq) => self.sync_to(Some(seq)),
            None => Ok(()),
        }
    }

    /// The snapshot's part of an origin FLUSH: its records durable, its COW
    /// flushed. An invalid snapshot has nothing to make durable; a failure
    /// (or a panic) invalidates it, never the origin's flush.
    pub(crate) fn flush_for_origin(&self) {
        if !self.is_valid() {
            return;
        }
        let r = self
            .sync_all()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let r = r.and_then(|()| catch_panic("flushing the COW", || self.cow.flush()));
        if let Err(e) = r {
            tracing::error!(snapshot = %self.name, error = %e, "flushing the snapshot failed");
            self.invalidate("flushing its COW failed");
        }
    }

    /// Wait until nothing is pending and no request is in flight on the
    /// snapshot's own device (removal, merge start; the caller has already
    /// made it `gone` or `merging`, so nothing new starts).
    pub(crate) fn wait_idle(&self) {
        let mut i = self.inner.lock();
        while !i.pending.is_empty() || i.active_io > 0 {
            self.cond.wait(&mut i);
        }
    }

    /// Removed from its origin: its device answers `Gone` from now on.
    pub(crate) fn set_gone(&self) {
        self.inner.lock().gone = true;
        self.cond.notify_all();
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

    /// Admit a request on the snapshot's own device. Returns only the
    /// guard (whose drop takes `inner`), never together with a guard of
    /// `inner`: the caller locks `inner` itself, after this.
    fn start_io(&self) -> Result<IoGuard<'_>, DevError> {
        let mut i = self.inner.lock();
        Self::check_io_state(&i)?;
        i.active_io += 1;
        Ok(IoGuard(self))
    }

    fn read_snapshot(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.origin_size)?;
        let cs = self.chunk_size;
        let segs;
        let _io = self.start_io()?;
        let mut tracked = ChunkRefs::new(self, reads_map);
        {
            let mut i = self.inner.lock();
            let mut from_origin = Vec::new();
            segs = Self::map_read(&i, cs, offset, buf.len() as u64, |c| from_origin.push(c));
            for c in from_origin {
                tracked.add(&mut i, c);
            }
        }
        for s in &segs {
            let dev = if s.to_cow {
                &self.cow
            } else {
                &self.origin_dev
            };
            dev.read_at(&mut buf[s.buf_off..s.buf_off + s.len], s.dev_off)
                .map_err(DevError::Io)?;
        }
        Ok(())
    }

    /// Write a run of whole chunks straight to their new COW chunks (one
    /// write: both the origin and the COW chunk numbers are consecutive), then
    /// push each through the ordered completion path as its copy. Empties
    /// `run`. A failed (or panicking) write completes them as failed copies,
    /// which invalidates the snapshot.
    fn write_full_chunks(
        &self,
        buf: &[u8],
        run: &mut Vec<NewException>,
        (start, len): (usize, usize),
        direct_done: &mut HashSet<u64>,
    ) {
        let Some(first) = run.first() else {
            return;
        };
        let at = self.chunk_size.chunk_to_byte(first.new);
        let ok = match catch_panic("writing whole chunks to the COW", || {
            self.cow
                .write_at(&buf[start..start + len], at, WriteFlags::NONE)
        }) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(snapshot = %self.name, error = %e, "COW write failed");
                false
            }
        };
        for e in run.drain(..) {
            direct_done.insert(e.old.0);
            self.copy_done(e, ok);
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
        let _io = self.start_io()?;
        {
            let mut i = self.inner.lock();
            // Kernel: once overflowed, every write to the snapshot fails.
            if i.overflow {
                return Err(DevError::Overflow);
            }
            for (pi, p) in ps.iter().enumerate() {
                if i.table.lookup(Chunk(p.chunk)).is_some() {
                    continue;
                }
                wait.push(p.chunk);
                if i.pending.insert(p.chunk) {
                    create.push(p.chunk);
                    if p.len as u64 == cs.bytes() {
                        full_piece.insert(p.chunk, pi);
                    }
                }
            }
        }
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
            let mut run: Vec<NewException> = Vec::new();
            let mut run_buf: (usize, usize) = (0, 0); // (start, len) in buf
            for it in items {
                match full_piece.get(&it.e.old.0) {
                    Some(&pi) if !full => {
                        let p = ps[pi];
                        let extends = run.last().is_some_and(|l| {
                            it.e.old.0 == l.old.0 + 1
                                && it.e.new.0 == l.new.0 + 1
                                && p.buf_off == run_buf.0 + run_buf.1
                        });
                        if !extends {
                            self.write_full_chunks(buf, &mut run, run_buf, &mut direct_done);
                            run_buf = (p.buf_off, 0);
                        }
                        run.push(it.e);
                        run_buf.1 += p.len;
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
                if self.store_type == StoreType::PersistentOverflow && self.is_valid() {
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
            for p in &ps {
                if direct_done.contains(&p.chunk) {
                    continue;
                }
                let new = i.table.lookup(Chunk(p.chunk)).ok_or(DevError::Invalid)?;
                push_seg(
                    &mut segs,
                    true,
                    cs.chunk_to_byte(new) + p.in_chunk,
                    p.buf_off,
                    p.len,
                );
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
            if let (Some(first), Some(last)) = (ps.first(), ps.last()) {
                self.sync_range(first.chunk, last.chunk)?;
            }
        }
        Ok(())
    }

    // ---- The block-status view (`extents.rs`). ----

    /// The lifecycle flags block status needs: (removed, merging, valid).
    pub(crate) fn lifecycle(&self) -> (bool, bool, bool) {
        let i = self.inner.lock();
        (i.gone, i.merging, i.valid)
    }

    /// Run `f` on the completed exceptions and the chunks with a pending
    /// exception, under `inner` (no I/O in `f`).
    pub(crate) fn with_exceptions<T>(
        &self,
        f: impl FnOnce(&ExceptionTable, &HashSet<u64>) -> T,
    ) -> T {
        let i = self.inner.lock();
        f(&i.table, &i.pending)
    }

    // ---- The merge's view (`snapshot-merge`): what merge.rs may do. ----

    /// Switch to merging (caller holds the origin's gate exclusively): the
    /// snapshot's device answers `Gone`, no more exceptions are triggered.
    pub(crate) fn set_merging(&self) {
        self.inner.lock().merging = true;
        self.cond.notify_all();
    }

    /// A new merge run starts: forget an earlier failure.
    pub(crate) fn clear_merge_failed(&self) {
        self.inner.lock().merge_failed = false;
    }

    /// The merge failed: release every chunk published as merging, so no
    /// write waits for a batch that will not end.
    pub(crate) fn set_merge_failed(&self) {
        {
            let mut i = self.inner.lock();
            i.merge_failed = true;
            i.merging_runs = Vec::new();
        }
        self.cond.notify_all();
    }

    /// Wake whoever waits on the snapshot (a merge told to stop).
    pub(crate) fn wake(&self) {
        self.cond.notify_all();
    }

    /// Run `f` on the store under the commit lock (the merge's
    /// `prepare_merge` / `commit_merge`, which read and write areas: the
    /// other store I/O done under `commit`, at a time when nothing else
    /// needs it — the merging snapshot allocates nothing and `status`
    /// reads the published usage).
    pub(crate) fn with_store<T>(&self, f: impl FnOnce(&mut dyn ExceptionStore) -> T) -> T {
        let mut c = self.commit.lock();
        let r = f(c.store.as_mut());
        self.publish_usage(&c);
        r
    }

    /// Is every `(old, new, n)` run (`old`/`new`: the first chunks) in the
    /// in-memory table? `Err(chunk)`: the first one that is not.
    pub(crate) fn check_runs_in_table(&self, runs: &[(u64, u64, u64)]) -> Result<(), u64> {
        let i = self.inner.lock();
        for &(old, new, n) in runs {
            for k in 0..n {
                if i.table.lookup(Chunk(old + k)) != Some(Chunk(new + k)) {
                    return Err(old + k);
                }
            }
        }
        Ok(())
    }

    /// Publish `runs` (`(first, n)`, sorted, disjoint) as being merged and
    /// wait until no write through the merging origin is still writing to
    /// one of them on the COW. The wakers ([`ChunkRefs`] drops) hold
    /// nothing the merge thread holds.
    pub(crate) fn publish_merge_batch(&self, runs: Vec<(u64, u64)>, stop: &dyn Fn() -> bool) {
        let mut i = self.inner.lock();
        i.merging_runs = runs;
        while !stop() && i.merge_writes.keys().any(|&c| in_runs(&i.merging_runs, c)) {
            self.cond.wait(&mut i);
        }
    }

    /// A batch is durable on the origin and cleared from the store: drop
    /// its exceptions (`(first, n)` runs) from the table, leave `still`
    /// published (the batch copied meanwhile) and release the writes that
    /// wait for the rest.
    pub(crate) fn release_merge_batch(&self, merged: &[(u64, u64)], still: Vec<(u64, u64)>) {
        {
            let mut i = self.inner.lock();
            for &(first, n) in merged {
                i.table.remove_range(Chunk(first), n);
            }
            i.merging_runs = still;
        }
        self.cond.notify_all();
    }

    /// Wait until none of `chunks` is in a batch being merged. Called by
    /// writes through the merging origin **without** the origin's gate:
    /// the batch ends only when the merge thread gets on, and nothing the
    /// merge thread may wait for is held here. Returns whether the merge
    /// failed meanwhile.
    pub(crate) fn wait_merge_runs(&self, chunks: &[u64]) -> bool {
        let mut i = self.inner.lock();
        while chunks.iter().any(|&c| in_runs(&i.merging_runs, c)) {
            self.cond.wait(&mut i);
        }
        i.merge_failed
    }

    /// Map a write through the merging origin (`snapshot_merge_map`):
    /// chunks with an exception go to the COW (tracked until the returned
    /// guard drops), the rest to the origin; `Busy` when a chunk is in a
    /// batch being merged (never waits).
    pub(crate) fn map_merge_write(&self, ps: &[Piece], offset: u64) -> MergeMap<'_> {
        let cs = self.chunk_size;
        let mut i = self.inner.lock();
        if ps.iter().any(|p| in_runs(&i.merging_runs, p.chunk)) {
            return MergeMap::Busy;
        }
        let mut cow = Vec::new();
        let mut origin: Vec<(u64, usize, usize)> = Vec::new();
        let mut tracked = ChunkRefs::new(self, merge_writes_map);
        for p in ps {
            let new = if i.valid {
                i.table.lookup(Chunk(p.chunk))
            } else {
                None
            };
            match new {
                Some(new) => {
                    tracked.add(&mut i, p.chunk);
                    cow.push((cs.chunk_to_byte(new) + p.in_chunk, p.buf_off, p.len));
                }
                None => match origin.last_mut() {
                    Some(l) if l.1 + l.2 == p.buf_off => l.2 += p.len,
                    _ => origin.push((offset + p.buf_off as u64, p.buf_off, p.len)),
                },
            }
        }
        drop(i);
        MergeMap::Mapped {
            cow,
            origin,
            tracked,
        }
    }

    /// Map a read of the merging origin: chunks with an exception come from
    /// the COW, the rest from the origin.
    pub(crate) fn map_merge_read(&self, offset: u64, len: u64) -> Vec<Seg> {
        let i = self.inner.lock();
        if !i.valid && len > 0 {
            return vec![Seg {
                to_cow: false,
                dev_off: offset,
                buf_off: 0,
                len: len as usize,
            }];
        }
        Self::map_read(&i, self.chunk_size, offset, len, |_| {})
    }

    /// The device segments of a read of `[offset, offset+len)`: chunks with
    /// an exception from the COW, the rest from the origin (each such chunk
    /// handed to `from_origin`). The one mapping of snapshot reads and of
    /// reads of the merging origin.
    fn map_read(
        i: &Inner,
        cs: ChunkSize,
        offset: u64,
        len: u64,
        mut from_origin: impl FnMut(u64),
    ) -> Vec<Seg> {
        let mut segs = Vec::new();
        for p in pieces(cs, offset, len) {
            match i.table.lookup(Chunk(p.chunk)) {
                Some(new) => push_seg(
                    &mut segs,
                    true,
                    cs.chunk_to_byte(new) + p.in_chunk,
                    p.buf_off,
                    p.len,
                ),
                None => {
                    from_origin(p.chunk);
                    push_seg(
                        &mut segs,
                        false,
                        offset + p.buf_off as u64,
                        p.buf_off,
                        p.len,
                    )
                }
            }
        }
        segs
    }
}

/// Is origin chunk `c` in one of `runs` (`(first, n)`, sorted, disjoint)?
pub(crate) fn in_runs(runs: &[(u64, u64)], c: u64) -> bool {
    let k = runs.partition_point(|r| r.0 <= c);
    k > 0 && runs.get(k - 1).is_some_and(|&(f, n)| c < f + n)
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
    items: Vec<NewException>,
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
        let off = cs.chunk_to_byte(it.e.old);
        let len = it.snap.chunk_len(it.e.old.0);
        let dest_off = cs.chunk_to_byte(it.e.new);
        by_src.entry((off, len)).or_default().push(DestRun {
            snap: it.snap,
            off: dest_off,
            len,
            items: vec![it.e],
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
                for &e in &d.items {
                    let done = catch_panic("completing a copy", || {
                        d.snap.copy_done(e, ok);
                        Ok(())
                    });
                    if done.is_err() {
                        d.snap.invalidate("a panic while completing a copy");
                    }
                }
            }
        });
    }
}
