//! The header in chunk 0.

use super::{SNAPSHOT_DISK_VERSION, SNAP_MAGIC};
use crate::units::{ChunkSize, ChunkSizeError};
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct disk_header` exactly as on disk.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RawDiskHeader {
    pub magic: U32,
    pub valid: U32,
    pub version: U32,
    pub chunk_size: U32,
}

const _: () = assert!(std::mem::size_of::<RawDiskHeader>() == 16);

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the header is {0} bytes, shorter than 16")]
    Truncated(usize),
    #[error("invalid or corrupt snapshot: magic is {0:#010x}, expected 0x70416e53 (\"SnAp\")")]
    BadMagic(u32),
    #[error("unable to handle snapshot disk version {0} (only version 1 exists)")]
    BadVersion(u32),
    #[error("invalid on-disk chunk size")]
    BadChunkSize(#[source] ChunkSizeError),
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskHeader {
    /// False once the kernel (or we) invalidated the snapshot.
    pub valid: bool,
    pub chunk_size: ChunkSize,
}

/// What chunk 0 says about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderState {
    /// Magic is zero: a new store, to be formatted (kernel: only the magic is checked).
    Fresh,
    /// A kernel-format store.
    Existing(DiskHeader),
}

impl DiskHeader {
    /// Parse the first 16 bytes of chunk 0.
    pub fn parse(bytes: &[u8]) -> Result<HeaderState, HeaderError> {
        let (raw, _) = RawDiskHeader::read_from_prefix(bytes)
            .map_err(|_| HeaderError::Truncated(bytes.len()))?;
        let magic = raw.magic.get();
        if magic == 0 {
            return Ok(HeaderState::Fresh);
        }
        if magic != SNAP_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let version = raw.version.get();
        if version != SNAPSHOT_DISK_VERSION {
            return Err(HeaderError::BadVersion(version));
        }
        let chunk_size = ChunkSize::from_sectors(u64::from(raw.chunk_size.get()))
            .map_err(HeaderError::BadChunkSize)?;
        Ok(HeaderState::Existing(DiskHeader {
            valid: raw.valid.get() != 0,
            chunk_size,
        }))
    }

    /// The raw form.
    pub fn to_raw(self) -> RawDiskHeader {
        RawDiskHeader {
            magic: U32::new(SNAP_MAGIC),
            valid: U32::new(u32::from(self.valid)),
            version: U32::new(SNAPSHOT_DISK_VERSION),
            // ChunkSize is at most INT_MAX >> 9 sectors, so it fits.
            chunk_size: U32::new(self.chunk_size.sectors() as u32),
        }
    }

    /// The whole header chunk: 16 header bytes then zeroes.
    pub fn encode_chunk(self) -> Vec<u8> {
        let mut buf = vec![0u8; self.chunk_size.bytes() as usize];
        if let Some(dst) = buf.get_mut(..16) {
            dst.copy_from_slice(self.to_raw().as_bytes());
        }
        buf
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bytes() {
        let h = DiskHeader {
            valid: true,
            chunk_size: ChunkSize::from_sectors(8).expect("valid"),
        };
        let b = h.encode_chunk();
        assert_eq!(
            &b[..16],
            &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]
        );
        assert_eq!(DiskHeader::parse(&b), Ok(HeaderState::Existing(h)));
    }

    #[test]
    fn refusals() {
        assert_eq!(DiskHeader::parse(&[0; 16]), Ok(HeaderState::Fresh));
        assert_eq!(DiskHeader::parse(&[0; 3]), Err(HeaderError::Truncated(3)));
        let mut b = [0u8; 16];
        b[0] = 1;
        assert!(matches!(
            DiskHeader::parse(&b),
            Err(HeaderError::BadMagic(1))
        ));
        b[..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
        b[8] = 2;
        assert!(matches!(
            DiskHeader::parse(&b),
            Err(HeaderError::BadVersion(2))
        ));
        b[8] = 1;
        b[12] = 3;
        assert!(matches!(
            DiskHeader::parse(&b),
            Err(HeaderError::BadChunkSize(_))
        ));
    }
}
