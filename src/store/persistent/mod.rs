//! The persistent exception store (`P`/`PO`, `dm-snap-persistent.c`): the
//! kernel's on-disk format (see [`crate::format`]) with the kernel's
//! allocation, commit and merge protocols.
//!
//! State, as in the kernel's `struct pstore`:
//! - `next_free`: the next COW chunk to hand out (never a metadata chunk);
//! - `current_area` / `current_committed`: the metadata area records are
//!   appended to and how many it holds; `area` is its in-memory copy;
//! - `pending_count`: exceptions prepared but not yet recorded;
//! - `recorded` / `durable`: sequence numbers of the last record appended
//!   and of the last one on disk; `full_areas`: filled areas captured for
//!   the next [`SyncJob`];
//! - `merge_batches`: merge batches prepared and not yet committed.
//!
//! The path the engine uses ([`crate::snap`]), one protocol each:
//! - **open** ([`PersistentStore::open`], here): read the header, or format
//!   a fresh store (area 0 zeroed and flushed before the header is written);
//! - **load** ([`load`]): `read_metadata` walks the areas with read-ahead
//!   ([`prefetch`]), checks every record against the geometry and keeps the
//!   last area as the working copy;
//! - **commit** ([`commit`]): `prepare_exception` allocates, the caller
//!   copies the data, `record_exception` appends the record in memory (no
//!   I/O, under the engine's lock), and `start_sync` captures a
//!   [`SyncJob`] that the caller runs outside its lock and reports with
//!   `finish_sync`. One job makes every record so far durable with the
//!   kernel's sequence: the successor of a full area zeroed (the
//!   terminator), the COW flushed (the data the records point at become
//!   durable), then the area written with FUA. This is the kernel's group
//!   commit: many records, one area write. Any write error makes the store
//!   invalid: it writes no more metadata and no later record is recorded.
//! - **merge** ([`merge`]): `prepare_merge_batch` hands out the runs the
//!   kernel's `persistent_prepare_merge` would, one after the other, up to
//!   a budget, and `commit_merge_batch` clears them with one flush and one
//!   FUA write; batches may be prepared ahead of their commit.
//!
//! Deviations from the kernel, all on corrupt or hostile input or for
//! crash safety: records pointing at the header, a metadata chunk or past
//! the device are refused ([`StoreError::Corrupt`]); bytes after the
//! terminator of the last area are not carried into the working copy (the
//! kernel would write them back and could resurrect stale records); a fresh
//! store's area 0 is zeroed and flushed *before* its header is written and
//! flushed, so a crash cannot leave a header over garbage records.

mod commit;
mod load;
mod merge;
mod prefetch;

use super::MergeRun;
use super::{AreaWrite, ExceptionStore, StoreError, StoreType, SyncJob, Usage};
use crate::format::{
    area_location, exceptions_per_area, DiskException, DiskHeader, HeaderError, HeaderState,
    NUM_SNAPSHOT_HDR_CHUNKS,
};
use crate::io::{DevRef, WriteFlags};
use crate::units::{Chunk, ChunkSize, Sector, SECTOR_SIZE};
use merge::MergeBatch;
use zerocopy::IntoBytes;

/// Chunks a new store needs at least: header, area 0 and one data chunk
/// (LVM's `SNAPSHOT_MIN_CHUNKS`).
pub const MIN_CHUNKS: u64 = 3;

/// A persistent exception store on a COW device.
pub struct PersistentStore {
    cow: DevRef,
    chunk_size: ChunkSize,
    /// `PO`: a full COW fails snapshot writes only (the engine acts on it).
    overflow: bool,
    /// `open` found magic 0 and formatted the device (kernel `new_snapshot`).
    new_snapshot: bool,
    valid: bool,
    next_free: Chunk,
    current_area: u64,
    current_committed: u64,
    pending_count: u64,
    /// In-memory copy of the current area (`ps->area`); empty only when the
    /// device cannot hold one (such a store never gets to commit).
    area: Vec<u8>,
    /// Sequence number of the last record appended, and of the last one
    /// a finished sync made durable.
    recorded: u64,
    durable: u64,
    /// The working area holds records no sync has captured yet.
    area_dirty: bool,
    /// Filled areas, captured in order, waiting for the next sync job.
    full_areas: Vec<AreaWrite>,
    /// The first error that made the store invalid during a commit (commits
    /// report only `false` to their callbacks).
    error: Option<StoreError>,
    /// The batches `prepare_merge_batch` found, oldest first, for
    /// `commit_merge_batch` (a merge prepares the next batch while the
    /// previous one is being made durable).
    merge_batches: std::collections::VecDeque<MergeBatch>,
}

