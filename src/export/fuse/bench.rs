//! Filesystem-level benchmark of the FUSE export, and the small loop-device /
//! mount guards it (and the FUSE tests) use.
//!
//! [`bench_fs`] compares ext4 on a loop device over `DIR/origin` (FUSE, backed
//! by a sparse file) with ext4 on a loop device over the same kind of sparse
//! file directly: write a file + fsync, then a cold read (page cache dropped).
//! Needs root, util-linux (losetup, mount) and e2fsprogs (mkfs.ext4).

use super::{mount, FuseOptions};
use crate::device::{PlainDevice, StaticExports};
use crate::io::{FileDev, OpenOptions};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Run `cmd`; its stdout, or an error naming the command and its stderr.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An attached loop device; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: Option<PathBuf>,
    direct_io: bool,
}

impl LoopDevice {
    /// `losetup --find --show [--direct-io=on] FILE`.
    pub fn attach(file: &Path, direct_io: bool) -> io::Result<LoopDevice> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let dev = run(cmd.arg(file))?;
        let mut dev = LoopDevice {
            path: Some(PathBuf::from(dev)),
            direct_io,
        };
        // losetup may attach and then fail to switch to direct I/O quietly;
        // report what we got.
        dev.direct_io = direct_io && dev.reports_direct_io();
        Ok(dev)
    }

    /// Attach with direct I/O, or without if the kernel refuses it.
    pub fn attach_prefer_direct(file: &Path) -> io::Result<LoopDevice> {
        match Self::attach(file, true) {
            Ok(dev) => Ok(dev),
            Err(_) => Self::attach(file, false),
        }
    }

    fn reports_direct_io(&self) -> bool {
        let Some(name) = self.path().file_name() else {
            return false;
        };
        let p = Path::new("/sys/block").join(name).join("loop/dio");
        std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "1")
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("loop device is attached")
    }

    /// True if the loop device does direct I/O to its backing file.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// `losetup -d`, retried briefly while the device is busy.
    pub fn detach(mut self) -> io::Result<()> {
        self.do_detach()
    }

    fn do_detach(&mut self) -> io::Result<()> {
        let Some(p) = self.path.take() else {
            return Ok(());
        };
        let mut last = None;
        for _ in 0..50 {
            match run(Command::new("losetup").arg("-d").arg(&p)) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| io::Error::other("losetup -d failed")))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.do_detach() {
            eprintln!("warning: {e}");
        }
    }
}

/// A mounted filesystem; unmounted on drop (lazily if busy).
#[derive(Debug)]
pub struct FsMount {
    dir: Option<PathBuf>,
}

