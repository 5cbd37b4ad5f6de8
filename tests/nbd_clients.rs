//! The NBD server against real clients: nbdinfo, nbdcopy (libnbd),
//! qemu-img, qemu-io (QEMU's NBD client) and fio's nbd engine. The server
//! runs in-process on a Unix socket in a temp dir (one test on TCP port 0);
//! every byte a client wrote is checked in the device behind the export.
//!
//! Needs the Debian packages qemu-utils, libnbd-bin and fio (CI installs
//! them; these tests fail if they are missing).

use dmsnap::device::{DevError, Device, ExportSet, PlainDevice};
use dmsnap::export::nbd::{Listen, NbdServer, ServerOptions};
use dmsnap::io::MemDev;
use parking_lot::RwLock;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A memory device that counts what reached it.
struct Counting {
    inner: PlainDevice<MemDev>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    writes: AtomicU64,
    zeroes: AtomicU64,
    discards: AtomicU64,
}

impl Counting {
    fn new(len: u64, read_only: bool) -> Arc<Self> {
        Self::with(MemDev::new(len), read_only)
    }
    fn with(dev: MemDev, read_only: bool) -> Arc<Self> {
        Arc::new(Counting {
            inner: PlainDevice::new(dev, read_only),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
        })
    }
    fn content(&self) -> Vec<u8> {
        self.inner.inner().snapshot()
    }
}

impl Device for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_block_size(&self) -> u32 {
        65536
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
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
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_zeroes(offset, len, fua)
    }
}

/// An export set that changes while the server runs.
#[derive(Default)]
struct DynExports {
    map: RwLock<BTreeMap<String, Arc<dyn Device>>>,
}

impl DynExports {
    fn add(&self, name: &str, dev: Arc<dyn Device>) {
        self.map.write().insert(name.to_string(), dev);
    }
    fn remove(&self, name: &str) {
        self.map.write().remove(name);
    }
}

impl ExportSet for DynExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Device>> {
        self.map.read().get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.map.read().keys().cloned().collect()
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    sock: PathBuf,
    exports: Arc<DynExports>,
    server: NbdServer,
}

impl Fixture {
    /// A server on `DIR/nbd.sock` where every export but `origin` is read-only.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let exports = Arc::new(DynExports::default());
        let opts = ServerOptions {
            read_only: Arc::new(|name| name != "origin"),
            ..ServerOptions::default()
        };
        let server = NbdServer::new(exports.clone(), opts);
        server.listen(&Listen::Unix(sock.clone())).unwrap();
        Fixture {
            dir,
            sock,
            exports,
            server,
        }
    }
    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len as usize];
    rng.fill(&mut v[..]);
    v
}

/// Run a client with a time limit; panic with its output if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_status(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is its package installed?): {e}"));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} timed out\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn unix_socket_is_private() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let f = Fixture::new();
    let md = std::fs::metadata(&f.sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // A second server on the same live socket is refused...
    let other = NbdServer::new(f.exports.clone(), ServerOptions::default());
    assert!(other.listen(&Listen::Unix(f.sock.clone())).is_err());
    // ...but a stale socket file (nobody listening) is replaced.
    let stale = f.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    other.listen(&Listen::Unix(stale.clone())).unwrap();
    // Shutdown removes the socket files.
    other.shutdown();
    assert!(!stale.exists());
}

#[test]
fn nbdinfo_lists_every_export_with_its_size() {
    let f = Fixture::new();
    f.exports.add("origin", Counting::new(8 * MIB, false));
    f.exports.add("snap1", Counting::new(4 * MIB, false));
    f.exports.add("snap-two", Counting::new(MIB, false));
    let out = run(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(f.uri("")));
    let v = json(&out);
    let mut got: Vec<(String, u64)> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("origin".to_string(), 8 * MIB),
            ("snap-two".to_string(), MIB),
            ("snap1".to_string(), 4 * MIB),
        ]
    );
}

#[test]
fn nbdinfo_shows_one_export_with_flags_and_block_sizes() {
    let f = Fixture::new();
    f.exports.add("origin", Counting::new(8 * MIB, false));
    f.exports.add("snap", Counting::new(8 * MIB, false));
    let v = json(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(f.uri("origin"))));
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "origin");
    assert_eq!(e["export-size"], 8 * MIB);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    // The server-side predicate makes every other export read-only.
    let v = json(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(f.uri("snap"))));
    assert_eq!(v["exports"][0]["is_read_only"], true);
    // Unknown export: nbdinfo fails cleanly (ERR_UNKNOWN).
    let out = run_status(Command::new("nbdinfo").arg(f.uri("nope")));
    assert!(!out.status.success());
}

