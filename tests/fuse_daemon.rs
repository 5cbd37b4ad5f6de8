//! The FUSE export end to end through the daemon: `dmsnap serve POOL --fuse
//! DIR`, a loop device over `DIR/origin`, ext4 on it, snapshots taken online
//! (with the filesystem frozen, the kernel way), and merges that roll the
//! origin back while it stays attached. Needs root, /dev/fuse, util-linux
//! (losetup, mount, fsfreeze) and e2fsprogs (mkfs.ext4, e2fsck); CI has them.
//!
//! `bench_fs_through_daemon` (ignored) is the filesystem benchmark through the
//! daemon with one 4 KiB-chunk snapshot against ext4 on a plain file.
#![cfg(feature = "fuse")]

mod common;
mod support;

use dmsnap::export::fuse::bench::{self, FsMount, LoopDevice};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{ok, Daemon};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Guards and small helpers

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

/// Makes sure nothing stays mounted on the FUSE directory, even if the
/// daemon died without unmounting.
struct UmountOnDrop(PathBuf);

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A pool served with `--fuse`. Fields drop in order: the daemon (SIGTERM,
/// it unmounts), then the safety-net unmount, then the directory.
struct Served {
    daemon: Option<Daemon>,
    _cleanup: UmountOnDrop,
    pool: PathBuf,
    /// The FUSE mount point (`DIR/origin`, `DIR/NAME`).
    dir: PathBuf,
    /// Mount points for ext4 on the origin and on a snapshot.
    fs_dir: PathBuf,
    snap_fs_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Served {
    /// `dmsnap create POOL --size SIZE`, then `serve POOL --fuse DIR EXTRA`.
    fn start(size: &str, extra: &[&str]) -> Served {
        Self::start_in(tempfile::tempdir().unwrap(), size, extra, &[])
    }

    /// A daemon that merges one run per step, so a test can act mid-merge.
    fn start_slow_merge(size: &str, extra: &[&str]) -> Served {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            size,
            extra,
            support::SLOW_MERGE,
        )
    }

    fn start_in(
        tmp: tempfile::TempDir,
        size: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let base = tmp.path().canonicalize().unwrap();
        let pool = base.join("pool");
        let dir = base.join("fuse");
        let fs_dir = base.join("fs");
        let snap_fs_dir = base.join("snapfs");
        for d in [&dir, &fs_dir, &snap_fs_dir] {
            std::fs::create_dir(d).unwrap();
        }
        ok(&["create", pool.to_str().unwrap(), "--size", size]);
        let cleanup = UmountOnDrop(dir.clone());
        let mut args = vec!["--fuse", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_env(&pool, &args, env);
        Served {
            daemon: Some(daemon),
            _cleanup: cleanup,
            pool,
            dir,
            fs_dir,
            snap_fs_dir,
            _tmp: tmp,
        }
    }

    fn ps(&self) -> &str {
        self.pool.to_str().unwrap()
    }

    fn origin(&self) -> PathBuf {
        self.dir.join("origin")
    }

    fn snapshot_names(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&ok(&["status", self.ps(), "--json"]))
            .expect("status --json parses");
        v["snapshots"]
            .as_array()
            .expect("snapshots array")
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The `state` of snapshot `name` in `status --json`, if listed.
    fn snapshot_state(&self, name: &str) -> Option<String> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["status", self.ps(), "--json"])).unwrap();
        v["snapshots"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["state"].as_str().unwrap_or("").to_string())
    }

    /// Chunks left to merge of snapshot `name`, if it is listed and merging.
    fn merge_chunks_left(&self, name: &str) -> Option<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["status", self.ps(), "--json"])).unwrap();
        v["snapshots"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)?["merge"]["chunks_left"]
            .as_u64()
    }

    /// Poll `status` until no snapshot is listed.
    fn wait_no_snapshots(&self, limit: Duration) {
        let t = Instant::now();
        while !self.snapshot_names().is_empty() {
            assert!(
                t.elapsed() < limit,
                "the merge did not finish in {limit:?}: {:?}",
                self.snapshot_names()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM the daemon: it exits 0 and unmounts. Returns the scratch
    /// directory (the pool stays until it is dropped).
    fn stop(mut self) -> tempfile::TempDir {
        let d = self.daemon.take().unwrap();
        assert!(d.stop().success(), "daemon exits 0 on SIGTERM");
        assert!(
            !is_mounted(&self.dir),
            "the daemon unmounted its FUSE export"
        );
        self._tmp
    }
}

/// `losetup --find --show -r [--direct-io=on] FILE`, detached on drop.
struct RoLoop(PathBuf);

impl RoLoop {
    fn attach(file: &Path) -> RoLoop {
        let dev = bench::run(
            Command::new("losetup")
                .args(["--find", "--show", "-r", "--direct-io=on"])
                .arg(file),
        )
        .or_else(|_| {
            bench::run(
                Command::new("losetup")
                    .args(["--find", "--show", "-r"])
                    .arg(file),
            )
        })
        .expect("losetup -r");
        RoLoop(PathBuf::from(dev))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RoLoop {
    fn drop(&mut self) {
        for _ in 0..50 {
            if bench::run(Command::new("losetup").arg("-d").arg(&self.0)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: cannot detach {}", self.0.display());
    }
}

/// `mount -o OPTS DEV DIR`, unmounted on drop (lazily if busy).
struct OptMount(PathBuf);

impl OptMount {
    fn mount(dev: &Path, dir: &Path, opts: &str) -> OptMount {
        bench::run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", opts])
                .arg(dev)
                .arg(dir),
        )
        .expect("mount");
        OptMount(dir.to_path_buf())
    }
}

impl Drop for OptMount {
    fn drop(&mut self) {
        if bench::run(Command::new("umount").arg(&self.0)).is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// `fsfreeze -f DIR`; thawed by [`Frozen::thaw`], or on drop (panic).
struct Frozen(Option<PathBuf>);

impl Frozen {
    fn freeze(dir: &Path) -> Frozen {
        bench::run(Command::new("fsfreeze").arg("-f").arg(dir)).expect("fsfreeze -f");
        Frozen(Some(dir.to_path_buf()))
    }
    fn thaw(mut self) {
        let dir = self.0.take().unwrap();
        bench::run(Command::new("fsfreeze").arg("-u").arg(&dir)).expect("fsfreeze -u");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = Command::new("fsfreeze").arg("-u").arg(&dir).status();
        }
    }
}

/// e2fsck -fn exits 0 on a clean filesystem.
fn assert_fsck_clean(dev: &Path, what: &str) {
    let out = Command::new("e2fsck").arg("-fn").arg(dev).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn on {what} ({}) not clean ({}):\n{}\n{}",
        dev.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------
// A model of the files on the filesystem: relative path -> content.

type Files = BTreeMap<String, Vec<u8>>;

fn random_bytes(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn put(root: &Path, files: &mut Files, name: &str, data: Vec<u8>) {
    let p = root.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &data).unwrap();
    files.insert(name.to_string(), data);
}

/// What is on the filesystem: every regular file's content (lost+found and
/// directories left out).
fn tree(root: &Path) -> Files {
    fn walk(root: &Path, dir: &Path, out: &mut Files) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else {
                assert!(ft.is_file(), "unexpected {rel}");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = Files::new();
    walk(root, root, &mut out);
    out
}

fn digests(files: &Files) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(k, v)| (k.clone(), common::sha256_hex(v)))
        .collect()
}

/// The filesystem at `root` holds exactly `expected` (compared by SHA-256).
fn assert_tree(root: &Path, expected: &Files, what: &str) {
    let got = digests(&tree(root));
    let want = digests(expected);
    assert!(
        got == want,
        "{what}: files differ\n got {got:#?}\nwant {want:#?}"
    );
}

/// The files written before the snapshot (one of them 20 MiB).
fn initial_files(root: &Path, rng: &mut rand::rngs::StdRng) -> Files {
    let mut f = Files::new();
    put(root, &mut f, "big", random_bytes(rng, (20 * MIB) as usize));
    put(
        root,
        &mut f,
        "medium",
        random_bytes(rng, (3 * MIB) as usize),
    );
    put(
        root,
        &mut f,
        "dir/nested",
        random_bytes(rng, MIB as usize + 123),
    );
    put(
        root,
        &mut f,
        "doomed",
        random_bytes(rng, (2 * MIB) as usize),
    );
    put(
        root,
        &mut f,
        "small.txt",
        b"written before the snapshot\n".to_vec(),
    );
    f
}

/// Changes after the snapshot: modify in place (scattered 4 KiB blocks, so
/// the COW holds thousands of one-chunk runs and a merge takes a while),
/// rewrite, append, delete, add.
fn change_files(root: &Path, files: &mut Files, rng: &mut rand::rngs::StdRng) {
    let big = files.get_mut("big").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("big"))
        .unwrap();
    for off in (0..big.len()).step_by(8 * KIB as usize) {
        let block = random_bytes(rng, 4 * KIB as usize);
        f.write_all_at(&block, off as u64).unwrap();
        big[off..off + block.len()].copy_from_slice(&block);
    }
    f.sync_all().unwrap();
    drop(f);

    put(root, files, "medium", random_bytes(rng, MIB as usize + 7));
    let mut s = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("small.txt"))
        .unwrap();
    s.write_all(b"appended after the snapshot\n").unwrap();
    files
        .get_mut("small.txt")
        .unwrap()
        .extend_from_slice(b"appended after the snapshot\n");
    std::fs::remove_file(root.join("doomed")).unwrap();
    files.remove("doomed");
    put(root, files, "new", random_bytes(rng, (8 * MIB) as usize));
    put(
        root,
        files,
        "dir/new2",
        b"added after the snapshot\n".to_vec(),
    );
}

/// ext4 on a loop device over `DIR/origin`, files written, `snap1` taken
/// online with the filesystem frozen, files changed, filesystem unmounted.
/// Returns the origin's loop device (still attached) and the files as of the
/// snapshot and as of now.
fn ext4_with_snapshot(s: &Served) -> (LoopDevice, Files, Files) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let lo = LoopDevice::attach_prefer_direct(&s.origin()).unwrap();
    eprintln!(
        "origin loop {} direct_io={}",
        lo.path().display(),
        lo.direct_io()
    );
    bench::run_mkfs(lo.path()).unwrap();
    let fs = FsMount::mount(lo.path(), &s.fs_dir, "ext4").unwrap();
    let mut files = initial_files(fs.dir(), &mut rng);
    sync_all();
    {
        let frozen = Frozen::freeze(fs.dir());
        ok(&["snapshot", "create", s.ps(), "snap1"]);
        frozen.thaw();
    }
    let at_snapshot = files.clone();
    assert!(s.dir.join("snap1").exists(), "the new snapshot is a file");
    change_files(fs.dir(), &mut files, &mut rng);
    assert_tree(fs.dir(), &files, "origin after the changes");
    fs.unmount().unwrap();
    (lo, at_snapshot, files)
}

// ---------------------------------------------------------------------------
// 1. A snapshot holds the filesystem as of the snapshot.

#[test]
fn ext4_snapshot_through_fuse_holds_the_files_as_of_the_snapshot() {
    let s = Served::start("256M", &[]);
    let (lo, at_snapshot, now) = ext4_with_snapshot(&s);
    assert_fsck_clean(lo.path(), "the origin");
    {
        let slo = RoLoop::attach(&s.dir.join("snap1"));
        assert_fsck_clean(slo.path(), "the snapshot");
        let _m = OptMount::mount(slo.path(), &s.snap_fs_dir, "ro,noload");
        assert_tree(&s.snap_fs_dir, &at_snapshot, "snapshot");
    }
    {
        let fs = FsMount::mount(lo.path(), &s.fs_dir, "ext4").unwrap();
        assert_tree(fs.dir(), &now, "origin");
        fs.unmount().unwrap();
    }
    assert_fsck_clean(lo.path(), "the origin after mounting it again");
    lo.detach().unwrap();
    s.stop();
}

// ---------------------------------------------------------------------------
// 2. A merge rolls the origin back (to the end, and at once for readers).

#[test]
fn ext4_merge_through_fuse_rolls_the_origin_back() {
    let s = Served::start("256M", &[]);
    let (lo, at_snapshot, _now) = ext4_with_snapshot(&s);
    {
        // The snapshot is in use, then released before the merge.
        let slo = RoLoop::attach(&s.dir.join("snap1"));
        assert_fsck_clean(slo.path(), "the snapshot");
    }
    ok(&["merge", s.ps(), "snap1", "--wait"]);
    assert!(
        !s.dir.join("snap1").exists(),
        "the merged snapshot's file is gone"
    );
    assert_eq!(s.snapshot_names(), Vec::<String>::new());

    // The origin loop device stayed attached across the merge.
    assert_fsck_clean(lo.path(), "the origin after the merge");
    {
        let fs = FsMount::mount(lo.path(), &s.fs_dir, "ext4").unwrap();
        assert_tree(fs.dir(), &at_snapshot, "origin after the merge");
        // And it is an ordinary writable filesystem again.
        std::fs::write(fs.dir().join("after-merge"), b"life goes on").unwrap();
        fs.unmount().unwrap();
    }
    assert_fsck_clean(lo.path(), "the origin written after the merge");
    lo.detach().unwrap();
    s.stop();
}

#[test]
fn ext4_merge_through_fuse_rolls_the_origin_back_at_once_for_readers() {
    let s = Served::start_slow_merge("256M", &[]);
    let (lo, at_snapshot, _now) = ext4_with_snapshot(&s);
    ok(&["merge", s.ps(), "snap1"]);
    let t = Instant::now();
    // Right after the command returned: the origin is the snapshot.
    assert!(
        !s.dir.join("snap1").exists(),
        "a merging snapshot is no longer exported"
    );
    let left_before = s.merge_chunks_left("snap1");
    assert_eq!(s.snapshot_state("snap1").as_deref(), Some("merging"));
    assert_fsck_clean(lo.path(), "the origin during the merge");
    {
        let _m = OptMount::mount(lo.path(), &s.fs_dir, "ro");
        assert_tree(&s.fs_dir, &at_snapshot, "origin during the merge");
    }
    let left_after = s.merge_chunks_left("snap1");
    eprintln!(
        "chunks left to merge when the checks began: {left_before:?}, after {:?}: {left_after:?}",
        t.elapsed()
    );
    assert!(
        left_before.is_some_and(|n| n > 0),
        "the checks began during the merge"
    );
    s.wait_no_snapshots(Duration::from_secs(120));
    assert_fsck_clean(lo.path(), "the origin after the merge");
    {
        let _m = OptMount::mount(lo.path(), &s.fs_dir, "ro");
        assert_tree(&s.fs_dir, &at_snapshot, "origin after the merge");
    }
    lo.detach().unwrap();
    s.stop();
}

// ---------------------------------------------------------------------------
// 3. Snapshot files follow the pool while mounted.

/// Creation and removal while mounted, and `--read-only-snapshots`, are in
/// tests/fuse_export.rs (`the_daemon_serves_*`); this adds the merge: the
/// snapshot's file vanishes when the merge starts, and its name can be
/// taken again once the merge is over.
#[test]
fn snapshot_files_appear_and_vanish_while_mounted() {
    let s = Served::start("16M", &["--read-only-snapshots"]);
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&s.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(listing(), ["origin"]);
    let origin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.origin())
        .unwrap();
    origin.write_all_at(&[0x11; 4096], 0).unwrap();
    ok(&["snapshot", "create", s.ps(), "a"]);
    ok(&["snapshot", "create", s.ps(), "b"]);
    assert_eq!(listing(), ["a", "b", "origin"]);
    origin.write_all_at(&[0x22; 4096], 0).unwrap();
    let snap_a = File::open(s.dir.join("a")).unwrap();
    let mut buf = [0u8; 4096];
    snap_a.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x11; 4096]);
    drop(snap_a);
    // Read-only snapshots stay read-only through the daemon.
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(s.dir.join("a"))
        .is_err());

    ok(&["merge", s.ps(), "a", "--wait"]);
    assert_eq!(listing(), ["b", "origin"]);
    origin.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        buf, [0x11; 4096],
        "the origin rolled back through the open fd"
    );
    let snap_b = File::open(s.dir.join("b")).unwrap();
    snap_b.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x11; 4096], "b keeps its content through a's merge");
    drop(snap_b);

    ok(&["snapshot", "create", s.ps(), "a"]);
    assert_eq!(listing(), ["a", "b", "origin"]);
    ok(&["snapshot", "remove", s.ps(), "b"]);
    assert_eq!(listing(), ["a", "origin"]);
    drop(origin);
    s.stop();
}

