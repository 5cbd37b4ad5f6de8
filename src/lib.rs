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
pub mod format;
pub mod io;
pub mod snap;
pub mod store;
pub mod units;
