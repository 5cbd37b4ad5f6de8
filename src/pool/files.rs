//! The files of a pool as the pool layer handles them: what a failed
//! operation made and must remove again ([`Undo`]), which file or device a
//! path names ([`FileId`]), what may serve as an origin or a COW
//! ([`check_kind`]), and the origin's exported view when its size is not a
//! whole number of sectors ([`SectorAligned`]).

use crate::io::{check_range, BlockDev, WriteFlags};
use crate::units::SECTOR_SIZE;
use std::fs;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The largest size a file can have on Linux (`MAX_LFS_FILESIZE` on 64-bit:
/// `loff_t` is signed).
pub const MAX_FILE_BYTES: u64 = i64::MAX as u64;

/// What an operation created, removed again (newest first) when it is
/// dropped without [`Undo::keep`]: a failed `create` or `snapshot create`
/// leaves nothing behind, and never touches what existed before it.
#[derive(Default)]
pub(crate) struct Undo {
    made: Vec<(PathBuf, bool)>,
}

impl Undo {
    /// Remember a file this operation created.
    pub(crate) fn file(&mut self, p: &Path) {
        self.made.push((p.to_path_buf(), false));
    }
    /// Remember a directory this operation created.
    pub(crate) fn dir(&mut self, p: &Path) {
        self.made.push((p.to_path_buf(), true));
    }
    /// The operation succeeded: keep everything.
    pub(crate) fn keep(mut self) {
        self.made.clear();
    }

    /// Create `dir` and any missing parents, remembering each one made here
    /// (not one that was there, or that a racing process made first).
    pub(crate) fn create_dir_all(&mut self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur {
            if d.as_os_str().is_empty() || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        for d in missing.iter().rev() {
            match fs::create_dir(d) {
                Ok(()) => self.dir(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Create a new sparse file of `len` bytes (never an existing one),
    /// durable on return.
    pub(crate) fn create_sparse(&mut self, path: &Path, len: u64) -> io::Result<()> {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        self.file(path);
        f.set_len(len)?;
        f.sync_all()
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for (p, is_dir) in self.made.drain(..).rev() {
            let r = if is_dir {
                fs::remove_dir(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("could not remove {} after a failure: {e}", p.display());
                }
            }
        }
    }
}

/// Which file or device a path names, whatever path leads there (symlinks,
/// `..`, hard links): a block device by its device number (two nodes of
/// one device are the same device), anything else by `st_dev` + `st_ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileId {
    Block { rdev: u64 },
    Inode { dev: u64, ino: u64 },
}

impl FileId {
    pub(crate) fn of(path: &Path) -> io::Result<FileId> {
        Ok(Self::from_meta(&fs::metadata(path)?))
    }
    fn from_meta(m: &fs::Metadata) -> FileId {
        if m.file_type().is_block_device() {
            FileId::Block { rdev: m.rdev() }
        } else {
            FileId::Inode {
                dev: m.dev(),
                ino: m.ino(),
            }
        }
    }
}

/// Why a path cannot be an origin or a COW: what it is instead, or `None`
/// when it is a regular file or a block device.
pub(crate) fn check_kind(path: &Path) -> io::Result<Option<&'static str>> {
    let t = fs::metadata(path)?.file_type();
    Ok(if t.is_file() || t.is_block_device() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    })
}

/// An origin file whose size is not a multiple of 512 bytes, as it is
/// exported: its whole sectors only. The tail is never read or written
/// (the loop driver sizes a device on such a file the same way).
pub(crate) struct SectorAligned<D> {
    inner: D,
    len: u64,
}

impl<D: BlockDev> SectorAligned<D> {
    pub(crate) fn new(inner: D) -> Self {
        let len = inner.len() / SECTOR_SIZE * SECTOR_SIZE;
        SectorAligned { inner, len }
    }
}

impl<D: BlockDev> BlockDev for SectorAligned<D> {
    fn len(&self) -> u64 {
        self.len
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.inner.write_at(buf, offset, flags)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.inner.write_zeroes(offset, len, flags)
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        // A read of the first `len` bytes through the descriptor returns
        // what `read_at` returns: the contract of `raw_fd` holds.
        self.inner.raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDev;

    #[test]
    fn sector_aligned_hides_the_tail() {
        let d = SectorAligned::new(MemDev::new(1000));
        assert_eq!(d.len(), 512);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert!(d.read_at(&mut b[..1], 512).is_err());
        assert!(d.write_at(&[1], 600, WriteFlags::NONE).is_err());
        assert!(d.discard(0, 513).is_err());
    }

    #[test]
    fn undo_removes_what_it_made_and_only_that() {
        let t = tempfile::tempdir().unwrap();
        let old = t.path().join("old");
        fs::write(&old, b"x").unwrap();
        {
            let mut u = Undo::default();
            u.create_dir_all(&t.path().join("a/b")).unwrap();
            u.create_sparse(&t.path().join("a/b/f"), 4096).unwrap();
            assert!(u.create_sparse(&old, 1).is_err(), "never an existing file");
        }
        assert!(!t.path().join("a").exists());
        assert_eq!(fs::read(&old).unwrap(), b"x");
        let mut u = Undo::default();
        u.create_dir_all(&t.path().join("k")).unwrap();
        u.keep();
        assert!(t.path().join("k").is_dir());
    }

    #[test]
    fn file_ids_see_through_paths() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        std::os::unix::fs::symlink(&f, t.path().join("l")).unwrap();
        fs::hard_link(&f, t.path().join("h")).unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        let id = FileId::of(&f).unwrap();
        assert_eq!(FileId::of(&t.path().join("l")).unwrap(), id);
        assert_eq!(FileId::of(&t.path().join("h")).unwrap(), id);
        assert_eq!(FileId::of(&t.path().join("d/../f")).unwrap(), id);
        assert_ne!(FileId::of(&t.path().join("d")).unwrap(), id);
        assert_eq!(check_kind(&f).unwrap(), None);
        assert_eq!(
            check_kind(&t.path().join("d")).unwrap(),
            Some("a directory")
        );
    }
}
