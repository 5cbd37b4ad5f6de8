#[cfg(feature = "fuse")]
pub mod fuse;
