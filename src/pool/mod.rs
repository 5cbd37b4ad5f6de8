//! A pool: one origin and its snapshots, named and kept in a directory with a
//! small manifest (`pool.json`). Offline operations work on the manifest and
//! the devices directly; [`ActivePool`] is the live engine the daemon serves.
//!
//! Locking: whoever changes a pool holds an exclusive `flock` on
//! `POOL/pool.lock` — the daemon for its whole life, an offline command for
//! the length of its work. Commands that find the lock held talk to the
//! daemon over `POOL/control.sock` instead.

mod capture;
pub mod control;
mod diff;
mod files;
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
use crate::units::{human_bytes, ChunkSize, ChunkSizeError, Sector, SECTOR_SIZE};
use files::{check_kind, FileId, SectorAligned, Undo, MAX_FILE_BYTES};
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
    #[error("bad pool manifest {path}")]
    ParseManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
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
    #[error(
        "a chunk size of {bytes} bytes is not valid: it must be a power of two from 4 KiB to 1 GiB"
    )]
    BadChunkSize {
        bytes: u64,
        #[source]
        source: Option<ChunkSizeError>,
    },
    #[error(
        "{path} cannot be the COW of a new snapshot: it is already the COW of snapshot '{user}'"
    )]
    CowInUse { path: PathBuf, user: String },
    #[error("{path} cannot be the COW of a new snapshot: it is {what} of this pool")]
    CowIsPoolFile { path: PathBuf, what: &'static str },
    #[error("the {what} {path} is {kind}, not a regular file or block device")]
    NotADevice {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("the origin {path} holds {bytes} bytes, not one whole 512-byte sector: there is nothing to snapshot or serve")]
    EmptyOrigin { path: PathBuf, bytes: u64 },
    #[error("the filesystem holding {path} cannot hold a file of {size}")]
    FileTooLarge {
        path: PathBuf,
        size: String,
        #[source]
        source: io::Error,
    },
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

/// The smallest chunk size dmsnap takes (the kernel takes 512 bytes; 4 KiB
/// is LVM's default and the page size every client writes in).
pub const MIN_CHUNK_BYTES: u64 = 4096;

/// A snapshot's chunk size as `--chunk-size` and the control socket take it:
/// a power of two from 4 KiB to the kernel's maximum (1 GiB).
pub fn check_chunk_size(bytes: u64) -> Result<ChunkSize, PoolError> {
    let c = ChunkSize::from_bytes(bytes).map_err(|source| PoolError::BadChunkSize {
        bytes,
        source: Some(source),
    })?;
    if c.bytes() < MIN_CHUNK_BYTES {
        return Err(PoolError::BadChunkSize {
            bytes,
            source: None,
        });
    }
    Ok(c)
}

/// A chunk size recorded in the manifest (validated when it was loaded).
fn recorded_chunk_size(e: &SnapshotEntry) -> Result<ChunkSize, PoolError> {
    ChunkSize::from_bytes(e.chunk_size).map_err(|source| PoolError::BadChunkSize {
        bytes: e.chunk_size,
        source: Some(source),
    })
}

/// Refuse a size no file can have, before anything is created.
fn check_file_size(what: &str, bytes: u64) -> Result<(), PoolError> {
    if bytes > MAX_FILE_BYTES {
        return Err(PoolError::Invalid(format!(
            "{what} of {bytes} bytes is larger than any file can be (at most 2^63 - 1 bytes)"
        )));
    }
    Ok(())
}

/// The error of creating a sparse file: EFBIG says the filesystem (or the
/// process's file size limit) cannot hold a file that large.
fn create_err<'a>(
    what: &'static str,
    path: &'a Path,
    len: u64,
) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::EFBIG) {
            PoolError::FileTooLarge {
                path: path.to_path_buf(),
                size: human_bytes(len),
                source,
            }
        } else {
            PoolError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Check that `path` can be an origin or a COW: a regular file or a block device.
fn check_device_kind(what: &'static str, path: &Path) -> Result<(), PoolError> {
    let kind = check_kind(path).map_err(|source| PoolError::Io {
        what: if what == "origin" {
            "opening the origin"
        } else {
            "opening the COW"
        },
        path: path.to_path_buf(),
        source,
    })?;
    match kind {
        None => Ok(()),
        Some(kind) => Err(PoolError::NotADevice {
            what,
            path: path.to_path_buf(),
            kind,
        }),
    }
}

/// Open an origin: a regular file or block device that is not empty.
fn open_origin_file(path: &Path, opts: OpenOptions) -> Result<FileDev, PoolError> {
    check_device_kind("origin", path)?;
    let dev = FileDev::open(path, opts).map_err(io_err("opening the origin", path))?;
    if exported_origin_bytes(dev.len()) == 0 {
        return Err(PoolError::EmptyOrigin {
            path: path.to_path_buf(),
            bytes: dev.len(),
        });
    }
    Ok(dev)
}

/// The bytes of an origin of `len` bytes that are exported: its whole
/// 512-byte sectors (a partial last sector is never read or written).
pub fn exported_origin_bytes(len: u64) -> u64 {
    len / SECTOR_SIZE * SECTOR_SIZE
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
    /// What reading the snapshot's store found worth telling (offline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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
    /// Snapshots whose merge completed (see [`Manifest::merged`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OriginStatus {
    pub path: PathBuf,
    /// The exported size in bytes: whole 512-byte sectors.
    pub size: u64,
    /// Bytes at the end of the origin file that are not exported (a partial
    /// last sector); 0 and omitted for a file of whole sectors.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unexported_bytes: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl OriginStatus {
    fn new(path: PathBuf, file_bytes: u64) -> Self {
        let size = exported_origin_bytes(file_bytes);
        OriginStatus {
            path,
            size,
            unexported_bytes: file_bytes - size,
        }
    }
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

/// A lock on a pool directory, released on drop: exclusive for whoever
/// changes the pool, shared for a reader.
pub struct PoolLock {
    _file: Option<File>,
}

fn flock(file: &File, op: libc::c_int, dir: &Path, path: &Path) -> Result<(), PoolError> {
    // SAFETY: flock on a valid fd owned by `file`; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(PoolError::Busy(dir.to_path_buf()));
        }
        return Err(PoolError::Io {
            what: "locking the pool",
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(())
}

impl PoolLock {
    /// Take the lock without waiting.
    pub fn try_acquire(dir: &Path) -> Result<PoolLock, PoolError> {
        Self::acquire(dir, &mut Undo::default())
    }

    /// Take the exclusive lock; a lock file made here is remembered in `undo`.
    fn acquire(dir: &Path, undo: &mut Undo) -> Result<PoolLock, PoolError> {
        let path = dir.join(LOCK_FILE);
        let file = match std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => {
                undo.file(&path);
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err("opening the pool lock", &path))?,
            Err(e) => return Err(io_err("opening the pool lock", &path)(e)),
        };
        flock(&file, libc::LOCK_EX, dir, &path)?;
        Ok(PoolLock { _file: Some(file) })
    }

    /// A reader's lock: shared, through a read-only descriptor, so it works
    /// on a pool the caller may not write (a read-only mount or directory).
    /// Without a lock file (never served or changed) there is nothing to
    /// lock against; one that cannot be opened for reading is skipped too:
    /// `Busy` only means that a writer holds it.
    fn shared(dir: &Path) -> Result<PoolLock, PoolError> {
        let path = dir.join(LOCK_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) =>
            {
                return Ok(PoolLock { _file: None })
            }
            Err(e) => return Err(io_err("opening the pool lock", &path)(e)),
        };
        flock(&file, libc::LOCK_SH, dir, &path)?;
        Ok(PoolLock { _file: Some(file) })
    }
}

/// What `create_pool` made.
#[derive(Debug, Clone)]
pub struct CreatedPool {
    pub manifest: Manifest,
    /// The origin's size in bytes.
    pub origin_bytes: u64,
    /// What is exported of it: its whole 512-byte sectors.
    pub exported_bytes: u64,
}

/// Create a pool directory and its manifest. On failure, whatever this made
/// (directories, lock file, origin image, manifest) is removed again, and
/// nothing that existed before is touched.
pub fn create_pool(dir: &Path, origin: OriginSpec) -> Result<CreatedPool, PoolError> {
    if let OriginSpec::Size(bytes) = origin {
        if bytes == 0 || bytes % SECTOR_SIZE != 0 {
            return Err(PoolError::Invalid(format!(
                "origin size {bytes} is not a positive multiple of 512 bytes"
            )));
        }
        check_file_size("an origin", bytes)?;
    }
    if dir.join(MANIFEST).exists() {
        return Err(PoolError::Exists(dir.join(MANIFEST)));
    }
    let mut undo = Undo::default();
    undo.create_dir_all(dir)
        .map_err(io_err("creating the pool directory", dir))?;
    let lock = PoolLock::acquire(dir, &mut undo)?;
    let (entry, origin_bytes) = match origin {
        OriginSpec::Size(bytes) => {
            let path = dir.join(ORIGIN_IMAGE);
            if path.symlink_metadata().is_ok() {
                return Err(PoolError::Exists(path));
            }
            undo.create_sparse(&path, bytes).map_err(create_err(
                "creating the origin image",
                &path,
                bytes,
            ))?;
            (
                OriginEntry {
                    path: ORIGIN_IMAGE.into(),
                    created: true,
                },
                bytes,
            )
        }
        OriginSpec::Path(p) => {
            let abs = std::fs::canonicalize(&p).map_err(io_err("opening the origin", &p))?;
            let dev = open_origin_file(&abs, OpenOptions::default())?;
            (
                OriginEntry {
                    path: abs,
                    created: false,
                },
                dev.len(),
            )
        }
    };
    let m = Manifest::new(entry);
    undo.file(&dir.join(MANIFEST));
    m.save(dir)?;
    drop(lock);
    undo.keep();
    Ok(CreatedPool {
        manifest: m,
        origin_bytes,
        exported_bytes: exported_origin_bytes(origin_bytes),
    })
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
    /// False when opened with [`Pool::open_read_only`]: only reads are allowed.
    writable: bool,
}

impl Pool {
    /// Open `dir` and take its lock (fails with `Busy` while a daemon runs).
    pub fn open(dir: &Path) -> Result<Pool, PoolError> {
        Self::open_with(dir, true)
    }

    /// Open `dir` to read it (`status`, `snapshot list`) under a shared
    /// lock taken read-only: works on a pool this process cannot write, and
    /// fails with `Busy` while a writer (a daemon, an offline change) holds it.
    pub fn open_read_only(dir: &Path) -> Result<Pool, PoolError> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, writable: bool) -> Result<Pool, PoolError> {
        if !dir.join(MANIFEST).exists() {
            return Err(PoolError::NotAPool(dir.to_path_buf()));
        }
        let lock = if writable {
            PoolLock::try_acquire(dir)?
        } else {
            PoolLock::shared(dir)?
        };
        let manifest = Manifest::load(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(io_err("opening the pool", dir))?;
        Ok(Pool {
            dir,
            manifest,
            _lock: lock,
            writable,
        })
    }

    fn check_writable(&self) -> Result<(), PoolError> {
        if self.writable {
            Ok(())
        } else {
            Err(PoolError::Invalid(format!(
                "the pool {} was opened read-only",
                self.dir.display()
            )))
        }
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
        open_origin_file(
            &self.origin_path(),
            OpenOptions {
                read_only: false,
                direct,
            },
        )
    }

    /// Refuse as the COW of a new snapshot a file or device the pool already
    /// uses: another snapshot's COW, the origin, the manifest or the lock.
    /// Compared by identity, not by path: a symlink, a path through `..` or
    /// a hard link to one of them is refused as well.
    fn check_cow_unused(&self, path: &Path) -> Result<(), PoolError> {
        let id = FileId::of(path).map_err(io_err("opening the COW", path))?;
        let is = |p: &Path| FileId::of(p).is_ok_and(|other| other == id);
        if is(&self.origin_path()) {
            return Err(PoolError::CowIsPoolFile {
                path: path.to_path_buf(),
                what: "the origin",
            });
        }
        for e in &self.manifest.snapshots {
            if is(&self.cow_path(e)) {
                return Err(PoolError::CowInUse {
                    path: path.to_path_buf(),
                    user: e.name.clone(),
                });
            }
        }
        for (f, what) in [(MANIFEST, "the manifest"), (LOCK_FILE, "the lock file")] {
            if is(&self.dir.join(f)) {
                return Err(PoolError::CowIsPoolFile {
                    path: path.to_path_buf(),
                    what,
                });
            }
        }
        Ok(())
    }

    /// Prepare the COW for a new snapshot and return its manifest entry
    /// (not yet recorded) and the open device. On failure a COW file made
    /// here is removed again; an existing one given with `--cow` is never
    /// removed.
    fn prepare_cow(
        &self,
        origin_len: u64,
        req: &SnapshotRequest,
    ) -> Result<(SnapshotEntry, DevRef), PoolError> {
        self.check_writable()?;
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
        if chunk.bytes() < MIN_CHUNK_BYTES {
            return Err(PoolError::BadChunkSize {
                bytes: chunk.bytes(),
                source: None,
            });
        }
        let mut undo = Undo::default();
        let (stored, created, dev): (PathBuf, bool, FileDev) = match &req.cow {
            CowSpec::New(size) => {
                let path = self.dir.join(format!("{}.cow", req.name));
                if path.symlink_metadata().is_ok() {
                    return Err(PoolError::Exists(path));
                }
                let bytes = size.unwrap_or_else(|| cow_size_for_origin(chunk, origin_len));
                let min = 3 * chunk.bytes();
                if req.store.is_persistent() && bytes < min {
                    return Err(PoolError::Invalid(format!(
                        "COW size {bytes} is too small: a {chunk} chunk store needs at least {min} bytes (header, one metadata area, one data chunk)"
                    )));
                }
                if bytes == 0 {
                    return Err(PoolError::Invalid(
                        "COW size 0 is too small: a transient store needs room for at least one chunk".into(),
                    ));
                }
                check_file_size("a COW", bytes)?;
                undo.create_sparse(&path, bytes).map_err(create_err(
                    "creating the COW",
                    &path,
                    bytes,
                ))?;
                let dev = FileDev::open(&path, OpenOptions::default())
                    .map_err(io_err("opening the COW", &path))?;
                (format!("{}.cow", req.name).into(), true, dev)
            }
            CowSpec::Existing(p) => {
                let abs = std::fs::canonicalize(p).map_err(io_err("opening the COW", p))?;
                check_device_kind("COW", &abs)?;
                self.check_cow_unused(&abs)?;
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
        undo.keep();
        Ok((entry, dev))
    }

    /// `snapshot create` with no daemon: the origin is not changing, so the
    /// snapshot is simply recorded; it starts collecting exceptions when the
    /// pool is next served.
    pub fn create_snapshot(&mut self, req: &SnapshotRequest) -> Result<SnapshotEntry, PoolError> {
        self.check_writable()?;
        let origin_len = exported_origin_bytes(self.open_origin(false)?.len());
        let (entry, dev) = self.prepare_cow(origin_len, req)?;
        drop(dev);
        let before = self.manifest.clone();
        self.manifest.add_snapshot(entry.clone());
        if let Err(e) = self.manifest.save(&self.dir) {
            self.manifest = before;
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
        self.check_writable()?;
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
        let len = open_origin_file(
            &origin,
            OpenOptions {
                read_only: true,
                direct: false,
            },
        )?
        .len();
        let snapshots = self
            .manifest
            .snapshots
            .iter()
            .map(|e| {
                let (mut st, warnings) =
                    capture::capture_warnings(|| self.offline_snapshot_status(e));
                st.warnings = warnings;
                st
            })
            .collect();
        Ok(PoolStatus {
            origin: OriginStatus::new(origin, len),
            snapshots,
            merged: self.manifest.merged.clone(),
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
            warnings: Vec::new(),
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
        self.check_writable()?;
        let file = self.open_origin(opts.direct)?;
        let unexported_bytes = file.len() % SECTOR_SIZE;
        let origin_dev: DevRef = if file.len() % SECTOR_SIZE != 0 {
            tracing::warn!(
                "the origin {} is {} bytes, not a whole number of 512-byte sectors: its last {} bytes are not exported",
                file.path().display(),
                file.len(),
                file.len() % SECTOR_SIZE
            );
            Arc::new(SectorAligned::new(file))
        } else {
            Arc::new(file)
        };
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
            check_device_kind("COW", &cow)?;
            let dev = FileDev::open(
                &cow,
                OpenOptions {
                    read_only: false,
                    direct: opts.direct,
                },
            )
            .map_err(io_err("opening the COW", &cow))?;
            let chunk = recorded_chunk_size(e)?;
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
            unexported_bytes,
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
    /// Bytes at the end of the origin file that are not exported.
    unexported_bytes: u64,
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
        let chunk = match recorded_chunk_size(&entry) {
            Ok(c) => c,
            Err(e) => {
                pool.discard_cow(&entry);
                return Err(e);
            }
        };
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
        let before = pool.manifest.clone();
        pool.manifest.add_snapshot(entry.clone());
        let dir = pool.dir.clone();
        if let Err(e) = pool.manifest.save(&dir) {
            pool.manifest = before;
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
        if pool.manifest.was_merged(name) {
            // Its merge completed (maybe just now, before this request
            // arrived): asking again is not an error.
            return Ok(());
        }
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
                    pool.manifest.record_merged(&st.name);
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
                    warnings: Vec::new(),
                }
            })
            .collect();
        PoolStatus {
            origin: OriginStatus {
                path: pool.origin_path(),
                size: self.origin.size(),
                unexported_bytes: self.unexported_bytes,
            },
            snapshots,
            merged: pool.manifest.merged.clone(),
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
    /// "origin of POOL (1.0 GiB)", "snapshot s1 of POOL, 4 KiB chunks, 12%
    /// used" (with its state when it is not active).
    fn description(&self, name: &str) -> Option<String> {
        let pool = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.dir.display().to_string());
        if name == "origin" {
            return Some(format!(
                "origin of {pool} ({})",
                human_bytes(self.origin.size())
            ));
        }
        let s = self.origin.snapshot(name)?;
        let st = s.status();
        let used = st
            .usage
            .allocated
            .0
            .saturating_mul(100)
            .checked_div(st.usage.total.0)
            .unwrap_or(0);
        let state = match st.state {
            SnapState::Active => String::new(),
            other => format!(", {}", state_name(other)),
        };
        Some(format!(
            "snapshot {name} of {pool}, {} chunks, {used}% used{state}",
            s.chunk_size()
        ))
    }
}
