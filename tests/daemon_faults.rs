//! The daemon under faults, end to end through `dmsnap serve` and NBD
//! (issue 10: never hang, never forget an invalidation, never serve wrong
//! data).
//!
//! - A COW on a 2 MiB tmpfs that fills (ENOSPC on a `P` store): the snapshot
//!   becomes Invalid, is recorded so on disk (`valid=0`, seen by `dump`) and
//!   stays so across SIGTERM and `kill -9`; the origin keeps serving what was
//!   written; every request gets a reply.
//! - A `PO` snapshot that overflows: later snapshot writes fail, status
//!   `Overflow`, the chunks written before stay readable (also after a
//!   restart and after `kill -9`, once flushed).
//! - SIGTERM while a device does not answer (the origin on a FUSE file the
//!   test stops answering): the in-flight request is answered with an error
//!   and the daemon ends within 10 s with exit 0.
//!
//! Every test runs under a watchdog: a hang fails the test (it kills the
//! daemons it started and aborts) instead of hanging CI. Needs root (tmpfs
//! and FUSE mounts), as the FUSE tests do.

mod support;

use support::nbd_client::{NbdClient, CMD_READ, CMD_WRITE};
use support::{bin, Daemon};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Daemons started by the running test, killed by the watchdog.
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A hang fails the test: after `secs`, kill the daemons this test started
/// and abort the test process (nextest runs each test in its own process).
struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

