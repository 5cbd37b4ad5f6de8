//! Throughput figures on files (run by hand; prints MB/s):
//! `cargo test --release --test merge_throughput -- --ignored --nocapture`.
//! - snapshot writes of whole chunks (skip the origin read),
//! - first-touch origin writes with one snapshot (copy + commit before the write),
//! - merging 256 MiB of sequential exceptions, against a plain copy of the
//!   same bytes (read 1 MiB, write 1 MiB, fsync at the end).

use dmsnap::device::Device;
use dmsnap::io::{BlockDev, DevRef, FileDev, OpenOptions, WriteFlags};
use dmsnap::snap::Origin;
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;
use std::time::Instant;

const SIZE: u64 = 256 << 20;
const IO: usize = 1 << 20;

fn mbps(bytes: u64, t: std::time::Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

#[test]
#[ignore = "benchmark on files: run by hand with --ignored --nocapture"]
fn merge_and_write_throughput_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions::default();
    let origin_dev: DevRef =
        Arc::new(FileDev::create_sparse(&dir.path().join("origin"), SIZE, opts).unwrap());
    let cs = ChunkSize::DEFAULT;
    let cow_len = dmsnap::format::cow_size_for_origin(cs, SIZE);
    let cow: DevRef =
        Arc::new(FileDev::create_sparse(&dir.path().join("cow"), cow_len, opts).unwrap());
    let data: Vec<u8> = (0..IO).map(|i| (i % 251) as u8).collect();
    // Fill the origin (no snapshot yet).
    let o = Origin::new(origin_dev.clone());
    for off in (0..SIZE).step_by(IO) {
        o.write_at(&data, off, false).unwrap();
    }
    o.flush().unwrap();

    let s = o
        .add_snapshot("s", cow.clone(), StoreType::Persistent, Some(cs))
        .unwrap();
    // Snapshot writes, whole chunks: no origin reads.
    let t = Instant::now();
    let d2: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    for off in (0..SIZE / 2).step_by(IO) {
        s.write_at(&d2, off, false).unwrap();
    }
    s.flush().unwrap();
    println!(
        "snapshot full-chunk writes: {:.0} MB/s (4 KiB chunks, 1 MiB writes)",
        mbps(SIZE / 2, t.elapsed())
    );
    // First-touch origin writes: copy + commit before each write.
    let t = Instant::now();
    for off in (SIZE / 2..SIZE).step_by(IO) {
        o.write_at(&data, off, false).unwrap();
    }
    o.flush().unwrap();
    println!(
        "first-touch origin writes with a snapshot: {:.0} MB/s",
        mbps(SIZE / 2, t.elapsed())
    );
    let t = Instant::now();
    for off in (SIZE / 2..SIZE).step_by(IO) {
        o.write_at(&data, off, false).unwrap();
    }
    o.flush().unwrap();
    println!(
        "origin rewrites (exceptions exist): {:.0} MB/s",
        mbps(SIZE / 2, t.elapsed())
    );
    assert_eq!(s.nr_exceptions(), SIZE / cs.bytes());

    // Merge 256 MiB of sequential exceptions.
    let t = Instant::now();
    o.start_merge("s").unwrap();
    o.wait_merge().unwrap();
    let merge_t = t.elapsed();
    println!(
        "merge of {} MiB sequential exceptions: {:.0} MB/s ({:?})",
        SIZE >> 20,
        mbps(SIZE, merge_t),
        merge_t
    );

    // Plain copy of the same bytes.
    let plain: DevRef =
        Arc::new(FileDev::create_sparse(&dir.path().join("plain"), SIZE, opts).unwrap());
    let t = Instant::now();
    let mut buf = vec![0u8; IO];
    for off in (0..SIZE).step_by(IO) {
        cow.read_at(&mut buf, off).unwrap();
        plain.write_at(&buf, off, WriteFlags::NONE).unwrap();
    }
    plain.flush().unwrap();
    println!(
        "plain copy of {} MiB (1 MiB I/O, one fsync): {:.0} MB/s",
        SIZE >> 20,
        mbps(SIZE, t.elapsed())
    );
}

