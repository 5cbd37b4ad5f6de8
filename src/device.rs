//! What the exports (NBD, FUSE) see: a [`Device`] per export name, found in
//! an [`ExportSet`] that may change while clients are connected.

use crate::io::{BlockDev, WriteFlags};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

/// Errors a device returns to a client. Each maps to an errno for the wire.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("I/O error")]
    Io(#[source] io::Error),
    #[error(
        "request of {len} bytes at offset {offset} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("the snapshot is invalid")]
    Invalid,
    #[error("the snapshot overflowed (its COW device is full)")]
    Overflow,
    #[error("the device has been removed")]
    Gone,
    #[error("the merge failed")]
    MergeFailed,
    #[error("operation not supported")]
    Unsupported,
}

impl DevError {
    /// The errno to answer with (NBD and FUSE replies).
    pub fn errno(&self) -> i32 {
        match self {
            DevError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            DevError::OutOfRange { .. } => libc::EINVAL,
            DevError::ReadOnly => libc::EPERM,
            DevError::Invalid | DevError::MergeFailed | DevError::Gone => libc::EIO,
            DevError::Overflow => libc::ENOSPC,
            DevError::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

impl From<io::Error> for DevError {
    fn from(e: io::Error) -> Self {
        DevError::Io(e)
    }
}

/// A device that clients read and write. All offsets and lengths in bytes.
pub trait Device: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred I/O size in bytes (the chunk size for a snapshot).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// True if writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError>;
    /// Write `buf`; with `fua` it is durable on return.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), DevError>;
    /// Hint that the range is unused. May do nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError>;
    /// Make the range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError>;
}

/// Check a request against a device size.
pub fn check_request(offset: u64, len: u64, size: u64) -> Result<(), DevError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

/// The set of named devices an export serves. Implementations may add and
/// remove devices at any time (snapshots created while serving).
pub trait ExportSet: Send + Sync {
    /// The device exported as `name`, if any.
    fn get(&self, name: &str) -> Option<Arc<dyn Device>>;
    /// Every export name, in a stable order.
    fn names(&self) -> Vec<String>;
}

/// A fixed set of exports (tests, simple tools).
#[derive(Default, Clone)]
pub struct StaticExports {
    devices: BTreeMap<String, Arc<dyn Device>>,
}

impl StaticExports {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, name: &str, dev: Arc<dyn Device>) -> Self {
        self.devices.insert(name.to_string(), dev);
        self
    }
}

impl ExportSet for StaticExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Device>> {
        self.devices.get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }
}

/// A [`BlockDev`] exported as it is (pass-through), optionally read-only.
pub struct PlainDevice<D: BlockDev> {
    dev: D,
    read_only: bool,
}

impl<D: BlockDev> PlainDevice<D> {
    pub fn new(dev: D, read_only: bool) -> Self {
        PlainDevice { dev, read_only }
    }
    pub fn inner(&self) -> &D {
        &self.dev
    }
}

impl<D: BlockDev> Device for PlainDevice<D> {
    fn size(&self) -> u64 {
        self.dev.len()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        check_request(offset, buf.len() as u64, self.size())?;
        Ok(self.dev.read_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check_request(offset, buf.len() as u64, self.size())?;
        Ok(self.dev.write_at(buf, offset, WriteFlags { fua })?)
    }
    fn flush(&self) -> Result<(), DevError> {
        Ok(self.dev.flush()?)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check_request(offset, len, self.size())?;
        Ok(self.dev.discard(offset, len)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        check_request(offset, len, self.size())?;
        Ok(self.dev.write_zeroes(offset, len, WriteFlags { fua })?)
    }
}
