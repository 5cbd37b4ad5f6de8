//! The FUSE export against real clients: the kernel's FUSE, loop devices,
//! ext4 (mkfs.ext4 / e2fsck / mount). Needs root, /dev/fuse, util-linux and
//! e2fsprogs (CI has them).
#![cfg(feature = "fuse")]

mod support;

use dmsnap::device::{DevError, Device, ExportSet, PlainDevice, StaticExports};
use dmsnap::export::fuse::bench::{self, FsMount, LoopDevice};
use dmsnap::export::fuse::{mount, FuseError, FuseMount, FuseOptions};
use dmsnap::io::{FileDev, MemDev, OpenOptions};
use parking_lot::RwLock;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn mount_dir(exports: Arc<dyn ExportSet>, opts: FuseOptions) -> (tempfile::TempDir, FuseMount) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let m = mount(exports, &dir, opts).expect("mount FUSE");
    (tmp, m)
}

fn mem_export(len: u64) -> Arc<dyn Device> {
    Arc::new(PlainDevice::new(MemDev::new(len), false))
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// e2fsck -fn exits 0 on a clean filesystem.
fn assert_fsck_clean(dev: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(dev).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} not clean ({}):\n{}\n{}",
        dev.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext4_on_a_loop_device_over_the_fuse_file_lands_in_the_backing_device() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("origin.img");
    let fs_dir = tmp.path().join("fs");
    let fuse_dir = tmp.path().join("fuse");
    std::fs::create_dir(&fs_dir).unwrap();
    std::fs::create_dir(&fuse_dir).unwrap();

    let dev = FileDev::create_sparse(&image, 256 * MIB, OpenOptions::default()).unwrap();
    let dev = Arc::new(Counting::wrap(Arc::new(PlainDevice::new(dev, false))));
    let exports = StaticExports::new().with("origin", dev.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let len = rng.gen_range(1..(8 * MIB) as usize);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            (format!("file{i}"), data)
        })
        .collect();

    {
        // Teardown in reverse: ext4, loop, FUSE — also on panic.
        let fuse = mount(Arc::new(exports), &fuse_dir, FuseOptions::default()).unwrap();
        let origin = fuse.dir().join("origin");
        assert_eq!(std::fs::metadata(&origin).unwrap().len(), 256 * MIB);
        let lo = LoopDevice::attach_prefer_direct(&origin).unwrap();
        eprintln!("loop {} direct_io={}", lo.path().display(), lo.direct_io());
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(lo.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            dev.discards.load(Ordering::SeqCst) > 0,
            "mkfs discards reach Device::discard"
        );
        assert_fsck_clean(lo.path());

        let fs = FsMount::mount(lo.path(), &fs_dir, "ext4").unwrap();
        for (name, data) in &files {
            std::fs::write(fs.dir().join(name), data).unwrap();
        }
        bench::run(&mut Command::new("sync")).unwrap();
        fs.unmount().unwrap();
        assert_fsck_clean(lo.path());
        lo.detach().unwrap();
        fuse.unmount().unwrap();
    }
    assert!(!is_mounted(&fuse_dir.canonicalize().unwrap()));

    // The bytes are in the backing image itself: mount it without FUSE.
    let lo = LoopDevice::attach(&image, false).unwrap();
    assert_fsck_clean(lo.path());
    let fs = FsMount::mount(lo.path(), &fs_dir, "ext4").unwrap();
    for (name, data) in &files {
        let got = std::fs::read(fs.dir().join(name)).unwrap();
        assert_eq!(sha(&got), sha(data), "{name} differs");
    }
}

/// A device that counts the calls the tests care about.
struct Counting {
    inner: Arc<dyn Device>,
    discards: AtomicUsize,
    zeroes: AtomicUsize,
    flushes: AtomicUsize,
    max_read: AtomicUsize,
    max_write: AtomicUsize,
    fua_writes: AtomicUsize,
}

impl Counting {
    fn new(len: u64) -> Self {
        Self::wrap(mem_export(len))
    }
    fn wrap(inner: Arc<dyn Device>) -> Self {
        Counting {
            inner,
            discards: AtomicUsize::new(0),
            zeroes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            max_read: AtomicUsize::new(0),
            max_write: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
        }
    }
}