// ---------------------------------------------------------------------------
// 4. Raw writes through DIR/origin while a merge runs.

/// 64 KiB stripes; thread `t` of 2 owns the stripes with index % 2 == t, so
/// each thread keeps an exact model of its own stripes.
const STRIPE: u64 = 64 * KIB;

fn pattern_a(off: u64, len: usize) -> Vec<u8> {
    common::pattern(b'A', off, len)
}

#[test]
fn merge_while_a_client_writes_the_origin_through_fuse() {
    const SIZE: u64 = 64 * MIB;
    const FILLED: u64 = 16 * MIB;
    let s = Served::start_slow_merge("64M", &[]);
    let origin_path = s.origin();
    let origin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&origin_path)
        .unwrap();
    // Snapshot content: pattern A over the first 16 MiB, zeros after.
    for off in (0..FILLED).step_by(MIB as usize) {
        origin
            .write_all_at(&pattern_a(off, MIB as usize), off)
            .unwrap();
    }
    origin.sync_all().unwrap();
    ok(&["snapshot", "create", s.ps(), "snap1"]);
    // Overwrite every other 4 KiB chunk: thousands of one-chunk runs to merge.
    for off in (0..FILLED).step_by(8 * KIB as usize) {
        origin.write_all_at(&[0xBB; 4096], off).unwrap();
    }
    origin.sync_all().unwrap();

    // The model starts as the snapshot.
    let mut expected = vec![0u8; SIZE as usize];
    expected[..FILLED as usize].copy_from_slice(&pattern_a(0, FILLED as usize));

    ok(&["merge", s.ps(), "snap1"]);
    let merge_done = Arc::new(AtomicBool::new(false));
    let writes_done = Arc::new(AtomicU64::new(0));
    let models: Vec<(usize, Vec<u8>)> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2usize)
            .map(|t| {
                let origin = &origin;
                let mut model = expected.clone();
                let merge_done = merge_done.clone();
                let writes_done = writes_done.clone();
                sc.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t as u64);
                    let stripes = SIZE / STRIPE;
                    let mut after_done = 0u32;
                    loop {
                        if merge_done.load(Ordering::Acquire) {
                            after_done += 1;
                            if after_done > 100 {
                                break;
                            }
                        }
                        // A write inside one of our stripes: any offset and
                        // length, odd ones included.
                        let stripe = rng.gen_range(0..stripes / 2) * 2 + t as u64;
                        let base = stripe * STRIPE;
                        let off = rng.gen_range(0..STRIPE - 1);
                        let len = rng.gen_range(1..=(STRIPE - off).min(24 * KIB));
                        let mut data = vec![0u8; len as usize];
                        rng.fill(&mut data[..]);
                        let o = (base + off) as usize;
                        origin.write_all_at(&data, base + off).unwrap();
                        model[o..o + len as usize].copy_from_slice(&data);
                        writes_done.fetch_add(1, Ordering::AcqRel);
                        // And a read of one of our stripes, checked at once.
                        let stripe = rng.gen_range(0..stripes / 2) * 2 + t as u64;
                        let o = (stripe * STRIPE) as usize;
                        let mut got = vec![0u8; STRIPE as usize];
                        origin.read_exact_at(&mut got, o as u64).unwrap();
                        assert!(
                            got == model[o..o + STRIPE as usize],
                            "thread {t}: stripe at {o} differs from its model"
                        );
                    }
                    (t, model)
                })
            })
            .collect();
        // Writes completed before a status call that still shows chunks to
        // merge certainly ran during the merge.
        let mut during = 0;
        let t0 = Instant::now();
        loop {
            let n = writes_done.load(Ordering::Acquire);
            match s.merge_chunks_left("snap1") {
                Some(left) if left > 0 => during = n,
                _ if s.snapshot_names().is_empty() => break,
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "merge too slow");
            std::thread::sleep(Duration::from_millis(50));
        }
        merge_done.store(true, Ordering::Release);
        let models = workers.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!(
            "merge took ~{:?}; {} writes, at least {during} of them while chunks were left to merge",
            t0.elapsed(),
            writes_done.load(Ordering::Acquire)
        );
        assert!(during > 0, "no write landed while the merge ran");
        models
    });

    // Each thread's stripes from its model, the rest from the snapshot.
    for (t, model) in &models {
        for stripe in (*t as u64..SIZE / STRIPE).step_by(2) {
            let o = (stripe * STRIPE) as usize;
            expected[o..o + STRIPE as usize].copy_from_slice(&model[o..o + STRIPE as usize]);
        }
    }
    let mut got = vec![0u8; SIZE as usize];
    origin.read_exact_at(&mut got, 0).unwrap();
    assert!(got == expected, "the origin after the merge differs");
    origin.sync_all().unwrap();
    drop(origin);
    let image = s.pool.join("origin.img");
    let _keep = s.stop();
    // And the origin image the daemon left behind says the same.
    let mut on_disk = Vec::new();
    File::open(&image)
        .unwrap()
        .read_to_end(&mut on_disk)
        .unwrap();
    assert!(on_disk == expected, "origin.img after shutdown differs");
}