#[test]
fn exports_added_and_removed_while_serving() {
    let f = Fixture::new();
    f.exports.add("origin", Counting::new(MIB, false));
    let size = |name: &str| {
        let out = run_status(Command::new("nbdinfo").arg("--size").arg(f.uri(name)));
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap()
        })
    };
    assert_eq!(size("later"), None);
    f.exports.add("later", Counting::new(2 * MIB, false));
    assert_eq!(size("later"), Some(2 * MIB));
    f.exports.remove("later");
    assert_eq!(size("later"), None);
    assert_eq!(size("origin"), Some(MIB));
}

#[test]
fn qemu_img_convert_into_export_then_compare() {
    let f = Fixture::new();
    let dev = Counting::new(16 * MIB, false);
    f.exports.add("origin", dev.clone());
    let src = f.path("src.img");
    let data = random_bytes(16 * MIB, 1);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(f.uri("origin")));
    assert!(dev.content() == data, "device differs from the source");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(f.uri("origin")));
    // compare notices a difference through the export too
    let mut changed = data.clone();
    changed[5 * MIB as usize] ^= 0xff;
    std::fs::write(&src, &changed).unwrap();
    let out = run_status(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(f.uri("origin")),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare should see the change"
    );
}

#[test]
fn qemu_io_write_read_flush_fua_zero_discard() {
    let f = Fixture::new();
    let dev = Counting::new(8 * MIB, false);
    f.exports.add("origin", dev.clone());
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=origin",
        f.sock.display()
    );
    let out = run(Command::new("qemu-io")
        .arg("--image-opts")
        .arg(&opts)
        .args(["-c", "write -P 0xab 0 1M"])
        .args(["-c", "read -P 0xab 0 1M"])
        .args(["-c", "write -f -P 0xcd 1M 64k"])
        .args(["-c", "flush"])
        .args(["-c", "write -z 2M 512k"])
        .args(["-c", "discard 3M 1M"])
        .args(["-c", "read -P 0xcd 1M 64k"])
        .args(["-c", "read -P 0 2M 512k"])
        .args(["-c", "write -P 0x11 3584 1024"])
        .args(["-c", "read -P 0x11 3584 1024"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    let c = dev.content();
    let m = MIB as usize;
    assert!(c[..3584].iter().all(|&b| b == 0xab));
    assert!(c[3584..4608].iter().all(|&b| b == 0x11));
    assert!(c[4608..m].iter().all(|&b| b == 0xab));
    assert!(c[m..m + 65536].iter().all(|&b| b == 0xcd));
    assert!(c[2 * m..2 * m + m / 2].iter().all(|&b| b == 0));
    assert!(
        dev.flushes.load(Ordering::SeqCst) >= 1,
        "FLUSH reached the device"
    );
    assert!(
        dev.fua_writes.load(Ordering::SeqCst) >= 1,
        "FUA reached the device"
    );
    assert!(
        dev.zeroes.load(Ordering::SeqCst) >= 1,
        "WRITE_ZEROES reached the device"
    );
    assert!(
        dev.discards.load(Ordering::SeqCst) >= 1,
        "TRIM reached the device"
    );
}

#[test]
fn qemu_io_over_tcp() {
    let exports = Arc::new(DynExports::default());
    let dev = Counting::new(4 * MIB, false);
    exports.add("origin", dev.clone());
    let server = NbdServer::new(exports, ServerOptions::default());
    let bound = server.listen(&Listen::Tcp("127.0.0.1:0".into())).unwrap();
    let addr = bound.tcp_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let uri = format!("nbd://127.0.0.1:{}/origin", addr.port());
    run(Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .args(["-c", "write -P 0x5a 512k 256k"])
        .args(["-c", "read -P 0x5a 512k 256k"])
        .args(["-c", "flush"]));
    let c = dev.content();
    assert!(c[512 << 10..768 << 10].iter().all(|&b| b == 0x5a));
    let v = json(&run(Command::new("nbdinfo").arg("--json").arg(&uri)));
    assert_eq!(v["exports"][0]["export-size"], 4 * MIB);
    server.shutdown();
}

#[test]
fn qemu_io_refused_writes_on_read_only_export() {
    let f = Fixture::new();
    let dev = Counting::new(MIB, false);
    f.exports.add("snap", dev.clone());
    let out = run_status(
        Command::new("qemu-io")
            .args(["-f", "raw", "-r"])
            .arg(f.uri("snap"))
            .args(["-c", "read -P 0 0 64k"]),
    );
    assert!(out.status.success());
    // Writing needs a writable open, which QEMU refuses for a read-only export.
    let out = run_status(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(f.uri("snap"))
            .args(["-c", "write -P 1 0 64k"]),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("Permission denied"), "{all}");
    assert_eq!(dev.writes.load(Ordering::SeqCst), 0);
    assert!(dev.content().iter().all(|&b| b == 0));
}

#[test]
fn nbdcopy_both_directions() {
    let f = Fixture::new();
    let dev = Counting::new(24 * MIB, false);
    f.exports.add("origin", dev.clone());
    let src = f.path("src.img");
    let data = random_bytes(24 * MIB, 2);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(f.uri("origin")));
    assert!(dev.content() == data, "file -> export differs");
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    let back = f.path("back.img");
    run(Command::new("nbdcopy").arg(f.uri("origin")).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "export -> file differs"
    );
}

#[test]
fn two_nbdcopy_at_once_with_multi_conn() {
    let f = Fixture::new();
    let a = Counting::new(16 * MIB, false);
    f.exports.add("origin", a.clone());
    let data_a = random_bytes(16 * MIB, 3);
    let src_a = f.path("a.img");
    std::fs::write(&src_a, &data_a).unwrap();
    // A read-only export with known content, read while the other is written.
    let data_b = random_bytes(16 * MIB, 4);
    f.exports.add(
        "snap",
        Counting::with(MemDev::from_vec(data_b.clone()), false),
    );
    let out_b = f.path("b.img");
    let mut ca = Command::new("nbdcopy");
    ca.args(["--connections=4", "--requests=32"])
        .arg(&src_a)
        .arg(f.uri("origin"));
    let mut cb = Command::new("nbdcopy");
    cb.args(["--connections=4", "--requests=32"])
        .arg(f.uri("snap"))
        .arg(&out_b);
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(&mut ca));
        let tb = s.spawn(|| run(&mut cb));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    drop((ra, rb));
    assert!(a.content() == data_a);
    assert!(std::fs::read(&out_b).unwrap() == data_b);
}

