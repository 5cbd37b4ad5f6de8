//! The NBD server: [`proto`] is the pure wire codec (no sockets, bounded
//! lengths), [`server`] the fixed-newstyle server over Unix and TCP sockets
//! that serves any [`crate::device::ExportSet`].

pub mod activation;
pub mod proto;
pub mod server;

pub use server::{BoundAddr, BoundListener, Listen, ListenParseError, NbdServer, ServerOptions};
