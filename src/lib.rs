//! dmsnap: Linux device-mapper snapshots (dm-snapshot) in userspace.
//!
//! A live origin device, copy-on-write snapshots of it in the kernel's exact
//! persistent COW format, merge, and exports over NBD and FUSE. See
//! `ARCHITECTURE.md` for the module map and the durability order.
//!
//! Kernel concept → here: `chunk_t` → [`units::Chunk`]; `struct disk_exception`
//! → [`format::DiskException`]; `dm_exception_store_type` →
//! [`store::ExceptionStore`]; `persistent_*` → `store::persistent`.

pub mod bench;
pub mod copier;
pub mod device;
pub mod exception;
pub mod export;
pub mod format;
pub mod io;
pub mod pool;
pub mod report;
pub mod snap;
pub mod store;
pub mod tools;
pub mod units;

/// An error and its causes as one line, `outer: cause: root cause`, for logs
/// and for messages that cross a process boundary (the control socket).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
