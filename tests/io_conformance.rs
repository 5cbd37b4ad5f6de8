//! One conformance suite for every `BlockDev`: the same model-checked
//! reads, writes, zeroing, discards, FUA writes and range errors against
//! MemDev, FileDev (buffered and O_DIRECT), CrashDev and FaultyDev; then the
//! semantics of the test devices themselves (CrashDev power loss, FaultyDev
//! rules).

use dmsnap::io::testing::{CrashDev, Fault, FaultyDev, OpKind};
use dmsnap::io::{BlockDev, FileDev, MemDev, OpenOptions, WriteFlags};
use rand::{Rng, SeedableRng};
use std::io::ErrorKind;

/// Device sizes the suite runs at: a multiple of 4 KiB, and an odd size
/// whose last block is partial.
const SIZES: [u64; 2] = [256 << 10, (256 << 10) + 1000];

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.len() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// Random unaligned reads, writes (some FUA), write_zeroes and discards
/// checked against an in-memory model of the device. Starts by writing the
/// whole device, so the model is exact.
fn model_check(dev: &dyn BlockDev, seed: u64) {
    let len = dev.len();
    let mut model = pattern(seed, len as usize);
    dev.write_at(&model, 0, WriteFlags::NONE).unwrap();
    assert!(read_all(dev) == model, "whole-device write/read");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    for i in 0..300 {
        // Mostly small and unaligned, sometimes aligned, sometimes at the end.
        let n = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..64u64),
            1 => 512 * rng.gen_range(1..9u64),
            2 => rng.gen_range(1..20_000u64),
            _ => 4096,
        }
        .min(len);
        let off = if rng.gen_bool(0.1) {
            len - n
        } else if rng.gen_bool(0.3) {
            rng.gen_range(0..=(len - n) / 512) * 512
        } else {
            rng.gen_range(0..=len - n)
        };
        let (o, e) = (off as usize, (off + n) as usize);
        match rng.gen_range(0..10) {
            0..=3 => {
                let data = pattern(seed + i, n as usize);
                let fua = rng.gen_bool(0.3);
                dev.write_at(&data, off, WriteFlags { fua }).unwrap();
                model[o..e].copy_from_slice(&data);
            }
            4..=6 => {
                let mut buf = vec![0u8; n as usize];
                dev.read_at(&mut buf, off).unwrap();
                assert!(buf == model[o..e], "read of {n} at {off} (op {i})");
            }
            7 | 8 => {
                let fua = rng.gen_bool(0.5);
                dev.write_zeroes(off, n, WriteFlags { fua }).unwrap();
                model[o..e].fill(0);
            }
            _ => {
                // Afterwards each byte reads as zero or as before.
                dev.discard(off, n).unwrap();
                let mut buf = vec![0u8; n as usize];
                dev.read_at(&mut buf, off).unwrap();
                for (j, (&got, &was)) in buf.iter().zip(&model[o..e]).enumerate() {
                    assert!(got == 0 || got == was, "discard at {off}: byte {j}");
                }
                model[o..e].copy_from_slice(&buf);
            }
        }
    }
    dev.flush().unwrap();
    assert!(read_all(dev) == model, "final content");
}

/// Requests past the end fail with InvalidInput and change nothing;
/// zero-length requests at the end succeed.
fn range_errors(dev: &dyn BlockDev) {
    let len = dev.len();
    let before = read_all(dev);
    let mut two = [0u8; 2];
    let bad = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what}: {e}");
    };
    bad(dev.read_at(&mut two, len - 1), "read across the end");
    bad(dev.read_at(&mut two, len), "read at the end");
    bad(dev.read_at(&mut two, u64::MAX), "read at u64::MAX");
    bad(
        dev.write_at(&two, len - 1, WriteFlags::NONE),
        "write across the end",
    );
    bad(
        dev.write_at(&two, u64::MAX - 1, WriteFlags::FUA),
        "write wrapping",
    );
    bad(
        dev.write_zeroes(len - 1, 2, WriteFlags::NONE),
        "zeroes across the end",
    );
    bad(dev.discard(len, 1), "discard past the end");
    dev.read_at(&mut [], len).unwrap();
    dev.write_at(&[], len, WriteFlags::NONE).unwrap();
    assert!(
        read_all(dev) == before,
        "failed requests changed the device"
    );
}

/// A FUA write and a flush succeed and the data reads back.
fn fua_and_flush(dev: &dyn BlockDev) {
    let data = pattern(99, 3000);
    dev.write_at(&data, 1234, WriteFlags::FUA).unwrap();
    dev.flush().unwrap();
    let mut buf = vec![0u8; 3000];
    dev.read_at(&mut buf, 1234).unwrap();
    assert!(buf == data);
}

