//! The merge path: `prepare_merge_batch` hands out the runs the kernel's
//! `persistent_prepare_merge` would return one after the other (each
//! committed in turn), walking back across areas, and `commit_merge_batch`
//! clears them on disk: one flush and one FUA write per batch, however many
//! runs and areas. Batches may be prepared ahead of their commit (the
//! engine copies the next batch while the previous one is made durable).

use super::PersistentStore;
use crate::format::{area_location, DiskException, RawDiskException, DISK_EXCEPTION_BYTES};
use crate::io::WriteFlags;
use crate::store::{ExceptionStore, MergeRun, StoreError};
use crate::units::Chunk;
use zerocopy::FromBytes;

/// One metadata area a merge batch clears records of: slots `[to, from)`.
pub(super) struct MergeArea {
    area: u64,
    /// Its contents once the batch is committed (the working copy, or read
    /// from the device, with the batch's records cleared).
    buf: Vec<u8>,
    /// Records in it before the batch.
    from: u64,
    /// Records left in it after the batch.
    to: u64,
}

/// A merge batch between `prepare_merge_batch` and `commit_merge_batch`.
pub(super) struct MergeBatch {
    /// `(current_area, current_committed)` it starts at: the state the
    /// batch before it leaves, or the store's.
    start: (u64, u64),
    /// Areas with records in the batch, highest first; never empty.
    areas: Vec<MergeArea>,
    /// Exceptions in the batch.
    nr: u64,
}

/// The record in slot `index` of an area image.
fn area_record(buf: &[u8], index: u64) -> Option<DiskException> {
    let start = usize::try_from(index * DISK_EXCEPTION_BYTES).ok()?;
    let raw =
        RawDiskException::read_from_bytes(buf.get(start..start + DISK_EXCEPTION_BYTES as usize)?)
            .ok()?;
    Some(raw.into())
}

/// `persistent_prepare_merge`'s scan: the last of the first `committed`
/// records of an area image and the length of the run ending at it in
/// which both `old_chunk` and `new_chunk` are consecutive.
fn run_ending_at(buf: &[u8], committed: u64) -> Option<(DiskException, u64)> {
    let last = area_record(buf, committed.checked_sub(1)?)?;
    let mut n = 1;
    while n < committed {
        let Some(ce) = area_record(buf, committed - 1 - n) else {
            break;
        };
        // checked: a run never wraps around chunk 0.
        if Some(ce.old_chunk.0) != last.old_chunk.0.checked_sub(n)
            || Some(ce.new_chunk.0) != last.new_chunk.0.checked_sub(n)
        {
            break;
        }
        n += 1;
    }
    Some((last, n))
}

impl PersistentStore {
    /// The runs the kernel's `persistent_prepare_merge` would hand out one after the other, walking
    /// back across areas (each read once), up to `max_chunks` exceptions,
    /// starting where the batches prepared and not yet committed end.
    pub(super) fn prepare_batch(&mut self, max_chunks: u64) -> Result<Vec<MergeRun>, StoreError> {
        // The merge works on durable records only.
        if let Err(e) = self.sync_inline() {
            self.merge_batches.clear();
            return Err(e);
        }
        // Where the last queued batch leaves the store (its lowest area,
        // records of the batch already cleared in the image), else the
        // store's state.
        let mut cur = match self.merge_batches.back().and_then(|b| b.areas.last()) {
            Some(low) => MergeArea {
                area: low.area,
                buf: low.buf.clone(),
                from: low.to,
                to: low.to,
            },
            None => MergeArea {
                area: self.current_area,
                buf: self.area.clone(),
                from: self.current_committed,
                to: self.current_committed,
            },
        };
        let start = (cur.area, cur.to);
        let mut runs = Vec::new();
        let mut areas: Vec<MergeArea> = Vec::new();
        let mut nr = 0u64;
        loop {
            if cur.to == 0 {
                if cur.area == 0 {
                    break;
                }
                let area = cur.area - 1;
                let buf = match self.read_full_area(area) {
                    Ok(b) => b,
                    Err(e) => {
                        self.merge_batches.clear();
                        return Err(e);
                    }
                };
                let epa = self.exceptions_per_area();
                let done = std::mem::replace(
                    &mut cur,
                    MergeArea {
                        area,
                        buf,
                        from: epa,
                        to: epa,
                    },
                );
                if done.to < done.from {
                    areas.push(done);
                }
            }
            let Some((last, n)) = run_ending_at(&cur.buf, cur.to) else {
                self.merge_batches.clear();
                return Err(StoreError::Invalid);
            };
            if !runs.is_empty() && nr + n > max_chunks {
                break;
            }
            runs.push(MergeRun {
                last_old: last.old_chunk,
                last_new: last.new_chunk,
                n,
            });
            nr += n;
            cur.to -= n;
        }
        if cur.to < cur.from {
            areas.push(cur);
        }
        // Each area's image as the commit will write it.
        for a in &mut areas {
            let (lo, hi) = (a.to * DISK_EXCEPTION_BYTES, a.from * DISK_EXCEPTION_BYTES);
            if let Some(recs) = a.buf.get_mut(lo as usize..hi as usize) {
                recs.fill(0);
            }
        }
        if !runs.is_empty() {
            self.merge_batches
                .push_back(MergeBatch { start, areas, nr });
        }
        Ok(runs)
    }

