//! `dump`, `check` and `restore` against COW devices the Linux kernel wrote
//! (tests/fixtures/kernel), and against corrupt variants of them made by
//! byte edits here.

mod common;

use common::*;
use dmsnap::format::{area_location, exceptions_per_area};
use dmsnap::io::{BlockDev, MemDev, WriteFlags};
use dmsnap::tools::check::{check, CheckOptions, CheckReport, Finding, FindingKind, Severity};
use dmsnap::tools::dump::{dump, DumpFormat, DumpOptions};
use dmsnap::tools::restore::{restore, DumpDoc, RestoreOptions};
use dmsnap::units::ChunkSize;
use proptest::prelude::*;
use std::io;

/// One kernel-made COW and what the kernel said about it.
struct GoldenCow {
    case: &'static str,
    /// Image name without `.img`.
    cow: &'static str,
    /// Origin image to rebuild the snapshot from, and the expected_sha256 key.
    rebuild: Option<(&'static str, &'static str)>,
    /// `info.<key>` holding the `dmsetup status` line for this COW.
    status_key: &'static str,
}

const GOLDEN: [GoldenCow; 7] = [
    GoldenCow {
        case: "chunk4k_mixed",
        cow: "cow",
        rebuild: Some(("origin_final", "snapshot")),
        status_key: "final_status",
    },
    GoldenCow {
        case: "chunk16k_mixed",
        cow: "cow",
        rebuild: Some(("origin_final", "snapshot")),
        status_key: "final_status",
    },
    GoldenCow {
        case: "two_snapshots",
        cow: "cowa",
        rebuild: Some(("origin_final", "snapshot_a")),
        status_key: "final_a_status",
    },
    GoldenCow {
        case: "two_snapshots",
        cow: "cowb",
        rebuild: Some(("origin_final", "snapshot_b")),
        status_key: "final_b_status",
    },
    GoldenCow {
        case: "merge_complete",
        cow: "cow_pre_merge",
        rebuild: Some(("origin_pre_merge", "snapshot")),
        status_key: "premerge_status",
    },
    GoldenCow {
        // After the merge: empty store; post-merge origin alone is the snapshot.
        case: "merge_complete",
        cow: "cow",
        rebuild: Some(("origin_post_merge", "snapshot")),
        status_key: "merge_done_status",
    },
    GoldenCow {
        case: "overflow_invalid",
        cow: "cow",
        rebuild: None,
        status_key: "final_status",
    },
];

fn cow_bytes(g: &GoldenCow) -> Vec<u8> {
    fixture(g.case, &format!("{}.img", g.cow))
}

fn dump_json_of(dev: &dyn BlockDev) -> String {
    let mut out = Vec::new();
    dump(&DumpOptions::new(dev, DumpFormat::Json), &mut out).expect("dump");
    String::from_utf8(out).expect("utf-8")
}

fn check_of(bytes: Vec<u8>) -> CheckReport {
    let dev = MemDev::from_vec(bytes);
    check(&CheckOptions::new(&dev)).expect("check runs")
}

/// The status part of a `dmsetup status` line (`0 16384 snapshot 7064/16384 40`).
fn kernel_status(g: &GoldenCow) -> String {
    let line = case_json(g.case)["info"][g.status_key]
        .as_str()
        .expect("status line")
        .to_owned();
    line.split_whitespace()
        .skip(3)
        .collect::<Vec<_>>()
        .join(" ")
}

//------------------------------------------
// The pattern helper itself.

#[test]
fn pattern_matches_python_definition_and_golden_origin() {
    let s = pattern_sector(b'A', 3);
    assert_eq!(&s[..22], b"A000000003.A000000003.");
    assert_eq!(&s[506..], b"A0000\n"); // 511 = 46 × 11 + 5
    assert_eq!(pattern(b'B', 510, 4), b"0\nB0".to_vec());
    let origin = fixture("chunk4k_mixed", "origin_at_snapshot.img");
    assert_eq!(origin, pattern(b'A', 0, origin.len()));
    assert_eq!(pattern(b'A', 1000, 3000), origin[1000..4000].to_vec());
}

//------------------------------------------
// Golden images.

