//! `dmsnap bench load|memory` (hidden): library benchmarks for the Python
//! driver `bench/bench.py`. Each prints one JSON object on stdout.
//!
//! - `load`: [`dmsnap::bench::run_load_bench`] (the store's metadata load of
//!   a COW with N exceptions against a sequential read of the same bytes),
//!   plus the time to build the in-core table from the loaded records.
//! - `memory`: bytes per exception of the in-core [`ExceptionTable`] for N
//!   scattered and N sequential exceptions, against the 16 bytes of an
//!   on-disk record.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dmsnap::exception::ExceptionTable;
use dmsnap::units::{Chunk, ChunkSize};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Metadata load of a COW with N exceptions vs a sequential read.
    Load(LoadArgs),
    /// In-core memory per exception.
    Memory(MemoryArgs),
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Where to build the COW file (a real disk: O_DIRECT fails on tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    pub exceptions: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Chunk size of the COW (bigger: fewer, larger metadata areas).
    #[arg(long, default_value = "4K", value_parser = chunk_size_arg)]
    pub chunk_size: ChunkSize,
}

fn chunk_size_arg(s: &str) -> Result<ChunkSize, String> {
    let b = dmsnap::units::parse_size(s)?;
    ChunkSize::from_bytes(b).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct MemoryArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub exceptions: u64,
}

pub fn bench(cmd: BenchCmd) -> Result<()> {
    let out = match cmd {
        BenchCmd::Load(a) => load(a)?,
        BenchCmd::Memory(a) => memory(a),
    };
    println!("{out}");
    Ok(())
}

fn load(a: LoadArgs) -> Result<serde_json::Value> {
    let r = dmsnap::bench::run_load_bench_with(&a.dir, a.exceptions, a.runs, a.chunk_size)
        .context("load benchmark")?;
    eprint!("{r}");
    let modes: Vec<_> = r
        .modes
        .iter()
        .map(|m| {
            json!({
                "mode": m.mode,
                "load_s": m.load_median().as_secs_f64(),
                "reference_s": m.reference_median().as_secs_f64(),
                "ratio": m.ratio(),
            })
        })
        .collect();
    // Building the in-core table from the records (activation does this
    // after read_metadata); timed separately: it is CPU, not I/O.
    let recs = scattered(ChunkSize::DEFAULT, a.exceptions);
    let t = Instant::now();
    let mut table = ExceptionTable::new();
    table.bulk_load(recs);
    let table_s = t.elapsed().as_secs_f64();
    Ok(json!({
        "exceptions": r.exceptions,
        "chunk_size": r.chunk_size.bytes(),
        "areas": r.areas,
        "metadata_bytes": r.metadata_bytes,
        "modes": modes,
        "table_build_s": table_s,
        "table_len": table.len(),
    }))
}

/// Scattered distinct old chunks, new chunks in allocation order (skipping
/// one metadata chunk per area, like a real COW).
fn scattered(cs: ChunkSize, n: u64) -> Vec<(Chunk, Chunk)> {
    let per_area = dmsnap::format::exceptions_per_area(cs);
    (0..n)
        .map(|i| {
            let old = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & ((1 << 40) - 1);
            (Chunk(old), Chunk(2 + i + i / per_area))
        })
        .collect()
}

fn memory(a: MemoryArgs) -> serde_json::Value {
    let n = a.exceptions.max(1);
    let mut sc = ExceptionTable::new();
    sc.bulk_load(scattered(ChunkSize::DEFAULT, n));
    let mut inc = ExceptionTable::new();
    for (o, nw) in scattered(ChunkSize::DEFAULT, n) {
        inc.insert(o, nw);
    }
    let mut seq = ExceptionTable::new();
    seq.bulk_load((0..n).map(|i| (Chunk(i), Chunk(2 + i))));
    let per = |t: &ExceptionTable| t.memory_bytes() as f64 / n as f64;
    json!({
        "exceptions": n,
        "disk_record_bytes": 16,
        "scattered_bulk_bytes_per_exception": per(&sc),
        "scattered_insert_bytes_per_exception": per(&inc),
        "sequential_bytes_per_exception": per(&seq),
    })
}