impl Device for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.max_read.fetch_max(buf.len(), Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        self.max_write.fetch_max(buf.len(), Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(offset, len, fua)
    }
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open fd with integer arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[test]
fn fallocate_and_fsync_reach_discard_write_zeroes_and_flush() {
    let dev = Arc::new(Counting::new(4 * MIB));
    let exports = StaticExports::new().with("origin", dev.clone());
    let (_tmp, m) = mount_dir(Arc::new(exports), FuseOptions::default());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.dir().join("origin"))
        .unwrap();
    f.write_all_at(&[0xAB; 65536], 0).unwrap();

    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .unwrap();
    assert_eq!(dev.discards.load(Ordering::SeqCst), 1);

    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        8192,
        8192,
    )
    .unwrap();
    assert_eq!(dev.zeroes.load(Ordering::SeqCst), 1);
    let mut buf = vec![0xFFu8; 3 * 8192];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[8192..16384].iter().all(|&b| b == 0), "zeroed range");
    assert!(buf[16384..].iter().all(|&b| b == 0xAB), "beyond the range");

    // Allocating inside the size is a no-op; growing the file is refused.
    fallocate(&f, 0, 0, 4 * MIB).unwrap();
    let e = fallocate(&f, 0, 0, 4 * MIB + 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
    assert_eq!(
        std::fs::metadata(m.dir().join("origin")).unwrap().len(),
        4 * MIB
    );
    // Truncating to the current size is fine, to another size is not.
    f.set_len(4 * MIB).unwrap();
    assert!(f.set_len(MIB).is_err());

    let before = dev.flushes.load(Ordering::SeqCst);
    f.sync_all().unwrap();
    assert!(dev.flushes.load(Ordering::SeqCst) > before, "fsync → flush");
    // Close flushes what was written since the last fsync, and only then.
    f.write_all_at(&[0xCD; 4096], 0).unwrap();
    let before = dev.flushes.load(Ordering::SeqCst);
    drop(f);
    assert_eq!(
        dev.flushes.load(Ordering::SeqCst),
        before + 1,
        "close after a write → flush"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.dir().join("origin"))
        .unwrap();
    f.write_all_at(&[0xCD; 4096], 0).unwrap();
    f.sync_data().unwrap();
    let before = dev.flushes.load(Ordering::SeqCst);
    drop(f);
    let f = File::open(m.dir().join("origin")).unwrap();
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, 0).unwrap();
    drop(f);
    assert_eq!(
        dev.flushes.load(Ordering::SeqCst),
        before,
        "close with nothing left to make durable, or of a reader → no flush"
    );

    // fsync on the directory flushes every export.
    let before = dev.flushes.load(Ordering::SeqCst);
    File::open(m.dir()).unwrap().sync_all().unwrap();
    assert!(
        dev.flushes.load(Ordering::SeqCst) > before,
        "fsyncdir → flush"
    );

    // O_DSYNC writes are FUA writes; plain ones are not.
    assert_eq!(dev.fua_writes.load(Ordering::SeqCst), 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(m.dir().join("origin"))
        .unwrap();
    f.write_all_at(&[1; 4096], 0).unwrap();
    assert_eq!(dev.fua_writes.load(Ordering::SeqCst), 1);
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn large_requests_arrive_in_one_mib_pieces() {
    let dev = Arc::new(Counting::new(8 * MIB));
    let exports = StaticExports::new().with("origin", dev.clone());
    let (_tmp, m) = mount_dir(Arc::new(exports), FuseOptions::default());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.dir().join("origin"))
        .unwrap();
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, MIB).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, MIB).unwrap();
    assert!(back == data);
    assert_eq!(dev.max_write.load(Ordering::SeqCst) as u64, MIB);
    assert_eq!(dev.max_read.load(Ordering::SeqCst) as u64, MIB);
    drop(f);
    m.unmount().unwrap();
}

