//! Failure paths of the pool commands, through the binary (issue 10): a COW
//! already in use is refused by identity, a failed `create` or `snapshot
//! create` leaves nothing behind, read-only and broken pools get clear
//! answers, a completed merge is remembered. Needs root (tmpfs and bind
//! mounts); every mount is undone by a guard, even when a test fails.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::nbd_client::NbdClient;
use support::{bin, dmsnap, ok, Daemon};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and insist on failure with exit 2; returns stderr.
fn fails(args: &[&str]) -> String {
    let o = dmsnap(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "dmsnap {args:?} must fail: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// The names of the entries of a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn snapshot_names(pool: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["snapshot", "list", "--json", pool.to_str().unwrap()])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// A mount, undone (lazily, so a busy one goes too) on drop.
struct Mount(PathBuf);

impl Mount {
    fn run(args: &[&str], target: &Path) -> Mount {
        std::fs::create_dir_all(target).unwrap();
        let st = Command::new("mount")
            .args(args)
            .arg(target)
            .status()
            .expect("mount (util-linux)");
        assert!(
            st.success(),
            "mount {args:?} {} (needs root)",
            target.display()
        );
        Mount(target.to_path_buf())
    }
    /// A tmpfs of `size` (e.g. "2M") at `target`.
    fn tmpfs(target: &Path, size: &str) -> Mount {
        Self::run(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            target,
        )
    }
    /// `src` seen read-only at `target`.
    fn read_only_bind(src: &Path, target: &Path) -> Mount {
        let m = Self::run(&["--bind", src.to_str().unwrap()], target);
        let st = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(target)
            .status()
            .unwrap();
        assert!(st.success(), "remount read-only");
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the filesystem holding `dir` (a small tmpfs) with one file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0xffu8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&block[..512]).is_ok() {}
    p
}

#[test]
fn a_cow_already_in_use_is_refused_by_identity_offline() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "a"]);
    let a_cow = p.join("a.cow");
    let before = std::fs::read(&a_cow).unwrap();
    std::fs::create_dir(p.join("x")).unwrap();
    std::os::unix::fs::symlink(&a_cow, t.path().join("link.cow")).unwrap();
    std::fs::hard_link(&a_cow, t.path().join("hard.cow")).unwrap();
    std::os::unix::fs::symlink(p.join("origin.img"), t.path().join("origin-link")).unwrap();
    let same_as_a = [
        a_cow.clone(),
        p.join("x/../a.cow"),
        t.path().join("link.cow"),
        t.path().join("hard.cow"),
    ];
    for cow in &same_as_a {
        let e = fails(&[
            "snapshot",
            "create",
            ps,
            "c",
            "--cow",
            cow.to_str().unwrap(),
        ]);
        assert!(
            e.contains("already the COW of snapshot 'a'"),
            "{}: {e}",
            cow.display()
        );
    }
    for cow in [p.join("origin.img"), t.path().join("origin-link")] {
        let e = fails(&[
            "snapshot",
            "create",
            ps,
            "c",
            "--cow",
            cow.to_str().unwrap(),
        ]);
        assert!(e.contains("it is the origin of this pool"), "{e}");
    }
    let e = fails(&[
        "snapshot",
        "create",
        ps,
        "c",
        "--cow",
        p.join("pool.json").to_str().unwrap(),
    ]);
    assert!(e.contains("the manifest"), "{e}");
    assert_eq!(snapshot_names(&p), ["a"]);
    assert_eq!(std::fs::read(&a_cow).unwrap(), before, "a's COW untouched");
    // A file nothing uses is taken.
    let free = t.path().join("free.cow");
    std::fs::write(&free, vec![0u8; 1 << 20]).unwrap();
    ok(&[
        "snapshot",
        "create",
        ps,
        "c",
        "--cow",
        free.to_str().unwrap(),
    ]);
    let e = fails(&[
        "snapshot",
        "create",
        ps,
        "d",
        "--cow",
        free.to_str().unwrap(),
    ]);
    assert!(e.contains("snapshot 'c'"), "{e}");
}

