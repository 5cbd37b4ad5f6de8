//! Exports: how clients reach the devices. [`nbd`] serves any
//! [`crate::device::ExportSet`] over the Network Block Device protocol;
//! [`fuse`] shows each device as a file (feature `fuse`).

#[cfg(feature = "fuse")]
pub mod fuse;
pub mod nbd;
