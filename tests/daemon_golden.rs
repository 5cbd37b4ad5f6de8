//! The kernel's golden cases replayed through `dmsnap serve` over NBD: the
//! origin and every snapshot must hash as the kernel's devices did, `status`
//! must print the kernel's final status line, and the COW must hold the
//! kernel's exceptions (and, where the allocation order matches, its bytes).

mod common;
mod support;

use common::{case_json, exceptions_txt, fixture, pattern, sha256_hex};
use std::collections::HashMap;
use std::path::Path;
use support::nbd_client::NbdClient;
use support::{ok, Daemon};

fn kernel_exceptions(case: &str, cow: &str) -> Vec<(u64, u64)> {
    exceptions_txt(case, cow)
        .into_iter()
        .map(|(o, n, _)| (o, n))
        .collect()
}

fn dumped_exceptions(cow: &Path) -> (bool, Vec<(u64, u64)>) {
    let out = ok(&["dump", "--json", cow.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("dump --json parses");
    let ex = v["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["old_chunk"].as_u64().unwrap(),
                e["new_chunk"].as_u64().unwrap(),
            )
        })
        .collect();
    (v["valid"].as_bool().unwrap(), ex)
}

fn status_of(pool: &Path, name: &str) -> String {
    let out = ok(&["status", "--json", pool.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json parses");
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["dm_status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no snapshot {name} in {out}"))
}

fn kernel_status(line: &str) -> String {
    line.split_once(" snapshot ")
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| line.to_string())
}

struct Replay {
    pool: tempfile::TempDir,
    daemon: Option<Daemon>,
    clients: HashMap<String, NbdClient>,
}

impl Replay {
    /// A pool over a copy of the case's origin_at_snapshot with one snapshot.
    fn new(case: &str, snap: &str, cow_size: u64, chunk: u64) -> Replay {
        let pool = tempfile::tempdir().unwrap();
        let origin = pool.path().join("kernel-origin.img");
        std::fs::write(&origin, fixture(case, "origin_at_snapshot.img")).unwrap();
        let p = pool.path().join("pool");
        ok(&[
            "create",
            p.to_str().unwrap(),
            "--origin",
            origin.to_str().unwrap(),
        ]);
        ok(&[
            "snapshot",
            "create",
            p.to_str().unwrap(),
            snap,
            "--chunk-size",
            &chunk.to_string(),
            "--cow-size",
            &cow_size.to_string(),
        ]);
        let daemon = Daemon::start(&p, &[]);
        Replay {
            pool,
            daemon: Some(daemon),
            clients: HashMap::new(),
        }
    }
    fn dir(&self) -> std::path::PathBuf {
        self.pool.path().join("pool")
    }
    fn client(&mut self, name: &str) -> &mut NbdClient {
        let sock = self.dir().join("nbd.sock");
        self.clients
            .entry(name.to_string())
            .or_insert_with(|| NbdClient::connect(&sock, name).expect("connect"))
    }
    fn apply(&mut self, op: &serde_json::Value, target: &str) -> u32 {
        let off = op["offset"].as_u64().unwrap();
        let len = op["length"].as_u64().unwrap() as usize;
        let letter = op["pattern"].as_str().unwrap().as_bytes()[0];
        let data = pattern(letter, off, len);
        self.client(target).write(off, &data).expect("write")
    }
    fn hash(&mut self, name: &str) -> String {
        let b = self.client(name).read_all().expect("read export");
        sha256_hex(&b)
    }
    fn stop(&mut self) {
        for (_, c) in self.clients.drain() {
            let _ = c.disconnect();
        }
        let st = self.daemon.take().unwrap().stop();
        assert!(st.success(), "serve exited with {st}");
    }
}

fn case_sizes(case: &serde_json::Value, cow: &str) -> (u64, u64) {
    (
        case["images"][cow]["size"].as_u64().unwrap(),
        case["chunk_bytes"].as_u64().unwrap(),
    )
}

/// Compare our COW with the kernel's; returns true when byte-identical.
fn same_bytes(case: &str, kernel_file: &str, ours: &Path) -> bool {
    fixture(case, kernel_file) == std::fs::read(ours).unwrap()
}

fn replay_one_snapshot(case: &str) {
    let c = case_json(case);
    let (cow_size, chunk) = case_sizes(&c, "cow.img");
    let mut r = Replay::new(case, "snap", cow_size, chunk);
    for op in c["ops"].as_array().unwrap() {
        let target = if op["target"] == "origin" {
            "origin"
        } else {
            "snap"
        };
        let err = r.apply(op, target);
        assert_eq!(err, 0, "write {op} failed with NBD error {err}");
    }
    assert_eq!(r.client("origin").flush().unwrap(), 0);
    assert_eq!(
        r.hash("origin"),
        c["expected_sha256"]["origin"].as_str().unwrap(),
        "origin"
    );
    assert_eq!(
        r.hash("snap"),
        c["expected_sha256"]["snapshot"].as_str().unwrap(),
        "snapshot"
    );
    let dir = r.dir();
    assert_eq!(
        status_of(&dir, "snap"),
        kernel_status(c["info"]["final_status"].as_str().unwrap()),
        "status line"
    );
    r.stop();
    let cow = dir.join("snap.cow");
    let (valid, ex) = dumped_exceptions(&cow);
    assert!(valid);
    assert_eq!(
        ex,
        kernel_exceptions(case, "cow"),
        "exceptions in on-disk order"
    );
    assert!(
        same_bytes(case, "cow.img", &cow),
        "the COW is not byte-identical to the kernel's"
    );
}

