//! Power loss at every write/flush of a merge, then resume from the durable
//! images: the origin ends equal to the merged snapshot's content, and the
//! other snapshot (which gets exceptions triggered by the merge's origin
//! writes) keeps its content at every cut.
//!
//! The merged snapshot has two metadata areas of records in runs of many
//! lengths; the merge runs once as one batch spanning both areas (the
//! default limit), once in batches of at most 50 chunks (batch ends
//! inside areas and one batch across the area boundary), and once in
//! batches of 20 with slow origin flushes, so that the next batch's copies
//! (pipelined) run while the previous batch is made durable.

mod common;

use common::{fill, read_all};
use dmsnap::device::Device;
use dmsnap::io::testing::{CrashDev, CrashGroup};
use dmsnap::io::{BlockDev, DevRef, MemDev, WriteFlags};
use dmsnap::snap::Origin;
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const ORIGIN: u64 = 1536 * 1024;
const COW: u64 = 4 << 20;

fn raw_all(d: &DevRef) -> Vec<u8> {
    let mut b = vec![0; d.len() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

struct Images {
    origin: Vec<u8>,
    cow_a: Vec<u8>,
    cow_b: Vec<u8>,
    content_a: Vec<u8>,
    content_b: Vec<u8>,
}

/// Origin + snapshot `a` (4 KiB chunks, runs and scattered exceptions from
/// origin and snapshot writes) + snapshot `b` (16 KiB chunks, taken later).
fn build() -> Images {
    let origin_dev = Arc::new(MemDev::from_vec(fill(1, ORIGIN as usize)));
    let cow_a = Arc::new(MemDev::new(COW));
    let cow_b = Arc::new(MemDev::new(COW));
    let o = Origin::new(origin_dev.clone() as DevRef);
    let a = o
        .add_snapshot(
            "a",
            cow_a.clone() as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let mut r = 99u64;
    let mut next = move || {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        r >> 33
    };
    // Sequential runs of several lengths (one I/O each to merge; the
    // longest straddles the end of area 0), then scattered writes.
    o.write_at(&fill(2, 64 * 1024), 128 * 1024, false).unwrap();
    a.write_at(&fill(3, 32 * 1024), 300 * 1024, false).unwrap();
    let mut at = 400 * 1024;
    for (j, chunks) in [3u64, 40, 7, 100, 2, 60, 1, 25].into_iter().enumerate() {
        o.write_at(&fill(4 + j as u64, (chunks * 4096) as usize), at, false)
            .unwrap();
        at += (chunks + 1 + j as u64 % 3) * 4096;
    }
    for i in 0..40 {
        let off = next() % (ORIGIN - 5000);
        let len = 1 + (next() % 5000) as usize;
        if i % 3 == 0 {
            a.write_at(&fill(10 + i, len), off, false).unwrap();
        } else {
            o.write_at(&fill(10 + i, len), off, false).unwrap();
        }
    }
    let b = o
        .add_snapshot(
            "b",
            cow_b.clone() as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::from_sectors(32).unwrap()),
        )
        .unwrap();
    for i in 0..10 {
        let off = next() % (ORIGIN - 5000);
        b.write_at(&fill(100 + i, 3000), off, false).unwrap();
    }
    o.sync().unwrap();
    assert!(
        a.nr_exceptions() > 256,
        "the merged snapshot's records fill more than one area ({})",
        a.nr_exceptions()
    );
    Images {
        content_a: read_all(&*a),
        content_b: read_all(&*b),
        origin: origin_dev.snapshot(),
        cow_a: cow_a.snapshot(),
        cow_b: cow_b.snapshot(),
    }
}

/// Counts the flushes of the device it wraps (the merge's origin flushes:
/// one per batch). With `slow`, writes and flushes take a while (a flush
/// before and after the flush itself), so the next batch's copies, running
/// meanwhile, land on both sides of it; `overlapped` counts writes that
/// ran during a flush.
struct CountFlushes<D> {
    dev: Arc<D>,
    flushes: AtomicU64,
    slow: bool,
    in_flush: AtomicBool,
    overlapped: AtomicU64,
}

impl<D: BlockDev> BlockDev for CountFlushes<D> {
    fn len(&self) -> u64 {
        self.dev.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> std::io::Result<()> {
        if self.slow {
            std::thread::sleep(Duration::from_micros(200));
        }
        if self.in_flush.load(Ordering::SeqCst) {
            self.overlapped.fetch_add(1, Ordering::Relaxed);
        }
        self.dev.write_at(buf, offset, flags)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if !self.slow {
            return self.dev.flush();
        }
        self.in_flush.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(500));
        let r = self.dev.flush();
        std::thread::sleep(Duration::from_micros(500));
        self.in_flush.store(false, Ordering::SeqCst);
        r
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.dev.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> std::io::Result<()> {
        self.dev.write_zeroes(offset, len, flags)
    }
}

#[test]
fn merge_in_one_batch_across_areas_resumes_after_a_crash_at_every_write_and_flush() {
    let (batches, _) = crash_at_every_op(None, false);
    assert_eq!(batches, 1, "the whole merge is one batch over both areas");
}

#[test]
fn merge_in_batches_of_50_resumes_after_a_crash_at_every_write_and_flush() {
    let (batches, _) = crash_at_every_op(Some(50), false);
    assert!(batches > 5, "{batches} batches");
}

/// The pipeline: a batch is copied back while the one before it is made
/// durable (origin flush, then its records cleared). With slow origin
/// flushes the next batch's origin writes land before, during and after
/// the previous batch's flush and before its records are cleared; a power
/// cut at any op still resumes to the snapshot, `b` unchanged.
#[test]
fn pipelined_merge_resumes_after_a_crash_at_every_write_and_flush() {
    let (batches, overlapped) = crash_at_every_op(Some(20), true);
    assert!(batches >= 8, "{batches} batches");
    assert!(
        overlapped >= 5,
        "{overlapped} copies ran while the previous batch was being flushed"
    );
}

/// Cut the power at every write/flush of the merge (batch limit `batch`,
/// slow origin flushes with `slow`), resume from the durable images each
/// time. Returns the number of batches (origin flushes) of the uncut merge
/// and how many of its origin writes ran during an origin flush.
fn crash_at_every_op(batch: Option<u64>, slow: bool) -> (u64, u64) {
    let img = build();
    let mut total = None;
    let mut batches = 0;
    let mut overlapped = 0;
    let mut k = 0;
    loop {
        let g = CrashGroup::new();
        let od = g.device(img.origin.clone());
        let ca = g.device(img.cow_a.clone());
        let cb = g.device(img.cow_b.clone());
        let counted = Arc::new(CountFlushes {
            dev: od.clone(),
            flushes: AtomicU64::new(0),
            slow,
            in_flush: AtomicBool::new(false),
            overlapped: AtomicU64::new(0),
        });
        let o = Origin::new(counted.clone() as DevRef);
        o.set_merge_batch_chunks(batch);
        o.add_snapshot("a", ca.clone() as DevRef, StoreType::Persistent, None)
            .unwrap();
        let b = o
            .add_snapshot("b", cb.clone() as DevRef, StoreType::Persistent, None)
            .unwrap();
        let base = g.ops();
        if total.is_some() {
            g.crash_after(base + k);
        }
        o.start_merge("a").unwrap();
        let res = o.wait_merge();
        match total {
            None => {
                res.unwrap();
                assert!(read_all(&*o) == img.content_a);
                assert!(read_all(&*b) == img.content_b);
                total = Some(g.ops() - base);
                batches = counted.flushes.load(Ordering::Relaxed);
                overlapped = counted.overlapped.load(Ordering::Relaxed);
                println!(
                    "batch limit {batch:?}: merge write/flush ops: {}, batches: {batches}, \
                     origin writes during a flush: {overlapped}",
                    g.ops() - base
                );
                continue;
            }
            Some(t) => {
                assert!(
                    res.is_err() || k >= t,
                    "cut {k}: the merge must fail after a power cut"
                );
            }
        }
        o.stop_merge();
        // Resume from what survived: the durable images, and at every
        // other cut also the first half of each device's cached writes (a
        // disk may persist some of its cache before power goes).
        let survived = |d: &CrashDev| {
            if k % 2 == 1 {
                d.crash_keeping(d.unflushed_writes() / 2)
            } else {
                d.crash()
            }
        };
        let o2 = Origin::new(Arc::new(MemDev::from_vec(survived(&od))));
        o2.add_snapshot(
            "a",
            Arc::new(MemDev::from_vec(survived(&ca))) as DevRef,
            StoreType::Persistent,
            None,
        )
        .unwrap_or_else(|e| panic!("cut {k}: reopening a: {e}"));
        let b2 = o2
            .add_snapshot(
                "b",
                Arc::new(MemDev::from_vec(survived(&cb))) as DevRef,
                StoreType::Persistent,
                None,
            )
            .unwrap_or_else(|e| panic!("cut {k}: reopening b: {e}"));
        assert!(
            read_all(&*b2) == img.content_b,
            "cut {k}: snapshot b changed"
        );
        o2.set_merge_batch_chunks(batch);
        o2.start_merge("a").unwrap();
        assert!(
            read_all(&*o2) == img.content_a,
            "cut {k}: the origin does not show a while merging"
        );
        o2.wait_merge()
            .unwrap_or_else(|e| panic!("cut {k}: resumed merge: {e}"));
        assert!(raw_all(o2.dev()) == img.content_a, "cut {k}: merged origin");
        assert!(
            read_all(&*b2) == img.content_b,
            "cut {k}: snapshot b changed after the merge"
        );
        k += 1;
        if k > total.unwrap() {
            break;
        }
    }
    (batches, overlapped)
}
