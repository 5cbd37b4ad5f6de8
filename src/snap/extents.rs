//! Extent queries on the engine: what NBD `BLOCK_STATUS` and `dmsnap diff`
//! report, computed from the exception tables (and, for holes, from the
//! origin file with `SEEK_DATA`/`SEEK_HOLE`).
//!
//! - `base:allocation`: on the origin, holes of a sparse origin file are
//!   `HOLE|ZERO`, the rest data. On a snapshot, a chunk with a COW copy is
//!   data; one without is `HOLE` (a write there allocates, and may fail
//!   when a fixed-size COW is full), plus `ZERO` where the origin file has
//!   a hole (the chunk reads as the origin reads).
//! - `qemu:allocation-depth` (snapshots; also answered on the origin): 1 in
//!   the COW, 2 from the origin, 0 where both are holes. On the origin: 1
//!   data, 0 hole.
//! - `qemu:dirty-bitmap:S`, flag 1 = this export may differ from `S`. For
//!   the origin: the chunks where `S` has an exception (an origin write
//!   since `S` was taken, or a write to `S`) — exact when `S` was never
//!   written to. For snapshot `T`: the union of `S`'s and `T`'s exceptions
//!   (where neither has one, both read the origin); for `T = S`: nothing.
//!   Pending exceptions count as exceptions. An invalid, removed or merging
//!   `S`, or a merging origin, makes the whole range dirty (never a miss).
//!
//! **Consistency with writers** ([`Fences`]): every write to the origin or
//! to a snapshot holds a *write span* on its device's [`Fences`] for its
//! whole duration; a block-status query first puts a *fence* over its range
//! on every device whose writes could change its answer (the export's own,
//! and each snapshot `S` of a dirty bitmap), waits for the write spans
//! already inside the range to end, computes, and hands the fence guard to
//! the caller, who drops it once the reply is sent. A write overlapping a
//! fence waits for it before it starts (holding no engine lock), so no
//! chunk reported clean can change before the reply is out. Writers go
//! first: a new fence over a waiting writer waits for it (no starvation by
//! a stream of queries); devices are fenced in address order (no cycle). The NBD server
//! bounds the time a fence is held by a send timeout (then it cuts the
//! connection), so a client that stops reading cannot stall writers for
//! long. Writers outside the fenced range never wait.

use super::{Origin, SnapError, Snapshot};
use crate::device::{
    check_request, push_extent, BlockStatus, DevError, Device, Extent, MetaContext, STATE_DIRTY,
    STATE_HOLE, STATE_ZERO,
};
use crate::exception::{ExceptionRun, ExceptionTable};
use crate::io::BlockDev;
use crate::units::{Chunk, ChunkSize};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Fences

/// Write spans and block-status fences of one device (the origin, or one
/// snapshot). Cheap to clone (shared).
#[derive(Clone, Default)]
pub(crate) struct Fences {
    inner: Arc<FenceInner>,
}

#[derive(Default)]
struct FenceInner {
    st: Mutex<FenceState>,
    cond: Condvar,
}

#[derive(Default)]
struct FenceState {
    next_id: u64,
    /// `(id, start, end)` of writes in flight.
    writes: Vec<(u64, u64, u64)>,
    /// `(id, start, end)` of block-status answers not yet delivered.
    fences: Vec<(u64, u64, u64)>,
    /// `(id, start, end)` of writes waiting for a fence: new fences over
    /// them wait (writers first), so a stream of overlapping queries
    /// cannot starve a writer.
    waiting: Vec<(u64, u64, u64)>,
    /// Threads waiting on `cond` (skip the notify when none).
    waiters: usize,
}

fn overlaps(list: &[(u64, u64, u64)], start: u64, end: u64) -> bool {
    list.iter().any(|&(_, s, e)| s < end && start < e)
}

impl FenceState {
    fn remove(list: &mut Vec<(u64, u64, u64)>, id: u64) {
        if let Some(p) = list.iter().position(|&(i, ..)| i == id) {
            list.swap_remove(p);
        }
    }
}

/// A write in flight (see [`Fences::write`]).
pub(crate) struct WriteSpan<'a> {
    f: &'a FenceInner,
    id: u64,
}

impl Drop for WriteSpan<'_> {
    fn drop(&mut self) {
        let mut st = self.f.st.lock();
        FenceState::remove(&mut st.writes, self.id);
        if st.waiters > 0 {
            self.f.cond.notify_all();
        }
    }
}

