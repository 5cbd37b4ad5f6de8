//! Exception stores: the `dm_exception_store_type` vtable as a trait, with the
//! persistent store (the kernel's on-disk format, [`persistent`]) and the
//! transient store ([`transient`], `N`: nothing survives a restart).
//!
//! Calling discipline (as in the kernel, where kcopyd delivers completions on
//! one thread): the engine holds the store behind one lock; every
//! `prepare_exception` is later matched by exactly one `record_exception`
//! (with `valid = false` if the copy failed), and records arrive **in
//! allocation order**.
//!
//! The kernel's `commit_exception` records an exception and, when its group
//! commit says so, writes the area there and then. Here it is two halves,
//! so that no lock is held across the area I/O:
//! [`record_exception`](ExceptionStore::record_exception) appends the
//! record in memory and returns its sequence number, and
//! [`start_sync`](ExceptionStore::start_sync) captures a [`SyncJob`] (the
//! area writes that make every record so far durable) that the caller runs
//! outside its lock, one job at a time, and reports back with
//! [`finish_sync`](ExceptionStore::finish_sync). A record is durable once
//! [`durable_seq`](ExceptionStore::durable_seq) has reached its number.
//! Group commit falls out: every record appended while a job runs goes
//! into the next one. Callers without a lock to spare (offline tools,
//! tests) run a job inline with [`sync_inline`](ExceptionStore::sync_inline).
//!
//! Merging is batched the same way: [`prepare_merge_batch`](ExceptionStore::prepare_merge_batch)
//! returns the kernel's `prepare_merge` runs one after the other (a budget
//! of one exception gives exactly one kernel step), and
//! [`commit_merge_batch`](ExceptionStore::commit_merge_batch) clears them.

pub mod persistent;
pub mod transient;

pub use persistent::PersistentStore;
pub use transient::TransientStore;

use crate::format::{DiskException, HeaderError};
use crate::io::{DevRef, WriteFlags};
use crate::units::{Chunk, ChunkSize, ChunkSizeError, Sector};
use std::io;

/// The table's `<P|PO|N>` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StoreType {
    /// `P`: persistent; a full COW invalidates the snapshot.
    #[serde(rename = "P")]
    Persistent,
    /// `PO`: persistent, overflow mode: a full COW fails snapshot writes only.
    #[serde(rename = "PO")]
    PersistentOverflow,
    /// `N`: transient.
    #[serde(rename = "N")]
    Transient,
}

impl StoreType {
    /// The table spelling: `P`, `PO` or `N`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreType::Persistent => "P",
            StoreType::PersistentOverflow => "PO",
            StoreType::Transient => "N",
        }
    }
    pub fn is_persistent(self) -> bool {
        !matches!(self, StoreType::Transient)
    }
}

impl std::str::FromStr for StoreType {
    type Err = String;
    /// Case-insensitive `P`, `PO` or `N` (stricter than the kernel, which
    /// ignores extra characters after `N`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "P" => Ok(StoreType::Persistent),
            "PO" => Ok(StoreType::PersistentOverflow),
            "N" => Ok(StoreType::Transient),
            _ => Err(format!("store type '{s}' is not P, PO or N")),
        }
    }
}

impl std::fmt::Display for StoreType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Usage as `dmsetup status` prints it: `<allocated>/<total> <metadata>`, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    /// Sectors handed out, header and metadata included (`next_free × chunk_size`).
    pub allocated: Sector,
    /// The COW device's size.
    pub total: Sector,
    /// Header plus metadata areas up to the current one.
    pub metadata: Sector,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} {}", self.allocated, self.total, self.metadata)
    }
}