// ---------------------------------------------------------------------------
// Benchmark: ext4 through the daemon with one snapshot vs ext4 on a plain file.

/// What [`bench_fs_through_daemon_report`] measures.
#[derive(Debug, Clone)]
pub struct DaemonBenchOptions {
    /// Scratch directory on a real filesystem.
    pub work_dir: PathBuf,
    /// Origin / plain image size.
    pub device_size: u64,
    /// Bytes written, rewritten and read through ext4.
    pub file_size: u64,
    /// Runs per configuration (the median is reported).
    pub runs: usize,
    /// `serve --direct` (O_DIRECT origin and COW, as the plain loop device
    /// with direct I/O bypasses the host page cache).
    pub direct: bool,
    /// Chunk size of the one snapshot; None: no snapshot.
    pub chunk_size: Option<String>,
}

impl DaemonBenchOptions {
    pub fn new(work_dir: &Path) -> Self {
        DaemonBenchOptions {
            work_dir: work_dir.to_path_buf(),
            device_size: 512 * MIB,
            file_size: 256 * MIB,
            runs: 3,
            direct: true,
            chunk_size: Some("4k".into()),
        }
    }
}

/// One run's (or the median's) times.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    /// Write the file + fsync: the snapshot copies every chunk first.
    pub first_write: Duration,
    /// Overwrite it in place + fsync: chunks already copied.
    pub rewrite: Duration,
    /// Read it after dropping caches.
    pub cold_read: Duration,
}

