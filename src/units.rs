//! Units of addressing: 512-byte sectors, chunks, and the chunk size that
//! converts between them. Validated like the kernel validates a table's
//! `<chunk_size>` argument (power of two, in sectors).

use std::fmt;

/// Bytes per sector: the unit of `dmsetup` tables and of the on-disk
/// `chunk_size` field.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// A position or length in 512-byte sectors.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset of this sector.
    pub const fn bytes(self) -> u64 {
        self.0 << SECTOR_SHIFT
    }
    /// Whole sectors in `bytes` (rounded down).
    pub const fn from_bytes(bytes: u64) -> Self {
        Sector(bytes >> SECTOR_SHIFT)
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A chunk index (kernel `chunk_t`): on the origin (`old_chunk`) or on a COW
/// device (`new_chunk`), always in one store's chunk size.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Chunk(pub u64);

impl fmt::Display for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Add<u64> for Chunk {
    type Output = Chunk;
    fn add(self, rhs: u64) -> Chunk {
        Chunk(self.0 + rhs)
    }
}

/// Why a chunk size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkSizeError {
    #[error("chunk size of {0} sectors is not a power of 2")]
    NotPowerOfTwo(u64),
    #[error("chunk size of {0} sectors is too small (at least 1 sector)")]
    Zero(u64),
    #[error("chunk size of {0} sectors is too high (at most {max} sectors)", max = ChunkSize::MAX_SECTORS)]
    TooHigh(u64),
    #[error(
        "chunk size of {bytes} bytes is not a multiple of the device block size {block} bytes"
    )]
    NotBlockMultiple { bytes: u64, block: u64 },
    #[error("chunk size of {0} bytes is not a whole number of 512-byte sectors")]
    NotSectorMultiple(u64),
}

/// A store's chunk size: a power of two number of sectors, at most
/// `INT_MAX >> 9` sectors as in the kernel (`dm_exception_store_set_chunk_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSize {
    shift: u32, // log2 of the size in sectors
}

impl ChunkSize {
    /// The kernel's upper bound: `INT_MAX >> SECTOR_SHIFT` sectors.
    pub const MAX_SECTORS: u64 = (i32::MAX as u64) >> SECTOR_SHIFT;
    /// 4 KiB: dmsnap's and LVM's default.
    pub const DEFAULT: ChunkSize = ChunkSize { shift: 3 };

    /// Validate a chunk size in sectors (the on-disk and table unit).
    pub fn from_sectors(sectors: u64) -> Result<Self, ChunkSizeError> {
        if sectors == 0 {
            return Err(ChunkSizeError::Zero(sectors));
        }
        if !sectors.is_power_of_two() {
            return Err(ChunkSizeError::NotPowerOfTwo(sectors));
        }
        if sectors > Self::MAX_SECTORS {
            return Err(ChunkSizeError::TooHigh(sectors));
        }
        Ok(ChunkSize {
            shift: sectors.trailing_zeros(),
        })
    }

    /// Validate a chunk size in bytes.
    pub fn from_bytes(bytes: u64) -> Result<Self, ChunkSizeError> {
        if bytes % SECTOR_SIZE != 0 {
            return Err(ChunkSizeError::NotSectorMultiple(bytes));
        }
        Self::from_sectors(bytes / SECTOR_SIZE)
    }

    /// Also require a multiple of a device's logical block size (bytes).
    pub fn check_block_size(self, block_bytes: u64) -> Result<Self, ChunkSizeError> {
        if block_bytes != 0 && self.bytes() % block_bytes != 0 {
            return Err(ChunkSizeError::NotBlockMultiple {
                bytes: self.bytes(),
                block: block_bytes,
            });
        }
        Ok(self)
    }

    pub const fn sectors(self) -> u64 {
        1 << self.shift
    }
    pub const fn bytes(self) -> u64 {
        1 << (self.shift + SECTOR_SHIFT)
    }
    /// log2 of the size in bytes.
    pub const fn byte_shift(self) -> u32 {
        self.shift + SECTOR_SHIFT
    }
    /// log2 of the size in sectors (kernel `chunk_shift`).
    pub const fn sector_shift(self) -> u32 {
        self.shift
    }

