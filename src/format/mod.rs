//! The kernel's persistent exception store format (`dm-snap-persistent.c`,
//! disk version 1), as pure code: bytes ↔ types and geometry, no I/O.
//!
//! ```text
//!  chunk:  0        1        2 .. E+1          E+2      E+3 .. 2E+2       2E+3
//!        +--------+--------+----------------+--------+-----------------+--------+--
//!        | header | area 0 | E data chunks  | area 1 | E data chunks   | area 2 | ..
//!        +--------+--------+----------------+--------+-----------------+--------+--
//!  header (chunk 0, little-endian, rest of the chunk zero):
//!        0: u32 magic = 0x70416e53 ("SnAp")   4: u32 valid (0 = invalidated)
//!        8: u32 version = 1                  12: u32 chunk_size (sectors)
//!  area (one chunk): E = chunk_bytes / 16 records of
//!        0: u64 old_chunk (origin)            8: u64 new_chunk (COW)
//!  the list ends at the first record whose new_chunk is 0 (chunk 0 is the header).
//! ```
//!
//! A chunk is `chunk_size × 512` bytes. Area `a` lives at chunk
//! `area_location(a) = 1 + a × (E + 1)`; every other chunk is data.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

mod area;
mod header;

pub use area::{decode_area, encode_area, AreaRecords, DiskException, RawDiskException};
pub use header::{DiskHeader, HeaderError, HeaderState, RawDiskHeader};

use crate::units::{Chunk, ChunkSize};

/// "SnAp" read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// The only disk version there is.
pub const SNAPSHOT_DISK_VERSION: u32 = 1;
/// Chunks before the first metadata area (the header).
pub const NUM_SNAPSHOT_HDR_CHUNKS: u64 = 1;
/// Bytes of one on-disk exception record.
pub const DISK_EXCEPTION_BYTES: u64 = 16;
/// Read-ahead depth when loading metadata (kernel `DM_PREFETCH_CHUNKS`).
pub const DM_PREFETCH_CHUNKS: usize = 12;

/// Records per metadata area: `chunk_bytes / 16`.
pub const fn exceptions_per_area(chunk_size: ChunkSize) -> u64 {
    chunk_size.bytes() / DISK_EXCEPTION_BYTES
}

/// The chunk holding metadata area `area`.
pub const fn area_location(chunk_size: ChunkSize, area: u64) -> Chunk {
    Chunk(NUM_SNAPSHOT_HDR_CHUNKS + area * (exceptions_per_area(chunk_size) + 1))
}

/// True when `chunk` is a metadata area (or the header).
pub const fn is_metadata_chunk(chunk_size: ChunkSize, chunk: Chunk) -> bool {
    chunk.0 == 0 || chunk.0 % (exceptions_per_area(chunk_size) + 1) == NUM_SNAPSHOT_HDR_CHUNKS
}

/// The area a data chunk's record would live in if allocation and commit
/// order agree (the kernel does not require it; readers trust `new_chunk`).
pub const fn area_of_data_chunk(chunk_size: ChunkSize, chunk: Chunk) -> u64 {
    (chunk.0 - NUM_SNAPSHOT_HDR_CHUNKS) / (exceptions_per_area(chunk_size) + 1)
}

/// Kernel `skip_metadata`: if `next_free` points at a metadata chunk, step over it.
pub const fn skip_metadata(chunk_size: ChunkSize, next_free: Chunk) -> Chunk {
    let stride = exceptions_per_area(chunk_size) + 1;
    if next_free.0 % stride == NUM_SNAPSHOT_HDR_CHUNKS {
        Chunk(next_free.0 + 1)
    } else {
        next_free
    }
}

/// Metadata areas needed so that `data_chunks` exceptions fit *and* a zeroed
/// terminator area follows when the last one is full (LVM `_cow_max_size`).
pub const fn metadata_chunks_for(chunk_size: ChunkSize, data_chunks: u64) -> u64 {
    let e = exceptions_per_area(chunk_size);
    (data_chunks + e) / e
}

/// The COW size (bytes) that can hold an exception for every one of
/// `origin_bytes` of origin without overflowing (LVM's "100 %" COW).
pub const fn cow_size_for_origin(chunk_size: ChunkSize, origin_bytes: u64) -> u64 {
    let data = chunk_size.chunks_covering(origin_bytes);
    (NUM_SNAPSHOT_HDR_CHUNKS + data + metadata_chunks_for(chunk_size, data)) * chunk_size.bytes()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cs(sectors: u64) -> ChunkSize {
        ChunkSize::from_sectors(sectors).expect("valid")
    }

    #[test]
    fn worked_example_4k() {
        let c = cs(8);
        assert_eq!(exceptions_per_area(c), 256);
        assert_eq!(area_location(c, 0), Chunk(1));
        assert_eq!(area_location(c, 1), Chunk(258));
        assert_eq!(area_location(c, 2), Chunk(515));
        assert_eq!(c.chunk_to_byte(area_location(c, 1)), 1_056_768);
        assert!(is_metadata_chunk(c, Chunk(0)));
        assert!(is_metadata_chunk(c, Chunk(258)));
        assert!(!is_metadata_chunk(c, Chunk(257)));
        assert_eq!(skip_metadata(c, Chunk(258)), Chunk(259));
        assert_eq!(skip_metadata(c, Chunk(257)), Chunk(257));
    }

    #[test]
    fn cow_size_has_terminator_area() {
        let c = cs(8);
        // 256 data chunks fill area 0 exactly: a second (terminator) area is needed.
        assert_eq!(metadata_chunks_for(c, 256), 2);
        assert_eq!(metadata_chunks_for(c, 255), 1);
        assert_eq!(cow_size_for_origin(c, 256 * 4096), (1 + 256 + 2) * 4096);
    }

    proptest! {
        #[test]
        fn area_locations_are_metadata(sh in 0u32..12, a in 0u64..10_000) {
            let c = cs(1 << sh);
            prop_assert!(is_metadata_chunk(c, area_location(c, a)));
            let e = exceptions_per_area(c);
            // Every chunk strictly between two areas is data, and belongs to the earlier area.
            let first = area_location(c, a).0 + 1;
            prop_assert!(!is_metadata_chunk(c, Chunk(first)));
            prop_assert!(!is_metadata_chunk(c, Chunk(first + e - 1)));
            prop_assert_eq!(area_of_data_chunk(c, Chunk(first + e - 1)), a);
            prop_assert_eq!(first + e, area_location(c, a + 1).0);
        }

        #[test]
        fn skip_metadata_never_lands_on_metadata(sh in 0u32..12, n in 2u64..10_000_000) {
            let c = cs(1 << sh);
            prop_assert!(!is_metadata_chunk(c, skip_metadata(c, Chunk(n))));
        }
    }
}
