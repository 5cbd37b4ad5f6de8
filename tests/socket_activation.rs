//! systemd socket activation (issue 14, item 3): `serve` takes the
//! listeners passed in `LISTEN_FDS` (unix and TCP) instead of making its
//! own, started by `systemd-socket-activate` (package systemd, installed by
//! scripts/test.sh) on the first connection, as `contrib/dmsnap@.socket`
//! does; SIGTERM ends it with exit 0.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{bin, ok};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn serve_takes_the_listeners_systemd_passes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("sa");
    let p = pool.to_str().unwrap();
    ok(&["create", p, "--size", "4M"]);
    let sock = dir.path().join("sa.sock");
    let port = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .args([bin(), "serve", p])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    // The activator listens at once; dmsnap starts on the first connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the activator made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let unix = format!("nbd+unix:///origin?socket={}", sock.display());
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &unix])
        .output()
        .unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let tcp = format!("nbd://127.0.0.1:{port}/origin");
    let r = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &tcp])
        .output()
        .unwrap();
    assert!(
        r.status.success()
            && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    // No listener of its own: POOL/nbd.sock was not made.
    assert!(!pool.join("nbd.sock").exists());
    // The control socket works as usual.
    let st = ok(&["status", p, "--json"]);
    assert!(st.contains("\"origin\""), "{st}");
    // SIGTERM (systemctl stop): exit 0; the socket file is the manager's.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("(socket activation)"), "{err}");
}
