//! Benchmarks that need library internals or real files (run from tests or
//! the CLI, never in loops on the shared CI machine).
//!
//! - [`load`]: how fast a persistent store's metadata loads compared with a
//!   plain sequential read of the same bytes.

pub mod load;

pub use load::{run_load_bench, run_load_bench_with, LoadBenchError, LoadReport, ModeReport};
