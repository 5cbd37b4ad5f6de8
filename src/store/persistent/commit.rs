//! The commit path: `prepare_exception` allocates a COW chunk,
//! `record_exception` appends the record to the working area in memory,
//! `start_sync` captures the [`SyncJob`] that makes every record so far
//! durable (the caller runs it outside its lock), `finish_sync` reports it.
//! See [`crate::store`] for the calling discipline and [`SyncJob::run`] for
//! the kernel's write sequence.

use super::PersistentStore;
use crate::format::{skip_metadata, DiskException, RawDiskException, DISK_EXCEPTION_BYTES};
use crate::store::{AreaWrite, ExceptionStore, StoreError, SyncJob};
use crate::units::{Chunk, Sector};
use zerocopy::IntoBytes;

impl PersistentStore {
    /// `persistent_prepare_exception`.
    pub(super) fn allocate(&mut self) -> Result<Chunk, StoreError> {
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        let cow_sectors = Sector::from_bytes(self.cow.len()).0;
        let need = (self.next_free.0 + 1).saturating_mul(self.chunk_size.sectors());
        if cow_sectors < need {
            return Err(StoreError::Full {
                chunk_size: self.chunk_size,
                usage: self.usage(),
            });
        }
        let new_chunk = self.next_free;
        self.next_free = skip_metadata(self.chunk_size, Chunk(self.next_free.0 + 1));
        self.pending_count += 1;
        Ok(new_chunk)
    }

    /// The record half of `persistent_commit_exception`: append `e` to the
    /// working area; a filled area is queued for the next sync job.
    pub(super) fn append_record(
        &mut self,
        e: DiskException,
        valid: bool,
    ) -> Result<u64, StoreError> {
        debug_assert!(self.pending_count > 0, "commit without prepare");
        self.pending_count = self.pending_count.saturating_sub(1);
        if !valid {
            self.valid = false;
        }
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        self.write_exception(self.current_committed, e.into());
        self.current_committed += 1;
        self.recorded += 1;
        self.area_dirty = true;
        if self.current_committed >= self.exceptions_per_area() {
            let next = self.current_area + 1;
            self.full_areas.push(AreaWrite {
                area: self.current_area,
                offset: self.area_offset(self.current_area),
                bytes: self.area.clone(),
                zero_next: Some((next, self.area_offset(next))),
            });
            self.current_committed = 0;
            self.current_area = next;
            self.area.fill(0);
            self.area_dirty = false;
        }
        Ok(self.recorded)
    }

    /// The write half: the filled areas and the dirty working area, as one job.
    pub(super) fn capture_sync(&mut self) -> Option<SyncJob> {
        if !self.valid {
            self.full_areas.clear();
            return None;
        }
        let mut areas = std::mem::take(&mut self.full_areas);
        if self.area_dirty {
            areas.push(AreaWrite {
                area: self.current_area,
                offset: self.area_offset(self.current_area),
                bytes: self.area.clone(),
                zero_next: None,
            });
            self.area_dirty = false;
        }
        if areas.is_empty() {
            return None;
        }
        Some(SyncJob {
            cow: self.cow.clone(),
            areas,
            upto: self.recorded,
        })
    }

