//! The persistent store against COW devices the Linux kernel wrote
//! (`tests/fixtures/kernel/`, or the team's `../shared/golden/`): every
//! exception loads in on-disk order, the status matches what `dmsetup
//! status` printed, and merging the kernel's pre-merge COW to the end gives
//! the kernel's post-merge COW byte for byte.

use dmsnap::format::DiskException;
use dmsnap::io::{BlockDev, MemDev, WriteFlags};
use dmsnap::store::{ExceptionStore, MergeRun, PersistentStore, StoreError};
use dmsnap::units::{Chunk, ChunkSize};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

/// The directory of a golden case. The fixtures are required: a missing
/// directory fails the test rather than skipping it.
fn case_dir(case: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        root.join("tests/fixtures/kernel").join(case),
        root.join("../shared/golden").join(case),
    ];
    for c in &candidates {
        if c.is_dir() {
            return c.clone();
        }
    }
    panic!("golden case {case} not found in {candidates:?}");
}

fn unzstd(path: &std::path::Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut d = ruzstd::StreamingDecoder::new(std::io::BufReader::new(f))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    d.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

fn case_json(case: &str) -> serde_json::Value {
    let p = case_dir(case).join("case.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// `old_chunk new_chunk area` lines.
fn exceptions_txt(case: &str, file: &str) -> Vec<(DiskException, u64)> {
    let p = case_dir(case).join(file);
    std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (
                DiskException {
                    old_chunk: Chunk(v[0]),
                    new_chunk: Chunk(v[1]),
                },
                v[2],
            )
        })
        .collect()
}

/// The `<allocated>/<total> <metadata>` part of a status line.
fn status_usage(case: &str, key: &str) -> String {
    let j = case_json(case);
    let line = j["info"][key].as_str().unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    words[3..].join(" ")
}

fn load(img: Vec<u8>) -> (PersistentStore, Vec<DiskException>, Arc<MemDev>) {
    let dev = Arc::new(MemDev::from_vec(img));
    let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
    assert!(!s.is_new_snapshot());
    let mut v = Vec::new();
    s.read_metadata(&mut |e| v.push(e)).unwrap();
    (s, v, dev)
}

fn check_case(case: &str, img: &str, txt: &str, status_key: &str) {
    let (s, got, _) = load(unzstd(&case_dir(case).join(img)));
    assert!(s.is_valid());
    let want = exceptions_txt(case, txt);
    let e = dmsnap::format::exceptions_per_area(s.chunk_size());
    assert_eq!(got.len(), want.len(), "{case}/{img}");
    for (i, (g, (w, area))) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{case}/{img} record {i}");
        assert_eq!(i as u64 / e, *area, "{case}/{img} record {i} area");
    }
    assert_eq!(
        s.usage().to_string(),
        status_usage(case, status_key),
        "{case}/{img}"
    );
}

#[test]
fn kernel_chunk4k_mixed_loads() {
    check_case(
        "chunk4k_mixed",
        "cow.img.zst",
        "cow.exceptions.txt",
        "final_status",
    );
}

#[test]
fn kernel_chunk16k_mixed_loads() {
    check_case(
        "chunk16k_mixed",
        "cow.img.zst",
        "cow.exceptions.txt",
        "final_status",
    );
}

#[test]
fn kernel_two_snapshots_load() {
    check_case(
        "two_snapshots",
        "cowa.img.zst",
        "cowa.exceptions.txt",
        "final_a_status",
    );
    check_case(
        "two_snapshots",
        "cowb.img.zst",
        "cowb.exceptions.txt",
        "final_b_status",
    );
}

#[test]
fn kernel_merge_cows_load() {
    check_case(
        "merge_complete",
        "cow_pre_merge.img.zst",
        "cow_pre_merge.exceptions.txt",
        "premerge_status",
    );
    check_case(
        "merge_complete",
        "cow.img.zst",
        "cow.exceptions.txt",
        "merge_done_status",
    );
}

/// The kernel invalidated this store (COW full): it opens invalid and yields
/// nothing, like the kernel's reactivation. With the header's valid field
/// set back to 1, its 14 exceptions load and the status is the one the
/// kernel printed just before the overflow.
#[test]
fn kernel_overflow_invalid() {
    let case = "overflow_invalid";
    let img = unzstd(&case_dir(case).join("cow.img.zst"));
    assert_eq!(status_usage(case, "reactivated_status"), "Invalid");
    let dev = Arc::new(MemDev::from_vec(img.clone()));
    let mut s = PersistentStore::open(dev, None, false).unwrap();
    assert!(!s.is_valid());
    let mut n = 0;
    s.read_metadata(&mut |_| n += 1).unwrap();
    assert_eq!(n, 0);
    assert!(matches!(s.prepare_exception(), Err(StoreError::Invalid)));

    let mut fixed = img;
    fixed[4] = 1;
    let (mut s, got, _) = load(fixed);
    assert!(s.is_valid());
    let want: Vec<_> = exceptions_txt(case, "cow.exceptions.txt")
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        s.usage().to_string(),
        status_usage(case, "after_origin_write_chunk13_status")
    );
    assert!(matches!(
        s.prepare_exception(),
        Err(StoreError::Full { .. })
    ));
}

