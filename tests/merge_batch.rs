//! A batched merge step clears several metadata areas (highest first). A
//! write error on the lower area after the higher one was cleared fails the
//! merge and loses nothing: the same process resumes it once the device
//! works, and so does a restart from the half-cleared COW (the loader stops
//! at the cleared area; everything past it is already on the origin).
//! Also: `wait_merge_for` wakes when the merge ends.

mod common;

use common::{read_all, stamp};
use dmsnap::device::Device;
use dmsnap::io::testing::{Fault, FaultyDev, OpKind};
use dmsnap::io::{BlockDev, DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

const ORIGIN: u64 = 2 << 20;
const CHUNK: u64 = 4096;

#[test]
fn area_write_error_in_a_batch_loses_nothing_and_resumes() {
    let base = MemDev::new(ORIGIN);
    for c in 0..ORIGIN / CHUNK {
        base.write_at(&stamp(1, c), c * CHUNK, Default::default())
            .unwrap();
    }
    let origin_dev = Arc::new(base);
    let cow = Arc::new(FaultyDev::new(MemDev::new(4 << 20)));
    let o = Origin::new(origin_dev.clone() as DevRef);
    let s = o
        .add_snapshot(
            "s",
            cow.clone() as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let want = read_all(&*s);
    // Runs of 4 with gaps: 409 exceptions, areas 0 (full) and 1.
    for c in (0..ORIGIN / CHUNK).filter(|c| c % 5 != 0) {
        o.write_at(&stamp(2, c), c * CHUNK, false).unwrap();
    }
    let nr = s.nr_exceptions();
    assert_eq!(nr, 409);

    // Area 0 (chunk 1) refuses writes: area 1 is cleared, area 0 is not.
    cow.add(Fault::Range {
        kind: OpKind::Write,
        offset: CHUNK,
        len: CHUNK,
    });
    o.start_merge("s").unwrap();
    assert!(o.wait_merge().is_err());
    assert_eq!(s.status().state, SnapState::MergeFailed);
    assert_eq!(s.nr_exceptions(), nr, "nothing forgotten in memory");
    assert!(cow.injected() > 0);
    // Already on the origin, the whole batch (the failure came after the
    // origin flush).
    assert!(origin_dev.snapshot() == want);

    // A restart from these images: area 1 is cleared, area 0 loads.
    let o2 = Origin::new(Arc::new(MemDev::from_vec(origin_dev.snapshot())) as DevRef);
    let s2 = o2
        .add_snapshot(
            "s",
            Arc::new(MemDev::from_vec(cow.inner().snapshot())) as DevRef,
            StoreType::Persistent,
            None,
        )
        .unwrap();
    assert_eq!(
        s2.nr_exceptions(),
        256,
        "the loader stops at cleared area 1"
    );
    o2.start_merge("s").unwrap();
    assert!(read_all(&*o2) == want);
    o2.wait_merge().unwrap();
    let mut merged = vec![0; ORIGIN as usize];
    o2.dev().read_at(&mut merged, 0).unwrap();
    assert!(merged == want);
    assert_eq!(s2.status().dm_status(), "16/8192 16");

    // The same process, once the device works.
    cow.clear();
    o.stop_merge();
    o.start_merge("s").unwrap();
    o.wait_merge().unwrap();
    assert!(o.merge_status().unwrap().done);
    assert!(origin_dev.snapshot() == want);
    assert_eq!(s.status().dm_status(), "16/8192 16");
}

/// `wait_merge_for` (what the offline `dmsnap merge` waits with between
/// progress updates) returns when the merge ends, not when its timeout
/// runs out; with no merge it returns at once.
#[test]
fn wait_merge_for_returns_when_the_merge_ends() {
    let o = Origin::new(Arc::new(MemDev::new(ORIGIN)) as DevRef);
    let t = std::time::Instant::now();
    o.wait_merge_for(std::time::Duration::from_secs(60));
    assert!(t.elapsed().as_secs() < 30, "no merge: at once");
    let s = o
        .add_snapshot(
            "s",
            Arc::new(MemDev::new(4 << 20)) as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    for c in 0..ORIGIN / CHUNK {
        o.write_at(&stamp(3, c), c * CHUNK, false).unwrap();
    }
    let want = read_all(&*s);
    let t = std::time::Instant::now();
    o.start_merge("s").unwrap();
    o.wait_merge_for(std::time::Duration::from_secs(60));
    assert!(
        t.elapsed().as_secs() < 30,
        "woken by the end of the merge, not the timeout"
    );
    assert!(o.merge_status().unwrap().done);
    let mut merged = vec![0; ORIGIN as usize];
    o.dev().read_at(&mut merged, 0).unwrap();
    assert!(merged == want);
}
