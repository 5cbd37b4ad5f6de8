//! The engine (`dm-snap.c`): an [`Origin`] with its [`Snapshot`]s, the COW
//! trigger on origin writes, snapshot reads and writes, and merge.
//!
//! Locks and waits: the whole hierarchy, every wait with its wakers and
//! what may be held while waiting, is in ARCHITECTURE.md ("Locks and
//! waits"). In short: fences, then `Origin::merge`, then `Origin::gate`,
//! then a snapshot's `commit`, then its `inner`; store I/O under `commit`
//! only for the invalid header and the merge's batch bookkeeping; no wait
//! under the gate whose waker needs the gate.

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