/// Errors of an exception store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("COW device full: no room for another {chunk_size} chunk ({usage} in use)")]
    Full { chunk_size: ChunkSize, usage: Usage },
    #[error("reading the COW header")]
    ReadHeader(#[source] io::Error),
    #[error("writing the COW header")]
    WriteHeader(#[source] io::Error),
    #[error("the COW header is not usable")]
    Header(#[source] HeaderError),
    #[error("reading metadata area {area}")]
    ReadArea {
        area: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing metadata area {area}")]
    WriteArea {
        area: u64,
        #[source]
        source: io::Error,
    },
    #[error("zeroing metadata area {area}")]
    ZeroArea {
        area: u64,
        #[source]
        source: io::Error,
    },
    #[error("flushing the COW device")]
    Flush(#[source] io::Error),
    #[error("the COW device of {cow_bytes} bytes is too small: a {chunk_size} chunk store needs at least {min_bytes} bytes")]
    TooSmall {
        cow_bytes: u64,
        chunk_size: ChunkSize,
        min_bytes: u64,
    },
    #[error("the chunk size does not suit the COW device")]
    BadChunkSize(#[source] ChunkSizeError),
    #[error("the COW device's chunk size {on_disk} differs from the requested {requested}")]
    ChunkSizeMismatch {
        on_disk: ChunkSize,
        requested: ChunkSize,
    },
    #[error("corrupt metadata in area {area}, slot {slot}")]
    Corrupt {
        area: u64,
        slot: u64,
        #[source]
        kind: Corruption,
    },
    #[error("commit_merge_batch of {nr_merged} exceptions does not match the prepared batch")]
    StaleMergeBatch { nr_merged: u64 },
    #[error("the exception store is invalid (an earlier error or an invalidated snapshot)")]
    Invalid,
    #[error("this store type cannot merge (only persistent stores can)")]
    MergeUnsupported,
    /// A panic in the store's I/O (a bug, or a device that panicked), caught
    /// so that the waiters get an error instead of a hang.
    #[error("a panic while {0}")]
    Panicked(&'static str),
}

/// One run of a merge (what the kernel's `persistent_prepare_merge`
/// returns): the `n` exceptions ending at `last_old → last_new`, in which
/// both the origin and the COW chunks are consecutive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeRun {
    pub last_old: Chunk,
    pub last_new: Chunk,
    pub n: u64,
}

impl MergeRun {
    /// The run's first origin chunk (`None` for a run that would wrap
    /// around chunk 0 or is empty: corrupt).
    pub fn first_old(&self) -> Option<Chunk> {
        self.last_old
            .0
            .checked_add(1)?
            .checked_sub(self.n)
            .filter(|_| self.n > 0)
            .map(Chunk)
    }
    /// The run's first COW chunk (`None` as for [`first_old`](Self::first_old)).
    pub fn first_new(&self) -> Option<Chunk> {
        self.last_new
            .0
            .checked_add(1)?
            .checked_sub(self.n)
            .filter(|_| self.n > 0)
            .map(Chunk)
    }
}

/// What is wrong with loaded metadata ([`StoreError::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("new_chunk {new_chunk} (old_chunk {old_chunk}) lies beyond the end of the COW device ({cow_chunks} chunks)")]
    BeyondDevice {
        old_chunk: Chunk,
        new_chunk: Chunk,
        cow_chunks: u64,
    },
    #[error("new_chunk {new_chunk} (old_chunk {old_chunk}) is a metadata chunk")]
    MetadataChunk { old_chunk: Chunk, new_chunk: Chunk },
    #[error("the metadata area (chunk {chunk}) lies beyond the end of the COW device ({cow_chunks} chunks): the exception list has no terminator")]
    NoTerminator { chunk: Chunk, cow_chunks: u64 },
    #[error("the area before the current one is not full")]
    PreviousAreaNotFull,
}

/// `dm_exception_store_type` as a trait. Method docs name the kernel function
/// each one mirrors.
pub trait ExceptionStore: Send {
    /// The chunk size in use (for a persistent store: the on-disk one).
    fn chunk_size(&self) -> ChunkSize;

    /// False once the store was invalidated or hit a write error
    /// (`ps->valid == 0`); an invalid store writes no more metadata.
    fn is_valid(&self) -> bool;

    /// `read_metadata`: hand every committed exception to `sink`, in on-disk
    /// order. Called once, before any other method but `chunk_size`.
    fn read_metadata(&mut self, sink: &mut dyn FnMut(DiskException)) -> Result<(), StoreError>;

    /// `prepare_exception`: allocate the COW chunk for a new exception.
    /// `Err(StoreError::Full)` when the COW has no room.
    fn prepare_exception(&mut self) -> Result<Chunk, StoreError>;

    /// `prepare_merge`, batched: the runs the kernel's `prepare_merge`
    /// would return one after the other if each were committed in turn,
    /// last first, whole runs only, at most `max_chunks` exceptions in all
    /// (but always the first run: `max_chunks = 1` is one kernel step).
    /// Empty when nothing is left. Changes no durable state: the batch is
    /// applied by [`commit_merge_batch`](Self::commit_merge_batch).
    fn prepare_merge_batch(&mut self, max_chunks: u64) -> Result<Vec<MergeRun>, StoreError>;

    /// `commit_merge`, batched: forget every exception of the oldest batch
    /// `prepare_merge_batch` returned (`nr_merged` of them), durably (the
    /// cleared records are the resume point after a crash), leaving the
    /// state the kernel's `commit_merge` would have left run by run.
    fn commit_merge_batch(&mut self, nr_merged: u64) -> Result<(), StoreError>;

    /// The first half of the kernel's `commit_exception`: append `e`'s record to the
    /// working metadata (its data copy has completed; `valid = false` when
    /// it failed, which invalidates the store). Writes nothing; returns the
    /// record's sequence number (1, 2, ... since the store was opened).
    /// `Err(StoreError::Invalid)` when the store is or becomes invalid.
    fn record_exception(&mut self, e: DiskException, valid: bool) -> Result<u64, StoreError>;

    /// Every record numbered up to this is durable.
    fn durable_seq(&self) -> u64;

    /// The number of the last record `record_exception` appended.
    fn recorded_seq(&self) -> u64;

    /// True when filled metadata areas wait for a [`SyncJob`] (the kernel
    /// writes a full area at once; so should the caller, soon).
    fn has_full_areas(&self) -> bool;

    /// Capture the area writes that make every record so far durable, to
    /// run outside the caller's lock. At most one job may be running at a
    /// time, and each must be reported with `finish_sync` before the next
    /// is started. `None` when there is nothing to write (or the store is
    /// invalid).
    fn start_sync(&mut self) -> Option<SyncJob>;

    /// Report a job's outcome: on success its records are durable; an
    /// error invalidates the store (the first error is kept).
    fn finish_sync(&mut self, upto: u64, result: Result<(), StoreError>);

    /// Start, run and finish a sync job here and now (the kernel's inline
    /// area write), for callers that hold no lock others need: offline
    /// tools, tests, a merge starting from durable records.
    /// `Err(StoreError::Invalid)` when the store is or became invalid (a
    /// persistent store keeps the cause for `take_error`).
    fn sync_inline(&mut self) -> Result<(), StoreError> {
        if let Some(job) = self.start_sync() {
            let res = job.run();
            let failed = res.is_err();
            self.finish_sync(job.upto(), res);
            if failed {
                return Err(StoreError::Invalid);
            }
        }
        if self.is_valid() {
            Ok(())
        } else {
            Err(StoreError::Invalid)
        }
    }

    /// Whether `prepare_merge_batch` may be called again before the batch
    /// it returned is committed (a merge copying the next batch while the
    /// previous one is made durable): the new batch then starts where the
    /// prepared ones end, and `commit_merge_batch` commits the oldest. The
    /// default: one batch at a time.
    fn queues_merge_batches(&self) -> bool {
        false
    }

    /// Forget the batches prepared and not committed (a merge that stopped
    /// or failed between the two); the next batch starts at the store's
    /// state. The default has none.
    fn abandon_merge_batches(&mut self) {}

    /// `drop_snapshot`: invalidate the store (header `valid = 0`).
    fn drop_snapshot(&mut self) -> Result<(), StoreError>;

    /// `usage`: the figures of `dmsetup status`.
    fn usage(&self) -> Usage;
}

/// One metadata area image a [`SyncJob`] writes.
pub(crate) struct AreaWrite {
    /// Area index and byte offset on the COW.
    pub(crate) area: u64,
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
    /// For a full area: its successor `(area, offset)`, zeroed first so
    /// that it terminates the metadata once this area is durable.
    pub(crate) zero_next: Option<(u64, u64)>,
}

/// The metadata writes that make a store's records up to
/// [`upto`](SyncJob::upto) durable, captured by
/// [`ExceptionStore::start_sync`] and run without the store's lock.
pub struct SyncJob {
    pub(crate) cow: DevRef,
    pub(crate) areas: Vec<AreaWrite>,
    pub(crate) upto: u64,
}

impl SyncJob {
    /// The last record this job makes durable.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// One area: the kernel's sequence (`persistent_commit_exception`):
    /// zero the successor of a full area, flush the COW (the data the
    /// records point at and that zero become durable), then write the
    /// area with FUA.
    ///
    /// Several areas (they filled while the previous job ran): zero every
    /// full area's successor, flush once, write the areas, flush once.
    /// The job's records count as durable only after the last flush, so
    /// the order among its area writes does not matter: a crash may keep
    /// any subset of them, and since each successor was durably zeroed
    /// first, the loader stops at the first area not rewritten (its older
    /// image: a prefix of its records) or reads on through areas that are
    /// complete. Two syncs per job, however many areas.
    pub fn run(&self) -> Result<(), StoreError> {
        for a in &self.areas {
            if let Some((area, offset)) = a.zero_next {
                self.cow
                    .write_zeroes(offset, a.bytes.len() as u64, WriteFlags::NONE)
                    .map_err(|source| StoreError::ZeroArea { area, source })?;
            }
        }
        self.cow.flush().map_err(StoreError::Flush)?;
        let single = self.areas.len() == 1;
        for a in &self.areas {
            let flags = if single {
                WriteFlags::FUA
            } else {
                WriteFlags::NONE
            };
            self.cow
                .write_at(&a.bytes, a.offset, flags)
                .map_err(|source| StoreError::WriteArea {
                    area: a.area,
                    source,
                })?;
        }
        if !single {
            self.cow.flush().map_err(StoreError::Flush)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncJob")
            .field(
                "areas",
                &self.areas.iter().map(|a| a.area).collect::<Vec<_>>(),
            )
            .field("upto", &self.upto)
            .finish()
    }
}