#[test]
fn dump_json_lists_exactly_the_kernel_records() {
    for g in &GOLDEN {
        let dev = MemDev::from_vec(cow_bytes(g));
        let doc = DumpDoc::parse(dump_json_of(&dev).as_bytes()).expect("parses");
        let cs = ChunkSize::from_sectors(u64::from(doc.chunk_size)).expect("chunk size");
        let e = exceptions_per_area(cs);
        let got: Vec<(u64, u64, u64)> = doc
            .exceptions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.old_chunk, r.new_chunk, i as u64 / e))
            .collect();
        assert_eq!(got, exceptions_txt(g.case, g.cow), "{} {}", g.case, g.cow);
        let hdr = &case_json(g.case)["cow_headers"][format!("{}.img", g.cow)];
        assert_eq!(doc.valid, hdr["valid"] == 1, "{} {}", g.case, g.cow);
        assert_eq!(
            u64::from(doc.chunk_size),
            hdr["chunk_sectors"].as_u64().unwrap()
        );
    }
}

#[test]
fn human_dump_body_is_the_exceptions_txt() {
    for g in &GOLDEN {
        let dev = MemDev::from_vec(cow_bytes(g));
        let mut out = Vec::new();
        dump(&DumpOptions::new(&dev, DumpFormat::Human), &mut out).expect("dump");
        let text = String::from_utf8(out).unwrap();
        let body = &text[text.find("# old_chunk").expect("records header")..];
        let want =
            String::from_utf8(fixture(g.case, &format!("{}.exceptions.txt", g.cow))).unwrap();
        assert_eq!(body, want, "{} {}", g.case, g.cow);
        let status = kernel_status(g);
        assert!(
            text.contains(&format!("\nstatus: {status}\n")),
            "{} {}: want status {status}\n{}",
            g.case,
            g.cow,
            &text[..400.min(text.len())]
        );
    }
}

#[test]
fn snapshot_rebuilt_from_dump_hashes_as_the_kernel_said() {
    for g in &GOLDEN {
        let Some((origin_name, key)) = g.rebuild else {
            continue;
        };
        let cow = cow_bytes(g);
        let dev = MemDev::from_vec(cow.clone());
        let doc = DumpDoc::parse(dump_json_of(&dev).as_bytes()).unwrap();
        let origin = fixture(g.case, &format!("{origin_name}.img"));
        let chunk_bytes = doc.chunk_size as usize * 512;
        let snap = apply_exceptions(
            &origin,
            &cow,
            chunk_bytes,
            doc.exceptions.iter().map(|r| (r.old_chunk, r.new_chunk)),
        );
        assert_eq!(
            sha256_hex(&snap),
            expected_sha256(g.case, key),
            "{} {}",
            g.case,
            g.cow
        );
    }
}

#[test]
fn check_passes_every_golden_cow_with_the_kernel_status() {
    for g in &GOLDEN {
        let r = check_of(cow_bytes(g));
        assert!(r.is_consistent(), "{} {}: {:?}", g.case, g.cow, r.findings);
        assert_eq!(r.errors, 0);
        assert_eq!(
            r.dm_status.as_deref(),
            Some(kernel_status(g).as_str()),
            "{} {}",
            g.case,
            g.cow
        );
        let want = exceptions_txt(g.case, g.cow).len() as u64;
        assert_eq!(r.exceptions, want, "{} {}", g.case, g.cow);
    }
}

#[test]
fn overflow_invalid_reports_itself_invalidated_and_consistent() {
    let r = check_of(fixture("overflow_invalid", "cow.img"));
    assert!(r.is_consistent());
    assert!(r.header_ok && !r.valid);
    assert_eq!(r.dm_status.as_deref(), Some("Invalid"));
    assert!(r
        .findings
        .iter()
        .any(|f| f.kind == FindingKind::Invalidated && f.severity == Severity::Note));
    assert_eq!(r.exceptions, 14);
}

#[test]
fn merge_complete_cow_is_an_empty_valid_store() {
    let r = check_of(fixture("merge_complete", "cow.img"));
    assert!(r.is_consistent() && r.valid);
    assert_eq!((r.exceptions, r.areas_used, r.next_free_chunk), (0, 0, 2));
    assert_eq!(r.dm_status.as_deref(), Some("16/16384 16"));
    let dev = MemDev::from_vec(fixture("merge_complete", "cow.img"));
    let doc = DumpDoc::parse(dump_json_of(&dev).as_bytes()).unwrap();
    assert!(doc.valid && doc.exceptions.is_empty());
}

