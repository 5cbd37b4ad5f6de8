//! FUSE export: every device of an [`ExportSet`] as a regular file in one
//! directory (`DIR/origin`, `DIR/<snap>`), so a loop device, `qemu-img`, `dd`
//! or a VM can use it like a disk image.
//!
//! The directory is looked up live through [`ExportSet::names`] /
//! [`ExportSet::get`] with zero entry/attribute TTLs, so snapshots created
//! while mounted appear at once and removed ones disappear. Inode numbers are
//! stable per name for the life of the mount.
//!
//! Files are opened with `FOPEN_DIRECT_IO` (no page cache between the client
//! and the device: the device is the cache) and
//! `FOPEN_PARALLEL_DIRECT_WRITES` (the kernel does not serialise writes on the
//! inode lock). The session runs several threads, each with its own cloned
//! `/dev/fuse` descriptor; request handlers take no exclusive lock of ours:
//! the open-file table is behind a read-mostly `RwLock`.
//!
//! Block-device semantics map onto file operations as a loop device expects:
//!
//! | file operation | device |
//! |---|---|
//! | `read`/`write` (clipped at the end; writes beyond it: `ENOSPC`) | `read_at`/`write_at` (`O_DSYNC` → FUA) |
//! | `fsync`, `fsyncdir` (every export) | `flush` |
//! | `flush` (close) after writes that are not durable yet | `flush` |
//! | `fallocate(PUNCH_HOLE\|KEEP_SIZE)` | `discard` |
//! | `fallocate(ZERO_RANGE)` | `write_zeroes` |
//! | `fallocate(0)` inside the size | nothing to do |
//! | anything that would grow the file | `EOPNOTSUPP` / `EINVAL` |
//!
//! Errors are answered with [`DevError::errno`].

pub mod bench;

use crate::device::{DevError, Device, ExportSet};
use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::RwLock;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Largest read or write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;

/// The FUSE device node.
const DEV_FUSE: &str = "/dev/fuse";

/// How to mount.
#[derive(Clone)]
pub struct FuseOptions {
    /// Export names that must be served read-only (writes: `EROFS`), on top
    /// of devices whose [`Device::read_only`] is true.
    pub read_only: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// Let users other than the mounting one use the files (`allow_other`;
    /// non-root mounts need `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Request threads (each with its own cloned `/dev/fuse` fd). At least 1.
    pub threads: usize,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            read_only: Arc::new(|_| false),
            allow_other: false,
            threads: 4,
        }
    }
}

impl fmt::Debug for FuseOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuseOptions")
            .field("allow_other", &self.allow_other)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// Mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// FUSE cannot be used on this machine.
    #[error("FUSE is unavailable: {reason}")]
    Unavailable {
        reason: &'static str,
        #[source]
        source: Option<io::Error>,
    },
    /// The mount point cannot be used.
    #[error("cannot mount on {}: {reason}", path.display())]
    BadMountpoint {
        path: PathBuf,
        reason: &'static str,
        #[source]
        source: Option<io::Error>,
    },
    /// The kernel or fusermount refused the mount.
    #[error("mounting FUSE on {} failed", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The mount could not be removed.
    #[error("unmounting {} failed", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A mounted export directory. Unmounts on [`FuseMount::unmount`] or drop.
pub struct FuseMount {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
}

impl fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuseMount").field("dir", &self.dir).finish()
    }
}

/// Mount `exports` on the directory `dir`. Requests are served by background
/// threads until the returned [`FuseMount`] is unmounted or dropped.
pub fn mount(
    exports: Arc<dyn ExportSet>,
    dir: &Path,
    opts: FuseOptions,
) -> Result<FuseMount, FuseError> {
    let dir = check_mountpoint(dir)?;
    check_available(Path::new(DEV_FUSE))?;

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("dmsnap".to_string()),
        MountOption::Subtype("dmsnap".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    // One /dev/fuse descriptor per request thread.
    config.clone_fd = true;

    let fs = ExportFs::new(exports, &opts);
    let session = fuser::Session::new(fs, &dir, &config).map_err(|source| FuseError::Mount {
        path: dir.clone(),
        source,
    })?;
    let session = session.spawn().map_err(|source| FuseError::Mount {
        path: dir.clone(),
        source,
    })?;
    tracing::info!(dir = %dir.display(), threads = opts.threads, "FUSE export mounted");
    Ok(FuseMount {
        session: Some(session),
        dir,
    })
}

impl FuseMount {
    /// The (canonical) mount directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmount and wait for the request threads. If a file is still in use
    /// (a loop device attached to it), the mount is detached lazily instead:
    /// it leaves the namespace now and is served until its last user closes
    /// it (a warning says so).
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "FUSE export unmounted");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The session thread is detached and keeps serving the
                // remaining users; the mount leaves the namespace now.
                lazy_unmount(&self.dir).map_err(|source| FuseError::Unmount {
                    path: self.dir.clone(),
                    source,
                })?;
                tracing::warn!(
                    dir = %self.dir.display(),
                    "FUSE export busy (a loop device or process still has a file open): \
                     lazily unmounted; it is served until the last user closes it"
                );
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a mount point any more: someone ran `umount DIR`, and
                // the request threads ended when the kernel closed the
                // connection.
                tracing::info!(dir = %self.dir.display(), "FUSE export was already unmounted");
                Ok(())
            }
            Err(source) => Err(FuseError::Unmount {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::error!(error = %e, cause = ?std::error::Error::source(&e), "FUSE unmount on drop failed");
        }
    }
}

