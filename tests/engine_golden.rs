//! Replay the kernel's golden cases through the engine: start from the
//! origin at snapshot time with a fresh COW of the same size and chunk size,
//! issue the recorded writes one at a time, then compare origin and
//! snapshot hashes, the status line, the exception list and the COW bytes
//! with what Linux 6.1 produced.

mod common;

use common::{case_json, exceptions_txt, fixture, pattern, read_all, sha256_hex};
use dmsnap::device::Device;
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, Snapshot};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

struct Replayed {
    origin: Arc<Origin>,
    origin_dev: Arc<MemDev>,
    snaps: Vec<(String, Arc<Snapshot>, Arc<MemDev>)>,
}

/// Replay `case`; `snaps` maps op targets to COW image names. `later`:
/// a snapshot created once the origin equals the named image.
fn replay(case: &str, snaps: &[(&str, &str)], later: Option<(&str, &str, &str)>) -> Replayed {
    let cj = case_json(case);
    let cs = ChunkSize::from_sectors(cj["chunk_sectors"].as_u64().unwrap()).unwrap();
    let origin_dev = Arc::new(MemDev::from_vec(fixture(case, "origin_at_snapshot.img")));
    let origin = Origin::new(origin_dev.clone() as DevRef);
    let mut out = Replayed {
        origin: origin.clone(),
        origin_dev: origin_dev.clone(),
        snaps: Vec::new(),
    };
    let add = |out: &mut Replayed, target: &str, cow_img: &str| {
        let size = cj["images"][format!("{cow_img}.img")]["size"]
            .as_u64()
            .unwrap();
        let cow = Arc::new(MemDev::new(size));
        let s = origin
            .add_snapshot(
                target,
                cow.clone() as DevRef,
                StoreType::Persistent,
                Some(cs),
            )
            .unwrap();
        out.snaps.push((target.to_string(), s, cow));
    };
    for (t, c) in snaps {
        add(&mut out, t, c);
    }
    let later_img = later.map(|(_, _, img)| fixture(case, img));
    let mut pending_later = later;
    for op in cj["ops"].as_array().unwrap() {
        if let (Some((t, c, _)), Some(img)) = (pending_later, &later_img) {
            if origin_dev.snapshot() == *img {
                add(&mut out, t, c);
                pending_later = None;
            }
        }
        let target = op["target"].as_str().unwrap();
        let off = op["offset"].as_u64().unwrap();
        let len = op["length"].as_u64().unwrap() as usize;
        let letter = op["pattern"].as_str().unwrap().as_bytes()[0];
        let data = pattern(letter, off, len);
        let res = if target == "origin" {
            origin.write_at(&data, off, false)
        } else {
            let s = out
                .snaps
                .iter()
                .find(|(n, _, _)| n == target)
                .map(|(_, s, _)| s.clone())
                .unwrap_or_else(|| panic!("{case}: write to {target} before it exists"));
            s.write_at(&data, off, false)
        };
        res.unwrap_or_else(|e| panic!("{case}: {target} write at {off}+{len}: {e}"));
    }
    assert!(
        pending_later.is_none(),
        "{case}: the later snapshot was never taken"
    );
    origin.sync().unwrap();
    out
}

/// Compare our COW with the kernel's; `Ok` when byte-identical.
fn compare_cow(ours: &[u8], kernel: &[u8], chunk: usize) -> Result<(), String> {
    assert_eq!(ours.len(), kernel.len());
    let diff: Vec<usize> = ours
        .chunks(chunk)
        .zip(kernel.chunks(chunk))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    if diff.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} chunks differ, first {:?}",
            diff.len(),
            &diff[..diff.len().min(8)]
        ))
    }
}

fn status_of(cj: &serde_json::Value, key: &str) -> String {
    let s = cj["info"][key].as_str().unwrap();
    s.split(" snapshot ").nth(1).unwrap().to_string()
}

