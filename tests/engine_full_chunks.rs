//! Whole-chunk snapshot writes skip the origin read (kernel a6e50b40) and,
//! when a long write gets consecutive COW chunks, reach the COW as one write
//! per run rather than one per chunk. The data and the records stay exactly
//! what chunk-by-chunk writing gives.

use dmsnap::device::Device;
use dmsnap::io::{BlockDev, DevRef, MemDev, WriteFlags};
use dmsnap::snap::Origin;
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts data writes of at least one chunk, and origin reads.
struct Counting {
    inner: MemDev,
    big_writes: AtomicU64,
    reads: AtomicU64,
}

impl BlockDev for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()> {
        if buf.len() > 4096 {
            self.big_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.write_at(buf, offset, flags)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

fn counting(len: u64) -> Arc<Counting> {
    Arc::new(Counting {
        inner: MemDev::new(len),
        big_writes: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    })
}

#[test]
fn a_long_aligned_snapshot_write_is_one_cow_write_per_run_and_no_origin_read() {
    const MIB: u64 = 1 << 20;
    let origin = counting(8 * MIB);
    let cow = counting(16 * MIB);
    let o = Origin::new(origin.clone() as DevRef);
    let s = o
        .add_snapshot(
            "s",
            cow.clone() as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let data: Vec<u8> = (0..MIB as u32 + 8192).map(|i| (i * 7 + 3) as u8).collect();
    // 1 MiB + 8 KiB at a chunk boundary: 258 whole chunks. Allocation starts at
    // chunk 2 and skips the metadata chunk 258, so the COW chunks form two runs.
    let reads_before = origin.reads.load(Ordering::Relaxed);
    s.write_at(&data, 4096 * 10, false).unwrap();
    assert_eq!(
        origin.reads.load(Ordering::Relaxed),
        reads_before,
        "whole chunks never read the origin"
    );
    assert_eq!(
        cow.big_writes.load(Ordering::Relaxed),
        2,
        "one COW write per run of consecutive chunks"
    );
    let mut back = vec![0u8; data.len()];
    s.read_at(&mut back, 4096 * 10).unwrap();
    assert!(back == data, "the snapshot reads back what was written");
    let mut o_back = vec![1u8; data.len()];
    o.read_at(&mut o_back, 4096 * 10).unwrap();
    assert!(o_back.iter().all(|&b| b == 0), "the origin is untouched");
    assert_eq!(s.nr_exceptions(), 258);

    // Reload from the COW: the records map every chunk to where its data is.
    o.sync().unwrap();
    o.remove_snapshot("s").unwrap();
    let o2 = Origin::new(origin.clone() as DevRef);
    let s2 = o2
        .add_snapshot("s", cow.clone() as DevRef, StoreType::Persistent, None)
        .unwrap();
    let mut back = vec![0u8; data.len()];
    s2.read_at(&mut back, 4096 * 10).unwrap();
    assert!(
        back == data,
        "after a reload the snapshot still reads the data"
    );
}