impl std::fmt::Debug for PersistentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentStore")
            .field("chunk_size", &self.chunk_size)
            .field("overflow", &self.overflow)
            .field("new_snapshot", &self.new_snapshot)
            .field("valid", &self.valid)
            .field("next_free", &self.next_free)
            .field("current_area", &self.current_area)
            .field("current_committed", &self.current_committed)
            .field("pending_count", &self.pending_count)
            .finish_non_exhaustive()
    }
}

/// The device's logical block size in bytes (at least one sector).
fn block_bytes(cow: &DevRef) -> u64 {
    u64::from(cow.logical_block_size()).max(SECTOR_SIZE)
}
impl PersistentStore {
    /// Open the store on `cow` (`persistent_ctr` + `read_header`): a device
    /// whose first 4 bytes are zero gets a fresh store with `requested` (or
    /// the default 4 KiB) chunks; an existing store keeps its on-disk chunk
    /// size. A header marked invalid opens as an invalid store.
    pub fn open(
        cow: DevRef,
        requested: Option<ChunkSize>,
        overflow: bool,
    ) -> Result<Self, StoreError> {
        match Self::read_header(&cow)? {
            HeaderState::Fresh => {
                let chunk_size = requested.unwrap_or_else(|| default_chunk_size(&cow));
                let mut s = Self::format(cow, chunk_size)?;
                s.overflow = overflow;
                Ok(s)
            }
            HeaderState::Existing(h) => {
                if let Some(r) = requested.filter(|&r| r != h.chunk_size) {
                    tracing::warn!(
                        "chunk size {} in device metadata overrides the requested chunk size of {}",
                        h.chunk_size,
                        r
                    );
                }
                Self::adopt(cow, h, overflow)
            }
        }
    }

    /// Open an existing store without ever writing: `Ok(None)` when the
    /// device holds no store (magic 0). For offline tools.
    pub fn open_existing(cow: DevRef, overflow: bool) -> Result<Option<Self>, StoreError> {
        match Self::read_header(&cow)? {
            HeaderState::Fresh => Ok(None),
            HeaderState::Existing(h) => Self::adopt(cow, h, overflow).map(Some),
        }
    }

    /// Write a fresh, empty store with `chunk_size` chunks on `cow`, whatever
    /// it held (`write_header` + `zero_disk_area(0)`), and open it.
    pub fn format(cow: DevRef, chunk_size: ChunkSize) -> Result<Self, StoreError> {
        let block = block_bytes(&cow);
        chunk_size
            .check_block_size(block)
            .map_err(StoreError::BadChunkSize)?;
        let min_bytes = MIN_CHUNKS * chunk_size.bytes();
        if cow.len() < min_bytes {
            return Err(StoreError::TooSmall {
                cow_bytes: cow.len(),
                chunk_size,
                min_bytes,
            });
        }
        let mut s = Self::new_state(cow, chunk_size, false);
        s.new_snapshot = true;
        // Area 0 first, then the header: a crash in between leaves either no
        // store (magic 0) or an empty one, never a header over stale records.
        s.zero_disk_area(0)?;
        s.cow.flush().map_err(StoreError::Flush)?;
        s.write_header()?;
        s.cow.flush().map_err(StoreError::Flush)?;
        Ok(s)
    }

    fn read_header(cow: &DevRef) -> Result<HeaderState, StoreError> {
        let head_len = block_bytes(cow);
        if cow.len() < head_len {
            let chunk_size = ChunkSize::DEFAULT;
            return Err(StoreError::TooSmall {
                cow_bytes: cow.len(),
                chunk_size,
                min_bytes: MIN_CHUNKS * chunk_size.bytes(),
            });
        }
        let mut head = vec![0u8; head_len as usize];
        cow.read_at(&mut head, 0).map_err(StoreError::ReadHeader)?;
        DiskHeader::parse(&head).map_err(StoreError::Header)
    }