/// Medians of the daemon configuration and of the plain loop over a file.
#[derive(Debug, Clone, Copy)]
pub struct DaemonBenchReport {
    pub file_size: u64,
    pub daemon: PhaseTimes,
    pub plain: PhaseTimes,
}

impl DaemonBenchReport {
    /// plain time / daemon time: 1.0 = as fast, 0.5 = twice as slow.
    pub fn ratios(&self) -> PhaseTimes {
        fn r(d: Duration, p: Duration) -> Duration {
            Duration::from_secs_f64(p.as_secs_f64() / d.as_secs_f64())
        }
        PhaseTimes {
            first_write: r(self.daemon.first_write, self.plain.first_write),
            rewrite: r(self.daemon.rewrite, self.plain.rewrite),
            cold_read: r(self.daemon.cold_read, self.plain.cold_read),
        }
    }
}

impl std::fmt::Display for DaemonBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = self.file_size as f64 / MIB as f64;
        let cell = |d: Duration| {
            format!(
                "{:>7.0} ms {:>6.0} MiB/s",
                d.as_secs_f64() * 1e3,
                mib / d.as_secs_f64()
            )
        };
        writeln!(
            f,
            "{:<8} | {:<24} | {:<24} | {:<24}",
            "", "first write+fsync", "rewrite+fsync", "cold read"
        )?;
        for (label, t) in [("daemon", self.daemon), ("plain", self.plain)] {
            writeln!(
                f,
                "{label:<8} | {:<24} | {:<24} | {:<24}",
                cell(t.first_write),
                cell(t.rewrite),
                cell(t.cold_read)
            )?;
        }
        let r = self.ratios();
        write!(
            f,
            "{:<8} | {:<24.2} | {:<24.2} | {:<24.2}",
            "ratio",
            r.first_write.as_secs_f64(),
            r.rewrite.as_secs_f64(),
            r.cold_read.as_secs_f64()
        )
    }
}