/// Merge the kernel's pre-merge COW to the end one kernel step at a time
/// (`prepare_merge_batch(1)`: one run, then `commit_merge_batch`; each
/// run copied onto the pre-merge origin): the COW must
/// equal the kernel's post-merge COW byte for byte and the origin its
/// post-merge origin.
#[test]
fn kernel_merge_gives_the_kernels_cow() {
    let case = "merge_complete";
    let dir = case_dir(case);
    let (mut s, mut all, cow) = load(unzstd(&dir.join("cow_pre_merge.img.zst")));
    let origin = MemDev::from_vec(unzstd(&dir.join("origin_pre_merge.img.zst")));
    let cb = s.chunk_size().bytes();
    let mut steps = 0;
    while let Some(&MergeRun {
        last_old: old,
        last_new: new,
        n,
    }) = s.prepare_merge_batch(1).unwrap().first()
    {
        let last = all.pop().unwrap();
        assert_eq!((old, new), (last.old_chunk, last.new_chunk));
        all.truncate(all.len() + 1 - n as usize);
        let mut buf = vec![0u8; (n * cb) as usize];
        let first_new = new.0 + 1 - n;
        let first_old = old.0 + 1 - n;
        cow.read_at(&mut buf, first_new * cb).unwrap();
        let end = (origin.len() - first_old * cb).min(buf.len() as u64) as usize;
        origin
            .write_at(&buf[..end], first_old * cb, WriteFlags::NONE)
            .unwrap();
        s.commit_merge_batch(n).unwrap();
        steps += 1;
    }
    assert!(all.is_empty());
    assert!(steps > 1);
    assert_eq!(
        s.usage().to_string(),
        status_usage(case, "merge_done_status")
    );
    let kernel_cow = unzstd(&dir.join("cow.img.zst"));
    assert!(
        cow.snapshot() == kernel_cow,
        "merged COW differs from the kernel's"
    );
    let kernel_origin = unzstd(&dir.join("origin_post_merge.img.zst"));
    assert!(
        origin.snapshot() == kernel_origin,
        "merged origin differs from the kernel's"
    );
}

/// The same load through an O_DIRECT file (read-ahead threads on a real
/// file, unaligned buffers through FileDev's bounce path).
#[test]
fn kernel_cow_loads_from_an_o_direct_file() {
    use dmsnap::io::{FileDev, OpenOptions};
    let case = "chunk4k_mixed";
    let img = unzstd(&case_dir(case).join("cow.img.zst"));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("cow.img");
    std::fs::write(&p, &img).unwrap();
    let dev = FileDev::open(
        &p,
        OpenOptions {
            direct: true,
            read_only: true,
        },
    )
    .unwrap();
    assert!(dev.is_direct());
    let mut s = PersistentStore::open(Arc::new(dev), None, false).unwrap();
    let mut got = Vec::new();
    s.read_metadata(&mut |e| got.push(e)).unwrap();
    let want: Vec<_> = exceptions_txt(case, "cow.exceptions.txt")
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.usage().to_string(), status_usage(case, "final_status"));
}

/// Replay the overflow case at the store level (origin chunk `i` written
/// for i = 0..24, one at a time, each copied out before its record is
/// committed): the statuses after every write equal the kernel's, the 15th
/// exception does not fit, and after invalidation the COW is byte for byte
/// the one the kernel wrote (header with valid = 0, area 0, data chunks).
#[test]
fn kernel_overflow_replayed_gives_the_kernels_cow() {
    let case = "overflow_invalid";
    let dir = case_dir(case);
    let origin = unzstd(&dir.join("origin_at_snapshot.img.zst"));
    let kernel_cow = unzstd(&dir.join("cow.img.zst"));
    let cow = Arc::new(MemDev::new(kernel_cow.len() as u64));
    let mut s = PersistentStore::open(cow.clone(), Some(ChunkSize::DEFAULT), false).unwrap();
    assert_eq!(s.usage().to_string(), status_usage(case, "initial_status"));
    let cb = 4096usize;
    for i in 0..24u64 {
        let key = format!("after_origin_write_chunk{i}_status");
        match s.prepare_exception() {
            Ok(c) => {
                let o = i as usize * cb;
                cow.write_at(&origin[o..o + cb], c.0 * cb as u64, WriteFlags::NONE)
                    .unwrap();
                let e = DiskException {
                    old_chunk: Chunk(i),
                    new_chunk: c,
                };
                s.record_exception(e, true).unwrap();
                s.sync_inline().unwrap();
                assert_eq!(s.durable_seq(), s.recorded_seq());
                assert_eq!(s.usage().to_string(), status_usage(case, &key));
            }
            Err(StoreError::Full { .. }) => {
                assert_eq!(i, 14, "the 15th exception is the first that does not fit");
                assert_eq!(status_usage(case, &key), "Invalid");
                s.drop_snapshot().unwrap();
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!s.is_valid());
    assert!(
        cow.snapshot() == kernel_cow,
        "the COW differs from the kernel's"
    );
}