    /// The chunk that holds byte `offset`.
    pub const fn chunk_of_byte(self, offset: u64) -> Chunk {
        Chunk(offset >> self.byte_shift())
    }
    /// The chunk that holds `sector` (kernel `sector_to_chunk`).
    pub const fn chunk_of_sector(self, sector: Sector) -> Chunk {
        Chunk(sector.0 >> self.shift)
    }
    /// First byte of `chunk`.
    pub const fn chunk_to_byte(self, chunk: Chunk) -> u64 {
        chunk.0 << self.byte_shift()
    }
    /// First sector of `chunk` (kernel `chunk_to_sector`).
    pub const fn chunk_to_sector(self, chunk: Chunk) -> Sector {
        Sector(chunk.0 << self.shift)
    }
    /// Offset of byte `offset` inside its chunk.
    pub const fn offset_in_chunk(self, offset: u64) -> u64 {
        offset & (self.bytes() - 1)
    }
    /// Whole chunks in a device of `len_bytes` bytes (a partial tail is not counted).
    pub const fn whole_chunks(self, len_bytes: u64) -> u64 {
        len_bytes >> self.byte_shift()
    }
    /// Chunks needed to cover `len_bytes` bytes (a partial tail counts).
    pub const fn chunks_covering(self, len_bytes: u64) -> u64 {
        (len_bytes + self.bytes() - 1) >> self.byte_shift()
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes();
        if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{} MiB", b >> 20)
        } else if b >= 1 << 10 {
            write!(f, "{} KiB", b >> 10)
        } else {
            // One sector: the kernel's smallest chunk.
            write!(f, "{b} B")
        }
    }
}

/// Parse a size as the CLI accepts it: plain bytes or binary suffixes
/// (`4k`, `16KiB`, `1G`, `512M`, `2T`; case-insensitive, `B`/`iB` optional).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size (expected e.g. 4096, 4k, 16KiB, 1G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large a number"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "s" => SECTOR_SHIFT, // sectors, as dmsetup speaks
        other => {
            return Err(format!(
                "unknown size suffix '{other}' in '{s}' (use k, M, G, T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Format a byte count for humans with binary units.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_validation_matches_kernel_rules() {
        assert_eq!(ChunkSize::from_sectors(8).unwrap().bytes(), 4096);
        assert!(matches!(
            ChunkSize::from_sectors(12),
            Err(ChunkSizeError::NotPowerOfTwo(12))
        ));
        assert!(matches!(
            ChunkSize::from_sectors(0),
            Err(ChunkSizeError::Zero(0))
        ));
        assert!(ChunkSize::from_sectors(1 << 21).is_ok());
        assert!(matches!(
            ChunkSize::from_sectors(1 << 22),
            Err(ChunkSizeError::TooHigh(_))
        ));
        assert!(ChunkSize::from_sectors(1)
            .unwrap()
            .check_block_size(4096)
            .is_err());
    }

    #[test]
    fn conversions() {
        let cs = ChunkSize::from_bytes(16384).unwrap();
        assert_eq!(cs.sectors(), 32);
        assert_eq!(cs.chunk_of_byte(16383), Chunk(0));
        assert_eq!(cs.chunk_of_byte(16384), Chunk(1));
        assert_eq!(cs.chunk_to_sector(Chunk(2)), Sector(64));
        assert_eq!(cs.chunks_covering(16385), 2);
        assert_eq!(cs.whole_chunks(16385), 1);
    }

    #[test]
    fn chunk_sizes_display_their_real_value() {
        let show = |b| ChunkSize::from_bytes(b).unwrap().to_string();
        assert_eq!(show(512), "512 B");
        assert_eq!(show(4096), "4 KiB");
        assert_eq!(show(1 << 20), "1 MiB");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert!(parse_size("x").is_err());
        assert!(parse_size("4q").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }
}
