//! Merge the kernel's pre-merge pair and compare with what the kernel's
//! `snapshot-merge` left: the origin, and the emptied COW.

mod common;

use common::{case_json, fixture, sha256_hex};
use dmsnap::device::{DevError, Device};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState};
use dmsnap::store::StoreType;
use std::sync::Arc;

#[test]
fn golden_merge_complete() {
    let case = "merge_complete";
    let cj = case_json(case);
    let origin_dev = Arc::new(MemDev::from_vec(fixture(case, "origin_pre_merge.img")));
    let cow = Arc::new(MemDev::from_vec(fixture(case, "cow_pre_merge.img")));
    let origin = Origin::new(origin_dev.clone() as DevRef);
    let snap = origin
        .add_snapshot("snap", cow.clone() as DevRef, StoreType::Persistent, None)
        .unwrap();
    assert_eq!(snap.nr_exceptions(), 580);
    let mut snap_content = vec![0; origin.size() as usize];
    snap.read_at(&mut snap_content, 0).unwrap();
    let want = cj["expected_sha256"]["snapshot"].as_str().unwrap();
    assert_eq!(sha256_hex(&snap_content), want);

    origin.start_merge("snap").unwrap();
    // At once the origin shows the snapshot; the snapshot device is gone.
    let mut view = vec![0; origin.size() as usize];
    origin.read_at(&mut view, 0).unwrap();
    assert!(
        view == snap_content,
        "the origin shows the snapshot as soon as the merge starts"
    );
    assert!(matches!(
        snap.read_at(&mut [0; 512], 0),
        Err(DevError::Gone)
    ));
    origin.wait_merge().unwrap();

    let st = origin.merge_status().unwrap();
    assert!(st.done && st.failed.is_none() && st.chunks_left == 0);
    assert_eq!(st.total_chunks_at_start, 580);
    assert_eq!(
        sha256_hex(&origin_dev.snapshot()),
        cj["expected_sha256"]["merged_origin"].as_str().unwrap()
    );
    assert_eq!(snap.status().state, SnapState::Merging);
    let done = cj["info"]["merge_done_status"].as_str().unwrap();
    assert_eq!(
        snap.status().dm_status(),
        done.split(" snapshot-merge ").nth(1).unwrap()
    );
    let kernel_cow = fixture(case, "cow.img");
    let ours = cow.snapshot();
    let differing: Vec<usize> = ours
        .chunks(4096)
        .zip(kernel_cow.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    // Metadata (header and areas) must match; data chunks keep the old
    // copies in both (the kernel does not zero them either).
    println!("merge_complete: COW chunks differing from the kernel's: {differing:?}");
    assert!(
        differing.is_empty(),
        "COW differs from the kernel's post-merge COW in chunks {differing:?}"
    );
    // The merged snapshot can now be removed; the origin reads as itself.
    origin.remove_snapshot("snap").unwrap();
    origin.read_at(&mut view, 0).unwrap();
    assert_eq!(sha256_hex(&view), want);
}