#[test]
fn chunk4k_mixed_through_nbd_matches_the_kernel() {
    replay_one_snapshot("chunk4k_mixed");
}

#[test]
fn chunk16k_mixed_through_nbd_matches_the_kernel() {
    replay_one_snapshot("chunk16k_mixed");
}

#[test]
fn overflow_invalidates_the_snapshot_but_not_the_origin() {
    let case = "overflow_invalid";
    let c = case_json(case);
    let (cow_size, chunk) = case_sizes(&c, "cow.img");
    let mut r = Replay::new(case, "snap", cow_size, chunk);
    let statuses = &c["info"];
    for (i, op) in c["ops"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r.apply(op, "origin"), 0, "origin writes never fail");
        if let Some(k) = statuses[format!("after_origin_write_chunk{i}_status")].as_str() {
            assert_eq!(
                status_of(&r.dir(), "snap"),
                kernel_status(k),
                "after write {i}"
            );
        }
    }
    assert_eq!(
        r.hash("origin"),
        c["expected_sha256"]["origin"].as_str().unwrap()
    );
    // An invalid snapshot fails its I/O (EIO = 5).
    let e = r.client("snap").read(0, 4096).unwrap();
    assert_eq!(
        e.err(),
        Some(5),
        "reads of an invalid snapshot fail with EIO"
    );
    assert_eq!(status_of(&r.dir(), "snap"), "Invalid");
    r.stop();
    let cow = r.dir().join("snap.cow");
    let (valid, ex) = dumped_exceptions(&cow);
    assert!(!valid, "the header says invalid");
    assert_eq!(ex, kernel_exceptions(case, "cow"));
    // Reactivated: still Invalid.
    assert_eq!(status_of(&r.dir(), "snap"), "Invalid");
    assert!(
        same_bytes(case, "cow.img", &cow),
        "COW differs from the kernel's"
    );
}

#[test]
fn two_snapshots_one_taken_online_match_the_kernel() {
    let case = "two_snapshots";
    let c = case_json(case);
    let (cow_size, chunk) = case_sizes(&c, "cowa.img");
    let mut r = Replay::new(case, "snapa", cow_size, chunk);
    for (i, op) in c["ops"].as_array().unwrap().iter().enumerate() {
        if i == 350 {
            // The kernel case took snapb here, with the origin suspended.
            let dir = r.dir();
            ok(&[
                "snapshot",
                "create",
                dir.to_str().unwrap(),
                "snapb",
                "--chunk-size",
                &chunk.to_string(),
                "--cow-size",
                &cow_size.to_string(),
            ]);
            assert_eq!(
                r.hash("snapb"),
                c["images"]["origin_at_snapb.img"]["sha256"]
                    .as_str()
                    .unwrap(),
                "snapb shows the origin as it was when it was taken"
            );
        }
        let target = op["target"].as_str().unwrap().to_string();
        assert_eq!(r.apply(op, &target), 0);
    }
    let e = &c["expected_sha256"];
    assert_eq!(r.hash("origin"), e["origin"].as_str().unwrap());
    assert_eq!(r.hash("snapa"), e["snapshot_a"].as_str().unwrap());
    assert_eq!(r.hash("snapb"), e["snapshot_b"].as_str().unwrap());
    let dir = r.dir();
    assert_eq!(
        status_of(&dir, "snapa"),
        kernel_status(c["info"]["final_a_status"].as_str().unwrap())
    );
    assert_eq!(
        status_of(&dir, "snapb"),
        kernel_status(c["info"]["final_b_status"].as_str().unwrap())
    );
    r.stop();
    assert_eq!(
        dumped_exceptions(&dir.join("snapa.cow")).1,
        kernel_exceptions(case, "cowa")
    );
    assert_eq!(
        dumped_exceptions(&dir.join("snapb.cow")).1,
        kernel_exceptions(case, "cowb")
    );
}

/// A pool in `scratch/pool` over `scratch/origin.img` holding `origin`, with
/// snapshot `snap` adopting `scratch/cow.img` (holding `cow`) as it is.
fn adopting_pool(scratch: &Path, origin: &[u8], cow: &[u8]) -> std::path::PathBuf {
    let (o, c) = (scratch.join("origin.img"), scratch.join("cow.img"));
    std::fs::write(&o, origin).unwrap();
    std::fs::write(&c, cow).unwrap();
    let p = scratch.join("pool");
    ok(&[
        "create",
        p.to_str().unwrap(),
        "--origin",
        o.to_str().unwrap(),
    ]);
    ok(&[
        "snapshot",
        "create",
        p.to_str().unwrap(),
        "snap",
        "--cow",
        c.to_str().unwrap(),
    ]);
    p
}

