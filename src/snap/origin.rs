//! The origin (`snapshot-origin` target): its device, its snapshots, and
//! the COW trigger every origin write goes through.

use super::merge::MergeCtl;
use super::snapshot::{pieces, write_zeroes_via, Snapshot};
use super::SnapError;
use crate::copier::{Copier, DEFAULT_MAX_JOBS, DEFAULT_WORKERS};
use crate::device::{check_request, DevError, Device};
use crate::exception::ExceptionTable;
use crate::io::{DevRef, WriteFlags};
use crate::store::{ExceptionStore, StoreType, TransientStore};
use crate::units::ChunkSize;
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// A live origin device and its snapshots, shared as `Arc<Origin>`.
pub struct Origin {
    pub(crate) me: Weak<Origin>,
    pub(crate) dev: DevRef,
    size: u64,
    pub(crate) copier: Arc<Copier>,
    /// Origin writes hold it shared; adding a snapshot or starting a merge
    /// takes it exclusively (the consistent point).
    pub(crate) gate: RwLock<()>,
    /// Registered snapshots, largest chunk size first (kernel order).
    snaps: RwLock<Vec<Arc<Snapshot>>>,
    /// The snapshot being merged: the origin device shows its content.
    pub(crate) merging: RwLock<Option<Arc<Snapshot>>>,
    pub(crate) merge: Mutex<MergeCtl>,
    pub(crate) merge_cond: Condvar,
    /// Snapshots added from now on acknowledge a write that creates an
    /// exception only once its record is durable (see
    /// [`set_durable_snapshot_writes`](Self::set_durable_snapshot_writes)).
    durable_snapshot_writes: AtomicBool,
    /// Write spans and block-status fences (`extents.rs`).
    pub(crate) fences: super::extents::Fences,
}

impl Origin {
    /// An origin over `dev` with the default copy engine.
    pub fn new(dev: DevRef) -> Arc<Origin> {
        Self::with_copier(dev, Copier::new(DEFAULT_WORKERS, DEFAULT_MAX_JOBS))
    }

    /// An origin using `copier` (run-time configured workers / throttle).
    pub fn with_copier(dev: DevRef, copier: Arc<Copier>) -> Arc<Origin> {
        Arc::new_cyclic(|me| Origin {
            me: me.clone(),
            size: dev.len(),
            dev,
            copier,
            gate: RwLock::new(()),
            snaps: RwLock::new(Vec::new()),
            merging: RwLock::new(None),
            merge: Mutex::new(MergeCtl::default()),
            merge_cond: Condvar::new(),
            durable_snapshot_writes: AtomicBool::new(false),
            fences: Default::default(),
        })
    }

