//! A pool: one origin and its snapshots, named and kept in a directory with a
//! small manifest (`pool.json`). Offline operations work on the manifest and
//! the devices directly; [`ActivePool`] is the live engine the daemon serves.
//!
//! Locking: whoever changes a pool holds an exclusive `flock` on
//! `POOL/pool.lock` — the daemon for its whole life, an offline command for
//! the length of its work. Commands that find the lock held talk to the
//! daemon over `POOL/control.sock` instead.

pub mod control;
mod diff;
mod manifest;

pub use diff::{DiffExtent, DiffReport};

pub use manifest::{
    check_name, resolve, EntryState, Manifest, OriginEntry, SnapshotEntry, MANIFEST,
};

use crate::device::{Device, ExportSet};
pub use crate::error_chain;
use crate::format::{cow_size_for_origin, DiskHeader, HeaderState};
use crate::io::{BlockDev, DevRef, FileDev, OpenOptions};
use crate::snap::{ExportDevice, MergeStatus, Origin, SnapError, SnapState};
use crate::store::{ExceptionStore, PersistentStore, StoreError, StoreType, Usage};
use crate::units::{ChunkSize, Sector};
use parking_lot::Mutex;
use serde::Serialize;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside a pool directory.
pub const LOCK_FILE: &str = "pool.lock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const NBD_SOCKET: &str = "nbd.sock";
pub const ORIGIN_IMAGE: &str = "origin.img";

/// Errors of pool operations.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0} is not a dmsnap pool (no pool.json)")]
    NotAPool(PathBuf),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("reading the pool manifest {path}")]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the pool manifest {path}")]
    WriteManifest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad pool manifest {path}: {why}")]
    BadManifest { path: PathBuf, why: String },
    #[error("the pool {0} is in use by another dmsnap process")]
    Busy(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot '{0}' already exists")]
    SnapshotExists(String),
    #[error("no snapshot named '{0}' in this pool")]
    NoSuchSnapshot(String),
    #[error("{0}")]
    Invalid(String),
    #[error("snapshot '{name}'")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("snapshot engine")]
    Snap(#[from] SnapError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `dmsnap create` is given.
#[derive(Debug, Clone)]
pub enum OriginSpec {
    /// Make a sparse `origin.img` of this many bytes.
    Size(u64),
    /// Use an existing file or block device in place.
    Path(PathBuf),
}

/// What `dmsnap snapshot create` is given.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub name: String,
    pub chunk_size: Option<ChunkSize>,
    pub cow: CowSpec,
    pub store: StoreType,
}

/// Where a snapshot's COW comes from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum CowSpec {
    /// A new sparse `POOL/NAME.cow`; `None` = big enough never to overflow.
    New(Option<u64>),
    /// An existing file or device: adopted if it holds a kernel-format header,
    /// formatted otherwise.
    Existing(PathBuf),
}

/// Status of one snapshot, as `status` prints it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SnapshotStatus {
    pub name: String,
    pub cow: PathBuf,
    pub chunk_size: u64,
    pub store: StoreType,
    pub dm_status: String,
    pub state: String,
    pub allocated_sectors: u64,
    pub total_sectors: u64,
    pub metadata_sectors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How far a merge is.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MergeProgress {
    pub chunks_total: u64,
    pub chunks_left: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    pub done: bool,
}

impl From<&MergeStatus> for MergeProgress {
    fn from(m: &MergeStatus) -> Self {
        MergeProgress {
            chunks_total: m.total_chunks_at_start,
            chunks_left: m.chunks_left,
            failed: m.failed.clone(),
            done: m.done,
        }
    }
}

/// `status` of a whole pool.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub origin: OriginStatus,
    pub snapshots: Vec<SnapshotStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OriginStatus {
    pub path: PathBuf,
    pub size: u64,
}

fn state_name(s: SnapState) -> &'static str {
    match s {
        SnapState::Active => "active",
        SnapState::Invalid => "invalid",
        SnapState::Overflow => "overflow",
        SnapState::Merging => "merging",
        SnapState::MergeFailed => "merge-failed",
    }
}

/// The `dmsetup status` line for a state and usage.
pub fn dm_status_line(state: SnapState, usage: Usage) -> String {
    match state {
        SnapState::Invalid => "Invalid".into(),
        SnapState::MergeFailed => "Merge failed".into(),
        SnapState::Overflow => "Overflow".into(),
        SnapState::Active | SnapState::Merging => usage.to_string(),
    }
}

