//! Helpers for tests that drive the `dmsnap` binary: runners, a daemon guard,
//! a minimal NBD client. Golden fixtures and patterns are in `tests/common`.
#![allow(dead_code)]

pub mod nbd_client;

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

/// Environment for a daemon whose merge must be watched mid-way: one run per
/// step, as the kernel merges, instead of the default batches that finish a
/// small test merge in one step, and a 2 ms pause before each step (the
/// pipelined merge is otherwise over before a test can look).
pub const SLOW_MERGE: &[(&str, &str)] = &[
    ("DMSNAP_MERGE_BATCH_CHUNKS", "1"),
    ("DMSNAP_MERGE_STEP_DELAY_MS", "2"),
];

/// A running `dmsnap serve`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    pub pool: PathBuf,
}

impl Daemon {
    pub fn start(pool: &Path, extra: &[&str]) -> Daemon {
        Self::start_env(pool, extra, &[])
    }

    /// Like [`Daemon::start`], with extra environment for the daemon.
    pub fn start_env(pool: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg(pool)
            .args(extra)
            .envs(env.iter().copied())
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

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
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