/// The kernel's pre-merge pair adopted into a pool.
fn merge_pool(scratch: &Path) -> std::path::PathBuf {
    let case = "merge_complete";
    adopting_pool(
        scratch,
        &fixture(case, "origin_pre_merge.img"),
        &fixture(case, "cow_pre_merge.img"),
    )
}

#[test]
fn kernel_cow_adopted_and_merged_offline_gives_the_kernels_origin() {
    let case = "merge_complete";
    let c = case_json(case);
    let t = tempfile::tempdir().unwrap();
    let p = merge_pool(t.path());
    assert_eq!(
        status_of(&p, "snap"),
        kernel_status(c["info"]["premerge_status"].as_str().unwrap())
    );
    ok(&["merge", p.to_str().unwrap(), "snap"]);
    let origin = std::fs::read(t.path().join("origin.img")).unwrap();
    assert_eq!(
        sha256_hex(&origin),
        c["images"]["origin_post_merge.img"]["sha256"]
            .as_str()
            .unwrap()
    );
    // The snapshot left the pool; its adopted COW stays, empty.
    let out = ok(&["snapshot", "list", "--json", p.to_str().unwrap()]);
    assert_eq!(out.trim(), "[]");
    let (valid, ex) = dumped_exceptions(&t.path().join("cow.img"));
    assert!(valid && ex.is_empty());
    assert!(
        same_bytes(case, "cow.img", &t.path().join("cow.img")),
        "merged COW differs from the kernel's"
    );
}

#[test]
fn kernel_cow_merged_online_reads_as_the_snapshot_at_once() {
    let case = "merge_complete";
    let c = case_json(case);
    let t = tempfile::tempdir().unwrap();
    let p = merge_pool(t.path());
    let d = Daemon::start(&p, &[]);
    ok(&["merge", p.to_str().unwrap(), "snap"]);
    let want = c["images"]["origin_post_merge.img"]["sha256"]
        .as_str()
        .unwrap();
    // From the moment merge returns, the origin reads as the snapshot.
    let mut cl = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(sha256_hex(&cl.read_all().unwrap()), want);
    // The merge leaves the pool by itself when it ends.
    let t0 = std::time::Instant::now();
    while ok(&["snapshot", "list", "--json", p.to_str().unwrap()]).trim() != "[]" {
        assert!(t0.elapsed().as_secs() < 60, "merge did not finish");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(sha256_hex(&cl.read_all().unwrap()), want);
    cl.disconnect().unwrap();
    assert!(d.stop().success());
    let origin = std::fs::read(t.path().join("origin.img")).unwrap();
    assert_eq!(sha256_hex(&origin), want);
    assert_eq!(
        ok(&["snapshot", "list", "--json", p.to_str().unwrap()]).trim(),
        "[]"
    );
}

/// A merge the kernel stopped half-way leaves the merged records cleared on
/// disk (its resume marker) and their chunks already copied to the origin.
/// Build exactly that from the kernel's pre-merge pair, adopt it, and finish.
#[test]
fn merge_the_kernel_left_half_done_resumes_to_the_kernels_origin() {
    let case = "merge_complete";
    let c = case_json(case);
    let t = tempfile::tempdir().unwrap();
    let mut origin = fixture(case, "origin_pre_merge.img");
    let mut cow = fixture(case, "cow_pre_merge.img");
    let records = kernel_exceptions(case, "cow_pre_merge");
    const CHUNK: usize = 4096;
    const PER_AREA: usize = CHUNK / 16;
    // The kernel merges from the last record backwards; 300 of 580 records
    // span the last area (emptied) and the tail of the one before.
    let merged = 300;
    for (i, &(old, new)) in records.iter().enumerate().rev().take(merged) {
        let area_chunk = 1 + (i / PER_AREA) * (PER_AREA + 1);
        let slot = area_chunk * CHUNK + (i % PER_AREA) * 16;
        cow[slot..slot + 16].fill(0);
        let (o, n) = (old as usize * CHUNK, new as usize * CHUNK);
        origin[o..o + CHUNK].copy_from_slice(&cow[n..n + CHUNK]);
    }
    let p = adopting_pool(t.path(), &origin, &cow);
    let (valid, left) = dumped_exceptions(&t.path().join("cow.img"));
    assert!(valid);
    assert_eq!(
        left,
        records[..records.len() - merged],
        "the cleared records end the list"
    );
    ok(&["merge", p.to_str().unwrap(), "snap"]);
    let merged_origin = std::fs::read(t.path().join("origin.img")).unwrap();
    assert_eq!(
        sha256_hex(&merged_origin),
        c["images"]["origin_post_merge.img"]["sha256"]
            .as_str()
            .unwrap(),
        "the origin ends as the kernel's fully merged origin"
    );
    assert!(
        same_bytes(case, "cow.img", &t.path().join("cow.img")),
        "the COW ends as the kernel's emptied COW"
    );
}