    /// Clear the batch's records: the areas above the lowest one it touched
    /// written plainly (highest first), one COW flush, then the lowest area
    /// (the cut) written with FUA. One flush and one FUA write per batch,
    /// however many areas it spans (a FUA write per area cost ≈ 3 ms each:
    /// three quarters of a 256 MiB sequential merge).
    ///
    /// Why any order (and any crash between the area writes) is safe: the
    /// caller flushed the origin after copying the whole batch, so every
    /// record in it is already merged and durable on the origin, and no
    /// write to those origin chunks has been let through yet. After a
    /// crash the loader stops at the first zero `new_chunk`: whatever
    /// subset of the area writes reached the disk, it loads the records
    /// before the first cleared slot, i.e. a prefix of the list that still
    /// holds every unmerged record plus perhaps some merged ones, whose
    /// copy is then repeated (idempotent: the COW still holds what the
    /// origin holds). Records past the first cleared slot are never loaded,
    /// and every one of them was merged. Highest first just makes a cut
    /// look like the kernel's run-by-run progress. Only the cut must be
    /// durable before the batch's chunks are released to origin writes
    /// (once it is, the loader stops at it and never reads the areas
    /// above); flushing the higher areas before it keeps the on-disk image
    /// the kernel's even after a crash (no stale records above the cut).
    ///
    /// The state left (`current_area`, `current_committed`, `next_free`,
    /// the working area) is what the kernel's `persistent_commit_merge` leaves after the same runs
    /// one at a time: the lowest area touched, holding its unmerged records.
    pub(super) fn commit_batch(&mut self, nr_merged: u64) -> Result<(), StoreError> {
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        let here = (self.current_area, self.current_committed);
        let batch = match self.merge_batches.pop_front() {
            Some(b) if b.nr == nr_merged && b.start == here => b,
            _ => {
                self.merge_batches.clear();
                return Err(StoreError::StaleMergeBatch { nr_merged });
            }
        };
        let mut areas = batch.areas;
        // The lowest area holds the cut; the ones above it are cleared
        // whole. Plain writes, made durable by the flush that also stands
        // for the kernel's REQ_PREFLUSH of the cut's write.
        let low = areas.pop();
        for a in &areas {
            self.cow
                .write_at(&a.buf, self.area_offset(a.area), WriteFlags::NONE)
                .map_err(|source| StoreError::WriteArea {
                    area: a.area,
                    source,
                })?;
        }
        self.cow.flush().map_err(StoreError::Flush)?;
        if let Some(low) = low {
            self.cow
                .write_at(&low.buf, self.area_offset(low.area), WriteFlags::FUA)
                .map_err(|source| StoreError::WriteArea {
                    area: low.area,
                    source,
                })?;
            self.current_area = low.area;
            self.current_committed = low.to;
            self.area = low.buf;
        }
        // Approximate, as in the kernel's commit_merge.
        self.next_free =
            Chunk(area_location(self.chunk_size, self.current_area).0 + self.current_committed + 1);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::super::test_support::*;
    use crate::store::MergeRun;

    /// Build a store with runs, then merge it down to nothing one kernel
    /// step at a time (a batch of one run), reloading after every step:
    /// each run is the one the kernel's `persistent_prepare_merge` finds
    /// (a model over the records), and each commit is the kernel's
    /// `persistent_commit_merge` sequence: a flush, then the area with FUA.
    #[test]
    fn merge_prepare_commit_steps_back() {
        let dev = LogDev::new(4 << 20);
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        // 300 exceptions: old chunks in runs of 7 (consecutive old and new),
        // broken where old jumps; new chunks skip area 1 at 258.
        let mut all = Vec::new();
        for i in 0..300u64 {
            let c = s.prepare_exception().unwrap();
            let e = de((i / 7) * 1000 + i % 7, c.0);
            commit(&mut s, e).unwrap();
            all.push(e);
        }
        assert_eq!(s.usage().to_string(), "2424/8192 24");
        dev.take();
        while let Some(MergeRun {
            last_old: old,
            last_new: new,
            n,
        }) = kernel_prepare_merge(&mut s)
        {
            let last = *all.last().unwrap();
            assert_eq!((old, new), (last.old_chunk, last.new_chunk));
            // The expected run: consecutive in both, within one area.
            let area_start = if all.len() > 256 { 256 } else { 0 };
            let mut want = 1;
            while all.len() - want > area_start {
                let p = all[all.len() - 1 - want];
                if p.old_chunk.0 + want as u64 != old.0 || p.new_chunk.0 + want as u64 != new.0 {
                    break;
                }
                want += 1;
            }
            assert_eq!(n, want as u64);
            dev.take();
            s.commit_merge_batch(n).unwrap();
            let area = area_location(s.chunk_size(), s.current_area());
            assert_eq!(
                dev.take(),
                vec![Op::F, Op::W(s.chunk_size().chunk_to_byte(area), 4096, true)]
            );
            all.truncate(all.len() - n as usize);
            let (r, v) = load(dev.clone());
            assert_eq!(v, all);
            assert_eq!(r.usage(), s.usage());
            assert_eq!(r.current_area(), s.current_area());
        }
        assert!(all.is_empty());
        assert_eq!(s.usage().to_string(), "16/8192 16");
    }

    /// Batched merge steps leave exactly what the kernel's run-by-run
    /// steps (batches of one run, checked against a model in
    /// `merge_prepare_commit_steps_back`) leave: the same runs, the same COW bytes, the same state and
    /// status after every batch; each batch writes the areas above its cut
    /// plainly (highest first), flushes the COW once, then writes the cut
    /// with FUA.
    #[test]
    fn merge_batches_equal_run_by_run_merging() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..6 {
            let kernel_dev = Arc::new(MemDev::new(4 << 20));
            let mut k = PersistentStore::open(kernel_dev.clone(), None, false).unwrap();
            // ~700 exceptions over 3 areas, runs of 1 to 40 (consecutive
            // old chunks; new chunks consecutive except across metadata).
            let mut old = 0u64;
            for _ in 0..700 {
                if rng.gen_bool(0.15) {
                    old += rng.gen_range(2..50);
                } else {
                    old += 1;
                }
                let c = k.prepare_exception().unwrap();
                commit(&mut k, de(old, c.0)).unwrap();
            }
            let dev = LogDev::new(4 << 20);
            dev.inner
                .write_at(&kernel_dev.snapshot(), 0, WriteFlags::NONE)
                .unwrap();
            let (mut b, _) = load(dev.clone());
            let (mut k, _) = load(kernel_dev.clone());
            dev.take();
            let mut multi_area = 0;
            loop {
                let budget = rng.gen_range(1..600);
                let runs = b.prepare_merge_batch(budget).unwrap();
                if runs.is_empty() {
                    assert_eq!(kernel_prepare_merge(&mut k), None);
                    break;
                }
                let nr: u64 = runs.iter().map(|r| r.n).sum();
                assert!(runs.len() == 1 || nr <= budget, "round {round}");
                for &r in &runs {
                    let kr = kernel_prepare_merge(&mut k).unwrap();
                    assert_eq!(kr, r, "round {round}: the kernel's next run");
                    k.commit_merge_batch(kr.n).unwrap();
                }
                b.commit_merge_batch(nr).unwrap();
                // Areas above the cut plainly (highest first), one flush,
                // the cut with FUA.
                let ops = dev.take();
                let n = ops.len();
                assert!(n >= 2, "round {round}: {ops:?}");
                assert_eq!(ops[n - 2], Op::F, "round {round}: {ops:?}");
                let cut = match ops[n - 1] {
                    Op::W(off, 4096, true) => off,
                    ref other => panic!("round {round}: unexpected {other:?}"),
                };
                let mut offs: Vec<u64> = ops[..n - 2]
                    .iter()
                    .map(|op| match op {
                        Op::W(off, 4096, false) => *off,
                        other => panic!("round {round}: unexpected {other:?}"),
                    })
                    .collect();
                offs.push(cut);
                assert!(offs.windows(2).all(|w| w[0] > w[1]), "highest area first");
                if offs.len() > 1 {
                    multi_area += 1;
                }
                assert!(
                    dev.inner.snapshot() == kernel_dev.snapshot(),
                    "round {round}"
                );
                assert_eq!(b.current_area(), k.current_area());
                assert_eq!(b.current_committed(), k.current_committed());
                assert_eq!(b.usage(), k.usage());
                let (r, v) = load(dev.clone());
                let (_, kv) = load(kernel_dev.clone());
                assert_eq!(v, kv);
                assert_eq!(r.current_area(), b.current_area());
            }
            assert!(multi_area > 0, "round {round}: no batch spanned two areas");
            assert_eq!(b.usage().to_string(), "16/8192 16");
        }
    }