/// Header chunk and areas 0..=current_area: every metadata byte the kernel reads.
fn metadata_bytes(cow: &[u8], chunk_sectors: u64, exceptions: u64) -> Vec<u8> {
    let cs = ChunkSize::from_sectors(chunk_sectors).unwrap();
    let cb = cs.bytes() as usize;
    let mut v = cow[..cb].to_vec();
    for a in 0..=exceptions / exceptions_per_area(cs) {
        let at = cs.chunk_to_byte(area_location(cs, a)) as usize;
        v.extend_from_slice(&cow[at..at + cb]);
    }
    v
}

#[test]
fn dump_restore_dump_round_trips_and_metadata_equals_the_kernels() {
    let dir = tempfile::tempdir().unwrap();
    for (i, g) in GOLDEN.iter().enumerate() {
        let cow = cow_bytes(g);
        let first = dump_json_of(&MemDev::from_vec(cow.clone()));
        let doc = DumpDoc::parse(first.as_bytes()).unwrap();
        let path = dir.path().join(format!("restored{i}.img"));
        let r = restore(&RestoreOptions {
            doc: &doc,
            output: path.clone(),
        })
        .expect("restore");
        assert!(r.created);
        let restored = std::fs::read(&path).unwrap();
        assert_eq!(
            restored.len(),
            cow.len(),
            "{} {}: size from cow_size",
            g.case,
            g.cow
        );
        let second = dump_json_of(&MemDev::from_vec(restored.clone()));
        assert_eq!(first, second, "{} {}", g.case, g.cow);
        let n = doc.exceptions.len() as u64;
        let cs = u64::from(doc.chunk_size);
        assert_eq!(
            metadata_bytes(&restored, cs, n),
            metadata_bytes(&cow, cs, n),
            "{} {}: restored metadata differs from the kernel's",
            g.case,
            g.cow
        );
        // Restoring again over the existing file is idempotent.
        restore(&RestoreOptions {
            doc: &doc,
            output: path.clone(),
        })
        .expect("restore over existing");
        assert_eq!(std::fs::read(&path).unwrap(), restored);
    }
}

#[test]
fn binary_dump_json_equals_library_dump() {
    let dir = tempfile::tempdir().unwrap();
    let cow = fixture("chunk4k_mixed", "cow.img");
    let path = dir.path().join("cow.img");
    std::fs::write(&path, &cow).unwrap();
    let out = std::process::Command::new(dmsnap_bin())
        .args(["dump", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        dump_json_of(&MemDev::from_vec(cow))
    );
    // And a restore through the binary, then check through the binary.
    let json = dir.path().join("dump.json");
    std::fs::write(
        &json,
        dump_json_of(&MemDev::from_vec(fixture("chunk4k_mixed", "cow.img"))),
    )
    .unwrap();
    let restored = dir.path().join("restored.img");
    let st = std::process::Command::new(dmsnap_bin())
        .arg("restore")
        .arg(&json)
        .arg(&restored)
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(String::from_utf8_lossy(&st.stdout).contains("878 exceptions"));
    let out = std::process::Command::new(dmsnap_bin())
        .arg("check")
        .arg(&restored)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new(dmsnap_bin())
        .arg("check")
        .arg(fixture_path("overflow_invalid", "case.json").with_file_name("nonexistent.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

//------------------------------------------
// Corrupt variants of chunk4k_mixed (4 KiB chunks, E = 256, 878 records,
// areas 0..3 at chunks 1, 258, 515, 772).

const CB: usize = 4096;

fn golden4k() -> Vec<u8> {
    fixture("chunk4k_mixed", "cow.img")
}

fn slot_offset(area: u64, slot: u64) -> usize {
    let cs = ChunkSize::from_sectors(8).unwrap();
    cs.chunk_to_byte(area_location(cs, area)) as usize + slot as usize * 16
}

fn read_rec(img: &[u8], area: u64, slot: u64) -> (u64, u64) {
    let o = slot_offset(area, slot);
    (
        u64::from_le_bytes(img[o..o + 8].try_into().unwrap()),
        u64::from_le_bytes(img[o + 8..o + 16].try_into().unwrap()),
    )
}

fn set_rec(img: &mut [u8], area: u64, slot: u64, old: u64, new: u64) {
    let o = slot_offset(area, slot);
    img[o..o + 8].copy_from_slice(&old.to_le_bytes());
    img[o + 8..o + 16].copy_from_slice(&new.to_le_bytes());
}

fn errors(r: &CheckReport) -> Vec<&Finding> {
    r.findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect()
}

#[test]
fn bad_header_fields_are_fatal_findings() {
    let mut img = golden4k();
    img[0] = 0x54;
    let r = check_of(img);
    assert!(!r.is_consistent());
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::BadMagic { magic: 0x70416e54 },
            ..
        }]
    ));

    let mut img = golden4k();
    img[8] = 2;
    let r = check_of(img);
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::BadVersion { version: 2 },
            ..
        }]
    ));

    let mut img = golden4k();
    img[12] = 12;
    let r = check_of(img);
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::BadChunkSize { sectors: 12 },
            ..
        }]
    ));
}

