//! I/O while a merge runs: the origin reads and writes as the merging
//! snapshot from the first moment, another snapshot keeps its content (its
//! exceptions are triggered by the merge's copies and by origin writes), and
//! at the end the origin device holds exactly the model.

mod common;

use common::{fill, read_all};
use dmsnap::device::{DevError, Device};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

const ORIGIN: u64 = 2 << 20;

#[test]
fn io_during_merge_matches_model() {
    for seed in 0..3u64 {
        once(seed);
    }
}

fn once(seed: u64) {
    let origin_dev = Arc::new(MemDev::from_vec(fill(seed + 1, ORIGIN as usize)));
    let o = Origin::new(origin_dev.clone() as DevRef);
    let a = o
        .add_snapshot(
            "a",
            Arc::new(MemDev::new(4 << 20)) as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::DEFAULT),
        )
        .unwrap();
    let mut r = seed * 7 + 3;
    let mut next = move || {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        r >> 33
    };
    // ~1000 scattered exceptions in a.
    for i in 0..400u64 {
        let off = next() % (ORIGIN - 12_000);
        let len = 1 + (next() % 12_000) as usize;
        if i % 2 == 0 {
            a.write_at(&fill(1000 + i, len), off, false).unwrap();
        } else {
            o.write_at(&fill(1000 + i, len), off, false).unwrap();
        }
    }
    let b = o
        .add_snapshot(
            "b",
            Arc::new(MemDev::new(4 << 20)) as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::from_sectors(32).unwrap()),
        )
        .unwrap();
    let mut view = read_all(&*a);
    let mut mb = read_all(&*b);
    assert!(mb == read_all(&*o));
    let total = a.nr_exceptions();

    o.start_merge("a").unwrap();
    assert!(matches!(
        o.start_merge("b"),
        Err(dmsnap::snap::SnapError::AlreadyMerging)
    ));
    assert!(
        read_all(&*o) == view,
        "the origin shows the snapshot at once"
    );
    assert!(matches!(
        a.write_at(&[0; 512], 0, false),
        Err(DevError::Gone)
    ));
    let mut during = 0;
    std::thread::scope(|sc| {
        // A reader of b, concurrently with the merge and the writes.
        let (b2, mb0) = (b.clone(), mb.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = sc.spawn(move || {
            // b is only written in its upper quarter below; the rest must
            // never change.
            let q = (ORIGIN * 3 / 4) as usize;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let mut buf = vec![0; q];
                b2.read_at(&mut buf, 0).unwrap();
                assert!(buf == mb0[..q], "snapshot b changed during the merge");
            }
        });
        for i in 0..300u64 {
            let off = next() % (ORIGIN - 9000);
            let len = 1 + (next() % 9000) as usize;
            match next() % 5 {
                0 | 1 => {
                    let d = fill(5000 + i, len);
                    o.write_at(&d, off, i % 11 == 0).unwrap();
                    view[off as usize..off as usize + len].copy_from_slice(&d);
                }
                2 => {
                    let mut buf = vec![0; len];
                    o.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf == view[off as usize..off as usize + len],
                        "origin view at {off}+{len} (op {i})"
                    );
                }
                3 => {
                    let off = ORIGIN * 3 / 4 + off % (ORIGIN / 4 - 9000);
                    let d = fill(9000 + i, len);
                    b.write_at(&d, off, false).unwrap();
                    mb[off as usize..off as usize + len].copy_from_slice(&d);
                }
                _ => {
                    o.flush().unwrap();
                }
            }
            if o.merge_status().is_some_and(|s| !s.done) {
                during += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
    });
    o.wait_merge().unwrap();
    let st = o.merge_status().unwrap();
    assert!(st.done && st.chunks_left == 0 && st.total_chunks_at_start == total);
    assert_eq!(a.status().state, SnapState::Merging);
    assert_eq!(a.status().dm_status(), "16/8192 16");
    assert!(read_all(&*o) == view, "origin view after the merge");
    assert!(
        origin_dev.snapshot() == view,
        "origin device after the merge"
    );
    assert!(read_all(&*b) == mb, "snapshot b after the merge");
    println!("seed {seed}: {total} exceptions merged, {during} ops issued while the merge ran");
    o.remove_snapshot("a").unwrap();
    assert!(read_all(&*o) == view);
}

/// Several threads write the origin (disjoint regions, sharing chunks at
/// the edges) while the merge runs; afterwards the origin holds the merged
/// snapshot plus every write, and the other snapshot is unchanged.
#[test]
fn concurrent_origin_writers_during_merge() {
    const T: u64 = 3;
    let origin_dev = Arc::new(MemDev::from_vec(fill(40, ORIGIN as usize)));
    let o = Origin::new(origin_dev.clone() as DevRef);
    let a = o
        .add_snapshot(
            "a",
            Arc::new(MemDev::new(4 << 20)) as DevRef,
            StoreType::Persistent,
            None,
        )
        .unwrap();
    for i in 0..300u64 {
        let off = (i * 7919 * 512) % (ORIGIN - 8192);
        a.write_at(&fill(i, 6000), off, false).unwrap();
    }
    let b = o
        .add_snapshot(
            "b",
            Arc::new(MemDev::new(4 << 20)) as DevRef,
            StoreType::Persistent,
            Some(ChunkSize::from_sectors(128).unwrap()),
        )
        .unwrap();
    let mut view = read_all(&*a);
    let content_b = read_all(&*b);
    o.start_merge("a").unwrap();
    let region = ORIGIN / T - 1234; // not chunk aligned
    let writes: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..T)
            .map(|t| {
                let o = o.clone();
                sc.spawn(move || {
                    let mut w = Vec::new();
                    for i in 0..80u64 {
                        let off = t * region + (i * 104_729 + t * 31) % (region - 7000);
                        let d = fill(t * 1000 + i, 1 + ((i * 37) % 7000) as usize);
                        o.write_at(&d, off, false).unwrap();
                        w.push((off, d));
                    }
                    w
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    o.wait_merge().unwrap();
    for w in &writes {
        for (off, d) in w {
            view[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
    }
    assert!(
        origin_dev.snapshot() == view,
        "origin after a merge with concurrent writers"
    );
    assert!(read_all(&*b) == content_b, "snapshot b changed");
}