/// `cachestat(2)` (Linux 6.5): page-cache state of a file range.
fn cachestat(f: &File, offset: u64, len: u64) -> [u64; 5] {
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = [offset, len];
    let mut stat = [0u64; 5]; // cache, dirty, writeback, evicted, recently evicted
                              // SAFETY: both pointers are valid for the struct sizes the kernel uses
                              // (struct cachestat_range: 2 u64; struct cachestat: 5 u64) for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            range.as_ptr(),
            stat.as_mut_ptr(),
            0u32,
        )
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    stat
}

#[test]
fn large_writes_start_writeback_at_once_and_fsync_makes_them_durable() {
    // A real disk filesystem (not tmpfs): the point is its writeback.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = tmp.path().join("origin.img");
    let dev = FileDev::create_sparse(&image, 8 * MIB, OpenOptions::default()).unwrap();
    let exports = StaticExports::new().with("origin", Arc::new(PlainDevice::new(dev, false)));
    let (_mnt, m) = mount_dir(Arc::new(exports), FuseOptions::default());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.dir().join("origin"))
        .unwrap();
    let backing = File::open(&image).unwrap();
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();

    // Two 1 MiB requests: each is written back as soon as it is written,
    // with no fsync: its pages are under writeback (or clean), not dirty.
    f.write_all_at(&data, 2 * MIB).unwrap();
    let [cached, dirty, ..] = cachestat(&backing, 2 * MIB, 2 * MIB);
    assert_eq!(
        cached,
        2 * MIB / 4096,
        "the write went through the page cache"
    );
    // (ext4 may leave the last page of a range dirty: allow 1%.)
    assert!(
        dirty * 100 <= cached,
        "writeback of the large write has not started: {dirty} of {cached} pages dirty"
    );

    // fsync: nothing dirty or in flight, and the backing file holds it.
    f.write_all_at(&data[..4096], 0).unwrap();
    f.sync_all().unwrap();
    let [_, dirty, writeback, ..] = cachestat(&backing, 0, 8 * MIB);
    assert_eq!((dirty, writeback), (0, 0), "fsync left pages not durable");
    let mut back = vec![0u8; data.len()];
    backing.read_exact_at(&mut back, 2 * MIB).unwrap();
    assert!(
        back == data,
        "the backing file differs from what was written"
    );
    backing.read_exact_at(&mut back[..4096], 0).unwrap();
    assert!(back[..4096] == data[..4096]);
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn reads_and_writes_from_many_threads_match_a_model() {
    const LEN: u64 = 8 * MIB;
    let backing = Arc::new(PlainDevice::new(MemDev::new(LEN), false));
    let exports = StaticExports::new().with("origin", backing.clone());
    let (_tmp, m) = mount_dir(Arc::new(exports), FuseOptions::default());
    let path = m.dir().join("origin");

    // Each thread owns one region: random writes there, checked by reads.
    let threads = 4;
    let region = LEN / threads;
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let path = path.clone();
                s.spawn(move || {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .unwrap();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                    let mut model = vec![0u8; region as usize];
                    let base = t * region;
                    for _ in 0..200 {
                        let off = rng.gen_range(0..region - 1);
                        let len = rng.gen_range(1..=(region - off).min(300_000));
                        if rng.gen_bool(0.6) {
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data[..]);
                            f.write_all_at(&data, base + off).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        } else {
                            let mut got = vec![0u8; len as usize];
                            f.read_exact_at(&mut got, base + off).unwrap();
                            assert!(
                                got == model[off as usize..(off + len) as usize],
                                "thread {t}: read at {off}+{len} differs from the model"
                            );
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // Every write reached the device.
    let mut content = vec![0u8; LEN as usize];
    backing.read_at(&mut content, 0).unwrap();
    for (t, model) in models.iter().enumerate() {
        let r = &content[t * region as usize..(t + 1) * region as usize];
        assert!(r == &model[..], "region {t} differs on the device");
    }

    // Block-device edges: reads stop at the end, writes beyond it fail.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut buf, LEN - 4096).unwrap(), 4096);
    assert_eq!(f.read_at(&mut buf, LEN).unwrap(), 0);
    let e = f.write_at(&buf, LEN).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(f);
    m.unmount().unwrap();
}

/// Sleeps in every read: shows whether requests overlap.
struct Slow {
    inner: PlainDevice<MemDev>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Slow {
    fn slowly(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Device for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.slowly();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        self.slowly();
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

#[test]
fn reads_and_writes_to_one_file_are_served_in_parallel() {
    let dev = Arc::new(Slow {
        inner: PlainDevice::new(MemDev::new(MIB), false),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    let exports = StaticExports::new().with("origin", dev.clone());
    let opts = FuseOptions {
        threads: 4,
        ..FuseOptions::default()
    };
    let (_tmp, m) = mount_dir(Arc::new(exports), opts);
    let path = m.dir().join("origin");
    for write in [false, true] {
        dev.max_in_flight.store(0, Ordering::SeqCst);
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let path = path.clone();
                s.spawn(move || {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .unwrap();
                    let mut buf = vec![0u8; 4096];
                    if write {
                        f.write_all_at(&buf, i * 4096).unwrap();
                    } else {
                        f.read_exact_at(&mut buf, i * 4096).unwrap();
                    }
                });
            }
        });
        let elapsed = t.elapsed();
        let overlap = dev.max_in_flight.load(Ordering::SeqCst);
        let what = if write { "writes" } else { "reads" };
        assert!(
            overlap >= 2,
            "{what} never overlapped (max in flight {overlap})"
        );
        assert!(
            elapsed < Duration::from_millis(390),
            "4 {what} of 100 ms took {elapsed:?}"
        );
    }
    m.unmount().unwrap();
}

#[test]
fn read_only_exports_refuse_writes() {
    let ro_dev: Arc<dyn Device> =
        Arc::new(PlainDevice::new(MemDev::from_vec(vec![7; 65536]), true));
    let exports = StaticExports::new()
        .with("origin", mem_export(65536))
        .with("snap", mem_export(65536))
        .with("ro", ro_dev);
    let opts = FuseOptions {
        read_only: Arc::new(|name| name == "snap"),
        ..FuseOptions::default()
    };
    let (_tmp, m) = mount_dir(Arc::new(exports), opts);
    for name in ["snap", "ro"] {
        let p = m.dir().join(name);
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect_err("opening a read-only export for writing");
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
            ),
            "{name}: {e}"
        );
        // Reading still works.
        let f = File::open(&p).unwrap();
        let mut buf = [0u8; 512];
        f.read_exact_at(&mut buf, 0).unwrap();
        let expect = if name == "ro" { 7 } else { 0 };
        assert!(buf.iter().all(|&b| b == expect));
        assert!(std::fs::metadata(&p).unwrap().permissions().readonly());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.dir().join("origin"))
        .unwrap()
        .write_all_at(b"ok", 0)
        .unwrap();
    // The directory itself is not writable either.
    assert!(File::create(m.dir().join("new")).is_err());
    assert!(std::fs::remove_file(m.dir().join("origin")).is_err());
    m.unmount().unwrap();
}

/// An export set that changes while mounted.
#[derive(Default)]
struct DynExports(RwLock<BTreeMap<String, Arc<dyn Device>>>);

impl ExportSet for DynExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Device>> {
        self.0.read().get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.0.read().keys().cloned().collect()
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn exports_added_and_removed_while_mounted_appear_and_disappear() {
    let set = Arc::new(DynExports::default());
    set.0.write().insert("origin".into(), mem_export(MIB));
    let (_tmp, m) = mount_dir(set.clone(), FuseOptions::default());
    let dir = m.dir().to_path_buf();
    assert_eq!(listing(&dir), ["origin"]);
    let snap = dir.join("snap1");
    assert_eq!(
        std::fs::metadata(&snap).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );

    set.0.write().insert("snap1".into(), mem_export(2 * MIB));
    assert_eq!(listing(&dir), ["origin", "snap1"]);
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), 2 * MIB);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&snap).unwrap());
    let f = File::open(&snap).unwrap();

    set.0.write().remove("snap1");
    assert_eq!(listing(&dir), ["origin"]);
    assert_eq!(
        std::fs::metadata(&snap).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        File::open(&snap).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    // A file opened before the removal keeps its device.
    let mut buf = [1u8; 512];
    f.read_exact_at(&mut buf, 0).unwrap();
    drop(f);

    // Same name again: same inode number while mounted.
    set.0.write().insert("snap1".into(), mem_export(MIB));
    let ino2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&snap).unwrap());
    assert_eq!(ino, ino2);
    m.unmount().unwrap();
}

