//! The pool commands and the daemon's life, through the binary: offline and
//! online snapshot create/list/remove, status, serving to real NBD clients
//! (qemu-io, qemu-img, nbdinfo), signals, and the errors users meet.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use support::nbd_client::NbdClient;
use support::{dmsnap, ok, Daemon};

fn uri(pool: &std::path::Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        pool.join("nbd.sock").display()
    )
}

fn qemu_io(pool: &std::path::Path, export: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri(pool, export));
    c.output().expect("qemu-io (installed by scripts/test.sh)")
}

#[test]
fn lifecycle_offline_and_online() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "64M"]);
    assert!(p.join("pool.json").exists());
    ok(&["snapshot", "create", ps, "before"]);
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["origin"]["size"], 64 << 20);
    let s0 = &st["snapshots"][0];
    assert_eq!(s0["name"], "before");
    assert_eq!(s0["store"], "P");
    assert_eq!(s0["chunk_size"], 4096);
    assert_eq!(s0["state"], "active");
    // Fresh 4 KiB store: 16 sectors allocated (header + area 0), 16 metadata.
    assert_eq!(s0["allocated_sectors"], 16);
    assert_eq!(s0["metadata_sectors"], 16);
    assert_eq!(s0["dm_status"], format!("16/{} 16", s0["total_sectors"]));
    assert!(
        s0["cow"].as_str().unwrap().starts_with('/'),
        "absolute COW path"
    );

    let d = Daemon::start(&p, &[]);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the NBD socket is private");

    let o = qemu_io(
        &p,
        "origin",
        &["write -P 0xab 0 1M", "flush", "read -P 0xab 0 1M"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = qemu_io(&p, "before", &["read -P 0 0 1M"]);
    assert!(
        o.status.success()
            && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
    );

    // Online snapshot: appears as an export at once.
    ok(&["snapshot", "create", ps, "after", "--chunk-size", "16k"]);
    let o = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", d.socket().display()))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["origin", "before", "after"] {
        assert!(list.contains(n), "nbdinfo --list shows {n}: {list}");
    }
    let o = qemu_io(&p, "origin", &["write -P 0xcd 0 64k"]);
    assert!(o.status.success());
    let o = qemu_io(&p, "after", &["read -P 0xab 0 1M"]);
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = qemu_io(&p, "before", &["read -P 0 0 1M"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("failed"));

    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["snapshots"].as_array().unwrap().len(), 2);
    assert!(
        st["snapshots"][0]["allocated_sectors"].as_u64().unwrap() > 16,
        "before got exceptions"
    );
    let human = ok(&["status", ps]);
    assert!(
        human.contains("before") && human.contains("after"),
        "{human}"
    );

    ok(&["snapshot", "remove", ps, "after"]);
    assert!(
        !p.join("after.cow").exists(),
        "the pool's COW file is deleted"
    );
    let names = ok(&["snapshot", "list", ps]);
    assert!(names.contains("before") && !names.contains("after"));

    // A second daemon on the same pool is refused.
    let o = dmsnap(&["serve", ps]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    assert!(d.stop().success(), "SIGTERM exits 0");
    assert!(!p.join("control.sock").exists() && !p.join("nbd.sock").exists());
    // Offline again: the data is on disk.
    let img = std::fs::read(p.join("origin.img")).unwrap();
    assert!(img[..65536].iter().all(|&b| b == 0xcd));
    assert!(img[65536..1 << 20].iter().all(|&b| b == 0xab));
}

#[test]
fn snapshot_taken_while_a_client_writes_captures_a_consistent_point() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap().to_string();
    ok(&["create", &ps, "--size", "16M"]);
    let d = Daemon::start(&p, &[]);
    let sock = d.socket();
    // Writer: writes generation g into every 4 KiB block, in order, counting acks.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = {
        let (acked, stop, sock) = (acked.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&sock, "origin").unwrap();
            let mut n: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block = n % 4096;
                let mut buf = vec![0u8; 4096];
                buf[..8].copy_from_slice(&(n + 1).to_le_bytes());
                assert_eq!(c.write(block * 4096, &buf).unwrap(), 0);
                acked.store(n + 1, std::sync::atomic::Ordering::SeqCst);
                n += 1;
            }
        })
    };
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 500 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before = acked.load(std::sync::atomic::Ordering::SeqCst);
    ok(&["snapshot", "create", &ps, "mid"]);
    let after = acked.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.join().unwrap();
    let mut c = NbdClient::connect(&sock, "mid").unwrap();
    let img = c.read_all().unwrap();
    // The snapshot holds a prefix of the write sequence: every write acked
    // before the create began, none issued after it returned.
    let mut max_seen = 0;
    for b in 0..4096usize {
        let v = u64::from_le_bytes(img[b * 4096..b * 4096 + 8].try_into().unwrap());
        max_seen = max_seen.max(v);
    }
    assert!(
        max_seen >= before,
        "acknowledged writes are in the snapshot ({max_seen} < {before})"
    );
    assert!(
        max_seen <= after + 1,
        "no write issued after the create returned ({max_seen} > {after}+1)"
    );
    for b in 0..4096u64 {
        let v = u64::from_le_bytes(
            img[b as usize * 4096..b as usize * 4096 + 8]
                .try_into()
                .unwrap(),
        );
        // Block b holds the last write n < max_seen with n % 4096 == b.
        let want = if max_seen > b {
            ((max_seen - 1 - b) / 4096) * 4096 + b + 1
        } else {
            0
        };
        assert_eq!(v, want, "block {b} is from a consistent point");
    }
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn transient_snapshots_end_with_the_daemon() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    let d = Daemon::start(&p, &[]);
    ok(&[
        "snapshot",
        "create",
        ps,
        "scratch",
        "--store",
        "N",
        "--cow-size",
        "4M",
    ]);
    let o = qemu_io(
        &p,
        "scratch",
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"));
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(
        st["snapshots"][0]["metadata_sectors"], 0,
        "transient: no metadata"
    );
    assert!(d.stop().success());
    assert_eq!(ok(&["snapshot", "list", "--json", ps]).trim(), "[]");
    assert!(!p.join("scratch.cow").exists());
}

