//! Metadata areas: `exceptions_per_area` 16-byte records in one chunk.

use crate::units::Chunk;
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct disk_exception` exactly as on disk.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, PartialEq, Eq,
)]
pub struct RawDiskException {
    pub old_chunk: U64,
    pub new_chunk: U64,
}

const _: () = assert!(std::mem::size_of::<RawDiskException>() == 16);

/// One exception: origin chunk `old_chunk` is stored in COW chunk `new_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskException {
    pub old_chunk: Chunk,
    pub new_chunk: Chunk,
}

impl From<RawDiskException> for DiskException {
    fn from(r: RawDiskException) -> Self {
        DiskException {
            old_chunk: Chunk(r.old_chunk.get()),
            new_chunk: Chunk(r.new_chunk.get()),
        }
    }
}

impl From<DiskException> for RawDiskException {
    fn from(e: DiskException) -> Self {
        RawDiskException {
            old_chunk: U64::new(e.old_chunk.0),
            new_chunk: U64::new(e.new_chunk.0),
        }
    }
}

/// The records of one area up to (not including) the terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaRecords {
    pub exceptions: Vec<DiskException>,
    /// True when every slot was in use: the list continues in the next area.
    pub full: bool,
}

/// Decode an area chunk: records until the first `new_chunk == 0`
/// (`old_chunk` of the terminator is ignored, as the kernel does). A trailing
/// partial record (a buffer that is not a multiple of 16) is ignored.
pub fn decode_area(area: &[u8]) -> AreaRecords {
    let slots = area.len() / 16;
    let mut exceptions = Vec::with_capacity(slots);
    for rec in area.chunks_exact(16) {
        let Ok(raw) = RawDiskException::read_from_bytes(rec) else {
            break;
        };
        if raw.new_chunk.get() == 0 {
            return AreaRecords {
                exceptions,
                full: false,
            };
        }
        exceptions.push(raw.into());
    }
    AreaRecords {
        exceptions,
        full: slots > 0,
    }
}

/// Encode records into an area chunk of `area_bytes` bytes (rest zero).
/// Records beyond the area's capacity are not written (callers bound them).
pub fn encode_area(records: &[DiskException], area_bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; area_bytes];
    for (slot, e) in buf.chunks_exact_mut(16).zip(records) {
        slot.copy_from_slice(RawDiskException::from(*e).as_bytes());
    }
    buf
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn de(o: u64, n: u64) -> DiskException {
        DiskException {
            old_chunk: Chunk(o),
            new_chunk: Chunk(n),
        }
    }

    #[test]
    fn terminator_ignores_old_chunk() {
        let mut a = encode_area(&[de(5, 2), de(9, 3)], 4096);
        a[32..40].copy_from_slice(&77u64.to_le_bytes()); // old_chunk of slot 2, new_chunk 0
        let r = decode_area(&a);
        assert_eq!(r.exceptions, vec![de(5, 2), de(9, 3)]);
        assert!(!r.full);
    }

    proptest! {
        #[test]
        fn round_trip(recs in proptest::collection::vec((any::<u64>(), 1u64..u64::MAX), 0..256)) {
            let recs: Vec<_> = recs.into_iter().map(|(o, n)| de(o, n)).collect();
            let buf = encode_area(&recs, 4096);
            let r = decode_area(&buf);
            prop_assert_eq!(r.full, recs.len() == 256);
            prop_assert_eq!(r.exceptions, recs);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let r = decode_area(&bytes);
            prop_assert!(r.exceptions.len() <= bytes.len() / 16);
        }
    }
}
