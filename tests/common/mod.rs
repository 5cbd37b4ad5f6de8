//! Shared helpers for integration tests (`mod common;` in a test file).
//!
//! - [`fixture`]: a file of a kernel-made golden case under
//!   `tests/fixtures/kernel/<case>/`, `.zst` images decompressed (cached per
//!   process);
//! - [`pattern`]: the golden data pattern (what the kernel runs wrote);
//! - [`case_json`], [`exceptions_txt`], [`expected_sha256`]: the case metadata;
//! - [`apply_exceptions`]: rebuild a snapshot from an origin image and a COW;
//! - [`sha256_hex`], [`dmsnap_bin`];
//! - engine tests: [`fill`] (seeded bytes), [`stamp`] (a chunk marked with its
//!   number), [`read_all`] (a whole `Device`), [`CountFlushes`] (a device
//!   wrapper counting flushes).
//!
//! - [`watchdog::watched`]: run a call under a watchdog that, after 10 s,
//!   prints every thread's stack and aborts (a hang fails the test).
//!
//! Not every test file uses every helper.
#![allow(dead_code)]

pub mod watchdog;

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Every golden case shipped in `tests/fixtures/kernel/`.
pub const CASES: [&str; 5] = [
    "chunk4k_mixed",
    "chunk16k_mixed",
    "two_snapshots",
    "overflow_invalid",
    "merge_complete",
];

/// `tests/fixtures/kernel/`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernel")
}

/// The path of `file` in `case` (as stored: an image is `NAME.img.zst`).
pub fn fixture_path(case: &str, file: &str) -> PathBuf {
    fixtures_dir().join(case).join(file)
}

/// The bytes of `file` in golden case `case`. For an image pass its
/// uncompressed name (`"cow.img"`): the `.zst` next to it is decompressed.
/// Decompressed images are cached for the life of the test process.
pub fn fixture(case: &str, file: &str) -> Vec<u8> {
    let plain = fixture_path(case, file);
    if plain.exists() && !file.ends_with(".zst") {
        return std::fs::read(&plain)
            .unwrap_or_else(|e| panic!("reading fixture {}: {e}", plain.display()));
    }
    let zst = if file.ends_with(".zst") {
        plain
    } else {
        fixture_path(case, &format!("{file}.zst"))
    };
    (*cached_decompress(&zst)).clone()
}

fn cached_decompress(path: &Path) -> Arc<Vec<u8>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Vec<u8>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().expect("fixture cache").get(path) {
        return Arc::clone(v);
    }
    let v = Arc::new(decompress(path));
    cache
        .lock()
        .expect("fixture cache")
        .insert(path.to_path_buf(), Arc::clone(&v));
    v
}