/// Bytes of exceptions for [`merge_vs_plain_copy`]: `DMSNAP_BENCH_MIB` or 256 MiB.
fn bench_bytes() -> u64 {
    std::env::var("DMSNAP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(256)
        << 20
}

/// A COW on `dir/cow` holding one exception for every chunk of an origin of
/// `size` bytes, written straight through the store (fast: one area write
/// per 256 records). `scattered`: the old chunks in a shuffled order, so
/// every run is one chunk long (new chunks stay consecutive).
fn build_cow(dir: &std::path::Path, size: u64, scattered: bool) -> (DevRef, DevRef) {
    use dmsnap::format::DiskException;
    use dmsnap::store::{ExceptionStore, PersistentStore};
    use dmsnap::units::Chunk;
    let opts = OpenOptions::default();
    let cs = ChunkSize::DEFAULT;
    let _ = std::fs::remove_file(dir.join("origin"));
    let _ = std::fs::remove_file(dir.join("cow"));
    let origin: DevRef = Arc::new(FileDev::create_sparse(&dir.join("origin"), size, opts).unwrap());
    let ones = vec![0xa5u8; IO];
    for off in (0..size).step_by(IO) {
        origin.write_at(&ones, off, WriteFlags::NONE).unwrap();
    }
    let cow_len = dmsnap::format::cow_size_for_origin(cs, size);
    let cow: DevRef = Arc::new(FileDev::create_sparse(&dir.join("cow"), cow_len, opts).unwrap());
    let n = size / cs.bytes();
    let mut olds: Vec<u64> = (0..n).collect();
    if scattered {
        let mut r = 12345u64;
        for i in (1..olds.len()).rev() {
            r = r
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            olds.swap(i, (r >> 33) as usize % (i + 1));
        }
    }
    let mut st = PersistentStore::open(cow.clone(), Some(cs), false).unwrap();
    let news: Vec<Chunk> = (0..n).map(|_| st.prepare_exception().unwrap()).collect();
    let mut chunk = vec![0u8; cs.bytes() as usize];
    for (&old, &new) in olds.iter().zip(&news) {
        chunk.fill(old as u8);
        chunk[..8].copy_from_slice(&old.to_le_bytes());
        cow.write_at(&chunk, cs.chunk_to_byte(new), WriteFlags::NONE)
            .unwrap();
        let e = DiskException {
            old_chunk: Chunk(old),
            new_chunk: new,
        };
        st.record_exception(e, true).unwrap();
        if st.has_full_areas() {
            st.sync_inline().unwrap();
        }
    }
    st.sync_inline().unwrap();
    drop(st);
    origin.flush().unwrap();
    cow.flush().unwrap();
    (origin, cow)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Merge throughput against a plain copy of the same bytes (read 1 MiB,
/// write 1 MiB, one fsync), sequential and scattered exceptions, medians
/// of 3 (each merge timed against a plain copy right after it):
/// `cargo test --release --test merge_throughput merge_vs_plain_copy -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark on files: run by hand with --ignored --nocapture"]
fn merge_vs_plain_copy() {
    let size = bench_bytes();
    let dir = tempfile::tempdir().unwrap();
    let cs = ChunkSize::DEFAULT;
    // DMSNAP_BENCH_KIND=sequential|scattered runs only that one.
    let only = std::env::var("DMSNAP_BENCH_KIND").ok();
    for scattered in [false, true] {
        let kind = if scattered { "scattered" } else { "sequential" };
        if only.as_deref().is_some_and(|k| k != kind) {
            continue;
        }
        let (mut merges, mut plains, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..3 {
            let (origin_dev, cow) = build_cow(dir.path(), size, scattered);
            let o = Origin::new(origin_dev.clone());
            let s = o
                .add_snapshot("s", cow.clone(), StoreType::Persistent, None)
                .unwrap();
            assert_eq!(s.nr_exceptions(), size / cs.bytes());
            let t = Instant::now();
            o.start_merge("s").unwrap();
            o.wait_merge().unwrap();
            let merge = mbps(size, t.elapsed());
            // Spot check: every 97th chunk came back from the COW.
            let mut b = vec![0u8; 8];
            for c in (0..size / cs.bytes()).step_by(97) {
                origin_dev.read_at(&mut b, c * cs.bytes()).unwrap();
                assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), c);
            }
            drop(o);
            let _ = std::fs::remove_file(dir.path().join("plain"));
            let plain: DevRef = Arc::new(
                FileDev::create_sparse(&dir.path().join("plain"), size, OpenOptions::default())
                    .unwrap(),
            );
            let t = Instant::now();
            let mut buf = vec![0u8; IO];
            for off in (0..size).step_by(IO) {
                cow.read_at(&mut buf, off).unwrap();
                plain.write_at(&buf, off, WriteFlags::NONE).unwrap();
            }
            plain.flush().unwrap();
            let p = mbps(size, t.elapsed());
            println!(
                "{kind} rep {rep}: merge {merge:.0} MB/s, plain copy {p:.0} MB/s, ratio {:.2}",
                merge / p
            );
            merges.push(merge);
            plains.push(p);
            ratios.push(merge / p);
        }
        println!(
            "{kind} {} MiB, median of 3: merge {:.0} MB/s, plain copy {:.0} MB/s, ratio {:.2}",
            size >> 20,
            median(merges),
            median(plains),
            median(ratios)
        );
    }
}