    /// Batches prepared ahead (up to three queued, the oldest committed
    /// first) leave what the kernel's run-by-run steps leave after every
    /// commit; abandoning the queue starts again at the store's state.
    #[test]
    fn queued_merge_batches_equal_run_by_run_merging() {
        use rand::{Rng, SeedableRng};
        use std::collections::VecDeque;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for round in 0..6 {
            let kernel_dev = Arc::new(MemDev::new(4 << 20));
            let mut k = PersistentStore::open(kernel_dev.clone(), None, false).unwrap();
            let mut old = 0u64;
            for _ in 0..700 {
                old += if rng.gen_bool(0.15) {
                    rng.gen_range(2..50)
                } else {
                    1
                };
                let c = k.prepare_exception().unwrap();
                commit(&mut k, de(old, c.0)).unwrap();
            }
            let dev = Arc::new(MemDev::from_vec(kernel_dev.snapshot()));
            let (mut b, _) = load(dev.clone());
            let (mut k, _) = load(kernel_dev.clone());
            assert!(b.queues_merge_batches());
            // Abandoning drops what was prepared.
            let first = b.prepare_merge_batch(30).unwrap();
            let _ = b.prepare_merge_batch(30).unwrap();
            b.abandon_merge_batches();
            assert_eq!(b.prepare_merge_batch(30).unwrap(), first);
            b.abandon_merge_batches();
            let mut queued: VecDeque<Vec<MergeRun>> = VecDeque::new();
            let mut exhausted = false;
            let mut deepest = 0;
            for step in 0.. {
                let depth = 3 - step % 3;
                while !exhausted && queued.len() < depth {
                    let runs = b.prepare_merge_batch(rng.gen_range(1..300)).unwrap();
                    if runs.is_empty() {
                        exhausted = true;
                    } else {
                        queued.push_back(runs);
                    }
                }
                deepest = deepest.max(queued.len());
                let Some(runs) = queued.pop_front() else {
                    break;
                };
                for &r in &runs {
                    let kr = kernel_prepare_merge(&mut k).unwrap();
                    assert_eq!(kr, r, "round {round}: the kernel's next run");
                    k.commit_merge_batch(kr.n).unwrap();
                }
                b.commit_merge_batch(runs.iter().map(|r| r.n).sum())
                    .unwrap();
                assert!(dev.snapshot() == kernel_dev.snapshot(), "round {round}");
                assert_eq!(b.current_area(), k.current_area());
                assert_eq!(b.current_committed(), k.current_committed());
                assert_eq!(b.usage(), k.usage());
            }
            assert_eq!(kernel_prepare_merge(&mut k), None);
            assert!(deepest >= 2, "round {round}: never prepared ahead");
            assert_eq!(b.usage().to_string(), "16/8192 16");
        }
    }

    #[test]
    fn commit_merge_batch_refuses_a_stale_batch() {
        let dev = Arc::new(MemDev::new(4 << 20));
        let mut s = PersistentStore::open(dev, None, false).unwrap();
        fill(&mut s, 0, 10);
        assert!(matches!(
            s.commit_merge_batch(1),
            Err(StoreError::StaleMergeBatch { nr_merged: 1 })
        ));
        let runs = s.prepare_merge_batch(100).unwrap();
        assert_eq!(
            runs,
            vec![MergeRun {
                last_old: Chunk(9),
                last_new: Chunk(11),
                n: 10
            }]
        );
        assert!(matches!(
            s.commit_merge_batch(9),
            Err(StoreError::StaleMergeBatch { nr_merged: 9 })
        ));
        let runs = s.prepare_merge_batch(100).unwrap();
        // A record appended since: the batch no longer starts where the
        // store stands.
        fill(&mut s, 100, 1);
        assert!(
            matches!(
                s.commit_merge_batch(runs[0].n),
                Err(StoreError::StaleMergeBatch { .. })
            ),
            "the state moved since the batch was prepared"
        );
    }
}