#[test]
fn a_cow_already_in_use_is_refused_online_and_merging_stays_safe() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    let d = Daemon::start(&p, &[]);
    ok(&["snapshot", "create", ps, "a"]);
    std::os::unix::fs::symlink(p.join("a.cow"), t.path().join("link.cow")).unwrap();
    for cow in [p.join("a.cow"), t.path().join("link.cow")] {
        let e = fails(&[
            "snapshot",
            "create",
            ps,
            "c",
            "--cow",
            cow.to_str().unwrap(),
        ]);
        assert!(e.contains("already the COW of snapshot 'a'"), "{e}");
    }
    let e = fails(&[
        "snapshot",
        "create",
        ps,
        "c",
        "--cow",
        p.join("origin.img").to_str().unwrap(),
    ]);
    assert!(e.contains("origin"), "{e}");
    assert_eq!(snapshot_names(&p), ["a"]);
    // The pool still works: a keeps the origin as it was, merges, and the
    // pool serves again afterwards.
    let mut o = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(o.write(0, &[0x5a; 4096]).unwrap(), 0);
    let mut s = NbdClient::connect(&d.socket(), "a").unwrap();
    assert_eq!(s.read(0, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    drop((o, s));
    ok(&["merge", ps, "a", "--wait"]);
    assert!(d.stop().success());
    let d = Daemon::start(&p, &[]);
    let mut o = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(o.read(0, 4096).unwrap().unwrap(), vec![0u8; 4096]);
    drop(o);
    assert!(d.stop().success());
}

#[test]
fn a_failed_create_removes_what_it_made_and_only_that() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("p");
    let ps = p.to_str().unwrap();
    let e = fails(&["create", ps, "--size", "0"]);
    assert!(e.contains("positive multiple of 512"), "{e}");
    assert!(!p.exists(), "the directory it made is gone");
    // An existing directory (and what is in it) stays; only our files go.
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("keep"), b"mine").unwrap();
    fails(&["create", ps, "--size", "0"]);
    assert_eq!(listing(&p), ["keep"]);
    // SIZE overflow: a clear usage error, nothing made.
    let q = t.path().join("q");
    let e = fails(&["create", q.to_str().unwrap(), "--size", "9007199254740992k"]);
    assert!(
        e.contains("larger than any file") && !e.contains("out of range integral"),
        "{e}"
    );
    assert!(!q.exists());
    // A size the filesystem cannot hold (here: beyond the process's file
    // size limit, which fails like ext4 does past 16 TiB: EFBIG).
    let big = t.path().join("a/b/big");
    let o = unsafe_limited_file_size(&["create", big.to_str().unwrap(), "--size", "17T"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("cannot hold a file of 17.0 TiB"), "{e}");
    assert!(!t.path().join("a").exists(), "{:?}", listing(t.path()));
    // The retry works.
    ok(&["create", big.to_str().unwrap(), "--size", "1M"]);
}

/// `dmsnap ARGS` with a file size limit of 1 GiB (SIGXFSZ ignored, so the
/// system call fails with EFBIG instead of killing the process).
fn unsafe_limited_file_size(args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    // SAFETY: between fork and exec only async-signal-safe calls
    // (setrlimit, signal) run; they touch no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

#[test]
fn a_create_on_a_full_filesystem_leaves_nothing_and_the_retry_works() {
    let t = tempfile::tempdir().unwrap();
    let m = Mount::tmpfs(&t.path().join("fs"), "2M");
    let filler = fill(&m.0);
    let p = m.0.join("pool");
    let e = fails(&["create", p.to_str().unwrap(), "--size", "1G"]);
    assert!(e.contains("No space left"), "{e}");
    assert_eq!(
        listing(&m.0),
        ["filler"],
        "no pool directory, lock or image left"
    );
    std::fs::remove_file(&filler).unwrap();
    ok(&["create", p.to_str().unwrap(), "--size", "1G"]);
}

#[test]
fn a_failed_snapshot_create_leaves_no_cow_and_no_entry() {
    let t = tempfile::tempdir().unwrap();
    let m = Mount::tmpfs(&t.path().join("fs"), "2M");
    let p = m.0.join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "64M"]);
    ok(&["snapshot", "create", ps, "a"]);
    let manifest = std::fs::read(p.join("pool.json")).unwrap();
    let files = listing(&p);
    // Refused arguments: nothing made.
    let e = fails(&["snapshot", "create", ps, "b", "--cow-size", "1k"]);
    assert!(e.contains("too small"), "{e}");
    fails(&["snapshot", "create", ps, "b", "--chunk-size", "3k"]);
    fails(&[
        "snapshot",
        "create",
        ps,
        "b",
        "--cow-size",
        "9007199254740992k",
    ]);
    assert_eq!(listing(&p), files);
    // No space for the new store's metadata: offline, then online.
    let filler = fill(&m.0);
    let e = fails(&["snapshot", "create", ps, "b"]);
    assert!(e.contains("No space left"), "{e}");
    assert_eq!(listing(&p), files, "no b.cow, no temporary manifest");
    assert_eq!(std::fs::read(p.join("pool.json")).unwrap(), manifest);
    std::fs::remove_file(&filler).unwrap();
    let d = Daemon::start(&p, &[]);
    let filler = fill(&m.0);
    let e = fails(&["snapshot", "create", ps, "b"]);
    assert!(e.contains("No space left"), "{e}");
    assert!(!p.join("b.cow").exists());
    assert_eq!(snapshot_names(&p), ["a"]);
    std::fs::remove_file(&filler).unwrap();
    ok(&["snapshot", "create", ps, "b"]);
    assert_eq!(snapshot_names(&p), ["a", "b"]);
    assert!(d.stop().success());
}

