//! The load path (`read_exceptions`): walk the metadata areas with
//! read-ahead ([`super::prefetch`]), check every record against the device
//! geometry, hand it to the caller and keep the last (partial) area as the
//! working copy, its bytes after the terminator zeroed.

use super::{prefetch, PersistentStore};
use crate::format::{
    area_location, exceptions_per_area, is_metadata_chunk, skip_metadata, DiskException,
    RawDiskException, DISK_EXCEPTION_BYTES, NUM_SNAPSHOT_HDR_CHUNKS,
};
use crate::store::{Corruption, StoreError};
use crate::units::{Chunk, ChunkSize};
use zerocopy::FromBytes;

/// [`is_metadata_chunk`] without a division per call (the load checks a
/// million records in a few milliseconds): a chunk `c > 0` is metadata when
/// the stride `d` (records per area + 1, odd for every chunk size) divides
/// `c - 1`, i.e. when `(c - 1) * d⁻¹ mod 2⁶⁴ <= (2⁶⁴ - 1) / d`.
#[derive(Debug, Clone, Copy)]
pub(super) struct MetadataChunks {
    chunk_size: ChunkSize,
    /// `d⁻¹ mod 2⁶⁴`, `None` for an even stride (plain `%` then).
    inverse: Option<u64>,
    limit: u64,
}

impl MetadataChunks {
    pub(super) fn new(chunk_size: ChunkSize) -> Self {
        let d = exceptions_per_area(chunk_size) + 1;
        let inverse = (d % 2 == 1).then(|| {
            // Newton's iteration doubles the correct low bits each step:
            // d * d ≡ 1 mod 8 for odd d, then 6, 12, 24, 48, 96 bits.
            let mut x = d;
            for _ in 0..5 {
                x = x.wrapping_mul(2u64.wrapping_sub(d.wrapping_mul(x)));
            }
            x
        });
        MetadataChunks {
            chunk_size,
            inverse,
            limit: u64::MAX / d,
        }
    }

    pub(super) fn contains(&self, chunk: Chunk) -> bool {
        match self.inverse {
            Some(inv) if chunk.0 >= NUM_SNAPSHOT_HDR_CHUNKS => {
                (chunk.0 - NUM_SNAPSHOT_HDR_CHUNKS).wrapping_mul(inv) <= self.limit
            }
            _ => is_metadata_chunk(self.chunk_size, chunk),
        }
    }
}
impl PersistentStore {
    /// Check one loaded record against the device geometry (`cow_chunks`:
    /// whole chunks on the device, computed once per load).
    fn check_record(
        &self,
        cow_chunks: u64,
        area: u64,
        slot: u64,
        e: DiskException,
    ) -> Result<(), StoreError> {
        let corrupt = |kind: Corruption| StoreError::Corrupt { area, slot, kind };
        if e.new_chunk.0 >= cow_chunks {
            return Err(corrupt(Corruption::BeyondDevice {
                old_chunk: e.old_chunk,
                new_chunk: e.new_chunk,
                cow_chunks,
            }));
        }
        if is_metadata_chunk(self.chunk_size, e.new_chunk) {
            return Err(corrupt(Corruption::MetadataChunk {
                old_chunk: e.old_chunk,
                new_chunk: e.new_chunk,
            }));
        }
        Ok(())
    }

    /// `read_exceptions`: walk the areas, hand every record to `sink`, keep
    /// the last (partial) area as the working area.
    pub(super) fn read_exceptions(
        &mut self,
        sink: &mut dyn FnMut(DiskException),
    ) -> Result<(), StoreError> {
        let areas = self.areas_on_device();
        let cow_chunks = self.cow_chunks();
        let cow = self.cow.clone();
        let chunk_size = self.chunk_size;
        let metadata = MetadataChunks::new(chunk_size);
        let (last_area, committed, last, next_free) =
            prefetch::with_areas(&*cow, chunk_size, areas, |src| {
                let mut next_free = self.next_free;
                let mut area = 0u64;
                loop {
                    if area >= areas {
                        return Err(StoreError::Corrupt {
                            area,
                            slot: 0,
                            kind: Corruption::NoTerminator {
                                chunk: area_location(chunk_size, area),
                                cow_chunks,
                            },
                        });
                    }
                    let buf = src
                        .get(area)
                        .map_err(|source| StoreError::ReadArea { area, source })?;
                    let mut end = None;
                    for (slot, rec) in (0u64..).zip(buf.chunks_exact(DISK_EXCEPTION_BYTES as usize))
                    {
                        let Ok(raw) = RawDiskException::read_from_bytes(rec) else {
                            break;
                        };
                        let e = DiskException::from(raw);
                        if e.new_chunk.0 == 0 {
                            end = Some(slot);
                            break;
                        }
                        if e.new_chunk.0 >= cow_chunks || metadata.contains(e.new_chunk) {
                            self.check_record(cow_chunks, area, slot, e)?;
                        }
                        if next_free.0 <= e.new_chunk.0 {
                            next_free = Chunk(e.new_chunk.0 + 1);
                        }
                        sink(e);
                    }
                    if let Some(committed) = end {
                        return Ok((area, committed, buf.to_vec(), next_free));
                    }
                    area += 1;
                }
            })?;
        self.current_area = last_area;
        self.current_committed = committed;
        // The working copy: the records, then zeroes (see the module docs).
        let keep = (committed * DISK_EXCEPTION_BYTES) as usize;
        self.area = last;
        if let Some(tail) = self.area.get_mut(keep..) {
            tail.fill(0);
        }
        self.next_free = skip_metadata(chunk_size, next_free);
        Ok(())
    }