    fn adopt(cow: DevRef, h: DiskHeader, overflow: bool) -> Result<Self, StoreError> {
        h.chunk_size
            .check_block_size(block_bytes(&cow))
            .map_err(|e| StoreError::Header(HeaderError::BadChunkSize(e)))?;
        let mut s = Self::new_state(cow, h.chunk_size, overflow);
        if !h.valid {
            tracing::warn!("snapshot is marked invalid");
            s.valid = false;
        }
        Ok(s)
    }

    fn new_state(cow: DevRef, chunk_size: ChunkSize, overflow: bool) -> Self {
        // The working area is allocated only if one fits on the device, so
        // an untrusted chunk size never sizes an allocation beyond it.
        let area = if cow.len() >= 2 * chunk_size.bytes() {
            vec![0u8; chunk_size.bytes() as usize]
        } else {
            Vec::new()
        };
        PersistentStore {
            cow,
            chunk_size,
            overflow,
            new_snapshot: false,
            valid: true,
            next_free: Chunk(NUM_SNAPSHOT_HDR_CHUNKS + 1),
            current_area: 0,
            current_committed: 0,
            pending_count: 0,
            area,
            recorded: 0,
            durable: 0,
            area_dirty: false,
            full_areas: Vec::new(),
            error: None,
            merge_batches: std::collections::VecDeque::new(),
        }
    }

    /// True when `open`/`format` wrote a fresh store; false when an existing
    /// (kernel- or dmsnap-made) store was adopted.
    pub fn is_new_snapshot(&self) -> bool {
        self.new_snapshot
    }
    /// True for `PO` (overflow) mode.
    pub fn overflow(&self) -> bool {
        self.overflow
    }
    /// `P` or `PO`.
    pub fn store_type(&self) -> StoreType {
        if self.overflow {
            StoreType::PersistentOverflow
        } else {
            StoreType::Persistent
        }
    }
    /// The COW device.
    pub fn cow(&self) -> &DevRef {
        &self.cow
    }
    /// The next chunk `prepare_exception` would hand out.
    pub fn next_free(&self) -> Chunk {
        self.next_free
    }
    /// The metadata area records are appended to.
    pub fn current_area(&self) -> u64 {
        self.current_area
    }
    /// Records in the current area.
    pub fn current_committed(&self) -> u64 {
        self.current_committed
    }
    /// Exceptions prepared and not yet committed.
    pub fn pending_count(&self) -> u64 {
        self.pending_count
    }
    /// Take the error that invalidated the store during a commit, if any.
    pub fn take_error(&mut self) -> Option<StoreError> {
        self.error.take()
    }

    fn exceptions_per_area(&self) -> u64 {
        exceptions_per_area(self.chunk_size)
    }

    fn area_offset(&self, area: u64) -> u64 {
        self.chunk_size
            .chunk_to_byte(area_location(self.chunk_size, area))
    }

    /// Whole chunks on the COW device.
    fn cow_chunks(&self) -> u64 {
        self.chunk_size.whole_chunks(self.cow.len())
    }

    /// How many metadata areas lie wholly on the device.
    fn areas_on_device(&self) -> u64 {
        let chunks = self.cow_chunks();
        if chunks < NUM_SNAPSHOT_HDR_CHUNKS + 1 {
            return 0;
        }
        (chunks - NUM_SNAPSHOT_HDR_CHUNKS - 1) / (self.exceptions_per_area() + 1) + 1
    }

    /// `write_header`: the whole header chunk (rest zero), plain write.
    fn write_header(&self) -> Result<(), StoreError> {
        let h = DiskHeader {
            valid: self.valid,
            chunk_size: self.chunk_size,
        };
        // Never more than the device holds (an adopted header's chunk size
        // is untrusted).
        let len = self.chunk_size.bytes().min(self.cow.len()) as usize;
        let mut buf = vec![0u8; len];
        let raw = h.to_raw();
        if let Some(dst) = buf.get_mut(..raw.as_bytes().len()) {
            dst.copy_from_slice(raw.as_bytes());
        }
        self.cow
            .write_at(&buf, 0, WriteFlags::NONE)
            .map_err(StoreError::WriteHeader)
    }