    /// How snapshots added from now on acknowledge a write to a chunk that
    /// has no exception yet. `false` (the default): once the data is on the
    /// COW and the exception is in the table; its record becomes durable
    /// with the next FLUSH or FUA write to the snapshot (or any flush of the
    /// origin), or when its metadata area fills — a crash before that loses
    /// the write, as it may lose any unflushed write. `true`: only once the
    /// record is durable, as the kernel's dm-snapshot does. Either way an
    /// origin write never reaches the origin before the records of the
    /// chunks it overwrites are durable.
    pub fn set_durable_snapshot_writes(&self, on: bool) {
        self.durable_snapshot_writes.store(on, Ordering::Relaxed);
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn dev(&self) -> &DevRef {
        &self.dev
    }

    /// Open or format the store on `cow`, load its exceptions, and register
    /// the snapshot. Every origin write acknowledged before this returns is
    /// in the snapshot, none after.
    pub fn add_snapshot(
        self: &Arc<Self>,
        name: &str,
        cow: DevRef,
        store: StoreType,
        chunk_size: Option<ChunkSize>,
    ) -> Result<Arc<Snapshot>, SnapError> {
        if self.snapshot(name).is_some() {
            return Err(SnapError::Exists(name.to_string()));
        }
        if Arc::ptr_eq(&cow, &self.dev) {
            return Err(SnapError::BadCow(
                "the COW device cannot be the origin device".into(),
            ));
        }
        let mut st: Box<dyn ExceptionStore> = match store {
            StoreType::Transient => Box::new(TransientStore::new(
                chunk_size.unwrap_or(ChunkSize::DEFAULT),
                cow.len(),
            )),
            StoreType::Persistent | StoreType::PersistentOverflow => {
                open_persistent(cow.clone(), chunk_size, store)?
            }
        };
        let cs = st
            .chunk_size()
            .check_block_size(self.dev.logical_block_size() as u64)?
            .check_block_size(cow.logical_block_size() as u64)?;
        let mut recs = Vec::new();
        st.read_metadata(&mut |e| recs.push((e.old_chunk, e.new_chunk)))?;
        let max_old = cs.chunks_covering(self.size);
        if let Some(bad) = recs.iter().find(|(o, _)| o.0 >= max_old) {
            return Err(SnapError::BadCow(format!(
                "exception for origin chunk {} is beyond the origin's end ({max_old} chunks)",
                bad.0
            )));
        }
        let mut table = ExceptionTable::new();
        table.bulk_load(recs);
        let snap = Snapshot::new(
            name,
            store,
            st,
            table,
            self.dev.clone(),
            cow,
            self.copier.clone(),
            self.durable_snapshot_writes.load(Ordering::Relaxed),
        );
        {
            let _g = self.gate.write();
            if self.merging.read().is_some() {
                return Err(SnapError::AlreadyMerging);
            }
            let mut l = self.snaps.write();
            if l.iter().any(|s| s.name() == name) {
                return Err(SnapError::Exists(name.to_string()));
            }
            l.push(snap.clone());
            l.sort_by_key(|s| std::cmp::Reverse(s.chunk_size().bytes()));
        }
        tracing::info!(snapshot = name, chunk_size = %cs, exceptions = snap.nr_exceptions(), "snapshot added");
        Ok(snap)
    }

    /// Unregister a snapshot (no more copies for it), wait for its pending
    /// exceptions, flush its COW. Its device then answers `Gone`.
    pub fn remove_snapshot(&self, name: &str) -> Result<Arc<Snapshot>, SnapError> {
        let snap = self
            .snapshot(name)
            .ok_or_else(|| SnapError::NotFound(name.to_string()))?;
        let merging_this = self
            .merging
            .read()
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &snap));
        if merging_this {
            let st = self.merge_status();
            let finished = st.as_ref().is_some_and(|s| s.done || s.failed.is_some());
            if !finished {
                return Err(SnapError::Merging(name.to_string()));
            }
            self.stop_merge();
        }
        {
            let _g = self.gate.write();
            self.snaps.write().retain(|s| !Arc::ptr_eq(s, &snap));
            if merging_this {
                *self.merging.write() = None;
            }
        }
        snap.set_gone();
        snap.wait_idle();
        // Its last records too (an invalid snapshot has none to write).
        let _ = snap.sync_all();
        snap.cow.flush().map_err(|source| SnapError::Io {
            what: "COW device",
            source,
        })?;
        Ok(snap)
    }

    pub fn snapshot(&self, name: &str) -> Option<Arc<Snapshot>> {
        self.snaps.read().iter().find(|s| s.name() == name).cloned()
    }

    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.snaps.read().clone()
    }

    /// Flush the origin and every COW, and make every snapshot's records
    /// durable.
    pub fn sync(&self) -> Result<(), SnapError> {
        self.dev.flush().map_err(|source| SnapError::Io {
            what: "origin device",
            source,
        })?;
        for s in self.snapshots() {
            // An invalid snapshot has nothing left to make durable.
            let _ = s.sync_all();
            s.cow.flush().map_err(|source| SnapError::Io {
                what: "COW device",
                source,
            })?;
        }
        Ok(())
    }

    /// Make every snapshot's records durable, without flushing the origin.
    /// The daemon calls it every second: it bounds what a crash (of the
    /// machine, or of the process: the records live in its memory) can take
    /// of the first writes to snapshots acknowledged without a FLUSH.
    pub fn commit_records(&self) {
        for s in self.snapshots() {
            let _ = s.sync_all();
        }
    }

    fn merging_snapshot(&self) -> Option<Arc<Snapshot>> {
        self.merging.read().clone()
    }

    /// Every origin write: under the gate (so a merge cannot start between
    /// choosing the path and writing, and a snapshot added meanwhile sees
    /// all of it or none), through the merge map while merging, else
    /// through the COW trigger. The waits under the gate are those of the
    /// trigger (copies, sync jobs, tracked reads), which never need the
    /// gate; a write into a batch being merged waits for the batch with
    /// the gate **released**, since the merge thread must get on to end
    /// it, and a queued exclusive taker (a snapshot removal) would
    /// otherwise stop both.
    pub(crate) fn write_inner(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        // Before the gate: a block-status fence may hold this write back.
        let _span = self.fences.write(offset, buf.len() as u64);
        loop {
            let g = self.gate.read();
            if let Some(m) = self.merging_snapshot() {
                match self.merge_write(&m, buf, offset, fua)? {
                    Some(()) => return Ok(()),
                    None => {
                        drop(g);
                        let cs = m.chunk_size();
                        let chunks: Vec<u64> = pieces(cs, offset, buf.len() as u64)
                            .iter()
                            .map(|p| p.chunk)
                            .collect();
                        if m.wait_merge_runs(&chunks) {
                            return Err(DevError::MergeFailed);
                        }
                        continue;
                    }
                }
            }
            let snaps = self.snaps.read().clone();
            Snapshot::trigger_and_wait(
                &self.copier,
                &self.dev,
                &snaps,
                &[(offset, buf.len() as u64)],
            );
            self.dev.write_at(buf, offset, WriteFlags { fua })?;
            return Ok(());
        }
    }
}

/// Open the persistent store (`P` / `PO`).
fn open_persistent(
    cow: DevRef,
    chunk_size: Option<ChunkSize>,
    store: StoreType,
) -> Result<Box<dyn ExceptionStore>, SnapError> {
    Ok(Box::new(crate::store::PersistentStore::open(
        cow,
        chunk_size,
        store == StoreType::PersistentOverflow,
    )?))
}

impl Device for Origin {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.size)?;
        match self.merging_snapshot() {
            Some(m) => self.merge_read(&m, buf, offset),
            None => Ok(self.dev.read_at(buf, offset)?),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.size)?;
        self.write_inner(buf, offset, fua)
    }
    /// The origin, and every snapshot with it (records included): a flush
    /// of the origin leaves nothing acknowledged in a cache.
    fn flush(&self) -> Result<(), DevError> {
        self.dev.flush()?;
        // A snapshot's failure is the snapshot's: it is invalidated (as a
        // failed copy would), the origin's flush succeeds.
        for s in self.snapshots() {
            s.flush_for_origin();
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        check_request(offset, len, self.size)?;
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        check_request(offset, len, self.size)?;
        write_zeroes_via(offset, len, fua, |b, o, f| self.write_inner(b, o, f))
    }
}
