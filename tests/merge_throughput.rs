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
