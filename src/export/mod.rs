//! Exports: how clients reach the devices. [`nbd`] serves any
//! [`crate::device::ExportSet`] over the Network Block Device protocol.

pub mod nbd;