#[test]
fn device_shorter_than_header_and_area0() {
    let mut img = golden4k();
    img.truncate(CB + 100);
    let r = check_of(img);
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::TooShortForArea0 {
                len: 4196,
                needed: 8192
            },
            ..
        }]
    ));
    let r = check_of(vec![0x53; 10]);
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::TooShortForHeader { len: 10 },
            ..
        }]
    ));
}

#[test]
fn truncated_device_reports_missing_area_and_records_beyond_end() {
    // Cut at chunk 770: area 3 (chunk 772) is gone, area 2 is full.
    let mut img = golden4k();
    img.truncate(770 * CB);
    let r = check_of(img);
    let errs = errors(&r);
    let missing: Vec<_> = errs
        .iter()
        .filter(|f| {
            matches!(
                f.kind,
                FindingKind::MissingTerminator {
                    previous_full_area: 2
                }
            )
        })
        .collect();
    assert_eq!(missing.len(), 1, "{errs:?}");
    assert_eq!((missing[0].area, missing[0].chunk), (Some(3), Some(772)));
    // Area 2's records run up to new_chunk 771; 770 and 771 are beyond the end.
    let beyond: Vec<_> = errs
        .iter()
        .filter(|f| {
            matches!(
                f.kind,
                FindingKind::NewChunkBeyondEnd { device_chunks: 770 }
            )
        })
        .map(|f| f.chunk.unwrap())
        .collect();
    let want: Vec<u64> = exceptions_txt("chunk4k_mixed", "cow")
        .iter()
        .filter(|&&(_, n, a)| a < 3 && n >= 770)
        .map(|&(_, n, _)| n)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(beyond, want);
    assert_eq!(r.exceptions, 768);
}

#[test]
fn new_chunk_on_metadata_area_is_located() {
    let mut img = golden4k();
    let (old, _) = read_rec(&img, 2, 17);
    set_rec(&mut img, 2, 17, old, 515);
    let r = check_of(img);
    let errs = errors(&r);
    let f = errs
        .iter()
        .find(|f| f.kind == FindingKind::NewChunkOnMetadata)
        .expect("finding");
    assert_eq!((f.area, f.slot, f.chunk), (Some(2), Some(17), Some(515)));
    assert_eq!(
        f.to_string(),
        "area 2 slot 17: new_chunk 515 points at a metadata area"
    );
}

#[test]
fn duplicate_old_and_new_chunks_name_both_records() {
    let mut img = golden4k();
    let (old03, new03) = read_rec(&img, 0, 3);
    let (_, new_2_17) = read_rec(&img, 2, 17);
    set_rec(&mut img, 2, 17, old03, new_2_17); // duplicate old_chunk
    let (old_1_5, _) = read_rec(&img, 1, 5);
    set_rec(&mut img, 1, 5, old_1_5, new03); // duplicate new_chunk
    let r = check_of(img);
    let errs = errors(&r);
    assert_eq!(errs.len(), 2, "{errs:?}");
    let d_old = errs
        .iter()
        .find(|f| matches!(f.kind, FindingKind::DuplicateOldChunk { .. }))
        .unwrap();
    assert_eq!(
        (d_old.area, d_old.slot, d_old.chunk, &d_old.kind),
        (
            Some(2),
            Some(17),
            Some(old03),
            &FindingKind::DuplicateOldChunk {
                first_area: 0,
                first_slot: 3
            }
        )
    );
    let d_new = errs
        .iter()
        .find(|f| matches!(f.kind, FindingKind::DuplicateNewChunk { .. }))
        .unwrap();
    assert_eq!(
        (d_new.area, d_new.slot, d_new.chunk, &d_new.kind),
        (
            Some(1),
            Some(5),
            Some(new03),
            &FindingKind::DuplicateNewChunk {
                first_area: 0,
                first_slot: 3
            }
        )
    );
}