#[test]
fn mounting_on_a_bad_path_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let exports: Arc<dyn ExportSet> =
        Arc::new(StaticExports::new().with("origin", mem_export(MIB)));

    let e = mount(exports.clone(), &file, FuseOptions::default()).unwrap_err();
    assert!(matches!(e, FuseError::BadMountpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("not a directory"), "{e}");

    let missing = tmp.path().join("no/such/dir");
    let e = mount(exports, &missing, FuseOptions::default()).unwrap_err();
    assert!(matches!(e, FuseError::BadMountpoint { .. }), "{e:?}");
    assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn mount_shows_fsname_and_unmount_removes_it() {
    let exports: Arc<dyn ExportSet> =
        Arc::new(StaticExports::new().with("origin", mem_export(MIB)));
    let (_tmp, m) = mount_dir(exports, FuseOptions::default());
    let dir: PathBuf = m.dir().to_path_buf();
    let line = mountinfo_line(&dir);
    let mut fs = line.split(" - ").nth(1).unwrap().split(' ');
    assert!(fs.next().unwrap().starts_with("fuse"), "{line}");
    assert_eq!(fs.next(), Some("dmsnap"), "{line}");
    let super_opts = fs.next().unwrap();
    assert!(super_opts.contains("default_permissions"), "{line}");
    assert!(!super_opts.contains("allow_other"), "{line}");
    let st = nix_statfs(&dir);
    assert_eq!(st, MIB / 4096);
    drop(m); // unmount on drop
    assert!(!is_mounted(&dir));
}

fn mountinfo_line(dir: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()))
        .expect("mount listed")
        .to_string()
}