fn check_single(case: &str) {
    let cj = case_json(case);
    let r = replay(case, &[("snap", "cow")], None);
    let (_, snap, cow) = &r.snaps[0];
    assert_eq!(
        sha256_hex(&r.origin_dev.snapshot()),
        cj["expected_sha256"]["origin"].as_str().unwrap(),
        "{case}: origin"
    );
    assert_eq!(
        sha256_hex(&read_all(&**snap)),
        cj["expected_sha256"]["snapshot"].as_str().unwrap(),
        "{case}: snapshot"
    );
    assert_eq!(
        snap.status().dm_status(),
        status_of(&cj, "final_status"),
        "{case}: status"
    );
    let mut want: Vec<(u64, u64)> = exceptions_txt(case, "cow")
        .iter()
        .map(|&(o, n, _)| (o, n))
        .collect();
    want.sort();
    let got: Vec<(u64, u64)> = snap.exceptions().iter().map(|(o, n)| (o.0, n.0)).collect();
    assert_eq!(got, want, "{case}: exceptions");
    let res = compare_cow(
        &cow.snapshot(),
        &fixture(case, "cow.img"),
        snap.chunk_size().bytes() as usize,
    );
    println!("{case}: COW byte-identical to the kernel's: {res:?}");
    res.unwrap_or_else(|e| panic!("{case}: COW differs from the kernel's: {e}"));
}

#[test]
fn golden_chunk4k_mixed() {
    check_single("chunk4k_mixed");
}

#[test]
fn golden_chunk16k_mixed() {
    check_single("chunk16k_mixed");
}

#[test]
fn golden_two_snapshots() {
    let case = "two_snapshots";
    let cj = case_json(case);
    let r = replay(
        case,
        &[("snapa", "cowa")],
        Some(("snapb", "cowb", "origin_at_snapb.img")),
    );
    assert_eq!(
        sha256_hex(&r.origin_dev.snapshot()),
        cj["expected_sha256"]["origin"].as_str().unwrap()
    );
    for (name, key, cow_img, status) in [
        ("snapa", "snapshot_a", "cowa", "final_a_status"),
        ("snapb", "snapshot_b", "cowb", "final_b_status"),
    ] {
        let (_, snap, cow) = r.snaps.iter().find(|(n, _, _)| n == name).unwrap();
        assert_eq!(
            sha256_hex(&read_all(&**snap)),
            cj["expected_sha256"][key].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            snap.status().dm_status(),
            status_of(&cj, status),
            "{name}: status"
        );
        let mut want: Vec<(u64, u64)> = exceptions_txt(case, cow_img)
            .iter()
            .map(|&(o, n, _)| (o, n))
            .collect();
        want.sort();
        let got: Vec<(u64, u64)> = snap.exceptions().iter().map(|(o, n)| (o.0, n.0)).collect();
        assert_eq!(got, want, "{name}: exceptions");
        let res = compare_cow(
            &cow.snapshot(),
            &fixture(case, &format!("{cow_img}.img")),
            4096,
        );
        println!("{case}/{name}: COW byte-identical to the kernel's: {res:?}");
        res.unwrap_or_else(|e| panic!("{name}: COW differs: {e}"));
    }
    let _ = r.origin;
}

#[test]
fn golden_overflow_invalid() {
    let case = "overflow_invalid";
    let cj = case_json(case);
    let r = replay(case, &[("snap", "cow")], None);
    let (_, snap, cow) = &r.snaps[0];
    assert_eq!(
        sha256_hex(&r.origin_dev.snapshot()),
        cj["expected_sha256"]["origin"].as_str().unwrap()
    );
    assert_eq!(snap.status().dm_status(), "Invalid");
    let mut b = vec![0; 4096];
    assert!(
        snap.read_at(&mut b, 0).is_err(),
        "reads of an invalid snapshot fail"
    );
    assert!(
        snap.write_at(&b, 0, false).is_err(),
        "writes to an invalid snapshot fail"
    );
    let res = compare_cow(&cow.snapshot(), &fixture(case, "cow.img"), 4096);
    println!("{case}: COW byte-identical to the kernel's: {res:?}");
    res.unwrap_or_else(|e| panic!("{case}: COW differs: {e}"));
    // Re-activation: still invalid.
    let o2 = Origin::new(Arc::new(MemDev::from_vec(r.origin_dev.snapshot())));
    let s2 = o2
        .add_snapshot(
            "again",
            Arc::new(MemDev::from_vec(cow.snapshot())),
            StoreType::Persistent,
            None,
        )
        .unwrap();
    assert_eq!(
        s2.status().dm_status(),
        status_of(&cj, "reactivated_status")
    );
}