/// A block-status answer not yet delivered: overlapping writes wait.
pub(crate) struct FenceGuard {
    f: Arc<FenceInner>,
    id: u64,
    start: u64,
    end: u64,
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        let mut st = self.f.st.lock();
        FenceState::remove(&mut st.fences, self.id);
        if st.waiters > 0 {
            self.f.cond.notify_all();
        }
    }
}

impl FenceGuard {
    /// Wait until no write registered before this fence overlaps it (later
    /// ones wait for the fence, so they are not registered).
    fn wait_writes(&self) {
        let mut st = self.f.st.lock();
        while overlaps(&st.writes, self.start, self.end) {
            st.waiters += 1;
            self.f.cond.wait(&mut st);
            st.waiters -= 1;
        }
    }
}

impl Fences {
    /// A write of `len` bytes at `offset` starts: wait while a fence covers
    /// any of it, then register. Call it holding no engine lock.
    pub(crate) fn write(&self, offset: u64, len: u64) -> WriteSpan<'_> {
        let end = offset.saturating_add(len.max(1));
        let f = &*self.inner;
        let mut st = f.st.lock();
        let id = st.next_id;
        st.next_id += 1;
        if overlaps(&st.fences, offset, end) {
            st.waiting.push((id, offset, end));
            while overlaps(&st.fences, offset, end) {
                st.waiters += 1;
                f.cond.wait(&mut st);
                st.waiters -= 1;
            }
            FenceState::remove(&mut st.waiting, id);
            // Fences held back by this writer may go on (they then wait
            // for it as a write in flight).
            if st.waiters > 0 {
                f.cond.notify_all();
            }
        }
        st.writes.push((id, offset, end));
        WriteSpan { f, id }
    }

    /// Put a fence over `[start, end)`, after the writers already waiting
    /// for an older fence over it (see [`FenceGuard::wait_writes`] for the
    /// writes in flight).
    fn fence(&self, start: u64, end: u64) -> FenceGuard {
        let f = &*self.inner;
        let mut st = f.st.lock();
        while overlaps(&st.waiting, start, end) {
            st.waiters += 1;
            f.cond.wait(&mut st);
            st.waiters -= 1;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.fences.push((id, start, end));
        FenceGuard {
            f: self.inner.clone(),
            id,
            start,
            end,
        }
    }

    /// Fence `[start, end)` on every one of `devs`, then wait for the writes
    /// already inside it on each (all fences first, so no device's writers
    /// can slip in while another's are awaited). Devices are fenced in one
    /// global order (their address): a registration may wait for writers
    /// that wait for older fences, and the order rules out a cycle.
    fn fence_all(devs: &[&Fences], start: u64, end: u64) -> Vec<FenceGuard> {
        let mut devs = devs.to_vec();
        devs.sort_by_key(|f| Arc::as_ptr(&f.inner) as usize);
        devs.dedup_by_key(|f| Arc::as_ptr(&f.inner) as usize);
        let guards: Vec<FenceGuard> = devs.iter().map(|f| f.fence(start, end)).collect();
        for g in &guards {
            g.wait_writes();
        }
        guards
    }
}

// ---------------------------------------------------------------------------
// Range sets

/// A set of byte ranges known exactly inside `[start, end)`: `list` is
/// sorted, disjoint, non-adjacent, inside `[start, end)`. `end` may be below
/// the range asked when a cap stopped the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ranges {
    pub(crate) list: Vec<(u64, u64)>,
    pub(crate) end: u64,
}

impl Ranges {
    fn all(start: u64, end: u64) -> Ranges {
        Ranges {
            list: if start < end {
                vec![(start, end)]
            } else {
                vec![]
            },
            end,
        }
    }
    fn none(end: u64) -> Ranges {
        Ranges { list: vec![], end }
    }
}

fn push_range(list: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    if a >= b {
        return;
    }
    match list.last_mut() {
        Some(l) if l.1 >= a => l.1 = l.1.max(b),
        _ => list.push((a, b)),
    }
}

