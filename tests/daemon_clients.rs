//! Real clients against `dmsnap serve` on origin and snapshots (fio with
//! crc32c verification, nbdcopy), and merges that survive `kill -9`.

mod common;
mod support;

use common::sha256_hex;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::nbd_client::NbdClient;
use support::{dmsnap, ok, Daemon};

fn uri(pool: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        pool.join("nbd.sock").display()
    )
}

/// fio's nbd engine: random 4 KiB writes at QD16 with crc32c headers; `seed`
/// picks the data so origin and snapshot hold different blocks.
fn fio(pool: &Path, export: &str, seed: u32, extra: &[&str]) -> Output {
    Command::new("fio")
        .args([
            "--name=dmsnap",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--randrepeat=1",
            "--exitall_on_error=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--randseed={seed}"))
        .arg(format!("--uri={}", uri(pool, export)))
        .args(extra)
        .output()
        .expect("fio (installed by scripts/test.sh)")
}

fn fio_ok(o: &Output, what: &str) {
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("err= 0"),
        "{what}: {s}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn fio_verifies_origin_and_snapshot_independently() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "32M"]);
    let d = Daemon::start(&p, &[]);
    // Origin data with verification headers, then a snapshot of it.
    fio_ok(&fio(&p, "origin", 1, &[]), "origin write+verify");
    ok(&["snapshot", "create", ps, "snap", "--chunk-size", "16k"]);
    // The snapshot reads back the origin's blocks...
    fio_ok(
        &fio(&p, "snap", 1, &["--verify_only"]),
        "snapshot verifies the origin's data",
    );
    // ...and keeps them while the origin is overwritten with other data.
    fio_ok(&fio(&p, "origin", 2, &[]), "origin rewrite");
    fio_ok(
        &fio(&p, "snap", 1, &["--verify_only"]),
        "snapshot unchanged by origin writes",
    );
    // Writes to the snapshot (partial 16 KiB chunks: copy-then-write) verify,
    // and the origin is untouched by them.
    fio_ok(&fio(&p, "snap", 3, &[]), "snapshot write+verify");
    fio_ok(
        &fio(&p, "origin", 2, &["--verify_only"]),
        "origin unchanged by snapshot writes",
    );
    drop(d);
    // After a restart everything still verifies.
    let d = Daemon::start(&p, &[]);
    fio_ok(
        &fio(&p, "snap", 3, &["--verify_only"]),
        "snapshot after restart",
    );
    fio_ok(
        &fio(&p, "origin", 2, &["--verify_only"]),
        "origin after restart",
    );
    assert!(d.stop().success());
}

#[test]
fn nbdcopy_out_of_a_snapshot_gives_the_snapshot_time_origin() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    let src = t.path().join("src.img");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2246822519) >> 23) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    ok(&["create", ps, "--size", "16M"]);
    let d = Daemon::start(&p, &[]);
    let st = Command::new("nbdcopy")
        .arg(&src)
        .arg(uri(&p, "origin"))
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy into the origin");
    ok(&["snapshot", "create", ps, "s"]);
    let zeros = t.path().join("zeros.img");
    std::fs::write(&zeros, vec![0x77u8; 16 << 20]).unwrap();
    assert!(Command::new("nbdcopy")
        .arg(&zeros)
        .arg(uri(&p, "origin"))
        .status()
        .unwrap()
        .success());
    let out = t.path().join("out.img");
    let st = Command::new("nbdcopy")
        .arg(uri(&p, "s"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy out of the snapshot");
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the snapshot holds the origin as it was"
    );
    assert!(d.stop().success());
}

fn list_json(pool: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["status", "--json", pool.to_str().unwrap()])).unwrap()
}

fn allocated(pool: &Path, name: &str) -> Option<u64> {
    list_json(pool)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["allocated_sectors"].as_u64().unwrap())
}