#[test]
fn read_only_snapshots_refuse_writes() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "ro"]);
    let d = Daemon::start(&p, &["--read-only-snapshots"]);
    let o = qemu_io(&p, "ro", &["write 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            || text.contains("failed")
            || text.contains("ermission")
            || text.contains("read-only"),
        "{text}"
    );
    let o = qemu_io(&p, "origin", &["write 0 4k"]);
    assert!(o.status.success());
    assert!(d.stop().success());
}

#[test]
fn errors_are_one_clear_sentence_and_non_zero() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    let o = dmsnap(&["status", ps]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not a dmsnap pool"), "{e}");
    ok(&["create", ps, "--size", "8M"]);
    let o = dmsnap(&["create", ps, "--size", "8M"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("exists"));
    let o = dmsnap(&["snapshot", "create", ps, "x", "--chunk-size", "3k"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("power of 2"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = dmsnap(&["snapshot", "create", ps, "origin"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("not a valid snapshot name")
    );
    ok(&["snapshot", "create", ps, "a"]);
    let o = dmsnap(&["snapshot", "create", ps, "a"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = dmsnap(&["snapshot", "remove", ps, "nope"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no snapshot named")
    );
    let o = dmsnap(&[
        "create",
        t.path().join("p2").to_str().unwrap(),
        "--size",
        "12q",
    ]);
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2");
    // A broken manifest is named, not panicked on.
    std::fs::write(p.join("pool.json"), b"{\"version\": 1").unwrap();
    let o = dmsnap(&["status", ps]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("bad pool manifest") && !e.contains("panicked"),
        "{e}"
    );
}

#[test]
fn qemu_img_convert_and_compare_through_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "32M"]);
    let d = Daemon::start(&p, &[]);
    let src = t.path().join("src.img");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(uri(&p, "origin"))
        .status()
        .unwrap();
    assert!(st.success());
    ok(&["snapshot", "create", ps, "s"]);
    // Overwrite the origin: the snapshot must still compare equal to src.
    let o = qemu_io(&p, "origin", &["write -P 0x5a 0 32M"]);
    assert!(o.status.success());
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(uri(&p, "s"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "snapshot == pre-write origin: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(d.stop().success());
}