#[test]
fn many_problems_are_all_reported_in_one_run() {
    let mut img = golden4k();
    set_rec(&mut img, 0, 10, 1, 258); // metadata
    set_rec(&mut img, 1, 20, 1, 1 << 40); // beyond end
    set_rec(&mut img, 3, 100, 7, 1029); // metadata (area 4 location)
    let r = check_of(img);
    let errs = errors(&r);
    let locs: Vec<_> = errs.iter().map(|f| (f.area, f.slot)).collect();
    assert!(locs.contains(&(Some(0), Some(10))), "{errs:?}");
    assert!(locs.contains(&(Some(1), Some(20))));
    assert!(locs.contains(&(Some(3), Some(100))));
}

#[test]
fn full_last_area_without_terminator_room() {
    // Fill area 3 (110 records) up to 256 slots with fresh records, and end
    // the device where area 4 (chunk 1029) would start.
    let mut img = golden4k();
    for slot in 110..256 {
        set_rec(&mut img, 3, slot, 5000 + slot, 773 + slot);
    }
    img.truncate(1029 * CB);
    let r = check_of(img);
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].kind,
        FindingKind::MissingTerminator {
            previous_full_area: 3
        }
    );
    assert_eq!((errs[0].area, errs[0].chunk), (Some(4), Some(1029)));
}

/// A device whose reads of one byte range fail with EIO.
struct FailingRange {
    inner: MemDev,
    bad: std::ops::Range<u64>,
}

impl BlockDev for FailingRange {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, f: WriteFlags) -> io::Result<()> {
        self.inner.write_at(buf, offset, f)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn unreadable_next_area_is_reported() {
    let at = 772 * CB as u64;
    let dev = FailingRange {
        inner: MemDev::from_vec(golden4k()),
        bad: at..at + 512,
    };
    let r = check(&CheckOptions::new(&dev)).expect("runs");
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(matches!(errs[0].kind, FindingKind::AreaUnreadable { .. }));
    assert_eq!((errs[0].area, errs[0].chunk), (Some(3), Some(772)));
    // dump still lists what it could and says the list is incomplete.
    let mut out = Vec::new();
    let rep = dump(&DumpOptions::new(&dev, DumpFormat::Json), &mut out).unwrap();
    assert!(rep.incomplete.is_some());
    assert_eq!(rep.summary.exceptions, 768);
}

#[test]
fn stale_tail_after_terminator_is_only_a_note() {
    let mut img = golden4k();
    // Area 3 ends at slot 110; put junk in slots 111 and 200.
    set_rec(&mut img, 3, 111, 9, 900);
    set_rec(&mut img, 3, 200, 0, 1);
    let r = check_of(img);
    assert!(r.is_consistent(), "{:?}", r.findings);
    let f = r
        .findings
        .iter()
        .find(|f| matches!(f.kind, FindingKind::StaleAfterTerminator { .. }))
        .unwrap();
    assert_eq!(
        f.kind,
        FindingKind::StaleAfterTerminator { nonzero_slots: 2 }
    );
    assert_eq!((f.area, f.slot), (Some(3), Some(110)));
    assert_eq!(r.exceptions, 878);
}

#[test]
fn records_of_an_invalidated_store_are_notes_not_errors() {
    let mut img = golden4k();
    img[4] = 0; // valid = 0
    let (old, _) = read_rec(&img, 2, 17);
    set_rec(&mut img, 2, 17, old, 515);
    let r = check_of(img);
    assert!(r.is_consistent());
    assert!(r
        .findings
        .iter()
        .any(|f| f.kind == FindingKind::NewChunkOnMetadata && f.severity == Severity::Note));
}

//------------------------------------------
// Never panic.

fn run_everything(bytes: Vec<u8>) {
    let dev = MemDev::from_vec(bytes);
    let _ = check(&CheckOptions::new(&dev));
    for format in [DumpFormat::Human, DumpFormat::Json] {
        let _ = dump(&DumpOptions::new(&dev, format), &mut io::sink());
    }
}

fn small_golden() -> Vec<u8> {
    // Header + areas of chunk4k_mixed only up to area 1, to keep cases fast:
    // the first 260 chunks (area 1 at 258, records point up to 257+).
    let mut v = golden4k();
    v.truncate(260 * CB);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..20_000), magic in any::<bool>()) {
        if magic && bytes.len() >= 16 {
            // Give the walk a chance: a plausible header with a random chunk size.
            bytes[..4].copy_from_slice(&0x70416e53u32.to_le_bytes());
            bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
            let sh = bytes[12] % 6;
            bytes[12..16].copy_from_slice(&(1u32 << sh).to_le_bytes());
        }
        run_everything(bytes);
    }

    #[test]
    fn mutated_golden_never_panics(
        edits in proptest::collection::vec((0usize..(CB * 3), any::<u8>()), 1..40),
        area1 in proptest::collection::vec((0usize..CB, any::<u8>()), 0..20),
        cut in proptest::option::of(0usize..(260 * CB)),
    ) {
        let mut img = small_golden();
        for (at, b) in edits {
            img[at] = b; // header, area 0, first data chunk
        }
        for (at, b) in area1 {
            img[258 * CB + at] = b;
        }
        if let Some(c) = cut {
            img.truncate(c);
        }
        run_everything(img);
    }
}