impl FsMount {
    /// `mount [-t fstype] DEV DIR`.
    pub fn mount(dev: &Path, dir: &Path, fstype: &str) -> io::Result<FsMount> {
        run(Command::new("mount").args(["-t", fstype]).arg(dev).arg(dir))?;
        Ok(FsMount {
            dir: Some(dir.to_path_buf()),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_deref().expect("filesystem is mounted")
    }

    pub fn unmount(mut self) -> io::Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> io::Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        run(Command::new("umount").arg(&dir)).or_else(|e| {
            run(Command::new("umount").arg("-l").arg(&dir))?;
            Err(e)
        })?;
        Ok(())
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            eprintln!("warning: {e}");
        }
    }
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches` (root).
pub fn drop_caches() -> io::Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n")
}

/// What [`bench_fs`] measures.
#[derive(Debug, Clone)]
pub struct FsBenchOptions {
    /// Scratch directory on a real filesystem (backing files, mount points).
    pub work_dir: PathBuf,
    /// Size of the exported device / plain image.
    pub device_size: u64,
    /// Bytes written (then read) through ext4.
    pub file_size: u64,
    /// Runs per configuration; the median is reported.
    pub runs: usize,
    /// Open the FUSE side's backing file with O_DIRECT (as the plain loop
    /// device with direct I/O does), so both paths skip the page cache.
    pub direct_backing: bool,
    /// FUSE request threads.
    pub threads: usize,
}

impl FsBenchOptions {
    /// 256 MiB file on a 512 MiB device, 3 runs.
    pub fn new(work_dir: &Path) -> Self {
        FsBenchOptions {
            work_dir: work_dir.to_path_buf(),
            device_size: 512 << 20,
            file_size: 256 << 20,
            runs: 3,
            direct_backing: true,
            threads: FuseOptions::default().threads,
        }
    }
}

/// One configuration's medians.
#[derive(Debug, Clone, Copy)]
pub struct FsTimes {
    /// Write the file + fsync.
    pub write: Duration,
    /// Read it back after dropping caches.
    pub cold_read: Duration,
    /// The loop device did direct I/O.
    pub loop_direct_io: bool,
}

/// [`bench_fs`] result.
#[derive(Debug, Clone, Copy)]
pub struct FsBenchReport {
    pub file_size: u64,
    pub fuse: FsTimes,
    pub plain: FsTimes,
}

impl FsBenchReport {
    fn mib_s(bytes: u64, d: Duration) -> f64 {
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    }
    /// FUSE time / plain time for write + fsync (1.0 = as fast).
    pub fn write_ratio(&self) -> f64 {
        self.fuse.write.as_secs_f64() / self.plain.write.as_secs_f64()
    }
    /// FUSE time / plain time for the cold read.
    pub fn read_ratio(&self) -> f64 {
        self.fuse.cold_read.as_secs_f64() / self.plain.cold_read.as_secs_f64()
    }
}

impl std::fmt::Display for FsBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.file_size;
        for (label, t) in [("fuse ", self.fuse), ("plain", self.plain)] {
            writeln!(
                f,
                "{label}: write+fsync {:>8.1} ms ({:>7.1} MiB/s)  cold read {:>8.1} ms ({:>7.1} MiB/s)  loop dio={}",
                t.write.as_secs_f64() * 1e3,
                Self::mib_s(n, t.write),
                t.cold_read.as_secs_f64() * 1e3,
                Self::mib_s(n, t.cold_read),
                t.loop_direct_io,
            )?;
        }
        write!(
            f,
            "ratio fuse/plain (time): write {:.2}x  cold read {:.2}x",
            self.write_ratio(),
            self.read_ratio()
        )
    }
}

/// ext4 on a loop device over `DIR/origin` (FUSE) vs over a plain file:
/// median of `runs` fresh runs each (interleaved). Needs root.
pub fn bench_fs(opts: &FsBenchOptions) -> io::Result<FsBenchReport> {
    let mut fuse = Vec::new();
    let mut plain = Vec::new();
    for run in 0..opts.runs.max(1) {
        fuse.push(one_run(opts, run, true)?);
        plain.push(one_run(opts, run, false)?);
    }
    Ok(FsBenchReport {
        file_size: opts.file_size,
        fuse: median(&fuse),
        plain: median(&plain),
    })
}

fn median(times: &[FsTimes]) -> FsTimes {
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    FsTimes {
        write: mid(times.iter().map(|t| t.write).collect()),
        cold_read: mid(times.iter().map(|t| t.cold_read).collect()),
        loop_direct_io: times.iter().all(|t| t.loop_direct_io),
    }
}

fn one_run(opts: &FsBenchOptions, run: usize, via_fuse: bool) -> io::Result<FsTimes> {
    let tag = if via_fuse { "fuse" } else { "plain" };
    let base = opts.work_dir.join(format!("{tag}-{run}"));
    std::fs::create_dir_all(&base)?;
    let image = base.join("image");
    let fuse_dir = base.join("fuse");
    let fs_dir = base.join("fs");
    std::fs::create_dir_all(&fuse_dir)?;
    std::fs::create_dir_all(&fs_dir)?;
    let _ = std::fs::remove_file(&image);

    // Declared in mount order so they are torn down in reverse.
    let fuse_mount;
    let loop_target = if via_fuse {
        let dev = FileDev::create_sparse(&image, opts.device_size, OpenOptions::default())?;
        let exports = StaticExports::new().with("origin", Arc::new(PlainDevice::new(dev, false)));
        fuse_mount = Some(
            mount(Arc::new(exports), &fuse_dir, FuseOptions::default())
                .map_err(io::Error::other)?,
        );
        fuse_dir.join("origin")
    } else {
        fuse_mount = None;
        File::create_new(&image)?.set_len(opts.device_size)?;
        image.clone()
    };
    let lo = LoopDevice::attach_prefer_direct(&loop_target)?;
    run_mkfs(lo.path())?;
    let fs = FsMount::mount(lo.path(), &fs_dir, "ext4")?;

    let path = fs.dir().join("data");
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    drop_caches()?;
    let t = Instant::now();
    {
        let mut f = File::create(&path)?;
        let mut left = opts.file_size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let write = t.elapsed();

    drop_caches()?;
    let t = Instant::now();
    {
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        if total != opts.file_size {
            return Err(io::Error::other(format!(
                "read back {total} bytes, wrote {}",
                opts.file_size
            )));
        }
    }
    let cold_read = t.elapsed();
    let loop_direct_io = lo.direct_io();

    fs.unmount()?;
    lo.detach()?;
    if let Some(m) = fuse_mount {
        m.unmount().map_err(io::Error::other)?;
    }
    std::fs::remove_dir_all(&base)?;
    Ok(FsTimes {
        write,
        cold_read,
        loop_direct_io,
    })
}

/// `mkfs.ext4 -q -F` with inode tables and journal initialised up front, so
/// no background initialisation disturbs a measurement.
pub fn run_mkfs(dev: &Path) -> io::Result<()> {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(dev))
    .map(drop)
}