    /// `zero_disk_area`: a plain write of zeroes over metadata area `area`.
    fn zero_disk_area(&self, area: u64) -> Result<(), StoreError> {
        self.cow
            .write_zeroes(
                self.area_offset(area),
                self.chunk_size.bytes(),
                WriteFlags::NONE,
            )
            .map_err(|source| StoreError::ZeroArea { area, source })
    }
    /// Mark the store invalid after a failed commit, keeping the first error.
    fn fail(&mut self, e: StoreError) {
        tracing::error!("exception store: {}", crate::error_chain(&e));
        self.valid = false;
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// A fresh store's chunk size when none is asked for: 4 KiB, or the
/// device's block size if that is larger (the kernel's rule, with LVM's 4 KiB).
fn default_chunk_size(cow: &DevRef) -> ChunkSize {
    let block = block_bytes(cow);
    if block > ChunkSize::DEFAULT.bytes() {
        if let Ok(cs) = ChunkSize::from_bytes(block) {
            return cs;
        }
    }
    ChunkSize::DEFAULT
}
impl ExceptionStore for PersistentStore {
    fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    fn is_valid(&self) -> bool {
        self.valid
    }

    /// `persistent_read_metadata`: nothing for a fresh or invalid store.
    fn read_metadata(&mut self, sink: &mut dyn FnMut(DiskException)) -> Result<(), StoreError> {
        if self.new_snapshot || !self.valid {
            return Ok(());
        }
        self.read_exceptions(sink)
    }

    /// `persistent_prepare_exception`.
    fn prepare_exception(&mut self) -> Result<Chunk, StoreError> {
        self.allocate()
    }

    fn record_exception(&mut self, e: DiskException, valid: bool) -> Result<u64, StoreError> {
        self.append_record(e, valid)
    }

    fn durable_seq(&self) -> u64 {
        self.durable
    }

    fn recorded_seq(&self) -> u64 {
        self.recorded
    }

    fn has_full_areas(&self) -> bool {
        !self.full_areas.is_empty()
    }

    fn start_sync(&mut self) -> Option<SyncJob> {
        self.capture_sync()
    }

    fn finish_sync(&mut self, upto: u64, result: Result<(), StoreError>) {
        match result {
            Ok(()) => self.durable = self.durable.max(upto),
            Err(e) => self.fail(e),
        }
    }

    fn prepare_merge_batch(&mut self, max_chunks: u64) -> Result<Vec<MergeRun>, StoreError> {
        self.prepare_batch(max_chunks)
    }

    fn commit_merge_batch(&mut self, nr_merged: u64) -> Result<(), StoreError> {
        self.commit_batch(nr_merged)
    }

    fn queues_merge_batches(&self) -> bool {
        true
    }

    fn abandon_merge_batches(&mut self) {
        self.merge_batches.clear();
    }

    /// `persistent_drop_snapshot`: header `valid = 0`, plain write + flush.
    fn drop_snapshot(&mut self) -> Result<(), StoreError> {
        self.valid = false;
        self.write_header()?;
        self.cow.flush().map_err(StoreError::Flush)
    }

    /// `persistent_usage`.
    fn usage(&self) -> Usage {
        let cs = self.chunk_size.sectors();
        Usage {
            allocated: Sector(self.next_free.0.saturating_mul(cs)),
            total: Sector::from_bytes(self.cow.len()),
            metadata: Sector((self.current_area + 1 + NUM_SNAPSHOT_HDR_CHUNKS).saturating_mul(cs)),
        }
    }
}

/// What the tests of every part of the store share.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod test_support {
    pub(super) use super::*;
    pub(super) use crate::io::{BlockDev, MemDev};
    use parking_lot::Mutex;
    pub(super) use std::sync::Arc;

    pub(super) fn cs(sectors: u64) -> ChunkSize {
        ChunkSize::from_sectors(sectors).unwrap()
    }
    pub(super) fn de(o: u64, n: u64) -> DiskException {
        DiskException {
            old_chunk: Chunk(o),
            new_chunk: Chunk(n),
        }
    }

    /// What a device saw: `W(offset, len, fua)` or `F`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) enum Op {
        W(u64, usize, bool),
        F,
    }