fn write_file(path: &Path, size: u64, truncate: bool, seed: u8) -> std::io::Result<Duration> {
    let block: Vec<u8> = (0..MIB as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 ^ seed)
        .collect();
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)?;
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(t.elapsed())
}

fn read_file(path: &Path, size: u64) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, size, "read back what was written");
    Ok(t.elapsed())
}

/// One run over the loop device `dev` (already holding a fresh ext4).
fn phases(dev: &Path, fs_dir: &Path, size: u64) -> PhaseTimes {
    let fs = FsMount::mount(dev, fs_dir, "ext4").unwrap();
    let path = fs.dir().join("data");
    bench::drop_caches().unwrap();
    let first_write = write_file(&path, size, true, 0).unwrap();
    bench::drop_caches().unwrap();
    let rewrite = write_file(&path, size, false, 0x5a).unwrap();
    bench::drop_caches().unwrap();
    let cold_read = read_file(&path, size).unwrap();
    fs.unmount().unwrap();
    PhaseTimes {
        first_write,
        rewrite,
        cold_read,
    }
}

fn daemon_run(opts: &DaemonBenchOptions, run: usize) -> PhaseTimes {
    let tmp = tempfile::tempdir_in(&opts.work_dir).unwrap();
    let mut extra = Vec::new();
    if opts.direct {
        extra.push("--direct");
    }
    let size = format!("{}", opts.device_size);
    let s = Served::start_in(tmp, &size, &extra, &[]);
    let lo = LoopDevice::attach_prefer_direct(&s.origin()).unwrap();
    bench::run_mkfs(lo.path()).unwrap();
    if let Some(cs) = &opts.chunk_size {
        ok(&["snapshot", "create", s.ps(), "snap1", "--chunk-size", cs]);
    }
    let t = phases(lo.path(), &s.fs_dir, opts.file_size);
    eprintln!(
        "daemon run {run} (loop dio={}): {t:?}; {}",
        lo.direct_io(),
        ok(&["status", s.ps()]).trim()
    );
    lo.detach().unwrap();
    s.stop();
    t
}