fn suite(dev: &dyn BlockDev, name: &str, len: u64) {
    assert_eq!(dev.len(), len, "{name}: len");
    assert!(dev.logical_block_size() >= 512, "{name}: block size");
    model_check(dev, len);
    range_errors(dev);
    fua_and_flush(dev);
}

/// A temp dir on a real filesystem (O_DIRECT fails on tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[test]
fn memdev_conforms() {
    for len in SIZES {
        suite(&MemDev::new(len), "MemDev", len);
    }
}

#[test]
fn filedev_buffered_conforms() {
    let dir = disk_dir();
    for (i, len) in SIZES.into_iter().enumerate() {
        let p = dir.path().join(format!("buffered{i}"));
        let dev = FileDev::create_sparse(&p, len, OpenOptions::default()).unwrap();
        suite(&dev, "FileDev", len);
    }
}

#[test]
fn filedev_direct_conforms() {
    let dir = disk_dir();
    for (i, len) in SIZES.into_iter().enumerate() {
        let p = dir.path().join(format!("direct{i}"));
        let opts = OpenOptions {
            direct: true,
            ..Default::default()
        };
        let dev = FileDev::create_sparse(&p, len, opts).unwrap();
        // A partial last block cannot go through O_DIRECT: such a file
        // falls back to the page cache.
        assert_eq!(dev.is_direct(), len % 512 == 0);
        suite(&dev, "FileDev O_DIRECT", len);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            len,
            "O_DIRECT I/O changed the file size"
        );
    }
}

#[test]
fn filedev_read_only_refuses_writes() {
    let dir = disk_dir();
    let p = dir.path().join("ro");
    drop(FileDev::create_sparse(&p, 8192, OpenOptions::default()).unwrap());
    let dev = FileDev::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = [0u8; 10];
    dev.read_at(&mut b, 100).unwrap();
    assert!(dev.write_at(&b, 0, WriteFlags::NONE).is_err());
    assert!(dev.write_zeroes(0, 10, WriteFlags::NONE).is_err());
    assert!(dev.discard(0, 10).is_err());
    dev.flush().unwrap();
}

#[test]
fn crashdev_conforms() {
    for len in SIZES {
        suite(&CrashDev::new(len), "CrashDev", len);
    }
}

#[test]
fn faultydev_without_rules_conforms() {
    for len in SIZES {
        let dev = FaultyDev::new(MemDev::new(len));
        suite(&dev, "FaultyDev", len);
        assert_eq!(dev.injected(), 0);
    }
}

// ---- CrashDev semantics ----

fn byte(img: &[u8], at: u64) -> u8 {
    img[at as usize]
}

#[test]
fn crashdev_loses_unflushed_writes() {
    let d = CrashDev::new(8192);
    d.write_at(&[1; 100], 0, WriteFlags::NONE).unwrap();
    assert_eq!(byte(&d.live(), 0), 1);
    assert_eq!(byte(&d.crash(), 0), 0, "an unflushed write is lost");
    assert_eq!(d.unflushed_writes(), 1);
    let mut b = [0u8; 1];
    d.read_at(&mut b, 50).unwrap();
    assert_eq!(b[0], 1, "reads see the live content");
    // reopen gives the durable image.
    let r = d.reopen();
    r.read_at(&mut b, 0).unwrap();
    assert_eq!(b[0], 0);
}

#[test]
fn crashdev_fua_is_durable_alone() {
    let d = CrashDev::new(8192);
    d.write_at(&[1; 10], 0, WriteFlags::NONE).unwrap();
    d.write_at(&[2; 10], 4096, WriteFlags::FUA).unwrap();
    let img = d.crash();
    assert_eq!(byte(&img, 4096), 2, "a FUA write is durable");
    assert_eq!(byte(&img, 0), 0, "FUA does not flush earlier writes");
}

