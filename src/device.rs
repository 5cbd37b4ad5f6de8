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

/// A metadata context of `NBD_CMD_BLOCK_STATUS` (what a client may ask a
/// device about its extents).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaContext {
    /// `base:allocation`: flags [`STATE_HOLE`] and [`STATE_ZERO`].
    Allocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 this device, 2 the layer below.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: flag [`STATE_DIRTY`] where this device may
    /// differ from snapshot `NAME`.
    DirtyBitmap(String),
}

/// `base:allocation`: not allocated (a write may allocate, and may fail).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: reads return zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:`: may differ from the snapshot.
pub const STATE_DIRTY: u32 = 1;

impl MetaContext {
    pub const ALLOCATION: &'static str = "base:allocation";
    pub const ALLOCATION_DEPTH: &'static str = "qemu:allocation-depth";
    pub const DIRTY_BITMAP_PREFIX: &'static str = "qemu:dirty-bitmap:";

    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => Self::ALLOCATION.into(),
            MetaContext::AllocationDepth => Self::ALLOCATION_DEPTH.into(),
            MetaContext::DirtyBitmap(s) => format!("{}{s}", Self::DIRTY_BITMAP_PREFIX),
        }
    }

    /// The context named `name` exactly, if it is one this crate knows.
    pub fn parse(name: &str) -> Option<MetaContext> {
        match name {
            Self::ALLOCATION => Some(MetaContext::Allocation),
            Self::ALLOCATION_DEPTH => Some(MetaContext::AllocationDepth),
            _ => name
                .strip_prefix(Self::DIRTY_BITMAP_PREFIX)
                .filter(|s| !s.is_empty())
                .map(|s| MetaContext::DirtyBitmap(s.to_string())),
        }
    }
}

/// One extent of a block-status answer: `len` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

/// The answer to a block-status query: per context asked (in the order
/// asked), extents from the query's offset on, adjacent ones with equal
/// flags merged. Each list covers at least one byte and at most the range
/// asked (fewer bytes when the extent cap was reached).
///
/// `guard` keeps writes that could change the answer waiting: drop it only
/// once the answer has been delivered (the NBD server drops it after the
/// reply is on the socket, or when the send timed out and the connection
/// was cut).
pub struct BlockStatus {
    pub extents: Vec<Vec<Extent>>,
    pub guard: Option<Box<dyn Send>>,
}

/// Append `len` bytes with `flags`, merging with the last extent.
pub fn push_extent(v: &mut Vec<Extent>, len: u64, flags: u32) {
    if len == 0 {
        return;
    }
    match v.last_mut() {
        Some(l) if l.flags == flags => l.len += len,
        _ => v.push(Extent { len, flags }),
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
    /// The block-status contexts this device answers. Default:
    /// `base:allocation` only (everything reported as data).
    fn meta_contexts(&self) -> Vec<MetaContext> {
        vec![MetaContext::Allocation]
    }
    /// Block status of `[offset, offset+len)` for each of `contexts`, at
    /// most `max_extents` extents per context. Default: `base:allocation`
    /// says "data" for the whole range; other contexts are unsupported.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        contexts: &[MetaContext],
        max_extents: usize,
    ) -> Result<BlockStatus, DevError> {
        let _ = max_extents;
        check_request(offset, len, self.size())?;
        let extents = contexts
            .iter()
            .map(|c| match c {
                MetaContext::Allocation => Ok(vec![Extent { len, flags: 0 }]),
                _ => Err(DevError::Unsupported),
            })
            .collect::<Result<_, _>>()?;
        Ok(BlockStatus {
            extents,
            guard: None,
        })
    }
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
    /// What export `name` is, for people (`NBD_INFO_DESCRIPTION`, the
    /// descriptions of `NBD_OPT_LIST`).
    fn description(&self, _name: &str) -> Option<String> {
        None
    }
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