fn fio(f: &Fixture, extra: &[&str]) -> Output {
    run(Command::new("fio")
        .args([
            "--name=nbdtest",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--randrepeat=1",
            "--exitall_on_error=1",
        ])
        .arg(format!("--uri={}", f.uri("origin")))
        .args(extra))
}

#[test]
fn fio_randwrite_then_verify() {
    let f = Fixture::new();
    let dev = Counting::new(16 * MIB, false);
    f.exports.add("origin", dev.clone());
    // Write with verification headers (and verify in the same run)...
    let out = fio(&f, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "{stdout}");
    assert!(dev.writes.load(Ordering::SeqCst) >= 4096);
    // ...then a separate verify-only pass over what the device holds.
    let out = fio(&f, &["--verify_only"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "{stdout}");
    // A corrupted block must make the verify pass fail (the check is real).
    let c = dev.content();
    let first_nonzero = c.iter().position(|&b| b != 0).unwrap();
    let off = first_nonzero as u64 / 4096 * 4096 + 100;
    dev.inner
        .write_at(&[!c[off as usize]; 8], off, false)
        .unwrap();
    let out = run_status(
        Command::new("fio")
            .args([
                "--name=nbdtest",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=16M",
                "--verify=crc32c",
                "--randrepeat=1",
                "--verify_only",
            ])
            .arg(format!("--uri={}", f.uri("origin"))),
    );
    assert!(!out.status.success(), "fio verify missed a corrupted block");
}

#[test]
fn shutdown_finishes_and_closes_connections() {
    let f = Fixture::new();
    let dev = Counting::new(8 * MIB, false);
    f.exports.add("origin", dev.clone());
    // A long-running client; shutting the server down must not hang and the
    // client must end (with an error, since it was cut off).
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(f.uri("origin"))
        .args(["-c", "sleep 60000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while f.server.connections() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "qemu-io never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    f.server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(f.server.connections(), 0);
    assert!(!Path::new(&f.sock).exists());
    let _ = child.kill();
    let _ = child.wait();
}