    /// A MemDev that logs writes and flushes.
    pub(super) struct LogDev {
        pub(super) inner: MemDev,
        log: Mutex<Vec<Op>>,
    }
    impl LogDev {
        pub(super) fn new(len: u64) -> Arc<Self> {
            Arc::new(LogDev {
                inner: MemDev::new(len),
                log: Mutex::new(Vec::new()),
            })
        }
        pub(super) fn take(&self) -> Vec<Op> {
            std::mem::take(&mut *self.log.lock())
        }
    }
    impl BlockDev for LogDev {
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, f: WriteFlags) -> std::io::Result<()> {
            self.log.lock().push(Op::W(offset, buf.len(), f.fua));
            self.inner.write_at(buf, offset, f)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.log.lock().push(Op::F);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.discard(offset, len)
        }
    }

    pub(super) fn load(cow: DevRef) -> (PersistentStore, Vec<DiskException>) {
        let mut s = PersistentStore::open(cow, None, false).unwrap();
        let mut v = Vec::new();
        s.read_metadata(&mut |e| v.push(e)).unwrap();
        (s, v)
    }

    /// Record `e` and, at the kernel's group-commit points (no other
    /// prepared exception pending, or an area just filled), make every
    /// record so far durable with an inline sync job.
    pub(super) fn commit(s: &mut PersistentStore, e: DiskException) -> Result<(), StoreError> {
        s.record_exception(e, true)?;
        if s.pending_count() == 0 || s.has_full_areas() {
            s.sync_inline()?;
        }
        Ok(())
    }

    /// One step of the kernel's merge (`persistent_prepare_merge` then,
    /// after the caller's copy, `persistent_commit_merge`): a batch of one
    /// run.
    pub(super) fn kernel_prepare_merge(s: &mut PersistentStore) -> Option<MergeRun> {
        let runs = s.prepare_merge_batch(1).unwrap();
        assert!(runs.len() <= 1, "a budget of one exception is one run");
        runs.first().copied()
    }

    /// Prepare and commit `n` exceptions one at a time; old = base + i.
    pub(super) fn fill(s: &mut PersistentStore, base: u64, n: u64) -> Vec<DiskException> {
        (0..n)
            .map(|i| {
                let c = s.prepare_exception().unwrap();
                let e = de(base + i, c.0);
                commit(s, e).unwrap();
                e
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::test_support::*;

    #[test]
    fn fresh_format_bytes_and_status() {
        let dev = Arc::new(MemDev::new(16384 * 512));
        let s = PersistentStore::open(dev.clone(), None, false).unwrap();
        assert!(s.is_new_snapshot());
        assert_eq!(s.chunk_size(), ChunkSize::DEFAULT);
        assert_eq!(s.usage().to_string(), "16/16384 16");
        let img = dev.snapshot();
        assert_eq!(
            &img[..16],
            &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]
        );
        assert!(img[16..].iter().all(|&b| b == 0));
        let (s2, v) = load(dev);
        assert!(!s2.is_new_snapshot());
        assert!(s2.is_valid());
        assert!(v.is_empty());
        assert_eq!(s2.usage().to_string(), "16/16384 16");
    }

    #[test]
    fn fresh_16k_status() {
        let dev = Arc::new(MemDev::new(98304 * 512));
        let s = PersistentStore::open(dev.clone(), Some(cs(32)), false).unwrap();
        assert_eq!(s.usage().to_string(), "64/98304 64");
        // The on-disk chunk size wins over a different request.
        let s = PersistentStore::open(dev, Some(cs(8)), true).unwrap();
        assert_eq!(s.chunk_size(), cs(32));
        assert!(!s.is_new_snapshot());
        assert_eq!(s.store_type(), StoreType::PersistentOverflow);
    }

    #[test]
    fn format_overwrites_an_existing_store() {
        let dev = Arc::new(MemDev::new(1 << 20));
        let mut s = PersistentStore::open(dev.clone(), Some(cs(8)), false).unwrap();
        fill(&mut s, 0, 10);
        let s = PersistentStore::format(dev.clone(), cs(16)).unwrap();
        assert!(s.is_new_snapshot());
        let (s, v) = load(dev);
        assert_eq!(s.chunk_size(), cs(16));
        assert!(v.is_empty());
    }

    #[test]
    fn refusals() {
        // Too small for header + area 0 + one data chunk.
        let dev = Arc::new(MemDev::new(2 * 4096));
        assert!(matches!(
            PersistentStore::open(dev, None, false),
            Err(StoreError::TooSmall {
                min_bytes: 12288,
                ..
            })
        ));
        let dev = Arc::new(MemDev::new(100));
        assert!(matches!(
            PersistentStore::open(dev, None, false),
            Err(StoreError::TooSmall { .. })
        ));
        let dev = Arc::new(MemDev::new(1 << 20));
        dev.write_at(b"XXXX", 0, WriteFlags::NONE).unwrap();
        assert!(matches!(
            PersistentStore::open(dev.clone(), None, false),
            Err(StoreError::Header(HeaderError::BadMagic(_)))
        ));
        dev.write_at(&0x7041_6e53u32.to_le_bytes(), 0, WriteFlags::NONE)
            .unwrap();
        dev.write_at(&[2, 0, 0, 0, 8, 0, 0, 0], 8, WriteFlags::NONE)
            .unwrap();
        assert!(matches!(
            PersistentStore::open(dev.clone(), None, false),
            Err(StoreError::Header(HeaderError::BadVersion(2)))
        ));
        dev.write_at(&[1, 0, 0, 0, 3, 0, 0, 0], 8, WriteFlags::NONE)
            .unwrap();
        assert!(matches!(
            PersistentStore::open(dev, None, false),
            Err(StoreError::Header(HeaderError::BadChunkSize(_)))
        ));
    }

    #[test]
    fn enospc_at_the_exact_boundary() {
        let dev = Arc::new(MemDev::new(64 << 10));
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        assert_eq!(s.usage().to_string(), "16/128 16");
        for i in 0..14u64 {
            let c = s.prepare_exception().unwrap();
            commit(&mut s, de(i, c.0)).unwrap();
            assert_eq!(s.usage().to_string(), format!("{}/128 16", 24 + 8 * i));
        }
        assert!(matches!(
            s.prepare_exception(),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.usage().to_string(), "128/128 16");
        s.drop_snapshot().unwrap();
        let (mut s, v) = load(dev);
        assert!(!s.is_valid());
        assert!(v.is_empty(), "an invalid store yields no exceptions");
        assert!(matches!(s.prepare_exception(), Err(StoreError::Invalid)));
    }

    /// Model check: random batches of prepares/commits and merge steps; after
    /// every operation a reload gives the same exceptions and status.
    #[test]
    fn reload_after_every_operation_gives_the_same_state() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..4 {
            let dev = Arc::new(MemDev::new(3 << 20));
            let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
            let mut model: Vec<DiskException> = Vec::new();
            let mut old = 0u64;
            for _ in 0..60 {
                if rng.gen_bool(0.2) && !model.is_empty() {
                    if let Some(r) = kernel_prepare_merge(&mut s) {
                        s.commit_merge_batch(r.n).unwrap();
                        model.truncate(model.len() - r.n as usize);
                    }
                } else {
                    let batch = rng.gen_range(1..40);
                    let mut prepared = Vec::new();
                    for _ in 0..batch {
                        match s.prepare_exception() {
                            Ok(c) => prepared.push(c),
                            Err(StoreError::Full { .. }) => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    for c in prepared {
                        old += rng.gen_range(1..3);
                        let e = de(old, c.0);
                        commit(&mut s, e).unwrap();
                        model.push(e);
                    }
                }
                let (r, v) = load(dev.clone());
                assert_eq!(v, model, "round {round}");
                assert_eq!(r.usage(), s.usage(), "round {round}");
                assert_eq!(r.current_area(), s.current_area());
                assert_eq!(r.current_committed(), s.current_committed());
            }
        }
    }
}
