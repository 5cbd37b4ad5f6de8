//! When a snapshot's new exception becomes durable, and what a power cut
//! leaves, in both commit modes (`Origin::set_durable_snapshot_writes`):
//! - deferred (default): a first write to a snapshot chunk is acknowledged
//!   before its COW record is on disk; FLUSH/FUA (or a flush of the origin)
//!   makes it durable; until then a crash may lose it, like any unflushed
//!   write, and nothing else;
//! - durable: it is acknowledged only once its record is durable (kernel);
//! - in both, an origin write never reaches the origin before the records
//!   of the chunks it overwrites are durable.

mod common;

use common::{fill, CountFlushes};
use dmsnap::device::Device;
use dmsnap::io::testing::{CrashDev, CrashGroup};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, Snapshot};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

const ORIGIN: usize = 256 * 1024;
const COW: usize = 1 << 20;
const CHUNK: usize = 4096;

struct Rig {
    origin_dev: Arc<CrashDev>,
    cow: Arc<CrashDev>,
    origin: Arc<Origin>,
    snap: Arc<Snapshot>,
    init: Vec<u8>,
}

fn rig(durable: bool) -> Rig {
    let g = CrashGroup::new();
    let init = fill(5, ORIGIN);
    let origin_dev = g.device(init.clone());
    let cow = g.device(vec![0; COW]);
    let origin = Origin::new(origin_dev.clone() as DevRef);
    origin.set_durable_snapshot_writes(durable);
    let snap = origin
        .add_snapshot(
            "s",
            cow.clone() as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    Rig {
        origin_dev,
        cow,
        origin,
        snap,
        init,
    }
}

/// The origin and snapshot contents reopened from what a power cut left
/// (`keep` of each device's unflushed writes survive, in order).
fn after_crash(r: &Rig, keep: usize) -> (Vec<u8>, Vec<u8>) {
    let origin_img = r.origin_dev.crash_keeping(keep);
    let cow_img = r.cow.crash_keeping(keep);
    let o = Origin::new(Arc::new(MemDev::from_vec(origin_img.clone())));
    let s = o
        .add_snapshot(
            "s",
            Arc::new(MemDev::from_vec(cow_img)) as DevRef,
            StoreType::Persistent,
            None,
        )
        .unwrap();
    let mut b = vec![0; ORIGIN];
    s.read_at(&mut b, 0).unwrap();
    (origin_img, b)
}

fn chunk(b: &[u8], c: usize) -> &[u8] {
    &b[c * CHUNK..(c + 1) * CHUNK]
}

#[test]
fn deferred_first_write_is_durable_after_flush_and_only_lost_before() {
    let data = fill(9, CHUNK);
    // Acknowledged, not flushed: a crash may lose it, and only it.
    let r = rig(false);
    r.snap.write_at(&data, 3 * CHUNK as u64, false).unwrap();
    for keep in [0, usize::MAX] {
        let (_, snap) = after_crash(&r, keep);
        assert_eq!(
            chunk(&snap, 3),
            chunk(&r.init, 3),
            "keep {keep}: the record never reached the disk"
        );
        assert_eq!(&snap[..3 * CHUNK], &r.init[..3 * CHUNK]);
        assert_eq!(&snap[4 * CHUNK..], &r.init[4 * CHUNK..]);
    }
    // FLUSH, FUA and a flush of the origin each make it durable.
    for how in ["flush", "fua", "origin flush"] {
        let r = rig(false);
        r.snap
            .write_at(&data, 3 * CHUNK as u64, how == "fua")
            .unwrap();
        match how {
            "flush" => r.snap.flush().unwrap(),
            "origin flush" => r.origin.flush().unwrap(),
            _ => {}
        }
        let (_, snap) = after_crash(&r, 0);
        assert_eq!(chunk(&snap, 3), &data[..], "{how}");
    }
}

#[test]
fn durable_mode_acknowledges_a_first_write_once_its_record_is_durable() {
    let r = rig(true);
    let data = fill(9, CHUNK);
    r.snap.write_at(&data, 3 * CHUNK as u64, false).unwrap();
    let (_, snap) = after_crash(&r, 0);
    assert_eq!(chunk(&snap, 3), &data[..]);
}

#[test]
fn origin_write_over_a_deferred_record_makes_it_durable_first() {
    for keep in [0, 1, usize::MAX] {
        let r = rig(false);
        // A partial first write: the old chunk is copied, then 512 bytes
        // change; its record is not durable yet.
        let small = fill(7, 512);
        r.snap
            .write_at(&small, 5 * CHUNK as u64 + 1024, false)
            .unwrap();
        // The origin overwrites the chunk, durably.
        let new = fill(8, CHUNK);
        r.origin.write_at(&new, 5 * CHUNK as u64, true).unwrap();
        let (origin, snap) = after_crash(&r, keep);
        assert_eq!(chunk(&origin, 5), &new[..], "keep {keep}: FUA origin write");
        // The snapshot shows its old chunk, with or without its own
        // unflushed 512 bytes — never the origin's new data.
        let got = chunk(&snap, 5);
        let old = chunk(&r.init, 5);
        assert_eq!(&got[..1024], &old[..1024], "keep {keep}");
        assert_eq!(&got[1536..], &old[1536..], "keep {keep}");
        assert!(
            got[1024..1536] == old[1024..1536] || got[1024..1536] == small[..],
            "keep {keep}: the snapshot's 512 bytes are its own or the old ones"
        );
    }
}

/// COW flushes during `writes` scattered 4 KiB first writes to a snapshot,
/// and after a final FLUSH.
fn flushes_for_first_writes(durable: bool, writes: usize) -> (u64, u64) {
    let cow = CountFlushes::new(Arc::new(MemDev::new(COW as u64)));
    let o = Origin::new(Arc::new(MemDev::from_vec(fill(1, ORIGIN))));
    o.set_durable_snapshot_writes(durable);
    let s = o
        .add_snapshot("s", cow.clone() as DevRef, StoreType::Persistent, None)
        .unwrap();
    let base = cow.flushes();
    for i in 0..writes {
        let c = (i * 37) % (ORIGIN / CHUNK);
        s.write_at(&fill(i as u64, CHUNK), (c * CHUNK) as u64, false)
            .unwrap();
    }
    let during = cow.flushes() - base;
    s.flush().unwrap();
    (during, cow.flushes() - base - during)
}

#[test]
fn deferred_first_writes_pay_no_metadata_sync_until_flush() {
    // 60 records fit in one area: no area fills, so nothing is synced.
    let (during, at_flush) = flushes_for_first_writes(false, 60);
    assert_eq!(during, 0, "no COW flush before the client's FLUSH");
    assert!(at_flush >= 1, "the FLUSH writes the records");
    // The kernel's way: every acknowledged first write waited for one.
    let (during, _) = flushes_for_first_writes(true, 60);
    assert!(
        during >= 60,
        "{during} COW flushes for 60 durable first writes"
    );
}
