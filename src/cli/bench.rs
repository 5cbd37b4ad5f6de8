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
    /// Block status of a large export with many scattered exceptions.
    BlockStatus(BlockStatusArgs),
}

#[derive(Args, Debug)]
pub struct BlockStatusArgs {
    /// Where to build the sparse origin and COW files.
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 10_000_000)]
    pub exceptions: u64,
    /// Origin size.
    #[arg(long, default_value = "1T", value_parser = dmsnap::units::parse_size)]
    pub size: u64,
    /// Seconds per measured query loop.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
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
        BenchCmd::BlockStatus(a) => block_status(a)?,
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

/// Peak resident set of this process, in KiB.
fn max_rss_kib() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given; nothing else.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss as u64
    }
}

/// Queries per second of `f` over `secs` seconds (at least 3 queries).
fn rate(secs: f64, mut f: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    let mut n = 0u64;
    while n < 3 || t.elapsed().as_secs_f64() < secs {
        f(n);
        n += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// A persistent COW of 4 KiB chunks with `n` exceptions scattered over an
/// origin of `chunks` chunks (distinct: an odd multiplier modulo a power of
/// two is a bijection), written straight in the kernel's format.
fn build_cow(path: &std::path::Path, n: u64, chunks: u64) -> Result<()> {
    use dmsnap::format::{
        area_location, encode_area, exceptions_per_area, metadata_chunks_for, skip_metadata,
        DiskException, DiskHeader,
    };
    use std::os::unix::fs::FileExt;
    let cs = ChunkSize::DEFAULT;
    let bits = 63 - chunks.max(2).leading_zeros();
    let mask = (1u64 << bits) - 1;
    anyhow::ensure!(n <= mask + 1, "{n} exceptions do not fit {chunks} chunks");
    let per = exceptions_per_area(cs);
    let areas = metadata_chunks_for(cs, n);
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len((1 + n + areas) * cs.bytes())?;
    f.write_all_at(
        &DiskHeader {
            valid: true,
            chunk_size: cs,
        }
        .encode_chunk(),
        0,
    )?;
    let mut next = Chunk(2);
    let mut i = 0u64;
    for a in 0..areas {
        let take = per.min(n - i.min(n));
        let recs: Vec<DiskException> = (0..take)
            .map(|_| {
                let e = DiskException {
                    old_chunk: Chunk(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & mask),
                    new_chunk: next,
                };
                next = skip_metadata(cs, Chunk(next.0 + 1));
                i += 1;
                e
            })
            .collect();
        f.write_all_at(
            &encode_area(&recs, cs.bytes() as usize),
            cs.chunk_to_byte(area_location(cs, a)),
        )?;
    }
    f.sync_all()?;
    Ok(())
}

fn block_status(a: BlockStatusArgs) -> Result<serde_json::Value> {
    use dmsnap::device::{Device, MetaContext};
    use dmsnap::io::{FileDev, OpenOptions};
    use dmsnap::snap::{ExportDevice, Origin, MAX_EXTENTS};
    use dmsnap::store::StoreType;
    use std::sync::Arc;
    let dir = tempfile_dir(&a.dir)?;
    let origin_path = dir.join("origin.img");
    let cow_path = dir.join("s1.cow");
    let result = (|| -> Result<serde_json::Value> {
        let size = a.size & !4095;
        build_cow(&cow_path, a.exceptions, size / 4096)?;
        let origin_dev = FileDev::create_sparse(&origin_path, size, OpenOptions::default())?;
        let cow = FileDev::open(&cow_path, OpenOptions::default())?;
        let rss0 = max_rss_kib();
        let t = Instant::now();
        let origin = Origin::new(Arc::new(origin_dev));
        let snap = origin.add_snapshot("s1", Arc::new(cow), StoreType::Persistent, None)?;
        let load_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            snap.nr_exceptions() == a.exceptions,
            "loaded {} exceptions",
            snap.nr_exceptions()
        );
        let rss_loaded = max_rss_kib();
        let o = ExportDevice::origin(origin.clone());
        let s = ExportDevice::snapshot(origin.clone(), snap.clone());
        let dirty = [MetaContext::DirtyBitmap("s1".into())];
        let all = [
            MetaContext::Allocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap("s1".into()),
        ];
        let mut extents = 0usize;
        let mut covered = 0u64;
        let full_dirty = rate(a.seconds, |_| {
            let bs = o
                .block_status(0, size, &dirty, MAX_EXTENTS)
                .expect("block status");
            extents = bs.extents[0].len();
            covered = bs.extents[0].iter().map(|e| e.len).sum();
        });
        let full_all = rate(a.seconds, |_| {
            let bs = s
                .block_status(0, size, &all, MAX_EXTENTS)
                .expect("block status");
            std::hint::black_box(bs.extents.len());
        });
        // NBD requests are at most 4 GiB: random ones all over the export.
        let step = (4u64 << 30) - 4096;
        let random_nbd = rate(a.seconds, |i| {
            let off = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % (size / 4096)) * 4096;
            let len = step.min(size - off);
            let bs = o
                .block_status(off, len, &dirty, MAX_EXTENTS)
                .expect("block status");
            std::hint::black_box(bs.extents.len());
        });
        let rss_end = max_rss_kib();
        // Reference: one walk over every run of the same table (what an
        // uncapped full-range answer would cost at the least).
        let mut table = ExceptionTable::new();
        table.bulk_load(snap.exceptions());
        let scan = rate(a.seconds, |_| {
            std::hint::black_box(table.runs().map(|r| r.len ^ r.old_chunk.0).sum::<u64>());
        });
        drop(table);
        let _ = rss0;
        Ok(json!({
            "exceptions": a.exceptions,
            "size": size,
            "load_s": load_s,
            "max_extents": MAX_EXTENTS,
            "full_range_extents": extents,
            "full_range_covered_bytes": covered,
            "full_range_dirty_rps": full_dirty,
            "full_range_three_contexts_rps": full_all,
            "random_4g_dirty_rps": random_nbd,
            "table_scan_rps": scan,
            "rss_after_load_kib": rss_loaded,
            "rss_after_queries_kib": rss_end,
            "rss_growth_during_queries_kib": rss_end.saturating_sub(rss_loaded),
        }))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A fresh directory under `base` (removed by the caller).
fn tempfile_dir(base: &std::path::Path) -> Result<PathBuf> {
    let d = base.join(format!("dmsnap-bench-bs-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