#[test]
fn a_header_claiming_huge_chunks_is_bounded() {
    // chunk_size 2^21 sectors (1 GiB): the device is far too small; no
    // allocation of a chunk-sized buffer may happen.
    let mut img = vec![0u8; 8192];
    img[..4].copy_from_slice(&0x70416e53u32.to_le_bytes());
    img[4] = 1;
    img[8] = 1;
    img[12..16].copy_from_slice(&(1u32 << 21).to_le_bytes());
    let r = check_of(img.clone());
    assert!(matches!(
        errors(&r)[..],
        [Finding {
            kind: FindingKind::TooShortForArea0 { .. },
            ..
        }]
    ));
    run_everything(img);
}

#[test]
fn extreme_chunk_numbers_do_not_overflow() {
    for new in [u64::MAX, u64::MAX - 1, 1 << 63] {
        let mut img = small_golden();
        set_rec(&mut img, 0, 255, u64::MAX, new);
        let r = check_of(img.clone());
        assert!(r.findings.iter().any(
            |f| f.chunk == Some(new) && matches!(f.kind, FindingKind::NewChunkBeyondEnd { .. })
        ));
        run_everything(img.clone());
        // The dump of it is refused by restore (it would need > 2^64 bytes).
        let doc = DumpDoc::parse(dump_json_of(&MemDev::from_vec(img)).as_bytes()).unwrap();
        assert!(doc.plan().is_err());
    }
}

#[test]
fn readahead_depth_does_not_change_results() {
    let mut truncated = golden4k();
    truncated.truncate(770 * CB);
    let mut dup = golden4k();
    let (old03, _) = read_rec(&dup, 0, 3);
    let (_, n) = read_rec(&dup, 2, 17);
    set_rec(&mut dup, 2, 17, old03, n);
    let images: Vec<Vec<u8>> = GOLDEN
        .iter()
        .map(cow_bytes)
        .chain([truncated, dup])
        .collect();
    for img in images {
        let dev = MemDev::from_vec(img);
        let mut reports = Vec::new();
        let mut dumps = Vec::new();
        for depth in [0, 1, 3, 12] {
            let mut o = CheckOptions::new(&dev);
            o.readahead = depth;
            let r = check(&o).unwrap();
            reports.push((r.findings, r.exceptions, r.dm_status));
            let mut d = DumpOptions::new(&dev, DumpFormat::Human);
            d.readahead = depth;
            let mut out = Vec::new();
            dump(&d, &mut out).unwrap();
            dumps.push(out);
        }
        assert!(reports.windows(2).all(|w| w[0] == w[1]));
        assert!(dumps.windows(2).all(|w| w[0] == w[1]));
    }
    // An unreadable area reached through the read-ahead path.
    let at = 772 * CB as u64;
    let dev = FailingRange {
        inner: MemDev::from_vec(golden4k()),
        bad: at..at + 512,
    };
    for depth in [0, 12] {
        let mut o = CheckOptions::new(&dev);
        o.readahead = depth;
        let r = check(&o).unwrap();
        let errs = errors(&r);
        assert_eq!(errs.len(), 1, "depth {depth}: {errs:?}");
        assert_eq!((errs[0].area, errs[0].chunk), (Some(3), Some(772)));
    }
}