/// The byte ranges of `runs` (origin order, chunk size `cs`) inside
/// `[start, end)`, stopping once `cap` ranges are collected (then `end` is
/// where the scan stopped). `size` clips the partial last chunk.
pub(crate) fn chunk_ranges(
    runs: impl Iterator<Item = ExceptionRun>,
    cs: ChunkSize,
    start: u64,
    end: u64,
    cap: usize,
) -> Ranges {
    let mut list: Vec<(u64, u64)> = Vec::new();
    for r in runs {
        let a = cs.chunk_to_byte(r.old_chunk).max(start);
        if a >= end {
            break;
        }
        let b = cs.chunk_to_byte(Chunk(r.old_chunk.0 + r.len)).min(end);
        let extends = list.last().is_some_and(|l| l.1 >= a);
        if !extends && list.len() >= cap.max(1) {
            return Ranges { list, end: a };
        }
        push_range(&mut list, a, b);
    }
    Ranges { list, end }
}

/// Union of two range sets, exact up to the smaller of their ends.
fn union(a: &Ranges, b: &Ranges) -> Ranges {
    let end = a.end.min(b.end);
    let mut all: Vec<(u64, u64)> = a
        .list
        .iter()
        .chain(&b.list)
        .filter(|r| r.0 < end)
        .map(|&(s, e)| (s, e.min(end)))
        .collect();
    all.sort_unstable();
    let mut list = Vec::with_capacity(all.len());
    for (s, e) in all {
        push_range(&mut list, s, e);
    }
    Ranges { list, end }
}

/// Paint `[start, ..)` with `flags(mask)`, bit `i` of the mask set where
/// `sets[i]` holds the byte; covers up to the smallest `end` of the sets,
/// at most `max` extents. Never empty when `start < end` of every set.
fn paint(start: u64, sets: &[&Ranges], flags: impl Fn(u32) -> u32, max: usize) -> Vec<Extent> {
    let end = sets.iter().map(|s| s.end).min().unwrap_or(start);
    let mut points: Vec<u64> = vec![start, end];
    for s in sets {
        for &(a, b) in &s.list {
            points.push(a.clamp(start, end));
            points.push(b.clamp(start, end));
        }
    }
    points.sort_unstable();
    points.dedup();
    let mut idx = vec![0usize; sets.len()];
    let mut out: Vec<Extent> = Vec::new();
    for w in points.windows(2) {
        let (p, q) = (w[0], w[1]);
        let mut mask = 0u32;
        for (i, s) in sets.iter().enumerate() {
            while idx[i] < s.list.len() && s.list[idx[i]].1 <= p {
                idx[i] += 1;
            }
            if s.list.get(idx[i]).is_some_and(|r| r.0 <= p) {
                mask |= 1 << i;
            }
        }
        let f = flags(mask);
        let merges = out.last().is_some_and(|l| l.flags == f);
        if !merges && out.len() >= max.max(1) {
            break;
        }
        push_extent(&mut out, q - p, f);
    }
    out
}

// ---------------------------------------------------------------------------
// What the engine knows

/// The data (non-hole) ranges of `dev` inside `[start, end)`, from
/// `SEEK_DATA`/`SEEK_HOLE` on its file (a block device, or a device without
/// a file descriptor, is all data).
pub(crate) fn data_ranges(dev: &dyn BlockDev, start: u64, end: u64, cap: usize) -> Ranges {
    use std::os::fd::AsRawFd;
    let Some(fd) = dev.raw_fd() else {
        return Ranges::all(start, end);
    };
    let fd = fd.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> Result<Option<u64>, ()> {
        let Ok(p) = libc::off_t::try_from(pos) else {
            return Err(());
        };
        // SAFETY: lseek on a descriptor the device keeps open for its whole
        // life (borrowed above); the device does positioned I/O only, so
        // moving the file offset affects nothing else.
        let r = unsafe { libc::lseek(fd, p, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Ok(None), // no data past `pos`
            _ => Err(()),
        }
    };
    let mut list = Vec::new();
    let mut pos = start;
    while pos < end {
        if list.len() >= cap.max(1) {
            return Ranges { list, end: pos };
        }
        let d = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d.max(pos),
            Ok(None) => break,
            Err(()) => {
                push_range(&mut list, pos, end);
                break;
            }
        };
        if d >= end {
            break;
        }
        let h = match seek(d, libc::SEEK_HOLE) {
            Ok(Some(h)) if h > d => h.min(end),
            _ => end,
        };
        push_range(&mut list, d, h);
        pos = h;
    }
    Ranges { list, end }
}