/// `umount2(MNT_DETACH)`, or `fusermount3 -u -z` when not root.
fn lazy_unmount(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let bin = fusermount_bin().ok_or(err)?;
    let out = std::process::Command::new(bin)
        .args(["-u", "-z", "--"])
        .arg(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The fusermount helper on PATH, if any.
fn fusermount_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["fusermount3", "fusermount"] {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// FUSE needs /dev/fuse openable by this process (fuser opens it itself even
/// for unprivileged mounts, and once more per request thread), and
/// unprivileged mounts need fusermount3.
fn check_available(dev_fuse: &Path) -> Result<(), FuseError> {
    let meta = std::fs::metadata(dev_fuse).map_err(|e| FuseError::Unavailable {
        reason: "/dev/fuse is missing (load the fuse module: modprobe fuse)",
        source: Some(e),
    })?;
    if !meta.file_type().is_char_device() {
        return Err(FuseError::Unavailable {
            reason: "/dev/fuse is not a character device",
            source: None,
        });
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_fuse)
    {
        return Err(FuseError::Unavailable {
            reason: "/dev/fuse cannot be opened for reading and writing by this user \
                     (it is normally mode 0666)",
            source: Some(e),
        });
    }
    if !is_root() && fusermount_bin().is_none() {
        return Err(FuseError::Unavailable {
            reason: "unprivileged mounts need fusermount3, which is not on PATH (install fuse3)",
            source: None,
        });
    }
    Ok(())
}

/// The mount point must be an existing directory; returns its canonical path.
fn check_mountpoint(dir: &Path) -> Result<PathBuf, FuseError> {
    let bad = |reason, source| FuseError::BadMountpoint {
        path: dir.to_path_buf(),
        reason,
        source,
    };
    let meta = std::fs::metadata(dir).map_err(|e| bad("it cannot be accessed", Some(e)))?;
    if !meta.is_dir() {
        return Err(bad("it is not a directory", None));
    }
    dir.canonicalize()
        .map_err(|e| bad("it cannot be resolved", Some(e)))
}

/// Zero TTLs: the set changes under us, and the kernel must ask again.
const TTL: Duration = Duration::ZERO;

/// One open file.
struct Handle {
    name: String,
    dev: Arc<dyn Device>,
    /// Opened for writing.
    writable: bool,
    /// A write (not FUA), discard or zeroing through this handle completed
    /// since its last flush started: its close must flush the device.
    unflushed: AtomicBool,
}

impl Handle {
    fn new(name: String, dev: Arc<dyn Device>, writable: bool) -> Self {
        Handle {
            name,
            dev,
            writable,
            unflushed: AtomicBool::new(false),
        }
    }

    /// Record a completed write that is not durable yet. Called after the
    /// device returned, so a flush that clears the mark afterwards covers it.
    fn wrote(&self) {
        self.unflushed.store(true, Ordering::Release);
    }

    /// Flush the device. Writes that completed before the mark is cleared
    /// are covered by the flush that starts after it; a failed flush puts
    /// the mark back.
    fn flush(&self) -> Result<(), Errno> {
        self.unflushed.store(false, Ordering::Release);
        self.dev.flush().map_err(|e| {
            self.wrote();
            errno(&e)
        })
    }

    /// Flush on close: only if this handle left something not durable
    /// (a reader, or a writer whose data an fsync or FUA already made
    /// durable, costs nothing).
    fn flush_on_close(&self) -> Result<(), Errno> {
        if self.unflushed.load(Ordering::Acquire) {
            self.flush()
        } else {
            Ok(())
        }
    }
}

/// Stable inode numbers: root is 1, export `names[i]` is `i + 2`.
#[derive(Default)]
struct Inodes {
    by_name: HashMap<String, u64>,
    names: Vec<String>,
}

/// The [`Filesystem`] serving one [`ExportSet`].
struct ExportFs {
    exports: Arc<dyn ExportSet>,
    read_only: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    allow_other: bool,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

thread_local! {
    /// Per-thread read buffer, reused across requests. Used from a
    /// page-aligned start, so an O_DIRECT backing file reads straight into it
    /// (no bounce buffer, no extra copy).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: &DevError) -> Errno {
    Errno::from_i32(e.errno())
}

impl ExportFs {
    fn new(exports: Arc<dyn ExportSet>, opts: &FuseOptions) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ExportFs {
            exports,
            read_only: opts.read_only.clone(),
            allow_other: opts.allow_other,
            uid,
            gid,
            mounted_at: SystemTime::now(),
            inodes: RwLock::new(Inodes::default()),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn ino_for(&self, name: &str) -> INodeNo {
        if let Some(&ino) = self.inodes.read().by_name.get(name) {
            return INodeNo(ino);
        }
        let mut inodes = self.inodes.write();
        if let Some(&ino) = inodes.by_name.get(name) {
            return INodeNo(ino);
        }
        let ino = inodes.names.len() as u64 + 2;
        inodes.names.push(name.to_string());
        inodes.by_name.insert(name.to_string(), ino);
        INodeNo(ino)
    }

    fn name_of(&self, ino: INodeNo) -> Option<String> {
        let i = ino.0.checked_sub(2)?;
        self.inodes.read().names.get(i as usize).cloned()
    }

    /// The device behind `ino` now, with its name.
    fn lookup_ino(&self, ino: INodeNo) -> Result<(String, Arc<dyn Device>), Errno> {
        let name = self.name_of(ino).ok_or(Errno::ENOENT)?;
        let dev = self.exports.get(&name).ok_or(Errno::ENOENT)?;
        Ok((name, dev))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.read().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn is_writable(&self, name: &str, dev: &dyn Device) -> bool {
        !dev.read_only() && !(self.read_only)(name)
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: if self.allow_other { 0o755 } else { 0o700 },
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: INodeNo, name: &str, dev: &dyn Device) -> FileAttr {
        let size = dev.size();
        let perm = match (self.is_writable(name, dev), self.allow_other) {
            (true, false) => 0o600,
            (false, false) => 0o400,
            (true, true) => 0o666,
            (false, true) => 0o444,
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::RegularFile,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: dev.preferred_block_size().max(512),
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(self.root_attr());
        }
        // An open file keeps its device even after the export is removed.
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok()) {
            return Ok(self.file_attr(ino, &h.name, h.dev.as_ref()));
        }
        let (name, dev) = self.lookup_ino(ino)?;
        Ok(self.file_attr(ino, &name, dev.as_ref()))
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8], fua: bool) -> Result<u32, Errno> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        if !self.is_writable(&h.name, h.dev.as_ref()) {
            return Err(Errno::EROFS);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let size = h.dev.size();
        if offset >= size {
            return Err(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(size - offset) as usize;
        h.dev
            .write_at(&data[..n], offset, fua)
            .map_err(|e| errno(&e))?;
        if !fua {
            h.wrote();
        }
        Ok(n as u32)
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        if !self.is_writable(&h.name, h.dev.as_ref()) {
            return Err(Errno::EROFS);
        }
        let size = h.dev.size();
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        let grows = end > size && mode & KEEP == 0;
        // The part of the range inside the device.
        let inside = end.min(size).saturating_sub(offset);
        match mode & !KEEP {
            PUNCH if mode & KEEP != 0 => {
                if inside > 0 {
                    h.dev.discard(offset, inside).map_err(|e| errno(&e))?;
                    h.wrote();
                }
                Ok(())
            }
            ZERO if !grows => {
                if inside > 0 {
                    h.dev
                        .write_zeroes(offset, inside, false)
                        .map_err(|e| errno(&e))?;
                    h.wrote();
                }
                Ok(())
            }
            // Plain allocation: a device is always fully "allocated".
            0 if !grows => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    fn flush_all(&self) -> Result<(), Errno> {
        let mut result = Ok(());
        for name in self.exports.names() {
            if let Some(dev) = self.exports.get(&name) {
                if let Err(e) = dev.flush() {
                    tracing::warn!(export = %name, error = %e, "flush failed");
                    result = result.and(Err(errno(&e)));
                }
            }
        }
        result
    }
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        // Let the kernel submit async direct I/O (loop devices with
        // direct-io=on) as parallel requests.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let Some(dev) = self.exports.get(name) else {
            return reply.error(Errno::ENOENT);
        };
        let ino = self.ino_for(name);
        reply.entry(
            &TTL,
            &self.file_attr(ino, name, dev.as_ref()),
            Generation(0),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        let attr = match self.attr_of(ino, fh) {
            Ok(attr) => attr,
            Err(e) => return reply.error(e),
        };
        // A device has a fixed size; truncating to the same size (loop
        // devices, `truncate -s`) is fine. Times are not kept: ignore them.
        match size {
            Some(s) if s != attr.size => reply.error(Errno::EINVAL),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (name, dev) = match self.lookup_ino(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writable && !self.is_writable(&name, dev.as_ref()) {
            return reply.error(Errno::EROFS);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .insert(fh, Arc::new(Handle::new(name, dev, writable)));
        let mut fopen = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        if !writable {
            // Nothing to make durable on close: spare the FLUSH round trip.
            fopen |= FopenFlags::FOPEN_NOFLUSH;
        }
        reply.opened(FileHandle(fh), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let dev_size = h.dev.size();
        if offset >= dev_size {
            return reply.data(&[]);
        }
        let n = u64::from(size).min(dev_size - offset) as usize;
        READ_BUF.with_borrow_mut(|buf| {
            const PAGE: usize = 4096;
            if buf.len() < n + PAGE {
                buf.resize(n + PAGE, 0);
            }
            let at = buf.as_ptr().align_offset(PAGE).min(PAGE);
            let buf = &mut buf[at..at + n];
            match h.dev.read_at(buf, offset) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // O_SYNC includes the O_DSYNC bit.
        let fua = flags.0 & libc::O_DSYNC != 0;
        match self.do_write(fh, offset, data, fua) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close() of a writable file: make what it wrote
        // durable, if anything is left to.
        match self.handle(fh).and_then(|h| h.flush_on_close()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.write().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Always a flush: fsync covers writes through any descriptor (and
        // the device's other clients), not just this handle's.
        match self.handle(fh).and_then(|h| h.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let names = self.exports.names();
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(
            names
                .iter()
                .map(|n| (self.ino_for(n), FileType::RegularFile, n.as_str())),
        );
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_all() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let names = self.exports.names();
        let bytes: u64 = names
            .iter()
            .filter_map(|n| self.exports.get(n))
            .map(|d| d.size())
            .sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            names.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // The directory's content is the export set: no creating, removing or
    // renaming files through the mount.
    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{PlainDevice, StaticExports};
    use crate::io::MemDev;

    fn fs_with(ro: bool) -> ExportFs {
        let exports = StaticExports::new()
            .with("origin", Arc::new(PlainDevice::new(MemDev::new(8192), ro)))
            .with("snap", Arc::new(PlainDevice::new(MemDev::new(4096), false)));
        let opts = FuseOptions {
            read_only: Arc::new(|n| n == "snap"),
            ..FuseOptions::default()
        };
        ExportFs::new(Arc::new(exports), &opts)
    }

    fn open(fs: &ExportFs, name: &str, writable: bool) -> FileHandle {
        let dev = fs.exports.get(name).unwrap();
        let fh = fs.next_fh.fetch_add(1, Ordering::Relaxed);
        fs.handles
            .write()
            .insert(fh, Arc::new(Handle::new(name.into(), dev, writable)));
        FileHandle(fh)
    }

    #[test]
    fn inode_numbers_are_stable_per_name() {
        let fs = fs_with(false);
        let a = fs.ino_for("origin");
        let b = fs.ino_for("snap");
        assert_ne!(a, b);
        assert_eq!(fs.ino_for("origin"), a);
        assert_eq!(fs.name_of(a).as_deref(), Some("origin"));
        assert_eq!(fs.name_of(INodeNo::ROOT), None);
        assert_eq!(fs.name_of(INodeNo(999)), None);
    }

    #[test]
    fn writes_are_clipped_at_the_end_and_refused_beyond_it() {
        let fs = fs_with(false);
        let fh = open(&fs, "origin", true);
        assert_eq!(fs.do_write(fh, 8192 - 100, &[1; 512], false), Ok(100));
        assert_eq!(fs.do_write(fh, 8192, &[1; 512], false), Err(Errno::ENOSPC));
        assert_eq!(fs.do_write(fh, 0, &[], false), Ok(0));
    }

    #[test]
    fn read_only_devices_and_predicate_refuse_writes() {
        let fs = fs_with(true);
        let fh = open(&fs, "origin", true);
        assert_eq!(fs.do_write(fh, 0, &[1; 512], false), Err(Errno::EROFS));
        let fh = open(&fs, "snap", true);
        assert_eq!(fs.do_write(fh, 0, &[1; 512], false), Err(Errno::EROFS));
        let fh = open(&fs, "snap", false);
        assert_eq!(fs.do_write(fh, 0, &[1; 512], false), Err(Errno::EBADF));
    }

    /// Counts flushes; fails them while `fail` is set.
    #[derive(Default)]
    struct FlushCount {
        flushes: AtomicU64,
        fail: AtomicBool,
    }

    impl Device for FlushCount {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<(), DevError> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<(), DevError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DevError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(DevError::Io(io::Error::from_raw_os_error(libc::EIO)));
            }
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<(), DevError> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), DevError> {
            Ok(())
        }
    }

    #[test]
    fn close_flushes_only_what_is_not_durable_yet() {
        let dev = Arc::new(FlushCount::default());
        let exports = StaticExports::new().with("origin", dev.clone());
        let fs = ExportFs::new(Arc::new(exports), &FuseOptions::default());
        let flushes = || dev.flushes.load(Ordering::SeqCst);
        let h = |fh: FileHandle| fs.handle(fh).unwrap();

        // Opened for writing, nothing written: close is free.
        let fh = open(&fs, "origin", true);
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 0);
        // FUA writes are durable already.
        fs.do_write(fh, 0, &[1; 512], true).unwrap();
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 0);
        // A plain write must be flushed on close, once.
        fs.do_write(fh, 0, &[1; 512], false).unwrap();
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 1);
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 1);
        // fsync always flushes, and leaves nothing for close.
        fs.do_write(fh, 0, &[1; 512], false).unwrap();
        assert_eq!(h(fh).flush(), Ok(()));
        assert_eq!(h(fh).flush(), Ok(()));
        assert_eq!(flushes(), 3);
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 3);
        // Discard and zeroing count as writes.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fs.do_fallocate(fh, 0, 4096, punch).unwrap();
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 4);
        fs.do_fallocate(fh, 0, 4096, libc::FALLOC_FL_ZERO_RANGE)
            .unwrap();
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 5);
        // A failed flush keeps the data owed: the next close tries again.
        fs.do_write(fh, 0, &[1; 512], false).unwrap();
        dev.fail.store(true, Ordering::SeqCst);
        assert_eq!(h(fh).flush_on_close(), Err(Errno::EIO));
        dev.fail.store(false, Ordering::SeqCst);
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 7);
        // Another handle's writes are its own business on close.
        let other = open(&fs, "origin", true);
        fs.do_write(other, 0, &[1; 512], false).unwrap();
        assert_eq!(h(fh).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 7);
        assert_eq!(h(other).flush_on_close(), Ok(()));
        assert_eq!(flushes(), 8);
    }

    #[test]
    fn fallocate_modes() {
        let fs = fs_with(false);
        let fh = open(&fs, "origin", true);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        assert_eq!(fs.do_fallocate(fh, 0, 4096, punch), Ok(()));
        assert_eq!(fs.do_fallocate(fh, 4096, 1 << 20, punch), Ok(()));
        assert_eq!(fs.do_fallocate(fh, 0, 4096, zero), Ok(()));
        assert_eq!(
            fs.do_fallocate(fh, 0, 1 << 20, zero),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(fs.do_fallocate(fh, 0, 1 << 20, zero | keep), Ok(()));
        assert_eq!(fs.do_fallocate(fh, 0, 8192, 0), Ok(()));
        assert_eq!(fs.do_fallocate(fh, 0, 8193, 0), Err(Errno::EOPNOTSUPP));
        assert_eq!(fs.do_fallocate(fh, 0, 8193, keep), Ok(()));
        assert_eq!(
            fs.do_fallocate(fh, 0, 4096, libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(fs.do_fallocate(fh, u64::MAX, 2, punch), Err(Errno::EFBIG));
    }

    #[test]
    fn missing_fuse_is_reported_as_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_available(&dir.path().join("fuse")).unwrap_err();
        assert!(matches!(e, FuseError::Unavailable { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "FUSE is unavailable: /dev/fuse is missing (load the fuse module: modprobe fuse)"
        );
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_available(&file).unwrap_err();
        assert!(e.to_string().contains("not a character device"), "{e}");
    }

    #[test]
    fn bad_mountpoints_are_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_mountpoint(&file).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = check_mountpoint(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot be accessed"), "{e}");
    }
}
