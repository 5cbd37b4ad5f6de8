//! Block I/O: the small synchronous [`BlockDev`] trait every layer above uses,
//! and its implementations: [`FileDev`] (regular files and block devices,
//! pread/pwrite, optional O_DIRECT), [`MemDev`] (memory), and in
//! [`testing`] devices that inject faults or simulate power loss.
//!
//! All offsets and lengths at this layer are in **bytes**. Reads and writes
//! are exact: a short transfer is an error (`UnexpectedEof` / `WriteZero`),
//! never a silent partial success.

mod file;
mod mem;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod uring;

pub use file::{FileDev, OpenOptions};
pub use mem::MemDev;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// Per-write flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when the call returns
    /// (REQ_FUA). It does not make *earlier* writes durable; use
    /// [`BlockDev::flush`] (REQ_PREFLUSH) for that.
    pub fua: bool,
}

impl WriteFlags {
    pub const NONE: WriteFlags = WriteFlags { fua: false };
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// A block device as the engine sees it. `&self` everywhere so one device is
/// shared by many threads; implementations do their own locking.
///
/// Contract:
/// - `read_at`/`write_at` transfer the whole buffer or fail; offsets beyond
///   `len()` fail with `InvalidInput`.
/// - `flush` makes every write that *completed* before the call durable.
/// - `write_at` with `fua` is durable on return.
/// - `discard` may do nothing; afterwards the range reads as zeroes or as
///   its old content (callers must not rely on either).
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Smallest addressable unit in bytes (512 unless the device says more).
    fn logical_block_size(&self) -> u32 {
        512
    }
    /// True when the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make `[offset, offset+len)` read as zeroes. Default: write zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        write_zeroes_by_writing(self, offset, len, flags)
    }
    /// The file descriptor behind the device, when a read of its first
    /// [`len`](Self::len) bytes through it returns exactly what
    /// [`read_at`](Self::read_at) returns (a plain file or block device, no
    /// translation, no fault injection). Lets a bulk reader keep many reads
    /// in flight at once ([`uring`]). Default: none.
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Shared handle to a device.
pub type DevRef = Arc<dyn BlockDev>;

/// Helper for [`BlockDev::write_zeroes`]: writes zero buffers of up to 1 MiB.
pub fn write_zeroes_by_writing<D: BlockDev + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
    flags: WriteFlags,
) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeroes = vec![0u8; STEP.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done);
        let last = done + n == len;
        let f = if last { flags } else { WriteFlags::NONE };
        dev.write_at(&zeroes[..n as usize], offset + done, f)?;
        done += n;
    }
    Ok(())
}

/// Check `[offset, offset+len)` lies inside a device of `dev_len` bytes.
pub fn check_range(offset: u64, len: u64, dev_len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= dev_len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O of {len} bytes at offset {offset} is beyond the end of a {dev_len}-byte device"),
        )),
    }
}

impl<T: BlockDev + ?Sized> BlockDev for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn logical_block_size(&self) -> u32 {
        (**self).logical_block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()> {
        (**self).write_at(buf, offset, flags)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        (**self).write_zeroes(offset, len, flags)
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).raw_fd()
    }
}

/// Run `f`; a panic in it (a bug, or a device that panicked) becomes an
/// I/O error naming `what`, so that a worker thread survives and the
/// callers waiting for its result get an error instead of a hang. The
/// panic message is logged.
pub fn catch_panic<T>(what: &'static str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(during = what, panic = %msg, "caught a panic");
            Err(io::Error::other(format!("a panic while {what}: {msg}")))
        }
    }
}
