//! Metadata load benchmark: `PersistentStore::open` + `read_metadata` of a
//! COW file with `N` exceptions (4 KiB chunks, scattered distinct
//! old_chunks), against the reference: a sequential read, 1 MiB at a time,
//! of a second file holding the same bytes (the header chunk and every
//! metadata area, back to back). Both files' page cache is dropped before
//! each timed run (fsync, then `posix_fadvise(DONTNEED)`). Run in two
//! modes: through the page cache, and with O_DIRECT for both sides.
//!
//! The ratio `reference / load` says how close loading comes to
//! sequential-read speed (1.0 = as fast; the goal is at least 0.8).

use crate::format::{
    area_location, encode_area, exceptions_per_area, metadata_chunks_for, skip_metadata,
    DiskException, DiskHeader,
};
use crate::io::{FileDev, OpenOptions};
use crate::store::{ExceptionStore, PersistentStore, StoreError};
use crate::units::{Chunk, ChunkSize};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes per reference read.
const REFERENCE_READ: usize = 1 << 20;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadBenchError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the benchmark store")]
    Store(#[source] StoreError),
    #[error("the store loaded {loaded} exceptions, {expected} were written")]
    Mismatch { loaded: u64, expected: u64 },
    #[error("a benchmark needs at least one exception and one run")]
    Empty,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoadBenchError + 'a {
    move |source| LoadBenchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Timings of one I/O mode.
#[derive(Debug, Clone)]
pub struct ModeReport {
    /// `"buffered"` or `"O_DIRECT"`.
    pub mode: &'static str,
    /// Every timed load (open + read_metadata), in run order.
    pub loads: Vec<Duration>,
    /// Every timed reference read, in run order.
    pub references: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

impl ModeReport {
    pub fn load_median(&self) -> Duration {
        median(&self.loads)
    }
    pub fn reference_median(&self) -> Duration {
        median(&self.references)
    }
    /// `reference / load` of the medians.
    pub fn ratio(&self) -> f64 {
        let l = self.load_median().as_secs_f64();
        if l == 0.0 {
            return 0.0;
        }
        self.reference_median().as_secs_f64() / l
    }
}

/// The benchmark's result.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub exceptions: u64,
    pub chunk_size: ChunkSize,
    /// Metadata areas the loader reads (the last one partial or empty).
    pub areas: u64,
    /// Bytes of the reference file (header + areas).
    pub metadata_bytes: u64,
    pub runs: usize,
    pub modes: Vec<ModeReport>,
}

impl LoadReport {
    /// The median load time divided by the areas read.
    pub fn per_area(&self, m: &ModeReport) -> Duration {
        m.load_median() / self.areas.max(1) as u32
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "metadata load: {} exceptions, {} chunks, {} areas ({}), median of {} run(s), cold cache",
            self.exceptions,
            self.chunk_size,
            self.areas,
            crate::units::human_bytes(self.metadata_bytes),
            self.runs
        )?;
        writeln!(
            f,
            "{:<10} {:>10} {:>10} {:>9} {:>16} {:>6}",
            "mode", "load", "per area", "areas/s", "sequential read", "ratio"
        )?;
        for m in &self.modes {
            writeln!(
                f,
                "{:<10} {:>10} {:>10} {:>9.0} {:>16} {:>6.2}",
                m.mode,
                ms(m.load_median()),
                format!("{:.1} µs", self.per_area(m).as_secs_f64() * 1e6),
                self.areas as f64 / m.load_median().as_secs_f64().max(1e-9),
                ms(m.reference_median()),
                m.ratio()
            )?;
        }
        Ok(())
    }
}

/// The benchmark store's exceptions: new chunks in allocation order,
/// old chunks scattered and distinct (an odd multiplier is a bijection
/// modulo 2^40).
fn exceptions(cs: ChunkSize, n: u64) -> impl Iterator<Item = DiskException> {
    let mut next_free = Chunk(2);
    (0..n).map(move |i| {
        let e = DiskException {
            old_chunk: Chunk(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & ((1 << 40) - 1)),
            new_chunk: next_free,
        };
        next_free = skip_metadata(cs, Chunk(next_free.0 + 1));
        e
    })
}

/// Write the COW file (sparse data chunks) and the reference file.
fn build(cow: &Path, reference: &Path, cs: ChunkSize, n: u64) -> Result<u64, LoadBenchError> {
    let e = exceptions_per_area(cs);
    let areas = metadata_chunks_for(cs, n);
    let cow_len = (1 + n + areas) * cs.bytes();
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .map_err(io_err("creating", p))
    };
    let cf = create(cow)?;
    cf.set_len(cow_len).map_err(io_err("sizing", cow))?;
    let rf = create(reference)?;
    let header = DiskHeader {
        valid: true,
        chunk_size: cs,
    }
    .encode_chunk();
    cf.write_all_at(&header, 0)
        .map_err(io_err("writing", cow))?;
    let mut refbuf = header;
    let mut all = exceptions(cs, n);
    let mut ref_off = 0u64;
    for a in 0..areas {
        let recs: Vec<DiskException> = all.by_ref().take(e as usize).collect();
        let buf = encode_area(&recs, cs.bytes() as usize);
        cf.write_all_at(&buf, cs.chunk_to_byte(area_location(cs, a)))
            .map_err(io_err("writing", cow))?;
        refbuf.extend_from_slice(&buf);
        if refbuf.len() >= 8 << 20 || a + 1 == areas {
            rf.write_all_at(&refbuf, ref_off)
                .map_err(io_err("writing", reference))?;
            ref_off += refbuf.len() as u64;
            refbuf.clear();
        }
    }
    cf.sync_all().map_err(io_err("syncing", cow))?;
    rf.sync_all().map_err(io_err("syncing", reference))?;
    Ok(areas)
}

