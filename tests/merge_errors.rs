//! An I/O error during a merge stops it with `Merge failed` and loses
//! nothing: the snapshot's exceptions stay in its store, other snapshots keep
//! their content, and once the device works again the merge can be resumed
//! to the end.

mod common;

use common::{read_all, stamp};
use dmsnap::device::Device;
use dmsnap::io::testing::{Fault, FaultyDev, OpKind};
use dmsnap::io::{BlockDev, DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

const ORIGIN: u64 = 1 << 20;
const CHUNK: u64 = 4096;

#[test]
fn origin_write_error_fails_the_merge_and_loses_nothing() {
    let base = MemDev::new(ORIGIN);
    for c in 0..ORIGIN / CHUNK {
        base.write_at(&stamp(1, c), c * CHUNK, Default::default())
            .unwrap();
    }
    let origin_dev = Arc::new(FaultyDev::new(base));
    let o = Origin::new(origin_dev.clone() as DevRef);
    let cow_s: DevRef = Arc::new(MemDev::new(4 << 20));
    let s = o
        .add_snapshot(
            "s",
            cow_s.clone(),
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let want_s = read_all(&*s);
    // Overwrite every other chunk (scattered runs), then take a second snapshot.
    for c in (0..ORIGIN / CHUNK).step_by(2) {
        o.write_at(&stamp(2, c), c * CHUNK, false).unwrap();
    }
    let other = o
        .add_snapshot(
            "other",
            Arc::new(MemDev::new(4 << 20)),
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let want_other = read_all(&*other);
    let nr_before = s.nr_exceptions();
    assert_eq!(nr_before, ORIGIN / CHUNK / 2);

    // The origin refuses writes from the second half on: the merge's copies fail there.
    origin_dev.add(Fault::Range {
        kind: OpKind::Write,
        offset: ORIGIN / 2,
        len: ORIGIN / 2,
    });
    o.start_merge("s").unwrap();
    let r = o.wait_merge();
    let st = o.merge_status().expect("merge status");
    assert!(r.is_err(), "wait_merge reports the failure");
    assert!(st.failed.is_some() && !st.done, "{st:?}");
    assert_eq!(s.status().state, SnapState::MergeFailed);
    assert_eq!(s.status().dm_status(), "Merge failed");
    assert!(origin_dev.injected() > 0);

    // Nothing lost: the failed run's records are still in the store, the
    // other snapshot still reads as it did.
    assert!(s.nr_exceptions() > 0 && s.nr_exceptions() <= nr_before);
    assert_eq!(
        read_all(&*other),
        want_other,
        "the other snapshot kept its content"
    );

    // The device recovers; the merge resumes from its on-disk state and finishes.
    origin_dev.clear();
    o.stop_merge();
    o.start_merge("s").unwrap();
    o.wait_merge().unwrap();
    assert!(o.merge_status().unwrap().done);
    assert_eq!(
        read_all(&*o),
        want_s,
        "the origin equals the snapshot's content"
    );
    assert_eq!(
        read_all(&*other),
        want_other,
        "the other snapshot still kept its content"
    );
}
