//! The persistent exception store (`P`/`PO`, `dm-snap-persistent.c`): the
//! kernel's on-disk format (see [`crate::format`]) with the kernel's
//! allocation, group-commit and merge protocols.
//!
//! State, as in the kernel's `struct pstore`:
//! - `next_free`: the next COW chunk to hand out (never a metadata chunk);
//! - `current_area` / `current_committed`: the metadata area records are
//!   appended to and how many it holds; `area` is its in-memory copy;
//! - `pending_count`: exceptions prepared but not yet committed;
//! - `callbacks`: commits gathered for the next area write;
//! - `recorded` / `durable`: sequence numbers of the last record appended
//!   and of the last one on disk; `full_areas`: filled areas captured for
//!   the next [`SyncJob`] (the split commit the engine uses, see
//!   [`crate::store`]).
//!
//! Durability (group commit, `persistent_commit_exception`): an area is
//! written only when no prepared exception is pending or the area just
//! filled; before it, a full area's successor is zeroed (the terminator),
//! then the COW is flushed (the data copies the records point at become
//! durable), then the area is written with FUA. Only then are the gathered
//! callbacks told `true`. Any write error makes the store invalid: it
//! writes no more metadata and every later callback gets `false`.
//!
//! Deviations from the kernel, all on corrupt or hostile input or for
//! crash safety: records pointing at the header, a metadata chunk or past
//! the device are refused ([`StoreError::Corrupt`]); bytes after the
//! terminator of the last area are not carried into the working copy (the
//! kernel would write them back and could resurrect stale records); a fresh
//! store's area 0 is zeroed and flushed *before* its header is written and
//! flushed, so a crash cannot leave a header over garbage records.

mod prefetch;

use super::{
    AreaWrite, CommitCallback, Completed, ExceptionStore, StoreError, StoreType, SyncJob, Usage,
};
use crate::format::{
    area_location, exceptions_per_area, is_metadata_chunk, skip_metadata, DiskException,
    DiskHeader, HeaderError, HeaderState, RawDiskException, DISK_EXCEPTION_BYTES,
    NUM_SNAPSHOT_HDR_CHUNKS,
};
use crate::io::{DevRef, WriteFlags};
use crate::units::{Chunk, ChunkSize, Sector, SECTOR_SIZE};
use zerocopy::{FromBytes, IntoBytes};

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
    callbacks: Vec<CommitCallback>,
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