/// Why a snapshot's exceptions cannot stand for "what changed".
fn unusable(s: &Snapshot) -> Option<&'static str> {
    let (gone, merging, valid) = s.lifecycle();
    if gone {
        Some("it was removed")
    } else if merging {
        Some("it is merging into the origin")
    } else if !valid {
        Some("it is invalid (its COW overflowed or failed), so its exceptions are incomplete")
    } else {
        None
    }
}

impl Snapshot {
    /// Byte ranges of `[start, end)` where this snapshot has an exception,
    /// completed or pending (in its own chunk size), at most `cap` ranges.
    pub(crate) fn exception_ranges(&self, start: u64, end: u64, cap: usize) -> Ranges {
        let cs = self.chunk_size();
        let end = end.min(self.size());
        if start >= end {
            return Ranges::none(end);
        }
        let first = cs.chunk_of_byte(start);
        let (table, mut pend) = self.with_exceptions(|table, pending| {
            let table = chunk_ranges(table.runs_from(first), cs, start, end, cap);
            if pending.is_empty() {
                return (table, Vec::new());
            }
            let last = cs.chunk_of_byte(table.end.max(start + 1) - 1).0;
            let pend: Vec<u64> = if (last - first.0 + 1) as usize > pending.len() {
                pending
                    .iter()
                    .copied()
                    .filter(|c| *c >= first.0 && *c <= last)
                    .collect()
            } else {
                (first.0..=last).filter(|c| pending.contains(c)).collect()
            };
            (table, pend)
        });
        if pend.is_empty() {
            return table;
        }
        pend.sort_unstable();
        let runs = pend.into_iter().map(|c| ExceptionRun {
            old_chunk: Chunk(c),
            new_chunk: Chunk(0),
            len: 1,
        });
        let pending = chunk_ranges(runs, cs, start, table.end, usize::MAX);
        union(&table, &pending)
    }
}

/// Byte extents `(offset, length)` where `to` (`None`: the origin) may differ
/// from snapshot `from`: the union of their exception tables, merged. The
/// same answer the dirty bitmaps give; pure over the tables.
pub fn diff_tables(
    size: u64,
    from: (&ExceptionTable, ChunkSize),
    to: Option<(&ExceptionTable, ChunkSize)>,
) -> Vec<(u64, u64)> {
    let a = chunk_ranges(from.0.runs_from(Chunk(0)), from.1, 0, size, usize::MAX);
    let r = match to {
        None => a,
        Some((t, cs)) => union(
            &a,
            &chunk_ranges(t.runs_from(Chunk(0)), cs, 0, size, usize::MAX),
        ),
    };
    r.list.into_iter().map(|(s, e)| (s, e - s)).collect()
}

impl Origin {
    /// `dmsnap diff` online: the byte extents `(offset, length)` where
    /// `to` (`None`: the origin) may differ from snapshot `from`, and the
    /// granularity (smallest chunk size involved).
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<(Vec<(u64, u64)>, u64), SnapError> {
        let s = self
            .snapshot(from)
            .ok_or_else(|| SnapError::NotFound(from.to_string()))?;
        if let Some(why) = unusable(&s) {
            return Err(SnapError::NoChangeInfo(format!(
                "snapshot '{from}' has no changed-block information: {why}"
            )));
        }
        let size = self.size();
        let mut granularity = s.chunk_size().bytes();
        let a = s.exception_ranges(0, size, usize::MAX);
        let r = match to {
            None => a,
            Some(t) if t == from => return Ok((vec![], granularity)),
            Some(t) => {
                let t = self
                    .snapshot(t)
                    .ok_or_else(|| SnapError::NotFound(t.to_string()))?;
                if let Some(why) = unusable(&t) {
                    return Err(SnapError::NoChangeInfo(format!(
                        "snapshot '{}' cannot be compared: {why}",
                        t.name()
                    )));
                }
                granularity = granularity.min(t.chunk_size().bytes());
                union(&a, &t.exception_ranges(0, size, usize::MAX))
            }
        };
        Ok((
            r.list.into_iter().map(|(s, e)| (s, e - s)).collect(),
            granularity,
        ))
    }