fn plain_run(opts: &DaemonBenchOptions, run: usize) -> PhaseTimes {
    let tmp = tempfile::tempdir_in(&opts.work_dir).unwrap();
    let image = tmp.path().join("image");
    let fs_dir = tmp.path().join("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    File::create_new(&image)
        .unwrap()
        .set_len(opts.device_size)
        .unwrap();
    let lo = LoopDevice::attach_prefer_direct(&image).unwrap();
    bench::run_mkfs(lo.path()).unwrap();
    let t = phases(lo.path(), &fs_dir, opts.file_size);
    eprintln!("plain run {run} (loop dio={}): {t:?}", lo.direct_io());
    lo.detach().unwrap();
    t
}

fn median(v: &[PhaseTimes]) -> PhaseTimes {
    let mid = |f: fn(&PhaseTimes) -> Duration| {
        let mut d: Vec<Duration> = v.iter().map(f).collect();
        d.sort();
        d[d.len() / 2]
    };
    PhaseTimes {
        first_write: mid(|t| t.first_write),
        rewrite: mid(|t| t.rewrite),
        cold_read: mid(|t| t.cold_read),
    }
}

/// ext4 on a loop device over `DIR/origin` of `dmsnap serve --fuse` with one
/// snapshot, against ext4 on a loop device over a plain sparse file: write
/// `file_size` + fsync (first writes: every chunk is copied to the COW),
/// overwrite it in place + fsync (chunks already copied), cold read. Runs
/// interleaved, medians. Needs root.
pub fn bench_fs_through_daemon_report(opts: &DaemonBenchOptions) -> DaemonBenchReport {
    let mut daemon = Vec::new();
    let mut plain = Vec::new();
    for run in 0..opts.runs.max(1) {
        daemon.push(daemon_run(opts, run));
        plain.push(plain_run(opts, run));
    }
    DaemonBenchReport {
        file_size: opts.file_size,
        daemon: median(&daemon),
        plain: median(&plain),
    }
}

/// `cargo test --release --test fuse_daemon bench_fs_through_daemon -- --ignored --nocapture`
/// (DMSNAP_BENCH_RUNS, DMSNAP_BENCH_FILE_MIB, DMSNAP_BENCH_DIRECT=0, DMSNAP_BENCH_CHUNK=none|4k|64k...).
#[test]
#[ignore = "benchmark"]
fn bench_fs_through_daemon() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut opts = DaemonBenchOptions::new(tmp.path());
    if let Ok(r) = std::env::var("DMSNAP_BENCH_RUNS") {
        opts.runs = r.parse().unwrap();
    }
    if let Ok(m) = std::env::var("DMSNAP_BENCH_FILE_MIB") {
        opts.file_size = m.parse::<u64>().unwrap() * MIB;
        opts.device_size = opts.device_size.max(2 * opts.file_size);
    }
    if let Ok(d) = std::env::var("DMSNAP_BENCH_DIRECT") {
        opts.direct = d != "0";
    }
    if let Ok(c) = std::env::var("DMSNAP_BENCH_CHUNK") {
        opts.chunk_size = match c.as_str() {
            "none" => None,
            c => Some(c.to_string()),
        };
    }
    let report = bench_fs_through_daemon_report(&opts);
    println!(
        "ext4 through `dmsnap serve --fuse` (direct={}, snapshot chunk {:?}) vs a plain loop file, {} MiB, median of {}:\n{report}\n(ratio = plain time / daemon time; goal >= 0.8 for rewrite and cold read)",
        opts.direct,
        opts.chunk_size,
        opts.file_size / MIB,
        opts.runs
    );
}