    /// `write_exception` (and `clear_exception` with zeroes).
    fn write_exception(&mut self, index: u64, raw: RawDiskException) {
        let Ok(start) = usize::try_from(index * DISK_EXCEPTION_BYTES) else {
            return;
        };
        if let Some(dst) = self
            .area
            .get_mut(start..start + DISK_EXCEPTION_BYTES as usize)
        {
            dst.copy_from_slice(raw.as_bytes());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::super::test_support::*;
    use crate::format::RawDiskException;
    use crate::io::testing::{Fault, FaultyDev, OpKind};

    #[test]
    fn allocation_skips_metadata() {
        let dev = Arc::new(MemDev::new(4 << 20));
        let mut s = PersistentStore::open(dev, None, false).unwrap();
        let got: Vec<u64> = (0..300).map(|_| s.prepare_exception().unwrap().0).collect();
        let want: Vec<u64> = (2..258).chain(259..303).collect();
        assert_eq!(got, want);
        assert_eq!(s.pending_count(), 300);
    }

    /// Group commit: records appended while nothing syncs cost no I/O;
    /// one job then makes all of them durable with the kernel's sequence
    /// (flush, area with FUA), and none counts as durable before it ends.
    #[test]
    fn group_commit_writes_once_per_batch() {
        let dev = LogDev::new(4 << 20);
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        dev.take();
        let chunks: Vec<Chunk> = (0..5).map(|_| s.prepare_exception().unwrap()).collect();
        for (i, c) in chunks.iter().enumerate() {
            let seq = s.record_exception(de(100 + i as u64, c.0), true).unwrap();
            assert_eq!(seq, i as u64 + 1);
            assert!(dev.take().is_empty(), "no I/O while recording");
        }
        assert_eq!(s.pending_count(), 0);
        let job = s.start_sync().unwrap();
        assert_eq!(job.upto(), 5);
        job.run().unwrap();
        assert_eq!(s.durable_seq(), 0, "durable only once the job is reported");
        s.finish_sync(job.upto(), Ok(()));
        assert_eq!(s.durable_seq(), 5);
        assert_eq!(dev.take(), vec![Op::F, Op::W(4096, 4096, true)]);
        let (_, v) = load(dev);
        assert_eq!(v.len(), 5);
    }

    #[test]
    fn full_area_zeroes_the_next() {
        let dev = LogDev::new(4 << 20);
        // Garbage where area 1 will be.
        dev.inner
            .write_at(&[0xff; 4096], 258 * 4096, WriteFlags::NONE)
            .unwrap();
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        fill(&mut s, 0, 255);
        dev.take();
        let c = s.prepare_exception().unwrap();
        assert_eq!(c, Chunk(257));
        commit(&mut s, de(999, 257)).unwrap();
        assert_eq!(s.durable_seq(), s.recorded_seq());
        assert_eq!(
            dev.take(),
            vec![
                Op::W(258 * 4096, 4096, false),
                Op::F,
                Op::W(4096, 4096, true)
            ]
        );
        assert_eq!(s.current_area(), 1);
        assert_eq!(s.current_committed(), 0);
        assert_eq!(s.usage().to_string(), "2072/8192 24");
        let (s2, v) = load(dev);
        assert_eq!(v.len(), 256);
        assert_eq!(s2.current_area(), 1);
        assert_eq!(s2.usage().to_string(), "2072/8192 24");
    }

    #[test]
    fn split_commit_jobs_run_outside_and_make_records_durable_in_order() {
        let mem = Arc::new(MemDev::new(4 << 20));
        let cow: DevRef = mem.clone();
        let mut s = PersistentStore::open(cow.clone(), None, false).unwrap();
        let per_area = s.exceptions_per_area();
        let mut recs = Vec::new();
        let mut record = |s: &mut PersistentStore, old: u64| {
            let new = s.prepare_exception().unwrap();
            recs.push((old, new.0));
            s.record_exception(de(old, new.0), true).unwrap()
        };
        // Nothing is written by recording; a job captures the partial area.
        for old in 0..10 {
            assert_eq!(record(&mut s, old), old + 1);
        }
        assert!(!s.has_full_areas());
        assert_eq!((s.recorded_seq(), s.durable_seq()), (10, 0));
        let job = s.start_sync().unwrap();
        assert_eq!(job.upto(), 10);
        assert!(s.start_sync().is_none(), "everything is captured");
        // Records keep coming while the job runs "outside the lock", and
        // fill area 0: the next job carries it (with its successor zeroed)
        // and the partial area 1.
        for old in 10..per_area + 5 {
            record(&mut s, old);
        }
        assert!(s.has_full_areas());
        job.run().unwrap();
        s.finish_sync(job.upto(), Ok(()));
        assert_eq!(s.durable_seq(), 10);
        let job = s.start_sync().unwrap();
        assert_eq!(
            job.areas
                .iter()
                .map(|a| (a.area, a.zero_next.map(|z| z.0)))
                .collect::<Vec<_>>(),
            [(0, Some(1)), (1, None)]
        );
        job.run().unwrap();
        s.finish_sync(job.upto(), Ok(()));
        assert_eq!(s.durable_seq(), per_area + 5);
        assert!(s.start_sync().is_none());
        // What is on disk is every record, in order.
        let mut s2 =
            PersistentStore::open(Arc::new(MemDev::from_vec(mem.snapshot())), None, false).unwrap();
        let mut got = Vec::new();
        s2.read_metadata(&mut |e| got.push((e.old_chunk.0, e.new_chunk.0)))
            .unwrap();
        assert_eq!(got, recs);
    }

    #[test]
    fn a_multi_area_sync_job_cut_anywhere_leaves_a_prefix_of_the_records() {
        use crate::io::testing::CrashDev;
        // 100 records durable, then 2 areas and 10 records more in one job
        // (areas 0 and 1 full, area 2 partial).
        let setup = || {
            let dev = Arc::new(CrashDev::new(4 << 20));
            let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
            let per_area = s.exceptions_per_area();
            // Areas 1..=3 hold stale full areas of plausible records (an
            // earlier life of the device): only zeroing keeps them out.
            let stale: Vec<u8> = (0..per_area)
                .flat_map(|j| {
                    let r: RawDiskException = de(50_000 + j, 2 + j).into();
                    r.as_bytes().to_vec()
                })
                .collect();
            for area in 1..=3 {
                dev.write_at(&stale, s.area_offset(area), WriteFlags::NONE)
                    .unwrap();
            }
            dev.flush().unwrap();
            let mut recs = Vec::new();
            for old in 0..100 + 2 * per_area + 10 {
                let new = s.prepare_exception().unwrap();
                recs.push((old, new.0));
                s.record_exception(de(old, new.0), true).unwrap();
                if old == 99 {
                    let job = s.start_sync().unwrap();
                    job.run().unwrap();
                    s.finish_sync(job.upto(), Ok(()));
                }
            }
            let job = s.start_sync().unwrap();
            assert_eq!(job.areas.len(), 3);
            (dev, job, recs)
        };
        let loaded = |img: Vec<u8>| {
            let mut s =
                PersistentStore::open(Arc::new(MemDev::from_vec(img)), None, false).unwrap();
            let mut got = Vec::new();
            s.read_metadata(&mut |e| got.push((e.old_chunk.0, e.new_chunk.0)))
                .unwrap();
            got
        };
        let (dev, job, recs) = setup();
        let base = dev.ops();
        job.run().unwrap();
        let total = dev.ops() - base;
        assert_eq!(
            loaded(dev.crash()),
            recs,
            "a finished job made everything durable"
        );
        for cut in 0..total {
            let (dev, job, recs) = setup();
            dev.crash_after(dev.ops() + cut);
            assert!(job.run().is_err());
            let n = dev.unflushed_writes();
            assert!(n <= 8, "{n} unflushed writes");
            // Any subset of the unflushed writes may have reached the disk.
            for mask in 0..1u32 << n {
                let got = loaded(dev.crash_keeping_where(|i| mask & (1 << i) != 0));
                assert!(
                    got.len() >= 100 && recs.starts_with(&got),
                    "cut {cut}, kept {mask:#b}: {} records, not a prefix of at least the durable 100",
                    got.len()
                );
            }
        }
    }

    #[test]
    fn a_failed_sync_job_invalidates_the_store() {
        let fd = Arc::new(FaultyDev::new(MemDev::new(1 << 20)));
        let mut s = PersistentStore::open(fd.clone(), None, false).unwrap();
        let a = s.prepare_exception().unwrap();
        s.record_exception(de(1, a.0), true).unwrap();
        let job = s.start_sync().unwrap();
        fd.add(Fault::Always {
            kind: OpKind::Write,
        });
        let res = job.run();
        assert!(matches!(res, Err(StoreError::WriteArea { area: 0, .. })));
        s.finish_sync(job.upto(), res);
        assert!(!s.is_valid());
        assert_eq!(s.durable_seq(), 0);
        assert!(s.start_sync().is_none());
        let b = s.prepare_exception();
        assert!(matches!(b, Err(StoreError::Invalid)));
        assert!(matches!(s.take_error(), Some(StoreError::WriteArea { .. })));
    }

    #[test]
    fn failed_copy_and_write_errors_invalidate() {
        let dev = LogDev::new(1 << 20);
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        let a = s.prepare_exception().unwrap();
        let b = s.prepare_exception().unwrap();
        dev.take();
        assert!(matches!(
            s.record_exception(de(1, a.0), false),
            Err(StoreError::Invalid)
        ));
        assert!(matches!(
            s.record_exception(de(2, b.0), true),
            Err(StoreError::Invalid)
        ));
        assert!(s.start_sync().is_none());
        assert!(s.sync_inline().is_err());
        assert!(dev.take().is_empty(), "an invalid store writes no metadata");
        assert!(!s.is_valid());
        assert_eq!(s.durable_seq(), 0);

        let fd = Arc::new(FaultyDev::new(MemDev::new(1 << 20)));
        let mut s = PersistentStore::open(fd.clone(), None, false).unwrap();
        let a = s.prepare_exception().unwrap();
        fd.add(Fault::Always {
            kind: OpKind::Flush,
        });
        assert!(commit(&mut s, de(1, a.0)).is_err());
        assert_eq!(s.durable_seq(), 0);
        assert!(!s.is_valid());
        assert!(matches!(s.take_error(), Some(StoreError::Flush(_))));
    }

    #[test]
    fn failing_to_zero_the_next_area_invalidates() {
        let fd = Arc::new(FaultyDev::new(MemDev::new(4 << 20)));
        let mut s = PersistentStore::open(fd.clone(), None, false).unwrap();
        fill(&mut s, 0, 255);
        fd.add(Fault::Range {
            kind: OpKind::Write,
            offset: 258 * 4096,
            len: 4096,
        });
        let c = s.prepare_exception().unwrap();
        assert!(commit(&mut s, de(1000, c.0)).is_err());
        assert!(s.durable_seq() < s.recorded_seq());
        assert!(!s.is_valid());
        assert!(matches!(
            s.take_error(),
            Some(StoreError::ZeroArea { area: 1, .. })
        ));
        // The full area was never written: a reload sees the 255 before it.
        fd.clear();
        let (_, v) = load(fd);
        assert_eq!(v.len(), 255);
    }
}