    /// Hold every write to the origin back until the guard drops, after the
    /// writes in flight ended. `ActivePool` takes it around the start of a
    /// merge, which changes what the origin reads at once.
    pub fn hold_writes(&self) -> impl Drop + Send {
        Fences::fence_all(&[&self.fences], 0, u64::MAX)
    }
}

/// Most extents per context in one block-status answer.
pub const MAX_EXTENTS: usize = 16 * 1024;

/// What the NBD and FUSE exports serve for the origin or one snapshot: the
/// device itself, plus block status from the engine.
pub struct ExportDevice {
    origin: Arc<Origin>,
    snap: Option<Arc<Snapshot>>,
}

impl ExportDevice {
    /// The origin's export.
    pub fn origin(origin: Arc<Origin>) -> ExportDevice {
        ExportDevice { origin, snap: None }
    }
    /// Snapshot `snap`'s export.
    pub fn snapshot(origin: Arc<Origin>, snap: Arc<Snapshot>) -> ExportDevice {
        ExportDevice {
            origin,
            snap: Some(snap),
        }
    }
    fn dev(&self) -> &dyn Device {
        match &self.snap {
            Some(s) => &**s,
            None => &*self.origin,
        }
    }

    /// The snapshot a dirty bitmap compares with, when its exceptions can
    /// stand for "what changed" (else: everything is dirty).
    fn bitmap_base(&self, name: &str) -> Option<Arc<Snapshot>> {
        let s = self.origin.snapshot(name)?;
        unusable(&s).is_none().then_some(s)
    }

    fn compute(
        &self,
        offset: u64,
        end: u64,
        ctx: &MetaContext,
        max: usize,
    ) -> Result<Vec<Extent>, DevError> {
        let origin_dev = &*self.origin.dev;
        Ok(match (&self.snap, ctx) {
            (None, MetaContext::Allocation | MetaContext::AllocationDepth) => {
                if self.origin.merging.read().is_some() {
                    // Reads come from the merging snapshot: no hole claims.
                    let f = if *ctx == MetaContext::Allocation {
                        0
                    } else {
                        1
                    };
                    vec![Extent {
                        len: end - offset,
                        flags: f,
                    }]
                } else {
                    let d = data_ranges(origin_dev, offset, end, max);
                    let alloc = *ctx == MetaContext::Allocation;
                    paint(
                        offset,
                        &[&d],
                        |m| match (m & 1 != 0, alloc) {
                            (true, true) => 0,
                            (false, true) => STATE_HOLE | STATE_ZERO,
                            (true, false) => 1,
                            (false, false) => 0,
                        },
                        max,
                    )
                }
            }
            (Some(t), MetaContext::Allocation | MetaContext::AllocationDepth) => {
                let e = t.exception_ranges(offset, end, max);
                let d = data_ranges(origin_dev, offset, e.end, max);
                let alloc = *ctx == MetaContext::Allocation;
                paint(
                    offset,
                    &[&e, &d],
                    |m| match (m & 1 != 0, m & 2 != 0, alloc) {
                        (true, _, true) => 0,
                        (false, true, true) => STATE_HOLE,
                        (false, false, true) => STATE_HOLE | STATE_ZERO,
                        (true, _, false) => 1,
                        (false, true, false) => 2,
                        (false, false, false) => 0,
                    },
                    max,
                )
            }
            (_, MetaContext::DirtyBitmap(name)) => {
                let all_dirty = vec![Extent {
                    len: end - offset,
                    flags: STATE_DIRTY,
                }];
                if self.snap.as_ref().is_some_and(|t| t.name() == name) {
                    return Ok(vec![Extent {
                        len: end - offset,
                        flags: 0,
                    }]);
                }
                let Some(s) = self.bitmap_base(name) else {
                    return Ok(all_dirty);
                };
                let r = match &self.snap {
                    None => {
                        if self.origin.merging.read().is_some() {
                            return Ok(all_dirty);
                        }
                        s.exception_ranges(offset, end, max)
                    }
                    Some(t) => {
                        let a = s.exception_ranges(offset, end, max);
                        let b = t.exception_ranges(offset, a.end, max);
                        union(&a, &b)
                    }
                };
                paint(
                    offset,
                    &[&r],
                    |m| if m & 1 != 0 { STATE_DIRTY } else { 0 },
                    max,
                )
            }
        })
    }
}