/// SIGKILL, no clean-up at all.
fn kill9(d: Daemon) {
    let pid = d.pid();
    // SAFETY: kill(2) on a child we started; no memory involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::mem::forget(d); // the guard would SIGTERM a dead pid
    let t = Instant::now();
    // SAFETY: waitpid on our own child; status pointer is a live local.
    while unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) } == 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn merge_survives_kill_9_and_resumes_on_serve_and_offline() {
    // The kills must land mid-merge: the daemons merge one run per step (as
    // the kernel), not in the default batches that would take these 8 MiB
    // in one step.
    let slow = support::SLOW_MERGE;
    const CHUNKS: u64 = 2048; // 8 MiB of 4 KiB chunks
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    let d = Daemon::start_env(&p, &[], slow);
    let mut c = NbdClient::connect(&d.socket(), "origin").unwrap();
    let block = |n: u64, gen: u8| -> Vec<u8> {
        let mut b = vec![gen; 4096];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b
    };
    for n in 0..CHUNKS {
        assert_eq!(c.write(n * 4096, &block(n, 1)).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
    let want = sha256_hex(&c.read_all().unwrap());
    ok(&["snapshot", "create", ps, "s"]);
    // Overwrite every chunk in a scattered order: one exception per chunk,
    // no runs, so the merge takes one step (copy, flush, commit) per chunk.
    let mut order: Vec<u64> = (0..CHUNKS).collect();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for &n in &order {
        assert_eq!(c.write(n * 4096, &block(n, 2)).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
    // Another snapshot of the overwritten origin must keep its content throughout.
    ok(&["snapshot", "create", ps, "other"]);
    let other_want = sha256_hex(
        &NbdClient::connect(&d.socket(), "other")
            .unwrap()
            .read_all()
            .unwrap(),
    );
    let before = allocated(&p, "s").unwrap();
    drop(c);

    ok(&["merge", ps, "s"]);
    std::thread::sleep(Duration::from_millis(150));
    kill9(d);
    // Offline status reads the COW: the merge is recorded and partly done or not.
    let st = list_json(&p);
    let s = st["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s");
    // 2048 one-chunk steps, each with two flushes, take far longer than
    // 150 ms: the kill lands mid-merge.
    let s = s.expect("the merge was cut short by the kill");
    assert_eq!(s["state"], "merging");
    assert!(s["allocated_sectors"].as_u64().unwrap() <= before);
    // serve resumes it; kill it again mid-way.
    let d = Daemon::start_env(&p, &[], slow);
    let mut c = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(
        sha256_hex(&c.read_all().unwrap()),
        want,
        "the origin reads as the snapshot while merging"
    );
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    kill9(d);
    let left = allocated(&p, "s").expect("the second kill also lands mid-merge");
    assert!(left < before, "serve resumed the merge and made progress");
    // An offline merge finishes it.
    ok(&["merge", ps, "s"]);
    assert!(
        allocated(&p, "s").is_none(),
        "the merged snapshot left the pool"
    );
    let img = std::fs::read(p.join("origin.img")).unwrap();
    assert_eq!(
        sha256_hex(&img),
        want,
        "the origin equals the snapshot's content"
    );
    let d = Daemon::start_env(&p, &[], slow);
    let got = sha256_hex(
        &NbdClient::connect(&d.socket(), "other")
            .unwrap()
            .read_all()
            .unwrap(),
    );
    assert_eq!(got, other_want, "the other snapshot kept its content");
    assert!(d.stop().success());
}

#[test]
fn an_invalid_snapshot_cannot_be_merged() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "small", "--cow-size", "64k"]);
    let d = Daemon::start(&p, &[]);
    let mut c = NbdClient::connect(&d.socket(), "origin").unwrap();
    for n in 0..32u64 {
        assert_eq!(
            c.write(n * 4096, &[1u8; 4096]).unwrap(),
            0,
            "origin writes never fail"
        );
    }
    drop(c);
    let st = list_json(&p);
    assert_eq!(st["snapshots"][0]["dm_status"], "Invalid");
    let o = dmsnap(&["merge", ps, "small"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("invalid"), "{e}");
    assert!(d.stop().success());
    // Offline too.
    let o = dmsnap(&["merge", ps, "small"]);
    assert!(
        !o.status.success(),
        "offline merge of an invalid snapshot is refused"
    );
}

/// First writes to a snapshot acknowledged without a FLUSH: with
/// `--sync-snapshot-writes` they survive a `kill -9` at once; by default the
/// daemon makes their records durable within about a second.
#[test]
fn snapshot_first_writes_survive_kill_9_at_once_or_after_a_second() {
    for (flags, wait) in [
        (&["--sync-snapshot-writes"][..], Duration::ZERO),
        (&[][..], Duration::from_millis(2500)),
    ] {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("pool");
        let ps = p.to_str().unwrap();
        ok(&["create", ps, "--size", "4M"]);
        ok(&["snapshot", "create", ps, "s"]);
        let d = Daemon::start(&p, flags);
        let mut c = NbdClient::connect(&d.socket(), "s").unwrap();
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        // A partial chunk (copy, then write) and whole chunks.
        assert_eq!(c.write(8192 + 512, &data[..1024]).unwrap(), 0);
        assert_eq!(c.write(1 << 20, &data).unwrap(), 0);
        let want = c.read_all().unwrap();
        std::thread::sleep(wait);
        kill9(d);
        let d = Daemon::start(&p, &[]);
        let mut c = NbdClient::connect(&d.socket(), "s").unwrap();
        assert!(
            c.read_all().unwrap() == want,
            "{flags:?}: the snapshot lost acknowledged first writes"
        );
        drop(c);
        d.stop();
    }
}