#[test]
fn allow_other_is_passed_when_asked() {
    let exports: Arc<dyn ExportSet> =
        Arc::new(StaticExports::new().with("origin", mem_export(MIB)));
    let opts = FuseOptions {
        allow_other: true,
        ..FuseOptions::default()
    };
    let (_tmp, m) = mount_dir(exports, opts);
    let line = mountinfo_line(m.dir());
    assert!(line.contains("allow_other"), "{line}");
    m.unmount().unwrap();
}

/// The lead's daemon keeps the mount in shared state.
#[allow(dead_code)]
fn fuse_mount_is_send_and_sync()
where
    FuseMount: Send + Sync,
{
}

fn nix_statfs(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: zeroed statvfs is a valid out-buffer; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and out-pointer for the duration of the call.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0);
    st.f_blocks
}

#[test]
fn unmount_with_a_loop_device_attached_is_lazy_and_clean() {
    let exports: Arc<dyn ExportSet> =
        Arc::new(StaticExports::new().with("origin", mem_export(16 * MIB)));
    let (_tmp, m) = mount_dir(exports, FuseOptions::default());
    let dir = m.dir().to_path_buf();
    let lo = LoopDevice::attach(&dir.join("origin"), false).unwrap();
    m.unmount().expect("lazy unmount");
    assert!(!is_mounted(&dir), "mount left the namespace");
    // The loop device still works through the detached mount.
    let f = File::open(lo.path()).unwrap();
    let mut buf = [1u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    lo.detach().unwrap();
}

/// Not a timed test: run `cargo test --release --test fuse_export bench_fs -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark helper (slow, needs root): run with --ignored --nocapture"]
fn bench_fs_report() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut opts = bench::FsBenchOptions::new(tmp.path());
    if let Ok(t) = std::env::var("DMSNAP_BENCH_THREADS") {
        opts.threads = t.parse().unwrap();
    }
    for direct_backing in [true, false] {
        opts.direct_backing = direct_backing;
        let report = bench::bench_fs(&opts).unwrap();
        println!(
            "FUSE backing file O_DIRECT={direct_backing}, {} threads:\n{report}",
            opts.threads
        );
    }
}

/// Power-loss model: writes land in `live`; `flush` makes every completed
/// write durable; `durable()` is what survives a power cut now.
struct PowerLoss {
    size: u64,
    state: parking_lot::Mutex<PowerLossState>,
}