impl Device for ExportDevice {
    fn size(&self) -> u64 {
        self.dev().size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.dev().preferred_block_size()
    }
    fn read_only(&self) -> bool {
        self.dev().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.dev().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        self.dev().write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        self.dev().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.dev().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.dev().write_zeroes(offset, len, fua)
    }

    fn meta_contexts(&self) -> Vec<MetaContext> {
        let mut v = vec![MetaContext::Allocation, MetaContext::AllocationDepth];
        v.extend(
            self.origin
                .snapshots()
                .iter()
                .map(|s| MetaContext::DirtyBitmap(s.name().to_string())),
        );
        v
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        contexts: &[MetaContext],
        max_extents: usize,
    ) -> Result<BlockStatus, DevError> {
        check_request(offset, len, self.size())?;
        let end = offset + len;
        if len == 0 {
            return Ok(BlockStatus {
                extents: contexts.iter().map(|_| Vec::new()).collect(),
                guard: None,
            });
        }
        if let Some(t) = &self.snap {
            let (gone, merging, valid) = t.lifecycle();
            if gone || merging {
                return Err(DevError::Gone);
            }
            if !valid {
                return Err(DevError::Invalid);
            }
        }
        // Every device whose writes could change the answer.
        let own = match &self.snap {
            Some(t) => &t.fences,
            None => &self.origin.fences,
        };
        let bases: Vec<Arc<Snapshot>> = contexts
            .iter()
            .filter_map(|c| match c {
                MetaContext::DirtyBitmap(n) => self.origin.snapshot(n),
                _ => None,
            })
            .filter(|s| !self.snap.as_ref().is_some_and(|t| Arc::ptr_eq(t, s)))
            .collect();
        let mut devs: Vec<&Fences> = vec![own];
        for b in &bases {
            if !devs.iter().any(|f| Arc::ptr_eq(&f.inner, &b.fences.inner)) {
                devs.push(&b.fences);
            }
        }
        let guards = Fences::fence_all(&devs, offset, end);
        let max = max_extents.max(1);
        let extents = contexts
            .iter()
            .map(|c| self.compute(offset, end, c, max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BlockStatus {
            extents,
            guard: Some(Box::new(guards)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(list: &[(u64, u64)], end: u64) -> Ranges {
        Ranges {
            list: list.to_vec(),
            end,
        }
    }

    #[test]
    fn union_and_paint() {
        let a = rs(&[(0, 10), (20, 30)], 100);
        let b = rs(&[(5, 15), (30, 40)], 50);
        assert_eq!(union(&a, &b), rs(&[(0, 15), (20, 40)], 50));
        let e = paint(0, &[&a, &b], |m| m, 100);
        let lens: Vec<(u64, u32)> = e.iter().map(|x| (x.len, x.flags)).collect();
        assert_eq!(
            lens,
            vec![(5, 1), (5, 3), (5, 2), (5, 0), (10, 1), (10, 2), (10, 0)]
        );
        let capped = paint(0, &[&a, &b], |m| m, 2);
        assert_eq!(capped.len(), 2);
        let one = paint(3, &[&rs(&[], 9)], |m| m, 1);
        assert_eq!(one, vec![Extent { len: 6, flags: 0 }]);
    }

    #[test]
    fn chunk_ranges_caps_and_clips() {
        let cs = ChunkSize::from_bytes(4096).unwrap();
        let runs = [(1u64, 2u64), (3, 1), (10, 1), (20, 5)].map(|(o, l)| ExceptionRun {
            old_chunk: Chunk(o),
            new_chunk: Chunk(0),
            len: l,
        });
        let all = chunk_ranges(runs.iter().copied(), cs, 0, 100 * 4096, 100);
        assert_eq!(
            all.list,
            vec![
                (4096, 4 * 4096),
                (10 * 4096, 11 * 4096),
                (20 * 4096, 25 * 4096)
            ]
        );
        let capped = chunk_ranges(runs.iter().copied(), cs, 0, 100 * 4096, 1);
        assert_eq!(capped, rs(&[(4096, 4 * 4096)], 10 * 4096));
        let clipped = chunk_ranges(runs.iter().copied(), cs, 5000, 21 * 4096, 100);
        assert_eq!(
            clipped.list,
            vec![
                (5000, 4 * 4096),
                (10 * 4096, 11 * 4096),
                (20 * 4096, 21 * 4096)
            ]
        );
    }
}