#[test]
fn status_works_on_a_read_only_pool_offline_and_through_the_daemon() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "a"]);
    let ro = Mount::read_only_bind(&p, &t.path().join("ro"));
    let ros = ro.0.to_str().unwrap();
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ros])).unwrap();
    assert_eq!(st["snapshots"][0]["dm_status"], "16/16464 16");
    ok(&["snapshot", "list", ros]);
    // Changes are still refused, with the cause.
    let e = fails(&["snapshot", "create", ros, "b"]);
    assert!(e.contains("Read-only file system"), "{e}");
    // With a daemon serving the pool, status on the read-only view asks it
    // (offline it would find the pool locked): the live usage shows.
    let d = Daemon::start(&p, &[]);
    let mut o = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(o.write(0, &[1; 4096]).unwrap(), 0);
    drop(o);
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ros])).unwrap();
    assert_eq!(st["snapshots"][0]["dm_status"], "24/16464 16");
    assert!(d.stop().success());
    drop(ro);
    // A pool without a lock file on a read-only mount.
    std::fs::remove_file(p.join("pool.lock")).unwrap();
    let ro = Mount::read_only_bind(&p, &t.path().join("ro"));
    ok(&["status", ro.0.to_str().unwrap()]);
}

#[test]
fn a_broken_or_empty_origin_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    std::fs::remove_file(p.join("origin.img")).unwrap();
    std::fs::create_dir(p.join("origin.img")).unwrap();
    for cmd in [&["status", ps][..], &["serve", ps]] {
        let e = fails(cmd);
        assert!(
            e.contains("origin.img is a directory, not a regular file or block device"),
            "{cmd:?}: {e}"
        );
    }
    // Empty origins: refused at create, and at serve when one became empty.
    let empty = t.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let q = t.path().join("q");
    let e = fails(&[
        "create",
        q.to_str().unwrap(),
        "--origin",
        empty.to_str().unwrap(),
    ]);
    assert!(e.contains("holds 0 bytes"), "{e}");
    assert!(!q.exists());
    let img = t.path().join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    ok(&[
        "create",
        q.to_str().unwrap(),
        "--origin",
        img.to_str().unwrap(),
    ]);
    std::fs::write(&img, b"").unwrap();
    let e = fails(&["serve", q.to_str().unwrap()]);
    assert!(e.contains("holds 0 bytes"), "{e}");
}

#[test]
fn an_origin_with_a_partial_last_sector_is_exported_rounded_down() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("odd.img");
    let mut data = vec![0x11u8; (1 << 20) + 100];
    data[1 << 20..].fill(0x77);
    std::fs::write(&img, &data).unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    let o = dmsnap(&["create", ps, "--origin", img.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("last 100 bytes are not exported"),
        "{}",
        stderr(&o)
    );
    ok(&["snapshot", "create", ps, "s"]);
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["origin"]["size"], 1 << 20);
    assert_eq!(st["origin"]["unexported_bytes"], 100);
    let d = Daemon::start(&p, &[]);
    let mut o = NbdClient::connect(&d.socket(), "origin").unwrap();
    assert_eq!(o.size, 1 << 20);
    assert_eq!(o.write((1 << 20) - 512, &[0x22; 512]).unwrap(), 0);
    assert_eq!(o.flush().unwrap(), 0);
    let mut s = NbdClient::connect(&d.socket(), "s").unwrap();
    assert_eq!(s.size, 1 << 20);
    assert_eq!(
        s.read((1 << 20) - 512, 512).unwrap().unwrap(),
        vec![0x11; 512]
    );
    drop((o, s));
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["origin"]["unexported_bytes"], 100, "online too");
    assert!(d.stop().success());
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), data.len(), "the file keeps its size");
    assert!(after[(1 << 20) - 512..1 << 20].iter().all(|&b| b == 0x22));
    assert!(
        after[1 << 20..].iter().all(|&b| b == 0x77),
        "the tail is untouched"
    );
}

