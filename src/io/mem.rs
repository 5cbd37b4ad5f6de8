//! An in-memory device: tests, examples and scratch COWs.

use super::{check_range, BlockDev, WriteFlags};
use parking_lot::RwLock;
use std::io;

/// A device held in memory. Everything is "durable" at once.
pub struct MemDev {
    data: RwLock<Vec<u8>>,
}

impl MemDev {
    /// A zero-filled device of `len` bytes.
    pub fn new(len: u64) -> Self {
        MemDev {
            data: RwLock::new(vec![0; len as usize]),
        }
    }
    /// A device holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        MemDev {
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockDev for MemDev {
    fn len(&self) -> u64 {
        self.data.read().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _flags: WriteFlags) -> io::Result<()> {
        let mut d = self.data.write();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write();
        check_range(offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: WriteFlags) -> io::Result<()> {
        self.discard(offset, len)
    }
}