/// Write back and evict a file's cached pages.
fn drop_cache(p: &Path) -> Result<(), LoadBenchError> {
    let f = File::open(p).map_err(io_err("opening", p))?;
    f.sync_all().map_err(io_err("syncing", p))?;
    // SAFETY: plain syscall on a valid fd with integer arguments.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(LoadBenchError::Io {
            what: "dropping the page cache of",
            path: p.to_path_buf(),
            source: io::Error::from_raw_os_error(r),
        });
    }
    Ok(())
}

fn time_load(cow: &Path, direct: bool, n: u64) -> Result<Duration, LoadBenchError> {
    let t = Instant::now();
    let dev = FileDev::open(
        cow,
        OpenOptions {
            read_only: true,
            direct,
        },
    )
    .map_err(io_err("opening", cow))?;
    let mut s = PersistentStore::open(Arc::new(dev), None, false).map_err(LoadBenchError::Store)?;
    // Reserved: the benchmark times the load, not the Vec's growth.
    let mut v = Vec::with_capacity(n as usize);
    s.read_metadata(&mut |e| v.push(e))
        .map_err(LoadBenchError::Store)?;
    let d = t.elapsed();
    if v.len() as u64 != n {
        return Err(LoadBenchError::Mismatch {
            loaded: v.len() as u64,
            expected: n,
        });
    }
    Ok(d)
}

fn time_reference(p: &Path, direct: bool) -> Result<Duration, LoadBenchError> {
    let t = Instant::now();
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let mut f = o.open(p).map_err(io_err("opening", p))?;
    // An aligned 1 MiB window of a slightly larger buffer (O_DIRECT).
    let mut raw = vec![0u8; REFERENCE_READ + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = raw
        .get_mut(off..off + REFERENCE_READ)
        .ok_or(LoadBenchError::Empty)?;
    let mut total = 0u64;
    loop {
        let got = f.read(buf).map_err(io_err("reading", p))?;
        if got == 0 {
            break;
        }
        total += got as u64;
    }
    let d = t.elapsed();
    std::hint::black_box(total);
    Ok(d)
}

/// Build a COW file with `exceptions` exceptions in `dir` and time its load
/// `runs` times per mode (page cache, O_DIRECT), each from a cold cache.
/// The files are removed afterwards.
pub fn run_load_bench(
    dir: &Path,
    exceptions: u64,
    runs: usize,
) -> Result<LoadReport, LoadBenchError> {
    run_load_bench_with(dir, exceptions, runs, ChunkSize::DEFAULT)
}

/// [`run_load_bench`] with another chunk size (bigger chunks: fewer, larger
/// metadata areas for the same number of exceptions).
pub fn run_load_bench_with(
    dir: &Path,
    exceptions: u64,
    runs: usize,
    cs: ChunkSize,
) -> Result<LoadReport, LoadBenchError> {
    if exceptions == 0 || runs == 0 {
        return Err(LoadBenchError::Empty);
    }
    let cow = dir.join(format!("dmsnap-load-bench-{}.cow", std::process::id()));
    let reference = dir.join(format!("dmsnap-load-bench-{}.ref", std::process::id()));
    let result = (|| {
        let areas = build(&cow, &reference, cs, exceptions)?;
        let metadata_bytes = (1 + areas) * cs.bytes();
        let mut modes = Vec::new();
        for (mode, direct) in [("buffered", false), ("O_DIRECT", true)] {
            let mut m = ModeReport {
                mode,
                loads: Vec::new(),
                references: Vec::new(),
            };
            for _ in 0..runs {
                drop_cache(&cow)?;
                m.loads.push(time_load(&cow, direct, exceptions)?);
                drop_cache(&reference)?;
                m.references.push(time_reference(&reference, direct)?);
            }
            modes.push(m);
        }
        Ok(LoadReport {
            exceptions,
            chunk_size: cs,
            areas,
            metadata_bytes,
            runs,
            modes,
        })
    })();
    let _ = std::fs::remove_file(&cow);
    let _ = std::fs::remove_file(&reference);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_bench_smoke() {
        // Not /tmp: O_DIRECT fails on tmpfs.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let r = run_load_bench(dir.path(), 10_000, 1).unwrap();
        assert_eq!(r.areas, 40);
        assert_eq!(r.metadata_bytes, 41 * 4096);
        assert_eq!(r.modes.len(), 2);
        for m in &r.modes {
            assert!(m.load_median() > Duration::ZERO);
            assert!(m.ratio() > 0.0);
        }
        let table = r.to_string();
        assert!(table.contains("10000 exceptions"), "{table}");
        assert!(table.contains("O_DIRECT"), "{table}");
    }

    /// `DMSNAP_LOAD_BENCH_N=1000000 cargo test --release --lib load_bench_full -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: builds a large sparse COW and drops caches"]
    fn load_bench_full() {
        let n = std::env::var("DMSNAP_LOAD_BENCH_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        let dir = std::env::var_os("DMSNAP_LOAD_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let r = run_load_bench(&dir, n, 5).unwrap();
        println!("{r}");
        let r = run_load_bench_with(&dir, n, 5, ChunkSize::from_sectors(128).unwrap()).unwrap();
        println!("{r}");
    }
}
