//! `dmsnap diff POOL FROM [TO]`: the byte ranges where `TO` (default the
//! origin) may differ from snapshot `FROM` — online from the live tables
//! ([`ActivePool::diff`]), offline from the COW metadata ([`Pool::diff`]).
//! Both give the extents the `qemu:dirty-bitmap:FROM` context reports on
//! `TO`'s export: the union of the two snapshots' exceptions, merged.

use super::{io_err, ActivePool, EntryState, Pool, PoolError};
use crate::exception::ExceptionTable;
use crate::io::{BlockDev, FileDev, OpenOptions};
use crate::snap::diff_tables;
use crate::store::{ExceptionStore, PersistentStore};
use crate::units::{Chunk, ChunkSize};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The name that stands for the origin as `TO`.
pub const ORIGIN: &str = "origin";

/// One extent of a diff, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
}

/// What `diff --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    /// Granularity of the extents: the smallest chunk size involved.
    pub chunk_size: u64,
    pub extents: Vec<DiffExtent>,
}

impl DiffReport {
    fn new(from: &str, to: Option<&str>, chunk_size: u64, ext: Vec<(u64, u64)>) -> Self {
        DiffReport {
            from: from.to_string(),
            to: to.unwrap_or(ORIGIN).to_string(),
            chunk_size,
            extents: ext
                .into_iter()
                .map(|(offset, length)| DiffExtent { offset, length })
                .collect(),
        }
    }
    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }
}

/// `None` for the origin.
fn target(to: Option<&str>) -> Option<&str> {
    to.filter(|t| *t != ORIGIN)
}

fn no_info(name: &str, why: &str) -> PoolError {
    PoolError::Invalid(format!(
        "snapshot '{name}' has no changed-block information: {why}"
    ))
}

impl ActivePool {
    /// `diff` while serving: from the live exception tables.
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<DiffReport, PoolError> {
        let to = target(to);
        for n in std::iter::once(from).chain(to) {
            if self.origin.snapshot(n).is_none() {
                return Err(PoolError::NoSuchSnapshot(n.to_string()));
            }
        }
        let (ext, cs) = self.origin.diff(from, to)?;
        Ok(DiffReport::new(from, to, cs, ext))
    }
}

impl Pool {
    /// `diff` with no daemon: read each snapshot's COW metadata.
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<DiffReport, PoolError> {
        let to = target(to);
        let origin = self.origin_path();
        let size = FileDev::open(
            &origin,
            OpenOptions {
                read_only: true,
                direct: false,
            },
        )
        .map_err(io_err("opening the origin", &origin))?
        .len();
        let a = self.offline_table(from)?;
        let (ext, cs) = match to {
            None => (diff_tables(size, (&a.0, a.1), None), a.1),
            Some(t) if t == from => (vec![], a.1),
            Some(t) => {
                let b = self.offline_table(t)?;
                let cs = a.1.bytes().min(b.1.bytes());
                (
                    diff_tables(size, (&a.0, a.1), Some((&b.0, b.1))),
                    ChunkSize::from_bytes(cs).unwrap_or(a.1),
                )
            }
        };
        Ok(DiffReport::new(from, to, cs.bytes(), ext))
    }

    /// A snapshot's completed exceptions, read from its COW.
    fn offline_table(&self, name: &str) -> Result<(ExceptionTable, ChunkSize), PoolError> {
        let e = self.entry(name)?;
        if e.state == EntryState::Merging {
            return Err(no_info(name, "it is merging into the origin"));
        }
        if !e.store.is_persistent() {
            return Err(no_info(
                name,
                "it is transient (N): its exceptions live only in a running daemon",
            ));
        }
        let path = self.cow_path(&e);
        let dev = FileDev::open(
            &path,
            OpenOptions {
                read_only: true,
                direct: false,
            },
        )
        .map_err(io_err("opening the COW", &path))?;
        let store_err = |source| PoolError::Store {
            name: name.to_string(),
            source,
        };
        let mut store = PersistentStore::open_existing(Arc::new(dev), false)
            .map_err(store_err)?
            .ok_or_else(|| no_info(name, "its COW holds no snapshot store yet"))?;
        let mut recs: Vec<(Chunk, Chunk)> = Vec::new();
        store
            .read_metadata(&mut |d| recs.push((d.old_chunk, d.new_chunk)))
            .map_err(store_err)?;
        if !store.is_valid() {
            return Err(no_info(
                name,
                "it is invalid (its COW overflowed or failed), so its exceptions are incomplete",
            ));
        }
        let mut t = ExceptionTable::new();
        t.bulk_load(recs);
        Ok((t, store.chunk_size()))
    }
}