struct PowerLossState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges written since the last flush.
    dirty: Vec<(usize, usize)>,
}

impl PowerLoss {
    fn new(size: u64) -> Self {
        PowerLoss {
            size,
            state: parking_lot::Mutex::new(PowerLossState {
                live: vec![0; size as usize],
                durable: vec![0; size as usize],
                dirty: Vec::new(),
            }),
        }
    }
    fn durable(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }
}

impl Device for PowerLoss {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        dmsnap::device::check_request(offset, buf.len() as u64, self.size)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.state.lock().live[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        dmsnap::device::check_request(offset, buf.len() as u64, self.size)?;
        let o = offset as usize;
        let mut s = self.state.lock();
        s.live[o..o + buf.len()].copy_from_slice(buf);
        if fua {
            s.durable[o..o + buf.len()].copy_from_slice(buf);
        } else {
            s.dirty.push((o, buf.len()));
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DevError> {
        let mut s = self.state.lock();
        let PowerLossState {
            live,
            durable,
            dirty,
        } = &mut *s;
        for (o, n) in dirty.drain(..) {
            durable[o..o + n].copy_from_slice(&live[o..o + n]);
        }
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), DevError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.write_at(&vec![0; len as usize], offset, fua)
    }
}

#[test]
fn an_ext4_fsync_through_the_loop_device_survives_power_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let fs_dir = tmp.path().join("fs");
    let fuse_dir = tmp.path().join("fuse");
    std::fs::create_dir(&fs_dir).unwrap();
    std::fs::create_dir(&fuse_dir).unwrap();
    let dev = Arc::new(PowerLoss::new(64 * MIB));
    let exports = StaticExports::new().with("origin", dev.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut synced = vec![0u8; (3 * MIB) as usize];
    rng.fill(&mut synced[..]);

    let durable = {
        let fuse = mount(Arc::new(exports), &fuse_dir, FuseOptions::default()).unwrap();
        let lo = LoopDevice::attach_prefer_direct(&fuse.dir().join("origin")).unwrap();
        bench::run_mkfs(lo.path()).unwrap();
        let fs = FsMount::mount(lo.path(), &fs_dir, "ext4").unwrap();
        let f = File::create(fs.dir().join("synced")).unwrap();
        f.write_all_at(&synced, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        // Power goes now: only what the device was told to flush survives.
        dev.durable()
    };

    let image = tmp.path().join("after-crash.img");
    std::fs::write(&image, &durable).unwrap();
    let lo = LoopDevice::attach(&image, false).unwrap();
    {
        // Mounting replays the journal, as after a real power cut.
        let fs = FsMount::mount(lo.path(), &fs_dir, "ext4").unwrap();
        let got = std::fs::read(fs.dir().join("synced")).unwrap();
        assert!(got == synced, "the fsynced file differs after power loss");
    }
    assert_fsck_clean(lo.path());
}

/// Fails every operation with a chosen error.
struct Failing;

impl Device for Failing {
    fn size(&self) -> u64 {
        MIB
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), DevError> {
        Err(DevError::Io(std::io::Error::from_raw_os_error(libc::EIO)))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<(), DevError> {
        Err(DevError::Overflow)
    }
    fn flush(&self) -> Result<(), DevError> {
        Err(DevError::Gone)
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), DevError> {
        Err(DevError::Unsupported)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), DevError> {
        Err(DevError::Invalid)
    }
}

#[test]
fn device_errors_reach_the_client_as_their_errno() {
    let exports = StaticExports::new().with("snap", Arc::new(Failing));
    let (_tmp, m) = mount_dir(Arc::new(exports), FuseOptions::default());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.dir().join("snap"))
        .unwrap();
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    let mut buf = [0u8; 4096];
    assert_eq!(errno(f.read_exact_at(&mut buf, 0)), Some(libc::EIO));
    assert_eq!(errno(f.write_all_at(&buf, 0)), Some(libc::ENOSPC));
    assert_eq!(errno(f.sync_all()), Some(libc::EIO));
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(errno(fallocate(&f, punch, 0, 4096)), Some(libc::EOPNOTSUPP));
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(errno(fallocate(&f, zero, 0, 4096)), Some(libc::EIO));
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn unmount_after_an_external_umount_is_ok() {
    let exports: Arc<dyn ExportSet> =
        Arc::new(StaticExports::new().with("origin", mem_export(MIB)));
    let (_tmp, m) = mount_dir(exports, FuseOptions::default());
    let dir = m.dir().to_path_buf();
    bench::run(Command::new("umount").arg(&dir)).unwrap();
    assert!(!is_mounted(&dir));
    m.unmount().expect("nothing left to unmount");
}

/// After the daemon is gone: make sure nothing stays mounted on `dir`, even
/// if the daemon died without unmounting.
struct UmountOnDrop(PathBuf);

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn assert_bytes(path: &Path, offset: u64, len: usize, byte: u8) {
    let f = File::open(path).unwrap();
    let mut buf = vec![!byte; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    assert!(
        buf.iter().all(|&b| b == byte),
        "{} at {offset}+{len} is not all {byte:#x}",
        path.display()
    );
}

#[test]
fn the_daemon_serves_origin_and_snapshots_as_files() {
    use support::{ok, Daemon};
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    let dir = t.path().join("fuse");
    let fs_dir = t.path().join("fs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&fs_dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    ok(&["create", ps, "--size", "64M"]);
    ok(&["snapshot", "create", ps, "before"]);

    let _cleanup = UmountOnDrop(dir.clone());
    let d = Daemon::start(&p, &["--fuse", dir.to_str().unwrap()]);
    assert_eq!(listing(&dir), ["before", "origin"]);
    assert_eq!(
        std::fs::metadata(dir.join("origin")).unwrap().len(),
        64 * MIB
    );

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("origin"))
        .unwrap();
    f.write_all_at(&vec![0xAB; MIB as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_bytes(&dir.join("origin"), 0, MIB as usize, 0xAB);
    assert_bytes(&dir.join("before"), 0, MIB as usize, 0);

    // A snapshot taken online appears as a file at once.
    ok(&["snapshot", "create", ps, "after"]);
    assert_eq!(listing(&dir), ["after", "before", "origin"]);
    assert_bytes(&dir.join("after"), 0, MIB as usize, 0xAB);

    // ext4 through a loop device on the origin; the snapshots keep their view.
    {
        let lo = LoopDevice::attach_prefer_direct(&dir.join("origin")).unwrap();
        bench::run_mkfs(lo.path()).unwrap();
        let fs = FsMount::mount(lo.path(), &fs_dir, "ext4").unwrap();
        std::fs::write(fs.dir().join("hello"), b"hello through dm-snapshot").unwrap();
        fs.unmount().unwrap();
        assert_fsck_clean(lo.path());
        lo.detach().unwrap();
    }
    assert_bytes(&dir.join("after"), 0, MIB as usize, 0xAB);
    assert_bytes(&dir.join("before"), 0, MIB as usize, 0);

    ok(&["snapshot", "remove", ps, "after"]);
    assert_eq!(listing(&dir), ["before", "origin"]);
    assert_eq!(
        std::fs::metadata(dir.join("after"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );

    assert!(d.stop().success(), "daemon exits 0 on SIGTERM");
    assert!(!is_mounted(&dir), "the daemon unmounted its FUSE export");
}

#[test]
fn the_daemon_serves_read_only_snapshots_when_asked() {
    use support::{ok, Daemon};
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("pool");
    let ps = p.to_str().unwrap();
    let dir = t.path().join("fuse");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    ok(&["create", ps, "--size", "16M"]);
    ok(&["snapshot", "create", ps, "s1"]);
    let _cleanup = UmountOnDrop(dir.clone());
    let d = Daemon::start(
        &p,
        &["--fuse", dir.to_str().unwrap(), "--read-only-snapshots"],
    );
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("s1"))
        .unwrap_err();
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        ),
        "{e}"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("origin"))
        .unwrap()
        .write_all_at(b"origin stays writable", 0)
        .unwrap();
    assert!(d.stop().success());
    assert!(!is_mounted(&dir));
}
