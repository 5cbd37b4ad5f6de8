//! The engine (`dm-snap.c`): an [`Origin`] with its [`Snapshot`]s, the COW
//! trigger on origin writes, snapshot reads and writes, and merge.
//!
//! Locking (no lock is held across I/O):
//! - `Origin::gate` (RwLock): origin writes hold it shared for their whole
//!   duration; adding a snapshot or starting a merge takes it exclusively, so
//!   every origin write acknowledged before is in the snapshot, none after.
//! - per snapshot `commit` (the store, allocation sequence, ordered
//!   completions) and `inner` (tables, pending set, tracked reads, state).
//!   Order: `commit` may be held while taking `inner`, never the reverse.
//! - per-chunk waits use the snapshot's condvar (`cond`) on `inner`.

mod extents;
mod merge;
mod origin;
mod snapshot;

pub use extents::{diff_tables, ExportDevice, MAX_EXTENTS};
pub use merge::{MergeStatus, MERGE_BATCH_BYTES, MERGE_BATCH_CHUNKS, MERGE_BATCH_ENV};
pub use origin::Origin;
pub use snapshot::{SnapState, SnapStatus, Snapshot};

use crate::store::StoreError;
use crate::units::ChunkSizeError;
use std::io;

/// Errors of engine operations (not of client I/O, which uses `DevError`).
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("exception store error")]
    Store(#[from] StoreError),
    #[error("I/O error on the {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a snapshot named '{0}' already exists")]
    Exists(String),
    #[error("no snapshot named '{0}'")]
    NotFound(String),
    #[error("a snapshot of this origin is already merging")]
    AlreadyMerging,
    #[error("the snapshot cannot be merged: {0}")]
    NotMergeable(String),
    #[error("the snapshot is invalid")]
    Invalid,
    #[error("snapshot '{0}' is merging")]
    Merging(String),
    #[error("invalid chunk size")]
    ChunkSize(#[from] ChunkSizeError),
    #[error("the COW device is too small or unusable: {0}")]
    BadCow(String),
    #[error("the merge failed: {0}")]
    MergeFailed(String),
    #[error("{0}")]
    NoChangeInfo(String),
}