fn watchdog(what: &'static str, secs: u64) -> Watchdog {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if d.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("WATCHDOG: {what} still running after {secs} s: a hang");
        for pid in PIDS.lock().map(|p| p.clone()).unwrap_or_default() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo '--- threads of dmsnap {pid}:'; for t in /proc/{pid}/task/*; do \
                     echo \"$(cat $t/comm) $(cat $t/wchan 2>/dev/null)\"; done"
                ))
                .status();
            // SAFETY: kill(2) on a pid this test spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::process::abort();
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn start(pool: &Path) -> Daemon {
    let d = Daemon::start(pool, &[]);
    PIDS.lock().unwrap().push(d.pid());
    d
}

/// Run dmsnap with a deadline: None if it did not answer in time (killed).
fn try_run(args: &[&str], secs: u64) -> Option<Output> {
    let mut c = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dmsnap");
    let t = Instant::now();
    while c.try_wait().expect("wait").is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(c.wait_with_output().expect("output"))
}

/// Run dmsnap with a deadline: a command that does not answer is a hang.
fn run(args: &[&str], secs: u64) -> Output {
    try_run(args, secs)
        .unwrap_or_else(|| panic!("dmsnap {args:?} did not answer within {secs} s: a hang"))
}

fn ok(args: &[&str]) -> String {
    let o = run(args, 30);
    assert!(
        o.status.success(),
        "dmsnap {args:?} failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `status --json`: the state of snapshot `name`.
fn state(pool: &Path, name: &str) -> String {
    let out = ok(&["status", pool.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    v["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name} in {out}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The `valid` flag of a COW's header, as `dump --json` reads it.
fn header_valid(cow: &Path) -> bool {
    let out = ok(&["dump", cow.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("dump json");
    v["valid"].as_bool().expect("valid")
}

fn connect(d: &Daemon, name: &str) -> NbdClient {
    let c = NbdClient::connect(&d.socket(), name).expect("connect");
    // No reply within 30 s is a hang.
    c.set_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

fn block(seed: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut x =
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for w in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    b
}

fn read4k(c: &mut NbdClient, off: u64) -> Result<Vec<u8>, u32> {
    c.read(off, 4096).expect("read: no reply (hang?)")
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs (needs root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const ORIGIN: u64 = 16 << 20;

/// Pool with a 16 MiB origin and snapshot `s1` whose 40 MiB sparse COW sits
/// on a 2 MiB tmpfs; then origin writes to 1000 distinct chunks (4 MiB of
/// copies) so a COW write hits ENOSPC. Returns the origin's model.
fn fill_cow_on_small_tmpfs(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, Daemon, Tmpfs) {
    let pool = dir.join("pool");
    let p = pool.to_str().unwrap();
    ok(&["create", p, "--size", &ORIGIN.to_string()]);
    let fs = Tmpfs::mount(&dir.join("small"), "2m");
    let cow = fs.0.join("s1.cow");
    let f = std::fs::File::create(&cow).unwrap();
    f.set_len(40 << 20).unwrap();
    drop(f);
    // Something on the origin before the snapshot.
    let mut model = vec![0u8; ORIGIN as usize];
    {
        let d = start(&pool);
        let mut c = connect(&d, "origin");
        for i in 0..64u64 {
            let b = block(1, i);
            assert_eq!(c.write(i * 4096, &b).unwrap(), 0);
            model[(i * 4096) as usize..][..4096].copy_from_slice(&b);
        }
        assert_eq!(c.flush().unwrap(), 0);
        ok(&[
            "snapshot",
            "create",
            p,
            "s1",
            "--cow",
            cow.to_str().unwrap(),
        ]);
        let mut origin_errors = Vec::new();
        for i in 0..1000u64 {
            // Scattered distinct chunks: every write needs a copy.
            let chunk = (i * 7919) % (ORIGIN / 4096);
            let b = block(2, chunk);
            let e = c.write(chunk * 4096, &b).expect("origin write: no reply");
            if e == 0 {
                model[(chunk * 4096) as usize..][..4096].copy_from_slice(&b);
            } else {
                origin_errors.push((i, chunk, e));
            }
        }
        assert_eq!(
            c.flush().unwrap(),
            0,
            "origin flush after ENOSPC on the COW"
        );
        assert!(
            origin_errors.is_empty(),
            "origin writes failed when the COW filled (the kernel invalidates the snapshot and lets the origin write proceed): {origin_errors:?}"
        );
        (pool, cow, model, d, fs)
    }
}

fn check_origin(d: &Daemon, model: &[u8]) {
    let mut c = connect(d, "origin");
    let got = c.read_all().expect("origin reads");
    if got != model {
        let first = got
            .chunks(4096)
            .zip(model.chunks(4096))
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("origin content differs from its model, first at chunk {first}");
    }
}

fn check_invalid(d: &Daemon, pool: &Path, cow: Option<&Path>) {
    assert_eq!(state(pool, "s1"), "invalid", "snapshot s1 after ENOSPC");
    if let Some(cow) = cow {
        assert!(
            !header_valid(cow),
            "header valid=0 on disk once s1 is Invalid"
        );
    }
    let mut s = connect(d, "s1");
    assert!(
        read4k(&mut s, 0).is_err(),
        "reads of an Invalid snapshot fail"
    );
    assert_ne!(
        s.write(0, &block(9, 0)).unwrap(),
        0,
        "writes to an Invalid snapshot fail"
    );
}

/// What works today without the header: Invalid, origin writes all
/// succeed and read back, snapshot I/O fails, SIGTERM ends the daemon.
#[test]
fn enospc_on_cow_invalidates_and_the_origin_keeps_serving() {
    let _w = watchdog("enospc_on_cow_invalidates_and_the_origin_keeps_serving", 90);
    let dir = tempfile::tempdir().unwrap();
    let (pool, _cow, model, d, _fs) = fill_cow_on_small_tmpfs(dir.path());
    check_invalid(&d, &pool, None);
    check_origin(&d, &model);
    let t = Instant::now();
    let st = d.stop();
    assert!(st.success(), "SIGTERM after ENOSPC: exit {st}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    let d = start(&pool);
    check_origin(&d, &model);
    assert!(d.stop().success());
}

#[test]
fn enospc_on_cow_invalidates_and_stays_invalid_after_sigterm() {
    let _w = watchdog(
        "enospc_on_cow_invalidates_and_stays_invalid_after_sigterm",
        90,
    );
    let dir = tempfile::tempdir().unwrap();
    let (pool, cow, model, d, _fs) = fill_cow_on_small_tmpfs(dir.path());
    check_invalid(&d, &pool, Some(&cow));
    check_origin(&d, &model);
    let t = Instant::now();
    let st = d.stop();
    assert!(st.success(), "SIGTERM after ENOSPC: exit {st}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    assert!(
        !header_valid(&cow),
        "valid=0 on disk after the daemon stopped"
    );
    assert_eq!(state(&pool, "s1"), "invalid", "offline status after a stop");
    let d = start(&pool);
    check_invalid(&d, &pool, Some(&cow));
    check_origin(&d, &model);
    assert!(d.stop().success());
}

#[test]
fn enospc_on_cow_invalidation_survives_kill_9() {
    let _w = watchdog("enospc_on_cow_invalidation_survives_kill_9", 90);
    let dir = tempfile::tempdir().unwrap();
    let (pool, cow, model, d, _fs) = fill_cow_on_small_tmpfs(dir.path());
    // Told Invalid: then it is on disk, whatever happens next.
    assert_eq!(state(&pool, "s1"), "invalid");
    // SAFETY: kill(2) on the daemon this test spawned.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(d);
    assert!(!header_valid(&cow), "valid=0 on disk after kill -9");
    let d = start(&pool);
    check_invalid(&d, &pool, Some(&cow));
    // The origin was flushed before the kill: all of it survives.
    check_origin(&d, &model);
    assert!(d.stop().success());
}

/// `PO` with a 64 KiB COW of 4 KiB chunks: header, one metadata area and 14
/// data chunks. 20 distinct snapshot writes: 14 succeed, the rest fail, the
/// state is `Overflow`; the 14 read back, so do the origin and the chunks
/// never written; after a flush they survive `how` (a restart sees a valid
/// snapshot: overflow is not persisted, as in the kernel).
fn po_overflow(how: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    ok(&["create", p, "--size", &ORIGIN.to_string()]);
    let d = start(&pool);
    let mut o = connect(&d, "origin");
    let mut origin = vec![0u8; ORIGIN as usize];
    for i in 0..32u64 {
        let b = block(3, i);
        assert_eq!(o.write(i * 4096, &b).unwrap(), 0);
        origin[(i * 4096) as usize..][..4096].copy_from_slice(&b);
    }
    assert_eq!(o.flush().unwrap(), 0);
    ok(&[
        "snapshot",
        "create",
        p,
        "s1",
        "--store",
        "PO",
        "--cow-size",
        "64K",
        "--chunk-size",
        "4K",
    ]);
    let mut snap = origin.clone();
    let mut s = connect(&d, "s1");
    let mut written = Vec::new();
    let mut failed = Vec::new();
    for i in 0..20u64 {
        let chunk = i * 3 % 32 + (i / 11) * 40; // distinct chunks, some past 32
        let b = block(4, chunk);
        let e = s.write(chunk * 4096, &b).unwrap_or_else(|e| {
            let st = try_run(&["status", p], 10)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|| "none within 10 s (status hangs too)".into());
            panic!(
                "snapshot write {i} (chunk {chunk}, after {} written) got no reply within 30 s ({e}): a hang; status: {st}",
                written.len()
            )
        });
        if e == 0 {
            written.push(chunk);
            snap[(chunk * 4096) as usize..][..4096].copy_from_slice(&b);
        } else {
            failed.push((chunk, e));
        }
    }
    assert_eq!(written.len(), 14, "14 data chunks fit (failed: {failed:?})");
    assert_eq!(failed.len(), 6);
    assert_eq!(state(&pool, "s1"), "overflow");
    let st = ok(&["status", p]);
    assert!(st.contains("Overflow"), "dm status line: {st}");
    // A write to a chunk it already has still works? The kernel fails every
    // snapshot write once overflowed; we only require reads to work.
    let check = |d: &Daemon, snap: &[u8]| {
        let mut s = connect(d, "s1");
        for c in 0..64u64 {
            let got =
                read4k(&mut s, c * 4096).unwrap_or_else(|e| panic!("read s1 chunk {c}: error {e}"));
            assert!(
                got == snap[(c * 4096) as usize..][..4096],
                "s1 chunk {c} content"
            );
        }
        let mut o = connect(d, "origin");
        assert!(o.read_all().unwrap() == origin, "origin content");
    };
    check(&d, &snap);
    assert_eq!(s.flush().unwrap(), 0, "flush of an overflowed snapshot");
    let d = match how {
        "sigterm" => {
            let t = Instant::now();
            assert!(d.stop().success());
            assert!(t.elapsed() < Duration::from_secs(10));
            start(&pool)
        }
        _ => {
            // SAFETY: kill(2) on the daemon this test spawned.
            unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
            drop(d);
            start(&pool)
        }
    };
    assert_eq!(
        state(&pool, "s1"),
        "active",
        "overflow is not persisted (kernel)"
    );
    check(&d, &snap);
    assert!(d.stop().success());
}

#[test]
fn po_overflow_keeps_written_chunks_across_sigterm() {
    let _w = watchdog("po_overflow_keeps_written_chunks_across_sigterm", 60);
    po_overflow("sigterm");
}

#[test]
fn po_overflow_keeps_written_chunks_across_kill_9() {
    let _w = watchdog("po_overflow_keeps_written_chunks_across_kill_9", 60);
    po_overflow("kill");
}

// ---------------------------------------------------------------------------
// A device that stops answering: a one-file FUSE filesystem the test controls.

#[cfg(feature = "fuse")]
mod gate {
    use fuser::{
        Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
        LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
        ReplyOpen, ReplyWrite, Request, WriteFlags,
    };
    use std::ffi::OsStr;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    type Parked = Box<dyn FnOnce() + Send>;

    /// Shared with the test: `stick` parks every later read/write/fsync
    /// (no reply until `release`).
    #[derive(Default)]
    pub struct Control {
        stuck: AtomicBool,
        parked: Mutex<Vec<Parked>>,
    }

    impl Control {
        pub fn stick(&self) {
            self.stuck.store(true, Ordering::SeqCst);
        }
        pub fn parked(&self) -> usize {
            self.parked.lock().unwrap().len()
        }
        /// Answer everything parked (running it now) and stop parking.
        pub fn release(&self) {
            self.stuck.store(false, Ordering::SeqCst);
            let p: Vec<_> = self.parked.lock().unwrap().drain(..).collect();
            for f in p {
                f();
            }
        }
        fn run(&self, f: Parked) {
            if self.stuck.load(Ordering::SeqCst) {
                self.parked.lock().unwrap().push(f);
            } else {
                f();
            }
        }
    }

    struct GateFs {
        file: Arc<File>,
        size: u64,
        ctl: Arc<Control>,
    }

    const FILE: INodeNo = INodeNo(2);
    pub const NAME: &str = "disk.img";

    impl GateFs {
        fn attr(&self, ino: INodeNo) -> FileAttr {
            let dir = ino == INodeNo::ROOT;
            FileAttr {
                ino,
                size: if dir { 0 } else { self.size },
                blocks: if dir { 0 } else { self.size / 512 },
                atime: UNIX_EPOCH,
                mtime: UNIX_EPOCH,
                ctime: UNIX_EPOCH,
                crtime: UNIX_EPOCH,
                kind: if dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                },
                perm: if dir { 0o755 } else { 0o644 },
                nlink: if dir { 2 } else { 1 },
                uid: 0,
                gid: 0,
                rdev: 0,
                flags: 0,
                blksize: 4096,
            }
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    impl Filesystem for GateFs {
        fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
            if parent == INodeNo::ROOT && name == NAME {
                reply.entry(&TTL, &self.attr(FILE), Generation(0));
            } else {
                reply.error(Errno::ENOENT);
            }
        }
        fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
            reply.attr(&TTL, &self.attr(ino));
        }
        fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
            // No page cache: every pread/pwrite of the daemon reaches us.
            reply.opened(FileHandle(1), FopenFlags::FOPEN_DIRECT_IO);
        }
        fn read(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            size: u32,
            _flags: OpenFlags,
            _lock_owner: Option<LockOwner>,
            reply: ReplyData,
        ) {
            let f = self.file.clone();
            self.ctl.run(Box::new(move || {
                let mut b = vec![0u8; size as usize];
                match f.read_at(&mut b, offset) {
                    Ok(n) => reply.data(&b[..n]),
                    Err(_) => reply.error(Errno::EIO),
                }
            }));
        }
        fn write(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            data: &[u8],
            _write_flags: WriteFlags,
            _flags: OpenFlags,
            _lock_owner: Option<LockOwner>,
            reply: ReplyWrite,
        ) {
            let f = self.file.clone();
            let data = data.to_vec();
            self.ctl
                .run(Box::new(move || match f.write_all_at(&data, offset) {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(_) => reply.error(Errno::EIO),
                }));
        }
        fn flush(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            _lo: LockOwner,
            reply: ReplyEmpty,
        ) {
            reply.ok();
        }
        fn fsync(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            _ds: bool,
            reply: ReplyEmpty,
        ) {
            let f = self.file.clone();
            self.ctl.run(Box::new(move || match f.sync_data() {
                Ok(()) => reply.ok(),
                Err(_) => reply.error(Errno::EIO),
            }));
        }
        fn readdir(
            &self,
            _req: &Request,
            _ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            mut reply: ReplyDirectory,
        ) {
            let entries = [
                (INodeNo::ROOT, FileType::Directory, "."),
                (INodeNo::ROOT, FileType::Directory, ".."),
                (FILE, FileType::RegularFile, NAME),
            ];
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(ino, (i + 1) as u64, kind, name) {
                    break;
                }
            }
            reply.ok();
        }
    }

    pub struct Gate {
        pub ctl: Arc<Control>,
        session: Option<fuser::BackgroundSession>,
    }

    /// Serve `backing` as `mnt/disk.img`.
    pub fn mount(backing: &Path, mnt: &Path) -> Gate {
        std::fs::create_dir_all(mnt).unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .open(backing)
            .unwrap();
        let size = file.metadata().unwrap().len();
        let ctl = Arc::new(Control::default());
        let fs = GateFs {
            file: Arc::new(file),
            size,
            ctl: ctl.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("dmsnap-test-gate".into())];
        let session = fuser::Session::new(fs, mnt, &config)
            .and_then(|s| s.spawn())
            .expect("mount the test FUSE filesystem (needs /dev/fuse and root)");
        Gate {
            ctl,
            session: Some(session),
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.ctl.release();
            if let Some(s) = self.session.take() {
                let _ = s.umount_and_join();
            }
        }
    }
}

/// The state letter of process `pid` in /proc (`Z` once its main thread
/// exited), or None once it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// SIGTERM while the origin does not answer: a client's write is stuck in
/// the origin (its copy-on-write read of the origin chunk never returns).
/// The daemon answers it with an error and ends within 10 s, exit 0.
///
/// "Ends" is measured as the daemon's main thread having exited (the
/// process is a zombie or gone): the kernel then still holds the thread
/// stuck in the FUSE read until the test's filesystem answers (a request
/// already read by a FUSE server is not abandoned on SIGKILL), which the
/// test does right after; a real stuck disk would hold it the same way.
#[cfg(feature = "fuse")]
#[test]
fn sigterm_ends_daemon_within_10s_with_a_stuck_origin() {
    let _w = watchdog("sigterm_ends_daemon_within_10s_with_a_stuck_origin", 60);
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("origin.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(ORIGIN)
        .unwrap();
    let mnt = dir.path().join("mnt");
    let gate = gate::mount(&backing, &mnt);
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    ok(&[
        "create",
        p,
        "--origin",
        mnt.join(gate::NAME).to_str().unwrap(),
    ]);
    ok(&["snapshot", "create", p, "s1"]);
    let d = start(&pool);
    let mut c = connect(&d, "origin");
    assert_eq!(c.write(0, &block(5, 0)).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    let mut r = connect(&d, "s1");

    gate.ctl.stick();
    let w = c.send(CMD_WRITE, 0, 1 << 20, 4096, &block(5, 1)).unwrap();
    let rd = r.send(CMD_READ, 0, 2 << 20, 4096, &[]).unwrap();
    let t = Instant::now();
    while gate.ctl.parked() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "requests never reached the FUSE file"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));

    let pid = d.pid();
    let t = Instant::now();
    // SAFETY: kill(2) on the daemon this test spawned.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let (e, cookie) = c.recv().expect("the stuck origin write gets a reply");
    assert_eq!(cookie, w);
    assert_eq!(e, 108, "the stuck write is answered ESHUTDOWN");
    let (e, cookie) = r.recv().expect("the stuck snapshot read gets a reply");
    assert_eq!(cookie, rd);
    assert_eq!(e, 108, "the stuck read is answered ESHUTDOWN");
    let answered = t.elapsed();
    while matches!(proc_state(pid), Some(s) if s != 'Z') {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon still runs {:?} after SIGTERM",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = t.elapsed();
    eprintln!("stuck requests answered after {answered:?}, daemon ended after {ended:?}");
    gate.ctl.release();
    let st = d.stop();
    assert!(
        st.success(),
        "exit status after SIGTERM with a stuck origin: {st}"
    );
    assert!(ended < Duration::from_secs(10));
    drop(gate);
}
