//! Helpers for tests that drive the `dmsnap` binary: a daemon guard, golden
//! fixtures, the golden data pattern.
#![allow(dead_code)]

pub mod nbd_client;

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dmsnap")
}

/// Run `dmsnap ARGS`, returning its output (never panics on failure).
pub fn dmsnap(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run dmsnap")
}

/// Run `dmsnap ARGS` and insist on success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = dmsnap(args);
    assert!(
        o.status.success(),
        "dmsnap {args:?} failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf8 stdout")
}

/// Where the kernel-made golden cases live: the project's copy, or the
/// shared folder beside the checkout.
pub fn golden_dir(case: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let local = root.join("tests/fixtures/kernel").join(case);
    if local.exists() {
        local
    } else {
        root.join("../shared/golden").join(case)
    }
}

/// Decompress a golden image into `dst`.
pub fn unpack(case: &str, file: &str, dst: &Path) {
    let src = golden_dir(case).join(format!("{file}.zst"));
    let st = Command::new("zstd")
        .args(["-q", "-d", "-f", "--long=27", "-o"])
        .arg(dst)
        .arg(&src)
        .status()
        .expect("zstd (installed by scripts/test.sh)");
    assert!(st.success(), "zstd -d {}", src.display());
}

pub fn case_json(case: &str) -> serde_json::Value {
    let t = std::fs::read_to_string(golden_dir(case).join("case.json")).expect("case.json");
    serde_json::from_str(&t).expect("case.json parses")
}

/// Bytes `[offset, offset+len)` of golden pattern `letter`: 512-byte sector
/// `s` is `('X%09d.' % s * 47)[:511] + '\n'`.
pub fn pattern(letter: char, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let first = offset / 512;
    let last = (offset + len as u64).div_ceil(512);
    for s in first..last {
        let unit = format!("{letter}{s:09}.");
        let mut sector = unit.repeat(47).into_bytes();
        sector.truncate(511);
        sector.push(b'\n');
        let lo = if s == first {
            (offset % 512) as usize
        } else {
            0
        };
        let hi = ((offset + len as u64) - s * 512).min(512) as usize;
        out.extend_from_slice(&sector[lo..hi]);
    }
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running `dmsnap serve`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    pub pool: PathBuf,
}

impl Daemon {
    pub fn start(pool: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg(pool)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dmsnap serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // keep draining
            let mut rest = String::new();
            while r.read_line(&mut rest).map(|n| n > 0).unwrap_or(false) {
                rest.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        if line.trim() != "ready" {
            let _ = child.kill();
            let st = child.wait();
            panic!("dmsnap serve did not print ready (got {line:?}, exit {st:?})");
        }
        Daemon {
            child: Some(child),
            pool: pool.to_path_buf(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.pool.join("nbd.sock")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.stop_inner().expect("daemon was running")
    }

    fn stop_inner(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) with a pid we own; no memory involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().ok().flatten() {
                return Some(st);
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