#[test]
fn crashdev_flush_covers_earlier_writes_only() {
    let d = CrashDev::new(8192);
    d.write_at(&[1; 10], 0, WriteFlags::NONE).unwrap();
    d.write_zeroes(100, 10, WriteFlags::NONE).unwrap();
    d.write_at(&[3; 10], 200, WriteFlags::NONE).unwrap();
    d.flush().unwrap();
    d.write_at(&[4; 10], 300, WriteFlags::NONE).unwrap();
    let img = d.crash();
    assert_eq!((byte(&img, 0), byte(&img, 200)), (1, 3));
    assert_eq!(byte(&img, 300), 0, "a write after the flush is not covered");
    // A later FUA write over older unflushed data wins after a flush.
    d.write_at(&[5; 10], 400, WriteFlags::NONE).unwrap();
    d.write_at(&[6; 10], 400, WriteFlags::FUA).unwrap();
    d.flush().unwrap();
    assert_eq!(byte(&d.crash(), 400), 6);
    // crash_keeping: the durable image plus the first k cached writes.
    d.write_at(&[7; 10], 500, WriteFlags::NONE).unwrap();
    d.write_at(&[8; 10], 600, WriteFlags::NONE).unwrap();
    let img = d.crash_keeping(1);
    assert_eq!((byte(&img, 500), byte(&img, 600)), (7, 0));
    // Keeping an older cached write never undoes a later FUA write.
    d.write_at(&[9; 10], 500, WriteFlags::FUA).unwrap();
    let img = d.crash_keeping(1);
    assert_eq!(byte(&img, 500), 9);
    assert_eq!(byte(&d.crash_keeping(3), 500), 9);
}

#[test]
fn crashdev_crash_after_cuts_power() {
    let d = CrashDev::new(8192);
    d.crash_after(3);
    d.write_at(&[1; 10], 0, WriteFlags::NONE).unwrap(); // op 0
    d.flush().unwrap(); // op 1
    d.write_zeroes(0, 5, WriteFlags::NONE).unwrap(); // op 2
    assert_eq!(d.ops(), 3);
    assert!(!d.has_crashed());
    let e = d.write_at(&[2; 10], 100, WriteFlags::FUA).unwrap_err(); // op 3: power cut
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(d.has_crashed());
    assert!(d.flush().is_err(), "everything fails after the cut");
    assert!(d.read_at(&mut [0u8; 1], 0).is_err());
    assert!(d.write_at(&[3], 0, WriteFlags::NONE).is_err());
    let img = d.crash();
    assert_eq!(byte(&img, 0), 1, "flushed before the cut");
    assert_eq!(byte(&img, 100), 0, "the cut write never happened");
    assert_eq!(d.ops(), 3);
}

#[test]
fn crashdev_crash_after_zero_fails_the_first_op() {
    let d = CrashDev::new(4096);
    d.crash_after(0);
    assert!(d.flush().is_err());
    assert!(d.has_crashed());
    assert_eq!(d.ops(), 0);
}

// ---- FaultyDev rules ----

fn is_eio(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

#[test]
fn faultydev_range_rule() {
    let d = FaultyDev::new(MemDev::new(16384));
    d.add(Fault::Range {
        kind: OpKind::Write,
        offset: 4096,
        len: 4096,
    });
    let mut b = [0u8; 10];
    assert!(is_eio(d.write_at(&[1; 10], 4090, WriteFlags::NONE)));
    assert!(is_eio(d.write_at(&[1; 10], 8191, WriteFlags::NONE)));
    assert!(is_eio(d.write_zeroes(0, 5000, WriteFlags::NONE)));
    d.write_at(&[1; 10], 4086, WriteFlags::NONE).unwrap(); // ends at 4096
    d.write_at(&[1; 10], 8192, WriteFlags::NONE).unwrap();
    d.read_at(&mut b, 4096).unwrap(); // reads are not covered
    d.flush().unwrap();
    assert_eq!(d.injected(), 3);
    let mut v = [0u8; 1];
    d.inner().read_at(&mut v, 4095).unwrap();
    assert_eq!(v[0], 1);
    d.inner().read_at(&mut v, 4096).unwrap();
    assert_eq!(v[0], 0, "a failed write changes nothing");
    d.clear();
    d.write_at(&[1; 10], 5000, WriteFlags::NONE).unwrap();
}

#[test]
fn faultydev_nth_and_always_rules() {
    let d = FaultyDev::new(MemDev::new(16384));
    d.add(Fault::Nth {
        kind: OpKind::Flush,
        n: 1,
    });
    d.flush().unwrap();
    assert!(is_eio(d.flush()), "the 2nd flush (n = 1) fails");
    d.flush().unwrap();
    d.write_at(&[1], 0, WriteFlags::NONE).unwrap();
    d.add(Fault::Nth {
        kind: OpKind::Any,
        n: 0,
    });
    let mut b = [0u8; 1];
    assert!(
        is_eio(d.read_at(&mut b, 0)),
        "counted from when the rule was added"
    );
    d.read_at(&mut b, 0).unwrap();
    d.add(Fault::Always {
        kind: OpKind::Discard,
    });
    for _ in 0..3 {
        assert!(is_eio(d.discard(0, 512)));
    }
    d.write_at(&[1], 0, WriteFlags::NONE).unwrap();
    assert_eq!(d.injected(), 5);
}