/// Decompress a zstd file. The golden frames were made with `--long=27` but
/// are single-segment frames (window = content size ≤ 48 MiB), which `ruzstd`
/// accepts (its limit is 100 MiB). Should a frame ever need a bigger window,
/// fall back to the `zstd` CLI (installed in CI).
pub fn decompress(path: &Path) -> Vec<u8> {
    let compressed =
        std::fs::read(path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    let rust = (|| -> Result<Vec<u8>, String> {
        let mut src = &compressed[..];
        let mut d = ruzstd::StreamingDecoder::new(&mut src).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        d.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })();
    match rust {
        Ok(out) => out,
        Err(e) => {
            let out = std::process::Command::new("zstd")
                .args(["-d", "--long=27", "-c"])
                .arg(path)
                .output()
                .unwrap_or_else(|e2| {
                    panic!(
                        "ruzstd failed on {} ({e}) and the zstd CLI could not run: {e2}",
                        path.display()
                    )
                });
            assert!(
                out.status.success(),
                "zstd -d failed on {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    }
}

/// The golden data pattern: 512-byte sector `s` of pattern `letter` is
/// `('X%09d.' % s * 47)[:511] + '\n'` (Python), and a write of
/// `[offset, offset+len)` copies that byte range of the pattern.
pub fn pattern(letter: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    let end = offset + len as u64;
    while pos < end {
        let sector = pos / 512;
        let sector_bytes = pattern_sector(letter, sector);
        let from = (pos % 512) as usize;
        let to = ((end - sector * 512).min(512)) as usize;
        out.extend_from_slice(&sector_bytes[from..to]);
        pos = sector * 512 + to as u64;
    }
    out
}

/// One whole sector of the pattern.
pub fn pattern_sector(letter: u8, sector: u64) -> [u8; 512] {
    let unit = format!("{}{:09}.", letter as char, sector);
    let mut s = [0u8; 512];
    for (i, b) in unit.bytes().cycle().take(511).enumerate() {
        s[i] = b;
    }
    s[511] = b'\n';
    s
}

/// `case.json` of a case.
pub fn case_json(case: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(case, "case.json")).expect("case.json parses")
}

/// `expected_sha256.<key>` of a case (e.g. `"snapshot"`, `"snapshot_a"`).
pub fn expected_sha256(case: &str, key: &str) -> String {
    case_json(case)["expected_sha256"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no expected_sha256.{key}"))
        .to_owned()
}

/// The records of `<cow>.exceptions.txt` (`cow` without `.img`): `(old_chunk, new_chunk, area)`.
pub fn exceptions_txt(case: &str, cow: &str) -> Vec<(u64, u64, u64)> {
    let text = String::from_utf8(fixture(case, &format!("{cow}.exceptions.txt"))).expect("utf-8");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .map(|x| x.parse().expect("number"))
                .collect();
            assert_eq!(v.len(), 3, "bad line {l:?}");
            (v[0], v[1], v[2])
        })
        .collect()
}

/// Rebuild a snapshot's content: the origin image with every exception's COW
/// chunk copied over its origin chunk (clamped at the origin's end).
pub fn apply_exceptions(
    origin: &[u8],
    cow: &[u8],
    chunk_bytes: usize,
    exceptions: impl IntoIterator<Item = (u64, u64)>,
) -> Vec<u8> {
    let mut snap = origin.to_vec();
    for (old, new) in exceptions {
        let dst = old as usize * chunk_bytes;
        let src = new as usize * chunk_bytes;
        assert!(dst < snap.len(), "old_chunk {old} beyond the origin");
        let n = chunk_bytes.min(snap.len() - dst);
        snap[dst..dst + n].copy_from_slice(&cow[src..src + n]);
    }
    snap
}

/// Lower-case hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `dmsnap` binary built for this test run.
pub fn dmsnap_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dmsnap"))
}

/// `len` pseudo-random bytes from `seed` (xorshift; the same seed gives the
/// same bytes).
pub fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A 4 KiB chunk of byte `gen` whose first 8 bytes hold `chunk` (LE).
pub fn stamp(gen: u8, chunk: u64) -> Vec<u8> {
    let mut b = vec![gen; 4096];
    b[..8].copy_from_slice(&chunk.to_le_bytes());
    b
}

/// The whole content of a device.
pub fn read_all(d: &dyn dmsnap::device::Device) -> Vec<u8> {
    let mut b = vec![0; d.size() as usize];
    d.read_at(&mut b, 0).expect("read the whole device");
    b
}

/// Counts the flushes of the device it wraps.
pub struct CountFlushes<D> {
    pub dev: Arc<D>,
    flushes: std::sync::atomic::AtomicU64,
}

impl<D> CountFlushes<D> {
    pub fn new(dev: Arc<D>) -> Arc<Self> {
        Arc::new(CountFlushes {
            dev,
            flushes: Default::default(),
        })
    }
    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<D: dmsnap::io::BlockDev> dmsnap::io::BlockDev for CountFlushes<D> {
    fn len(&self) -> u64 {
        self.dev.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        flags: dmsnap::io::WriteFlags,
    ) -> std::io::Result<()> {
        self.dev.write_at(buf, offset, flags)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.dev.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: dmsnap::io::WriteFlags,
    ) -> std::io::Result<()> {
        self.dev.write_zeroes(offset, len, flags)
    }
}
