//! The `dmsnap` binary's contract for the offline tools: help and version,
//! usage errors, exit codes 0/1/2, and quiet handling of a closed stdout.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Output, Stdio};

fn dmsnap(args: &[&str]) -> Output {
    Command::new(dmsnap_bin())
        .args(args)
        .output()
        .expect("run dmsnap")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A temp dir holding a decompressed golden COW, optionally edited.
fn cow_file(case: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut img = fixture(case, "cow.img");
    edit(&mut img);
    let path = dir.path().join("cow.img");
    std::fs::write(&path, img).expect("write");
    let p = path.to_str().expect("utf-8 path").to_owned();
    (dir, p)
}

#[test]
fn help_and_version() {
    let o = dmsnap(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    for sub in ["dump", "check", "restore"] {
        assert!(stdout(&o).contains(sub), "{}", stdout(&o));
    }
    for sub in ["dump", "check", "restore"] {
        let o = dmsnap(&[sub, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{sub}");
        assert!(stdout(&o).contains("Usage: dmsnap"), "{sub}");
    }
    let o = dmsnap(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o).trim(),
        format!("dmsnap {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_option_is_a_usage_error() {
    for args in [
        &["dump", "--no-such-option", "x"][..],
        &["frobnicate"][..],
        &[][..],
        &["check"][..],
        &["restore", "only-one-arg"][..],
    ] {
        let o = dmsnap(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains("Usage:"), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn missing_input_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let m = missing.to_str().unwrap();
    for args in [
        &["dump", m][..],
        &["dump", "--json", m][..],
        &["check", m][..],
        &["restore", m, m][..],
    ] {
        let o = dmsnap(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with("dmsnap: "), "{e}");
        assert!(e.contains("No such file"), "cause chain missing: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn corrupt_input_exits_1() {
    // Bad magic: dump refuses, check reports.
    let (_d, p) = cow_file("chunk4k_mixed", |img| img[0] ^= 0xff);
    let o = dmsnap(&["dump", &p]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("magic"));
    let o = dmsnap(&["check", &p]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("bad magic"), "{}", stdout(&o));

    // A record on a metadata chunk: check names it, exit 1.
    let (_d, p) = cow_file("chunk4k_mixed", |img| {
        let o = 258 * 4096 + 5 * 16 + 8; // area 1 slot 5 new_chunk
        img[o..o + 8].copy_from_slice(&515u64.to_le_bytes());
    });
    let o = dmsnap(&["check", &p]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("area 1 slot 5: new_chunk 515 points at a metadata area"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("corrupt"));

    // A dump that is not JSON, and one that is inconsistent.
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("d.json");
    let cow = dir.path().join("c.img");
    std::fs::write(&j, "not json").unwrap();
    let o = dmsnap(&["restore", j.to_str().unwrap(), cow.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    std::fs::write(
        &j,
        r#"{"magic": "0x70416e53", "valid": true, "version": 1, "chunk_size": 8,
            "exceptions": [{"old_chunk": 0, "new_chunk": 258}]}"#,
    )
    .unwrap();
    let o = dmsnap(&["restore", j.to_str().unwrap(), cow.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("metadata area"), "{}", stderr(&o));
    assert!(!cow.exists(), "nothing is written for a refused dump");
}

#[test]
fn invalidated_store_checks_clean_and_says_so() {
    let (_d, p) = cow_file("overflow_invalid", |_| {});
    let o = dmsnap(&["check", &p]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("invalidated"), "{}", stdout(&o));
    assert!(stdout(&o).contains("status Invalid"), "{}", stdout(&o));
    assert!(o.stderr.is_empty());
}

#[test]
fn no_stderr_on_broken_pipe() {
    // A store big enough that either output form overflows a 64 KiB pipe
    // buffer, so dump must meet EPIPE: 20 000 records, made by `restore`.
    let dir = tempfile::tempdir().unwrap();
    let e = 256u64;
    let recs: Vec<String> = (0..20_000u64)
        .map(|i| {
            let new = 2 + i + i / e; // skip one metadata chunk per 256 records
            format!(r#"{{"old_chunk": {}, "new_chunk": {new}}}"#, i * 7)
        })
        .collect();
    let doc = format!(
        r#"{{"magic": "0x70416e53", "valid": true, "version": 1, "chunk_size": 8, "exceptions": [{}]}}"#,
        recs.join(", ")
    );
    let j = dir.path().join("big.json");
    std::fs::write(&j, doc).unwrap();
    let cow = dir.path().join("big.img");
    let o = dmsnap(&["restore", j.to_str().unwrap(), cow.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = dmsnap(&["check", cow.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let p = cow.to_str().unwrap().to_owned();
    for json in [false, true] {
        let mut cmd = Command::new(dmsnap_bin());
        cmd.arg("dump");
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .arg(&p)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one byte, then close our end: dump's later writes hit EPIPE.
        let mut out = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        out.read_exact(&mut one).unwrap();
        drop(out);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(0), "json={json}");
        assert!(err.is_empty(), "json={json}: {err}");
    }
}