/// One metadata area a merge batch clears records of: slots `[to, from)`.
struct MergeArea {
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
struct MergeBatch {
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

/// [`is_metadata_chunk`] without a division per call (the load checks a
/// million records in a few milliseconds): a chunk `c > 0` is metadata when
/// the stride `d` (records per area + 1, odd for every chunk size) divides
/// `c - 1`, i.e. when `(c - 1) * d⁻¹ mod 2⁶⁴ <= (2⁶⁴ - 1) / d`.
#[derive(Debug, Clone, Copy)]
struct MetadataChunks {
    chunk_size: ChunkSize,
    /// `d⁻¹ mod 2⁶⁴`, `None` for an even stride (plain `%` then).
    inverse: Option<u64>,
    limit: u64,
}

impl MetadataChunks {
    fn new(chunk_size: ChunkSize) -> Self {
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

    fn contains(&self, chunk: Chunk) -> bool {
        match self.inverse {
            Some(inv) if chunk.0 >= NUM_SNAPSHOT_HDR_CHUNKS => {
                (chunk.0 - NUM_SNAPSHOT_HDR_CHUNKS).wrapping_mul(inv) <= self.limit
            }
            _ => is_metadata_chunk(self.chunk_size, chunk),
        }
    }
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
            callbacks: Vec::new(),
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

    /// Run the sync job for everything recorded, here and now (the kernel's
    /// inline commit; merges call it so they start from durable records).
    fn sync_now(&mut self) -> Result<(), StoreError> {
        if let Some(job) = self.start_sync() {
            let res = job.run();
            let failed = res.is_err();
            self.finish_sync(job.upto, res);
            if failed {
                // The cause is logged and kept for `take_error`.
                return Err(StoreError::Invalid);
            }
        }
        if self.valid {
            Ok(())
        } else {
            Err(StoreError::Invalid)
        }
    }

    /// `area_io(REQ_PREFLUSH | REQ_FUA)`: flush, then write the working area
    /// with FUA.
    fn write_area_durably(&self) -> Result<(), StoreError> {
        self.cow.flush().map_err(StoreError::Flush)?;
        self.cow
            .write_at(
                &self.area,
                self.area_offset(self.current_area),
                WriteFlags::FUA,
            )
            .map_err(|source| StoreError::WriteArea {
                area: self.current_area,
                source,
            })
    }

    fn slot(&self, index: u64) -> Option<&[u8]> {
        let start = usize::try_from(index * DISK_EXCEPTION_BYTES).ok()?;
        self.area.get(start..start + DISK_EXCEPTION_BYTES as usize)
    }

    /// `read_exception`.
    fn read_exception(&self, index: u64) -> Option<DiskException> {
        let raw = RawDiskException::read_from_bytes(self.slot(index)?).ok()?;
        Some(raw.into())
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

    /// Check one loaded record against the device geometry (`cow_chunks`:
    /// whole chunks on the device, computed once per load).
    fn check_record(
        &self,
        cow_chunks: u64,
        area: u64,
        slot: u64,
        e: DiskException,
    ) -> Result<(), StoreError> {
        let corrupt = |what: String| StoreError::Corrupt { area, slot, what };
        if e.new_chunk.0 >= cow_chunks {
            return Err(corrupt(format!(
                "new_chunk {} (old_chunk {}) lies beyond the end of the COW device ({} chunks)",
                e.new_chunk, e.old_chunk, cow_chunks
            )));
        }
        if is_metadata_chunk(self.chunk_size, e.new_chunk) {
            return Err(corrupt(format!(
                "new_chunk {} (old_chunk {}) is a metadata chunk",
                e.new_chunk, e.old_chunk
            )));
        }
        Ok(())
    }

    /// `read_exceptions`: walk the areas, hand every record to `sink`, keep
    /// the last (partial) area as the working area.
    fn read_exceptions(&mut self, sink: &mut dyn FnMut(DiskException)) -> Result<(), StoreError> {
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
                            what: format!(
                                "metadata area {area} (chunk {}) lies beyond the end of the COW \
                                 device ({} chunks): the exception list has no terminator",
                                area_location(chunk_size, area),
                                cow_chunks
                            ),
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
    fn read_full_area(&self, area: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; self.chunk_size.bytes() as usize];
        self.cow
            .read_at(&mut buf, self.area_offset(area))
            .map_err(|source| StoreError::ReadArea { area, source })?;
        let rec = crate::format::decode_area(&buf);
        if !rec.full {
            return Err(StoreError::Corrupt {
                area,
                slot: rec.exceptions.len() as u64,
                what: "the area before the current one is not full".into(),
            });
        }
        Ok(buf)
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

    /// `persistent_commit_exception`: group commit (module docs), the
    /// area written inline.
    fn commit_exception(
        &mut self,
        e: DiskException,
        valid: bool,
        callback: CommitCallback,
    ) -> Completed {
        let _ = self.record_exception(e, valid);
        self.callbacks.push(callback);
        if self.pending_count != 0 && self.full_areas.is_empty() {
            return Completed::default();
        }
        if self.valid {
            let _ = self.sync_now();
        }
        let ok = self.valid;
        Completed(self.callbacks.drain(..).map(|cb| (cb, ok)).collect())
    }

    fn record_exception(&mut self, e: DiskException, valid: bool) -> Result<u64, StoreError> {
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

    fn finish_sync(&mut self, upto: u64, result: Result<(), StoreError>) {
        match result {
            Ok(()) => self.durable = self.durable.max(upto),
            Err(e) => self.fail(e),
        }
    }

    /// `persistent_prepare_merge`.
    fn prepare_merge(&mut self) -> Result<Option<(Chunk, Chunk, u64)>, StoreError> {
        self.merge_batches.clear();
        self.sync_now()?;
        if self.current_committed == 0 {
            if self.current_area == 0 {
                return Ok(None);
            }
            // Step back to the previous area, which is full on disk.
            let area = self.current_area - 1;
            self.area = self.read_full_area(area)?;
            self.current_area = area;
            self.current_committed = self.exceptions_per_area();
        }
        let Some(last) = self.read_exception(self.current_committed - 1) else {
            return Err(StoreError::Invalid);
        };
        let mut n = 1;
        while n < self.current_committed {
            let Some(ce) = self.read_exception(self.current_committed - 1 - n) else {
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
        Ok(Some((last.old_chunk, last.new_chunk, n)))
    }

    /// `persistent_commit_merge`.
    fn commit_merge(&mut self, nr_merged: u64) -> Result<(), StoreError> {
        self.merge_batches.clear();
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        if nr_merged > self.current_committed {
            return Err(StoreError::Corrupt {
                area: self.current_area,
                slot: self.current_committed,
                what: format!(
                    "commit_merge of {nr_merged} exceptions, but the area holds only {}",
                    self.current_committed
                ),
            });
        }
        for i in 0..nr_merged {
            self.write_exception(self.current_committed - 1 - i, RawDiskException::default());
        }
        self.write_area_durably()?;
        self.current_committed -= nr_merged;
        // Approximate, as in the kernel: only usage() reads it from now on.
        self.next_free =
            Chunk(area_location(self.chunk_size, self.current_area).0 + self.current_committed + 1);
        Ok(())
    }

    /// The runs `prepare_merge` would hand out one after the other, walking
    /// back across areas (each read once), up to `max_chunks` exceptions,
    /// starting where the batches prepared and not yet committed end.
    fn prepare_merge_batch(
        &mut self,
        max_chunks: u64,
    ) -> Result<Vec<(Chunk, Chunk, u64)>, StoreError> {
        // The merge works on durable records only.
        if let Err(e) = self.sync_now() {
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
            runs.push((last.old_chunk, last.new_chunk, n));
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
    /// the working area) is what `commit_merge` leaves after the same runs
    /// one at a time: the lowest area touched, holding its unmerged records.
    fn commit_merge_batch(&mut self, nr_merged: u64) -> Result<(), StoreError> {
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        let here = (self.current_area, self.current_committed);
        let batch = match self.merge_batches.pop_front() {
            Some(b) if b.nr == nr_merged && b.start == here => b,
            _ => {
                self.merge_batches.clear();
                return Err(StoreError::Corrupt {
                    area: self.current_area,
                    slot: self.current_committed,
                    what: format!(
                        "commit_merge_batch of {nr_merged} exceptions does not match \
                         the prepared batch"
                    ),
                });
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::io::testing::{Fault, FaultyDev, OpKind};
    use crate::io::{BlockDev, MemDev};
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn cs(sectors: u64) -> ChunkSize {
        ChunkSize::from_sectors(sectors).unwrap()
    }
    fn de(o: u64, n: u64) -> DiskException {
        DiskException {
            old_chunk: Chunk(o),
            new_chunk: Chunk(n),
        }
    }

    /// What a device saw: `W(offset, len, fua)` or `F`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Op {
        W(u64, usize, bool),
        F,
    }

    /// A MemDev that logs writes and flushes.
    struct LogDev {
        inner: MemDev,
        log: Mutex<Vec<Op>>,
    }
    impl LogDev {
        fn new(len: u64) -> Arc<Self> {
            Arc::new(LogDev {
                inner: MemDev::new(len),
                log: Mutex::new(Vec::new()),
            })
        }
        fn take(&self) -> Vec<Op> {
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

    fn load(cow: DevRef) -> (PersistentStore, Vec<DiskException>) {
        let mut s = PersistentStore::open(cow, None, false).unwrap();
        let mut v = Vec::new();
        s.read_metadata(&mut |e| v.push(e)).unwrap();
        (s, v)
    }

    /// Commit `e` and run the callbacks; returns how many ran and their results.
    fn commit(s: &mut PersistentStore, e: DiskException) -> Vec<bool> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let done = s.commit_exception(e, true, Box::new(move |ok| o.lock().push(ok)));
        let n = done.0.len();
        done.run();
        let v = out.lock().clone();
        assert!(v.len() <= n);
        v
    }

    /// Prepare and commit `n` exceptions one at a time; old = base + i.
    fn fill(s: &mut PersistentStore, base: u64, n: u64) -> Vec<DiskException> {
        (0..n)
            .map(|i| {
                let c = s.prepare_exception().unwrap();
                let e = de(base + i, c.0);
                let _ = commit(s, e);
                e
            })
            .collect()
    }

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
    fn allocation_skips_metadata() {
        let dev = Arc::new(MemDev::new(4 << 20));
        let mut s = PersistentStore::open(dev, None, false).unwrap();
        let got: Vec<u64> = (0..300).map(|_| s.prepare_exception().unwrap().0).collect();
        let want: Vec<u64> = (2..258).chain(259..303).collect();
        assert_eq!(got, want);
        assert_eq!(s.pending_count(), 300);
    }

    #[test]
    fn group_commit_writes_once_per_batch() {
        let dev = LogDev::new(4 << 20);
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        dev.take();
        let chunks: Vec<Chunk> = (0..5).map(|_| s.prepare_exception().unwrap()).collect();
        let ran = Arc::new(AtomicUsize::new(0));
        for (i, c) in chunks.iter().enumerate() {
            let r = ran.clone();
            let done = s.commit_exception(
                de(100 + i as u64, c.0),
                true,
                Box::new(move |ok| {
                    assert!(ok);
                    r.fetch_add(1, Ordering::SeqCst);
                }),
            );
            if i < 4 {
                assert!(done.is_empty());
                assert!(dev.take().is_empty(), "no I/O while exceptions are pending");
            } else {
                assert_eq!(done.0.len(), 5);
                done.run();
            }
        }
        assert_eq!(ran.load(Ordering::SeqCst), 5);
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
        assert_eq!(commit(&mut s, de(999, 257)), vec![true]);
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
    fn enospc_at_the_exact_boundary() {
        let dev = Arc::new(MemDev::new(64 << 10));
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        assert_eq!(s.usage().to_string(), "16/128 16");
        for i in 0..14u64 {
            let c = s.prepare_exception().unwrap();
            let _ = commit(&mut s, de(i, c.0));
            assert_eq!(s.usage().to_string(), format!("{}/128 16", 24 + 8 * i));
        }
        assert!(matches!(
            s.prepare_exception(),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.usage().to_string(), "128/128 16");
        s.drop_snapshot().unwrap();
        let (s, v) = load(dev);
        assert!(!s.is_valid());
        assert!(v.is_empty(), "an invalid store yields no exceptions");
        assert!(matches!(s.clone_err(), StoreError::Invalid));
    }

    impl PersistentStore {
        fn clone_err(mut self) -> StoreError {
            self.prepare_exception().unwrap_err()
        }
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
        let d = s.commit_exception(de(1, a.0), false, Box::new(|ok| assert!(!ok)));
        assert!(d.is_empty());
        let d = s.commit_exception(de(2, b.0), true, Box::new(|ok| assert!(!ok)));
        assert_eq!(d.0.iter().map(|x| x.1).collect::<Vec<_>>(), [false, false]);
        d.run();
        assert!(dev.take().is_empty(), "an invalid store writes no metadata");
        assert!(!s.is_valid());

        let fd = Arc::new(FaultyDev::new(MemDev::new(1 << 20)));
        let mut s = PersistentStore::open(fd.clone(), None, false).unwrap();
        let a = s.prepare_exception().unwrap();
        fd.add(Fault::Always {
            kind: OpKind::Flush,
        });
        let d = s.commit_exception(de(1, a.0), true, Box::new(|ok| assert!(!ok)));
        assert_eq!(d.0.len(), 1);
        d.run();
        assert!(!s.is_valid());
        assert!(matches!(s.take_error(), Some(StoreError::Flush(_))));
    }

    /// Build a store with runs, then merge it down to nothing, reloading
    /// after every step.
    #[test]
    fn merge_prepare_commit_steps_back() {
        let dev = Arc::new(MemDev::new(4 << 20));
        let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
        // 300 exceptions: old chunks in runs of 7 (consecutive old and new),
        // broken where old jumps; new chunks skip area 1 at 258.
        let mut all = Vec::new();
        for i in 0..300u64 {
            let c = s.prepare_exception().unwrap();
            let e = de((i / 7) * 1000 + i % 7, c.0);
            let _ = commit(&mut s, e);
            all.push(e);
        }
        assert_eq!(s.usage().to_string(), "2424/8192 24");
        while let Some((old, new, n)) = s.prepare_merge().unwrap() {
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
            s.commit_merge(n).unwrap();
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
    /// steps leave: the same runs, the same COW bytes, the same state and
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
                let _ = commit(&mut k, de(old, c.0));
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
                    assert_eq!(k.prepare_merge().unwrap(), None);
                    break;
                }
                let nr: u64 = runs.iter().map(|r| r.2).sum();
                assert!(runs.len() == 1 || nr <= budget, "round {round}");
                for &r in &runs {
                    let kr = k.prepare_merge().unwrap().unwrap();
                    assert_eq!(kr, r, "round {round}: the kernel's next run");
                    k.commit_merge(kr.2).unwrap();
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
                let _ = commit(&mut k, de(old, c.0));
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
            let mut queued: VecDeque<Vec<(Chunk, Chunk, u64)>> = VecDeque::new();
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
                    let kr = k.prepare_merge().unwrap().unwrap();
                    assert_eq!(kr, r, "round {round}: the kernel's next run");
                    k.commit_merge(kr.2).unwrap();
                }
                b.commit_merge_batch(runs.iter().map(|r| r.2).sum())
                    .unwrap();
                assert!(dev.snapshot() == kernel_dev.snapshot(), "round {round}");
                assert_eq!(b.current_area(), k.current_area());
                assert_eq!(b.current_committed(), k.current_committed());
                assert_eq!(b.usage(), k.usage());
            }
            assert_eq!(k.prepare_merge().unwrap(), None);
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
            Err(StoreError::Corrupt { .. })
        ));
        let runs = s.prepare_merge_batch(100).unwrap();
        assert_eq!(runs, vec![(Chunk(9), Chunk(11), 10)]);
        assert!(matches!(
            s.commit_merge_batch(9),
            Err(StoreError::Corrupt { .. })
        ));
        let runs = s.prepare_merge_batch(100).unwrap();
        s.commit_merge(1).unwrap();
        assert!(
            s.commit_merge_batch(runs[0].2).is_err(),
            "the state moved since the batch was prepared"
        );
    }

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
        let _ = commit(&mut s, de(9, 3));
        let (_, v) = load(dev);
        assert_eq!(v, vec![de(7, 2), de(9, 3)]);
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
                    if let Some((_, _, n)) = s.prepare_merge().unwrap() {
                        s.commit_merge(n).unwrap();
                        model.truncate(model.len() - n as usize);
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
                        let _ = commit(&mut s, e);
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
        assert_eq!(commit(&mut s, de(1000, c.0)), vec![false]);
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