#[test]
fn chunk_size_errors_say_the_real_value_and_the_rule() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    for (arg, shown) in [
        ("512", "512 bytes"),
        ("3k", "3072 bytes"),
        ("2G", "2147483648 bytes"),
    ] {
        let e = fails(&["snapshot", "create", ps, "x", "--chunk-size", arg]);
        assert!(
            e.contains(shown) && e.contains("power of two from 4 KiB") && !e.contains("0 KiB"),
            "{arg}: {e}"
        );
    }
    assert!(!p.join("x.cow").exists());
}

#[test]
fn logs_have_no_colours_when_stderr_is_not_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    let (p, q) = (t.path().join("p"), t.path().join("q"));
    ok(&["create", p.to_str().unwrap(), "--size", "8M"]);
    ok(&["create", q.to_str().unwrap(), "--size", "8M"]);
    let cow = t.path().join("kept.cow");
    ok(&[
        "snapshot",
        "create",
        p.to_str().unwrap(),
        "a",
        "--cow",
        cow_file(&cow),
    ]);
    ok(&["snapshot", "remove", p.to_str().unwrap(), "a"]);
    // Adopting a COW with another chunk size than asked for logs a WARN.
    let o = dmsnap(&[
        "snapshot",
        "create",
        q.to_str().unwrap(),
        "b",
        "--cow",
        cow.to_str().unwrap(),
        "--chunk-size",
        "8k",
    ]);
    let e = stderr(&o);
    assert!(o.status.success() && e.contains("WARN"), "{e}");
    assert!(!e.contains('\x1b'), "no ANSI escapes: {e:?}");
}

/// A 1 MiB file at `p`, as a string argument.
fn cow_file(p: &Path) -> &str {
    std::fs::write(p, vec![0u8; 1 << 20]).unwrap();
    p.to_str().unwrap()
}

#[test]
fn offline_status_tells_in_its_output_not_in_log_lines() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "a"]);
    // Mark the store invalid as the kernel does: header field `valid` = 0.
    let mut cow = std::fs::read(p.join("a.cow")).unwrap();
    cow[4..8].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(p.join("a.cow"), &cow).unwrap();
    for args in [&["status", ps][..], &["status", "--json", ps]] {
        let o = dmsnap(args);
        assert!(o.status.success());
        assert_eq!(stderr(&o), "", "{args:?}: no log lines");
    }
    let human = ok(&["status", ps]);
    assert!(
        human.contains("a: Invalid") && human.contains("note: snapshot is marked invalid"),
        "{human}"
    );
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["snapshots"][0]["state"], "invalid");
    assert_eq!(
        st["snapshots"][0]["warnings"][0],
        "snapshot is marked invalid"
    );
}

#[test]
fn merge_after_the_merge_ended_reports_that_it_completed() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    ok(&["create", ps, "--size", "8M"]);
    ok(&["snapshot", "create", ps, "a"]);
    ok(&["snapshot", "create", ps, "b"]);
    let d = Daemon::start(&p, &[]);
    ok(&["merge", ps, "a", "--wait"]);
    for args in [&["merge", ps, "a", "--wait"][..], &["merge", ps, "a"]] {
        let o = dmsnap(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("merge of 'a' completed"),
            "{}",
            stderr(&o)
        );
    }
    let e = fails(&["merge", ps, "nope", "--wait"]);
    assert!(e.contains("no snapshot named 'nope'"), "{e}");
    assert!(d.stop().success());
    // Remembered in the manifest: offline, and by the next daemon.
    let o = dmsnap(&["merge", ps, "a", "--wait"]);
    assert!(
        o.status.success() && stderr(&o).contains("completed"),
        "{}",
        stderr(&o)
    );
    ok(&["merge", ps, "b"]);
    let o = dmsnap(&["merge", ps, "b"]);
    assert!(
        o.status.success() && stderr(&o).contains("merge of 'b' completed"),
        "{}",
        stderr(&o)
    );
    let d = Daemon::start(&p, &[]);
    let o = dmsnap(&["merge", ps, "b", "--wait"]);
    assert!(
        o.status.success() && stderr(&o).contains("completed"),
        "{}",
        stderr(&o)
    );
    // A new snapshot takes the name back: its merge is a real one.
    ok(&["snapshot", "create", ps, "a"]);
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--json", ps])).unwrap();
    assert_eq!(st["merged"], serde_json::json!(["b"]));
    ok(&["merge", ps, "a", "--wait"]);
    assert_eq!(snapshot_names(&p), Vec::<String>::new());
    assert!(d.stop().success());
}