    /// Read metadata area `area`, which lies before the current one and so
    /// must be full (the step back of `persistent_prepare_merge`).
    pub(super) fn read_full_area(&self, area: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; self.chunk_size.bytes() as usize];
        self.cow
            .read_at(&mut buf, self.area_offset(area))
            .map_err(|source| StoreError::ReadArea { area, source })?;
        let rec = crate::format::decode_area(&buf);
        if !rec.full {
            return Err(StoreError::Corrupt {
                area,
                slot: rec.exceptions.len() as u64,
                kind: Corruption::PreviousAreaNotFull,
            });
        }
        Ok(buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::super::test_support::*;
    use crate::format::is_metadata_chunk;
    use crate::io::testing::{Fault, FaultyDev, OpKind};

    #[test]
    fn corrupt_records_are_refused() {
        let c = cs(8);
        let mk = |recs: &[DiskException], len: u64| {
            let dev = Arc::new(MemDev::new(len));
            PersistentStore::open(dev.clone(), Some(c), false).unwrap();
            let area = crate::format::encode_area(recs, 4096);
            dev.write_at(&area, 4096, WriteFlags::NONE).unwrap();
            dev
        };
        let try_load = |dev: Arc<MemDev>| {
            let mut s = PersistentStore::open(dev, None, false).unwrap();
            s.read_metadata(&mut |_| {})
        };
        assert!(matches!(
            try_load(mk(&[de(1, 2), de(2, 258)], 4 << 20)),
            Err(StoreError::Corrupt {
                area: 0,
                slot: 1,
                ..
            })
        ));
        assert!(matches!(
            try_load(mk(&[de(1, 2), de(2, 3), de(3, 16)], 64 << 10)),
            Err(StoreError::Corrupt {
                area: 0,
                slot: 2,
                ..
            })
        ));
        // A full area 0 on a device that ends before area 1.
        let full: Vec<_> = (0..256).map(|i| de(i, 2 + i)).collect();
        assert!(matches!(
            try_load(mk(&full, 258 * 4096)),
            Err(StoreError::Corrupt {
                area: 1,
                slot: 0,
                ..
            })
        ));
        // The same with room for area 1 loads.
        assert!(try_load(mk(&full, 259 * 4096)).is_ok());
        // A read error in the walk.
        let fd = Arc::new(FaultyDev::new(MemDev::new(4 << 20)));
        PersistentStore::open(fd.clone(), None, false).unwrap();
        fd.add(Fault::Range {
            kind: OpKind::Read,
            offset: 4096,
            len: 1,
        });
        let mut s = PersistentStore::open(fd, None, false).unwrap();
        assert!(matches!(
            s.read_metadata(&mut |_| {}),
            Err(StoreError::ReadArea { area: 0, .. })
        ));
    }

    #[test]
    fn last_area_tail_is_not_carried_over() {
        let dev = Arc::new(MemDev::new(1 << 20));
        PersistentStore::open(dev.clone(), None, false).unwrap();
        // Terminator at slot 1, a stale record at slot 2.
        let area = crate::format::encode_area(&[de(7, 2), de(0, 0), de(8, 3)], 4096);
        dev.write_at(&area, 4096, WriteFlags::NONE).unwrap();
        let (mut s, v) = load(dev.clone());
        assert_eq!(v, vec![de(7, 2)]);
        let c = s.prepare_exception().unwrap();
        assert_eq!(c, Chunk(3));
        commit(&mut s, de(9, 3)).unwrap();
        let (_, v) = load(dev);
        assert_eq!(v, vec![de(7, 2), de(9, 3)]);
    }

    proptest::proptest! {
        /// Hostile metadata: any bytes in the first areas load or fail
        /// with an error, never panic, and what loads is in range.
        #[test]
        fn hostile_areas_never_panic(
            a0 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            fill0 in 0usize..257,
            a1 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            len_chunks in 3u64..600,
        ) {
            let dev = Arc::new(MemDev::new(len_chunks * 4096));
            PersistentStore::open(dev.clone(), None, false).unwrap();
            // Area 0: `fill0` plausible records, then the random bytes.
            let recs: Vec<_> = (0..fill0 as u64).map(|i| de(i, 2 + i)).collect();
            let mut area0 = crate::format::encode_area(&recs, 4096);
            let start = (fill0 * 16).min(4096);
            let n = a0.len().min(4096 - start);
            area0[start..start + n].copy_from_slice(&a0[..n]);
            dev.write_at(&area0, 4096, WriteFlags::NONE).unwrap();
            if len_chunks > 259 {
                dev.write_at(&a1, 258 * 4096, WriteFlags::NONE).unwrap();
            }
            let mut s = PersistentStore::open(dev, None, false).unwrap();
            let mut v = Vec::new();
            if s.read_metadata(&mut |e| v.push(e)).is_ok() {
                for e in &v {
                    proptest::prop_assert!(e.new_chunk.0 < len_chunks);
                    proptest::prop_assert!(!is_metadata_chunk(cs(8), e.new_chunk));
                }
                proptest::prop_assert!(s.next_free().0 >= 2);
                let u = s.usage();
                proptest::prop_assert!(u.metadata.0 >= 16);
            }
        }
    }

    #[test]
    fn prefetch_window_is_bounded() {
        assert_eq!(prefetch::window(cs(8)), 13);
        assert_eq!(prefetch::window(cs(1 << 21)), 1);
    }
}