/// An exclusive lock on a pool directory, released on drop.
pub struct PoolLock {
    _file: File,
}

impl PoolLock {
    /// Take the lock without waiting.
    pub fn try_acquire(dir: &Path) -> Result<PoolLock, PoolError> {
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening the pool lock", &path))?;
        // SAFETY: flock on a valid fd owned by `file`; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PoolError::Busy(dir.to_path_buf()));
            }
            return Err(PoolError::Io {
                what: "locking the pool",
                path,
                source: e,
            });
        }
        Ok(PoolLock { _file: file })
    }
}

/// Create a pool directory and its manifest.
pub fn create_pool(dir: &Path, origin: OriginSpec) -> Result<Manifest, PoolError> {
    if dir.join(MANIFEST).exists() {
        return Err(PoolError::Exists(dir.join(MANIFEST)));
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating the pool directory", dir))?;
    let _lock = PoolLock::try_acquire(dir)?;
    let entry = match origin {
        OriginSpec::Size(bytes) => {
            if bytes == 0 || bytes % 512 != 0 {
                return Err(PoolError::Invalid(format!(
                    "origin size {bytes} is not a positive multiple of 512 bytes"
                )));
            }
            let path = dir.join(ORIGIN_IMAGE);
            if path.exists() {
                return Err(PoolError::Exists(path));
            }
            FileDev::create_sparse(&path, bytes, OpenOptions::default())
                .map_err(io_err("creating the origin image", &path))?;
            OriginEntry {
                path: ORIGIN_IMAGE.into(),
                created: true,
            }
        }
        OriginSpec::Path(p) => {
            let abs = std::fs::canonicalize(&p).map_err(io_err("opening the origin", &p))?;
            let dev = FileDev::open(&abs, OpenOptions::default())
                .map_err(io_err("opening the origin", &abs))?;
            if dev.len() == 0 {
                return Err(PoolError::Invalid(format!(
                    "the origin {} is empty",
                    abs.display()
                )));
            }
            OriginEntry {
                path: abs,
                created: false,
            }
        }
    };
    let m = Manifest::new(entry);
    m.save(dir)?;
    Ok(m)
}

/// What an existing COW's first chunk says.
fn probe_header(dev: &dyn BlockDev) -> io::Result<Option<DiskHeader>> {
    if dev.len() < 512 {
        return Ok(None);
    }
    let mut b = [0u8; 512];
    dev.read_at(&mut b, 0)?;
    Ok(match DiskHeader::parse(&b) {
        Ok(HeaderState::Existing(h)) => Some(h),
        _ => None,
    })
}

/// A pool opened for changes, offline or by the daemon.
pub struct Pool {
    dir: PathBuf,
    manifest: Manifest,
    _lock: PoolLock,
}

impl Pool {
    /// Open `dir` and take its lock (fails with `Busy` while a daemon runs).
    pub fn open(dir: &Path) -> Result<Pool, PoolError> {
        if !dir.join(MANIFEST).exists() {
            return Err(PoolError::NotAPool(dir.to_path_buf()));
        }
        let lock = PoolLock::try_acquire(dir)?;
        let manifest = Manifest::load(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(io_err("opening the pool", dir))?;
        Ok(Pool {
            dir,
            manifest,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn origin_path(&self) -> PathBuf {
        resolve(&self.dir, &self.manifest.origin.path)
    }
    pub fn cow_path(&self, e: &SnapshotEntry) -> PathBuf {
        resolve(&self.dir, &e.cow)
    }

    fn open_origin(&self, direct: bool) -> Result<FileDev, PoolError> {
        let p = self.origin_path();
        FileDev::open(
            &p,
            OpenOptions {
                read_only: false,
                direct,
            },
        )
        .map_err(io_err("opening the origin", &p))
    }

    /// Prepare the COW for a new snapshot and return its manifest entry
    /// (not yet recorded) and the open device.
    fn prepare_cow(
        &self,
        origin_len: u64,
        req: &SnapshotRequest,
    ) -> Result<(SnapshotEntry, DevRef), PoolError> {
        check_name(&req.name).map_err(PoolError::Invalid)?;
        if self.manifest.snapshot(&req.name).is_some() {
            return Err(PoolError::SnapshotExists(req.name.clone()));
        }
        if let Some(m) = self.manifest.merging() {
            return Err(PoolError::Invalid(format!(
                "the origin is merging snapshot '{}': wait for the merge to finish before taking new snapshots",
                m.name
            )));
        }
        let mut chunk = req.chunk_size.unwrap_or(ChunkSize::DEFAULT);
        if chunk.bytes() < 4096 {
            return Err(PoolError::Invalid(format!(
                "chunk size {chunk} is below the 4 KiB minimum"
            )));
        }
        let (stored, created, dev): (PathBuf, bool, FileDev) = match &req.cow {
            CowSpec::New(size) => {
                let path = self.dir.join(format!("{}.cow", req.name));
                if path.exists() {
                    return Err(PoolError::Exists(path));
                }
                let bytes = size.unwrap_or_else(|| cow_size_for_origin(chunk, origin_len));
                let min = 3 * chunk.bytes();
                if req.store.is_persistent() && bytes < min {
                    return Err(PoolError::Invalid(format!(
                        "COW size {bytes} is too small: a {chunk} chunk store needs at least {min} bytes (header, one metadata area, one data chunk)"
                    )));
                }
                let dev = FileDev::create_sparse(&path, bytes, OpenOptions::default())
                    .map_err(io_err("creating the COW", &path))?;
                (format!("{}.cow", req.name).into(), true, dev)
            }
            CowSpec::Existing(p) => {
                let abs = std::fs::canonicalize(p).map_err(io_err("opening the COW", p))?;
                if abs == self.origin_path() {
                    return Err(PoolError::Invalid(
                        "the COW device cannot be the origin".into(),
                    ));
                }
                let dev = FileDev::open(&abs, OpenOptions::default())
                    .map_err(io_err("opening the COW", &abs))?;
                (abs, false, dev)
            }
        };
        let dev: DevRef = Arc::new(dev);
        if req.store.is_persistent() {
            let adopted = match &req.cow {
                CowSpec::Existing(_) => {
                    probe_header(&*dev).map_err(io_err("reading the COW header", &stored))?
                }
                CowSpec::New(_) => None,
            };
            match adopted {
                Some(h) => {
                    if let Some(want) = req.chunk_size {
                        if want != h.chunk_size {
                            tracing::warn!(
                                "chunk size {} in the COW's metadata overrides the requested {}",
                                h.chunk_size,
                                want
                            );
                        }
                    }
                    if !h.valid {
                        tracing::warn!(
                            "adopting an invalidated COW: snapshot '{}' will be Invalid",
                            req.name
                        );
                    }
                    chunk = h.chunk_size;
                }
                None => {
                    PersistentStore::format(dev.clone(), chunk).map_err(|source| {
                        PoolError::Store {
                            name: req.name.clone(),
                            source,
                        }
                    })?;
                }
            }
        }
        let entry = SnapshotEntry {
            name: req.name.clone(),
            cow: stored,
            cow_created: created,
            chunk_size: chunk.bytes(),
            store: req.store,
            state: EntryState::Active,
            activated: false,
        };
        Ok((entry, dev))
    }

    /// `snapshot create` with no daemon: the origin is not changing, so the
    /// snapshot is simply recorded; it starts collecting exceptions when the
    /// pool is next served.
    pub fn create_snapshot(&mut self, req: &SnapshotRequest) -> Result<SnapshotEntry, PoolError> {
        let origin_len = self.open_origin(false)?.len();
        let (entry, _dev) = self.prepare_cow(origin_len, req)?;
        self.manifest.snapshots.push(entry.clone());
        if let Err(e) = self.manifest.save(&self.dir) {
            self.manifest.snapshots.pop();
            self.discard_cow(&entry);
            return Err(e);
        }
        Ok(entry)
    }

    fn discard_cow(&self, e: &SnapshotEntry) {
        if e.cow_created {
            let p = self.cow_path(e);
            if let Err(err) = std::fs::remove_file(&p) {
                tracing::warn!("could not delete {}: {err}", p.display());
            }
        }
    }

    /// `snapshot remove` with no daemon.
    pub fn remove_snapshot(&mut self, name: &str) -> Result<(), PoolError> {
        let e = self.removable(name)?;
        self.manifest.snapshots.retain(|s| s.name != name);
        self.manifest.save(&self.dir)?;
        self.discard_cow(&e);
        Ok(())
    }

    /// The manifest entry of snapshot `name`.
    fn entry(&self, name: &str) -> Result<SnapshotEntry, PoolError> {
        self.manifest
            .snapshot(name)
            .cloned()
            .ok_or_else(|| PoolError::NoSuchSnapshot(name.to_string()))
    }

    /// The entry of a snapshot that may be removed: any but a merging one.
    fn removable(&self, name: &str) -> Result<SnapshotEntry, PoolError> {
        let e = self.entry(name)?;
        if e.state == EntryState::Merging {
            return Err(PoolError::Invalid(format!(
                "snapshot '{name}' is merging into the origin and cannot be removed; it leaves the pool by itself when the merge ends (`dmsnap merge POOL {name}` finishes an interrupted one)"
            )));
        }
        Ok(e)
    }

    /// `status` with no daemon: read each COW's header and metadata.
    pub fn status(&self) -> Result<PoolStatus, PoolError> {
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
        let snapshots = self
            .manifest
            .snapshots
            .iter()
            .map(|e| self.offline_snapshot_status(e))
            .collect();
        Ok(PoolStatus {
            origin: OriginStatus { path: origin, size },
            snapshots,
        })
    }

    fn offline_snapshot_status(&self, e: &SnapshotEntry) -> SnapshotStatus {
        let cow = self.cow_path(e);
        let mut st = SnapshotStatus {
            name: e.name.clone(),
            cow: cow.clone(),
            chunk_size: e.chunk_size,
            store: e.store,
            dm_status: String::new(),
            state: "active".into(),
            allocated_sectors: 0,
            total_sectors: 0,
            metadata_sectors: 0,
            merge: None,
            error: None,
        };
        let read = || -> Result<(SnapState, Usage), String> {
            let dev = FileDev::open(
                &cow,
                OpenOptions {
                    read_only: true,
                    direct: false,
                },
            )
            .map_err(|e| format!("cannot open {}: {e}", cow.display()))?;
            if !e.store.is_persistent() {
                // A transient store holds nothing until a daemon activates it.
                return Ok((
                    SnapState::Active,
                    Usage {
                        allocated: Sector(0),
                        total: Sector::from_bytes(dev.len()),
                        metadata: Sector(0),
                    },
                ));
            }
            let mut store = PersistentStore::open_existing(Arc::new(dev), false)
                .map_err(|e| error_chain(&e))?
                .ok_or_else(|| {
                    format!(
                        "{} holds no snapshot store (its header is blank)",
                        cow.display()
                    )
                })?;
            store
                .read_metadata(&mut |_| ())
                .map_err(|e| error_chain(&e))?;
            let state = if !store.is_valid() {
                SnapState::Invalid
            } else if e.state == EntryState::Merging {
                SnapState::Merging
            } else {
                SnapState::Active
            };
            Ok((state, store.usage()))
        };
        match read() {
            Ok((state, usage)) => {
                st.state = state_name(state).into();
                st.dm_status = dm_status_line(state, usage);
                st.allocated_sectors = usage.allocated.0;
                st.total_sectors = usage.total.0;
                st.metadata_sectors = usage.metadata.0;
            }
            Err(why) => {
                st.state = "error".into();
                st.dm_status = "Error".into();
                st.error = Some(why);
            }
        }
        st
    }

    /// Bring the pool up: open the origin, activate every snapshot (in
    /// manifest order), resume an interrupted merge.
    pub fn activate(mut self, opts: ActivateOptions) -> Result<Arc<ActivePool>, PoolError> {
        let origin_dev: DevRef = Arc::new(self.open_origin(opts.direct)?);
        let origin = Origin::new(origin_dev);
        origin.set_durable_snapshot_writes(opts.sync_snapshot_writes);
        let mut dropped = Vec::new();
        for e in &self.manifest.snapshots {
            if e.store == StoreType::Transient && e.activated {
                tracing::warn!(
                    "transient snapshot '{}' did not survive the end of the daemon that held it; removing it",
                    e.name
                );
                dropped.push(e.name.clone());
                continue;
            }
            let cow = self.cow_path(e);
            let dev = FileDev::open(
                &cow,
                OpenOptions {
                    read_only: false,
                    direct: opts.direct,
                },
            )
            .map_err(io_err("opening the COW", &cow))?;
            let chunk = ChunkSize::from_bytes(e.chunk_size)
                .map_err(|err| PoolError::Invalid(err.to_string()))?;
            origin
                .add_snapshot(&e.name, Arc::new(dev), e.store, Some(chunk))
                .map_err(|source| match source {
                    SnapError::Store(s) => PoolError::Store {
                        name: e.name.clone(),
                        source: s,
                    },
                    other => PoolError::Snap(other),
                })?;
        }
        let mut changed = false;
        for name in &dropped {
            if let Some(idx) = self.manifest.snapshots.iter().position(|s| &s.name == name) {
                let e = self.manifest.snapshots.remove(idx);
                self.discard_cow(&e);
                changed = true;
            }
        }
        for e in self.manifest.snapshots.iter_mut() {
            if e.store == StoreType::Transient && !e.activated {
                e.activated = true;
                changed = true;
            }
        }
        if changed {
            self.manifest.save(&self.dir)?;
        }
        let merging = self.manifest.merging().map(|e| e.name.clone());
        let active = Arc::new(ActivePool {
            dir: self.dir.clone(),
            origin,
            inner: Mutex::new(self),
        });
        if let Some(name) = merging {
            tracing::info!("resuming the merge of snapshot '{name}'");
            active.origin.start_merge(&name)?;
        }
        Ok(active)
    }
}

/// How to activate a pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivateOptions {
    /// Open the origin and COWs with O_DIRECT.
    pub direct: bool,
    /// Acknowledge a snapshot's first write to a chunk only once its COW
    /// record is durable (see [`Origin::set_durable_snapshot_writes`]).
    pub sync_snapshot_writes: bool,
}

/// A pool whose origin and snapshots are live in this process.
pub struct ActivePool {
    dir: PathBuf,
    origin: Arc<Origin>,
    inner: Mutex<Pool>,
}

impl ActivePool {
    pub fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Take a snapshot while serving: every origin write acknowledged before
    /// this returns is in it, none after.
    pub fn create_snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotEntry, PoolError> {
        let mut pool = self.inner.lock();
        let (mut entry, dev) = pool.prepare_cow(self.origin.size(), req)?;
        let chunk = ChunkSize::from_bytes(entry.chunk_size)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        if let Err(e) = self
            .origin
            .add_snapshot(&entry.name, dev, entry.store, Some(chunk))
        {
            pool.discard_cow(&entry);
            return Err(match e {
                SnapError::Store(s) => PoolError::Store {
                    name: entry.name.clone(),
                    source: s,
                },
                other => PoolError::Snap(other),
            });
        }
        entry.activated = true;
        pool.manifest.snapshots.push(entry.clone());
        let dir = pool.dir.clone();
        if let Err(e) = pool.manifest.save(&dir) {
            pool.manifest.snapshots.pop();
            let _ = self.origin.remove_snapshot(&entry.name);
            pool.discard_cow(&entry);
            return Err(e);
        }
        Ok(entry)
    }

    /// Remove a snapshot while serving.
    pub fn remove_snapshot(&self, name: &str) -> Result<(), PoolError> {
        let mut pool = self.inner.lock();
        let e = pool.removable(name)?;
        self.origin.remove_snapshot(name)?;
        pool.manifest.snapshots.retain(|s| s.name != name);
        let dir = pool.dir.clone();
        pool.manifest.save(&dir)?;
        pool.discard_cow(&e);
        Ok(())
    }

    /// Start rolling the origin back to snapshot `name`.
    pub fn start_merge(&self, name: &str) -> Result<(), PoolError> {
        let mut pool = self.inner.lock();
        let e = pool.entry(name)?;
        if let Some(m) = pool.manifest.merging() {
            if m.name == name {
                // Already merging: idempotent; a merge that failed is retried
                // from its on-disk state (the records not yet cleared).
                if self
                    .origin
                    .merge_status()
                    .is_some_and(|st| st.failed.is_some())
                {
                    self.origin.stop_merge();
                    self.origin.start_merge(name)?;
                }
                return Ok(());
            }
            return Err(PoolError::Invalid(format!(
                "snapshot '{}' is already merging",
                m.name
            )));
        }
        if !e.store.is_persistent() {
            return Err(PoolError::Invalid(format!(
                "snapshot '{name}' is transient (N): only persistent snapshots can be merged"
            )));
        }
        if let Some(s) = self.origin.snapshot(name) {
            let st = s.status();
            if st.state == SnapState::Invalid {
                return Err(PoolError::Invalid(format!(
                    "snapshot '{name}' is invalid and cannot be merged"
                )));
            }
        }
        // Record the intent first: a crash after this resumes the merge.
        if let Some(s) = pool.manifest.snapshot_mut(name) {
            s.state = EntryState::Merging;
        }
        let dir = pool.dir.clone();
        pool.manifest.save(&dir)?;
        // The origin reads as the snapshot from now on: no block-status
        // answer about the origin may be in flight across that change.
        let hold = self.origin.hold_writes();
        let started = self.origin.start_merge(name);
        drop(hold);
        if let Err(err) = started {
            if let Some(s) = pool.manifest.snapshot_mut(name) {
                s.state = EntryState::Active;
            }
            let _ = pool.manifest.save(&dir);
            return Err(err.into());
        }
        Ok(())
    }

    /// If a merge has finished, take the snapshot out of the pool. Returns the
    /// merge's state as of now.
    pub fn poll_merge(&self) -> Result<Option<MergeProgress>, PoolError> {
        let Some(st) = self.origin.merge_status() else {
            return Ok(None);
        };
        if st.done && st.failed.is_none() {
            let mut pool = self.inner.lock();
            if let Some(e) = pool.manifest.snapshot(&st.name).cloned() {
                if e.state == EntryState::Merging {
                    self.origin.remove_snapshot(&st.name)?;
                    pool.manifest.snapshots.retain(|s| s.name != st.name);
                    let dir = pool.dir.clone();
                    pool.manifest.save(&dir)?;
                    pool.discard_cow(&e);
                    tracing::info!(
                        "merge of '{}' complete; the snapshot left the pool",
                        st.name
                    );
                }
            }
        }
        Ok(Some(MergeProgress::from(&st)))
    }

    /// Live status.
    pub fn status(&self) -> PoolStatus {
        let pool = self.inner.lock();
        let merge = self.origin.merge_status();
        let snapshots = pool
            .manifest
            .snapshots
            .iter()
            .map(|e| {
                let (state, usage) = match self.origin.snapshot(&e.name) {
                    Some(s) => {
                        let st = s.status();
                        (st.state, st.usage)
                    }
                    None => (SnapState::Invalid, Usage::default()),
                };
                SnapshotStatus {
                    name: e.name.clone(),
                    cow: pool.cow_path(e),
                    chunk_size: e.chunk_size,
                    store: e.store,
                    dm_status: dm_status_line(state, usage),
                    state: state_name(state).into(),
                    allocated_sectors: usage.allocated.0,
                    total_sectors: usage.total.0,
                    metadata_sectors: usage.metadata.0,
                    merge: merge
                        .as_ref()
                        .filter(|m| m.name == e.name)
                        .map(MergeProgress::from),
                    error: None,
                }
            })
            .collect();
        PoolStatus {
            origin: OriginStatus {
                path: pool.origin_path(),
                size: self.origin.size(),
            },
            snapshots,
        }
    }

    /// Make every snapshot's records durable ([`Origin::commit_records`]).
    pub fn commit_records(&self) {
        self.origin.commit_records();
    }

    /// Clean shutdown: stop a merge (it resumes next time), flush everything,
    /// forget transient snapshots (they cannot outlive this process).
    pub fn shutdown(&self) -> Result<(), PoolError> {
        self.origin.stop_merge();
        let _ = self.poll_merge();
        self.origin.sync()?;
        let mut pool = self.inner.lock();
        let transient: Vec<SnapshotEntry> = pool
            .manifest
            .snapshots
            .iter()
            .filter(|s| s.store == StoreType::Transient)
            .cloned()
            .collect();
        if !transient.is_empty() {
            pool.manifest
                .snapshots
                .retain(|s| s.store != StoreType::Transient);
            let dir = pool.dir.clone();
            pool.manifest.save(&dir)?;
            for e in &transient {
                tracing::info!("transient snapshot '{}' ends with the daemon", e.name);
                pool.discard_cow(e);
            }
        }
        Ok(())
    }

    /// The snapshot names currently exported (a merging snapshot is not).
    fn exported_snapshots(&self) -> Vec<String> {
        let pool = self.inner.lock();
        pool.manifest
            .snapshots
            .iter()
            .filter(|s| s.state != EntryState::Merging)
            .map(|s| s.name.clone())
            .collect()
    }
}

impl ExportSet for ActivePool {
    /// The device with block status ([`ExportDevice`]): the origin's or a
    /// snapshot's.
    fn get(&self, name: &str) -> Option<Arc<dyn Device>> {
        if name == "origin" {
            return Some(Arc::new(ExportDevice::origin(self.origin.clone())));
        }
        if !self.exported_snapshots().iter().any(|n| n == name) {
            return None;
        }
        self.origin
            .snapshot(name)
            .map(|s| Arc::new(ExportDevice::snapshot(self.origin.clone(), s)) as Arc<dyn Device>)
    }
    fn names(&self) -> Vec<String> {
        let mut v = vec!["origin".to_string()];
        v.extend(self.exported_snapshots());
        v
    }
}
