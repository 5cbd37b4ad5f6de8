//! Model-based tests of the engine: random mixes of origin and snapshot I/O
//! (offsets and lengths unaligned to chunks, several snapshots of different
//! chunk sizes added mid-way, P and N stores) checked after every operation
//! against plain byte vectors; and concurrent variants.

mod common;

use common::fill;
use dmsnap::device::{DevError, Device};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState, Snapshot};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use proptest::prelude::*;
use std::sync::Arc;

const ORIGIN: u64 = 192 * 1024 + 1536; // last chunk partial for every chunk size

fn store_types() -> Vec<StoreType> {
    if persistent_available() {
        vec![StoreType::Transient, StoreType::Persistent]
    } else {
        vec![StoreType::Transient]
    }
}

/// True once the persistent store is built (it formats a zeroed COW).
fn persistent_available() -> bool {
    let o = Origin::new(Arc::new(MemDev::new(64 * 1024)));
    o.add_snapshot(
        "probe",
        Arc::new(MemDev::new(1 << 20)),
        StoreType::Persistent,
        None,
    )
    .is_ok()
}

#[derive(Debug, Clone)]
enum Op {
    OriginWrite {
        off: u64,
        len: u64,
        seed: u64,
    },
    OriginRead {
        off: u64,
        len: u64,
    },
    SnapWrite {
        snap: usize,
        off: u64,
        len: u64,
        seed: u64,
    },
    SnapRead {
        snap: usize,
        off: u64,
        len: u64,
    },
    SnapZero {
        snap: usize,
        off: u64,
        len: u64,
    },
    Add {
        chunk_shift: u32,
        store: usize,
    },
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..ORIGIN, 1u64..70_000),
        // Chunk-aligned full chunks (the full-chunk snapshot write path).
        (0u64..12, 0u64..3).prop_map(|(c, k)| (c * 16384, 4096 << k)),
        (0..ORIGIN, 1u64..600),
    ]
    .prop_map(|(off, len)| (off, len.min(ORIGIN - off).max(1)))
    .prop_filter("in range", |(off, len)| off + len <= ORIGIN)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::OriginWrite { off, len, seed }),
        2 => range().prop_map(|(off, len)| Op::OriginRead { off, len }),
        5 => (0usize..4, range(), any::<u64>()).prop_map(|(snap, (off, len), seed)| Op::SnapWrite { snap, off, len, seed }),
        2 => (0usize..4, range()).prop_map(|(snap, (off, len))| Op::SnapRead { snap, off, len }),
        1 => (0usize..4, range()).prop_map(|(snap, (off, len))| Op::SnapZero { snap, off, len }),
        1 => (prop_oneof![Just(3u32), Just(5), Just(7)], 0usize..2).prop_map(|(chunk_shift, store)| Op::Add { chunk_shift, store }),
        1 => Just(Op::Flush),
    ]
}

struct World {
    origin: Arc<Origin>,
    model_origin: Vec<u8>,
    snaps: Vec<(Arc<Snapshot>, Vec<u8>)>,
}

impl World {
    fn new() -> World {
        let init = fill(1, ORIGIN as usize);
        World {
            origin: Origin::new(Arc::new(MemDev::from_vec(init.clone()))),
            model_origin: init,
            snaps: Vec::new(),
        }
    }

    fn add(&mut self, chunk_shift: u32, store: StoreType) {
        let name = format!("s{}", self.snaps.len());
        let cs = ChunkSize::from_sectors(1 << chunk_shift).unwrap();
        let cow: DevRef = Arc::new(MemDev::new(2 * ORIGIN + 16 * cs.bytes()));
        let s = self
            .origin
            .add_snapshot(&name, cow, store, Some(cs))
            .unwrap();
        assert_eq!(s.status().state, SnapState::Active);
        self.snaps.push((s, self.model_origin.clone()));
    }

    fn apply(&mut self, op: &Op, stores: &[StoreType]) {
        match *op {
            Op::OriginWrite { off, len, seed } => {
                let d = fill(seed, len as usize);
                self.origin.write_at(&d, off, seed % 5 == 0).unwrap();
                self.model_origin[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::OriginRead { off, len } => {
                let mut b = vec![0; len as usize];
                self.origin.read_at(&mut b, off).unwrap();
                assert_eq!(b, &self.model_origin[off as usize..(off + len) as usize]);
            }
            Op::SnapWrite {
                snap,
                off,
                len,
                seed,
            } => {
                if let Some((s, m)) = self.snaps.get_mut(snap) {
                    let d = fill(seed, len as usize);
                    s.write_at(&d, off, seed % 7 == 0).unwrap();
                    m[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
            }
            Op::SnapZero { snap, off, len } => {
                if let Some((s, m)) = self.snaps.get_mut(snap) {
                    s.write_zeroes(off, len, false).unwrap();
                    m[off as usize..(off + len) as usize].fill(0);
                }
            }
            Op::SnapRead { snap, off, len } => {
                if let Some((s, m)) = self.snaps.get(snap) {
                    let mut b = vec![0; len as usize];
                    s.read_at(&mut b, off).unwrap();
                    assert_eq!(b, &m[off as usize..(off + len) as usize]);
                }
            }
            Op::Add { chunk_shift, store } => {
                if self.snaps.len() < 4 {
                    self.add(chunk_shift, stores[store % stores.len()]);
                }
            }
            Op::Flush => {
                self.origin.flush().unwrap();
                for (s, _) in &self.snaps {
                    s.flush().unwrap();
                }
            }
        }
    }

    fn check_all(&self) {
        let mut b = vec![0; ORIGIN as usize];
        self.origin.read_at(&mut b, 0).unwrap();
        assert!(b == self.model_origin, "origin differs from the model");
        for (s, m) in &self.snaps {
            s.read_at(&mut b, 0).unwrap();
            if b != *m {
                let first = b.iter().zip(m).position(|(a, b)| a != b).unwrap();
                panic!(
                    "snapshot {} differs from the model at byte {first} (chunk size {})",
                    s.name(),
                    s.chunk_size()
                );
            }
            assert_eq!(s.status().state, SnapState::Active);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..60), first_shift in prop_oneof![Just(3u32), Just(5), Just(7)]) {
        let stores = store_types();
        let mut w = World::new();
        w.add(first_shift, stores[0]);
        for op in &ops {
            w.apply(op, &stores);
            w.check_all();
        }
    }
}

/// A full COW: `P` invalidates (all I/O fails, origin unharmed); `N`
/// likewise; `PO` fails only snapshot writes and keeps reads.
#[test]
fn full_cow_invalidates_or_overflows() {
    let mut stores = store_types();
    if persistent_available() {
        stores.push(StoreType::PersistentOverflow);
    }
    for st in stores {
        let init = fill(3, ORIGIN as usize);
        let origin = Origin::new(Arc::new(MemDev::from_vec(init.clone())));
        // Room for a few 4 KiB chunks only (header + area + data for P).
        let cow: DevRef = Arc::new(MemDev::new(6 * 4096));
        let s = origin
            .add_snapshot("s", cow, st, Some(ChunkSize::DEFAULT))
            .unwrap();
        let mut model = init.clone();
        if st == StoreType::PersistentOverflow {
            // Snapshot writes until full: the last one fails with Overflow.
            let mut failed = None;
            for c in 0..10u64 {
                let d = fill(c + 100, 4096);
                match s.write_at(&d, c * 4096, false) {
                    Ok(()) => {
                        model[(c * 4096) as usize..((c + 1) * 4096) as usize].copy_from_slice(&d)
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            assert!(matches!(failed, Some(DevError::Overflow)), "{failed:?}");
            assert_eq!(s.status().state, SnapState::Overflow);
            assert_eq!(s.status().dm_status(), "Overflow");
            let mut b = vec![0; ORIGIN as usize];
            s.read_at(&mut b, 0).unwrap();
            assert!(b == model);
            // Origin writes to chunks without exception invalidate it.
        }
        let mut om = init.clone();
        for c in 0..12u64 {
            let d = fill(c + 7, 4096);
            origin.write_at(&d, c * 4096 + 100, false).unwrap();
            om[(c * 4096 + 100) as usize..(c * 4096 + 4196) as usize].copy_from_slice(&d);
        }
        assert_eq!(s.status().state, SnapState::Invalid, "{st}");
        assert_eq!(s.status().dm_status(), "Invalid");
        let mut b = vec![0; 4096];
        assert!(matches!(s.read_at(&mut b, 0), Err(DevError::Invalid)));
        assert!(matches!(s.write_at(&b, 0, false), Err(DevError::Invalid)));
        let mut all = vec![0; ORIGIN as usize];
        origin.read_at(&mut all, 0).unwrap();
        assert!(all == om, "origin must not suffer from an invalid snapshot");
    }
}

/// Concurrent writers on disjoint (but chunk-sharing) ranges of the origin
/// and of each snapshot, concurrent racing origin writers on one shared
/// range, and readers checking that snapshot content never changes where
/// only the origin is written.
#[test]
fn concurrent_io_keeps_snapshots_intact() {
    for st in store_types() {
        concurrent_once(st);
    }
}

fn concurrent_once(st: StoreType) {
    const SIZE: u64 = 4 << 20;
    const THREADS: u64 = 4;
    const REGION: u64 = 700_001; // not chunk aligned: neighbours share chunks
    const SHARED: (u64, u64) = (3_000_000, 300_000); // racing origin writes
    const SNAP_ONLY: (u64, u64) = (3_400_000, 500_000); // written on snapshots only… and origin
    let init = fill(9, SIZE as usize);
    let origin = Origin::new(Arc::new(MemDev::from_vec(init.clone())));
    let snaps: Vec<Arc<Snapshot>> = [3u32, 5, 7]
        .iter()
        .enumerate()
        .map(|(i, &sh)| {
            let cs = ChunkSize::from_sectors(1 << sh).unwrap();
            let cow: DevRef = Arc::new(MemDev::new(2 * SIZE + 64 * cs.bytes()));
            origin
                .add_snapshot(&format!("c{i}"), cow, st, Some(cs))
                .unwrap()
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|sc| {
        // Readers: the snapshots in SNAP_ONLY keep the snapshot-time content
        // while the origin is hammered there.
        for s in &snaps {
            let (s, init, stop) = (s.clone(), &init, stop.clone());
            sc.spawn(move || {
                let mut b = vec![0; SNAP_ONLY.1 as usize];
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 3 {
                    s.read_at(&mut b, SNAP_ONLY.0).unwrap();
                    assert!(
                        b == init[SNAP_ONLY.0 as usize..(SNAP_ONLY.0 + SNAP_ONLY.1) as usize],
                        "snapshot changed under origin writes"
                    );
                    n += 1;
                }
            });
        }
        let mut writers = Vec::new();
        for t in 0..THREADS {
            let (origin, snaps) = (origin.clone(), snaps.clone());
            writers.push(sc.spawn(move || {
                let mut rng = t * 1000 + 1;
                let mut next = || {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    rng >> 33
                };
                let mut model_o: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut model_s: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); snaps.len()];
                for i in 0..120u64 {
                    let off = t * REGION + next() % (REGION - 1);
                    let len = (1 + next() % 40_000).min(t * REGION + REGION - off);
                    let d = fill(t * 100_000 + i, len as usize);
                    match next() % 4 {
                        0 | 1 => {
                            origin.write_at(&d, off, false).unwrap();
                            model_o.push((off, d));
                        }
                        k => {
                            let si = (k as usize + i as usize) % snaps.len();
                            snaps[si].write_at(&d, off, false).unwrap();
                            model_s[si].push((off, d));
                        }
                    }
                    // Racing writers on the shared range and on SNAP_ONLY.
                    let so = SHARED.0 + next() % (SHARED.1 - 5000);
                    origin.write_at(&fill(i, 5000), so, false).unwrap();
                    let so = SNAP_ONLY.0 + next() % (SNAP_ONLY.1 - 9000);
                    origin.write_at(&fill(i + 7, 9000), so, false).unwrap();
                }
                (model_o, model_s)
            }));
        }
        let results: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Replay each thread's writes on the models (threads' regions are disjoint).
        let mut mo = init.clone();
        let mut ms: Vec<Vec<u8>> = vec![init.clone(); snaps.len()];
        for (model_o, model_s) in &results {
            for (off, d) in model_o {
                mo[*off as usize..*off as usize + d.len()].copy_from_slice(d);
            }
            for (si, ws) in model_s.iter().enumerate() {
                for (off, d) in ws {
                    ms[si][*off as usize..*off as usize + d.len()].copy_from_slice(d);
                }
            }
        }
        let owned = (THREADS * REGION) as usize;
        let mut b = vec![0; SIZE as usize];
        origin.read_at(&mut b, 0).unwrap();
        assert!(b[..owned] == mo[..owned], "origin (owned regions) differs");
        for (si, s) in snaps.iter().enumerate() {
            s.read_at(&mut b, 0).unwrap();
            assert!(
                b[..owned] == ms[si][..owned],
                "snapshot {si} (owned regions) differs"
            );
            // Never written on snapshots: snapshot-time content.
            assert!(
                b[owned..] == init[owned..],
                "snapshot {si} changed where only the origin was written"
            );
            assert_eq!(s.status().state, SnapState::Active);
        }
    });
}

/// A device whose first read blocks until released.
struct HoldFirstRead {
    inner: MemDev,
    held: std::sync::Mutex<bool>,
    entered: std::sync::Barrier,
    release: std::sync::Barrier,
}

impl dmsnap::io::BlockDev for HoldFirstRead {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let first = std::mem::replace(&mut *self.held.lock().unwrap(), false);
        // Read first, then hold: the data returned is what the device had
        // when the read was issued; an overtaking write would show up in a
        // later read of the test only if it landed before this one.
        self.inner.read_at(buf, offset)?;
        if first {
            self.entered.wait();
            self.release.wait();
            // Re-read: if the origin was overwritten meanwhile, the snapshot
            // read would return new data (the race the kernel closes).
            self.inner.read_at(buf, offset)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, f: dmsnap::io::WriteFlags) -> std::io::Result<()> {
        self.inner.write_at(buf, offset, f)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A snapshot read sent to the origin finishes before an origin write to
/// the same chunk overwrites it (kernel `__check_for_conflicting_io`).
#[test]
fn origin_write_waits_for_snapshot_reads_on_the_origin() {
    use dmsnap::io::BlockDev;
    let init = fill(5, 64 * 1024);
    let dev = Arc::new(HoldFirstRead {
        inner: MemDev::from_vec(init.clone()),
        held: std::sync::Mutex::new(false),
        entered: std::sync::Barrier::new(2),
        release: std::sync::Barrier::new(2),
    });
    let origin = Origin::new(dev.clone() as DevRef);
    let s = origin
        .add_snapshot(
            "s",
            Arc::new(MemDev::new(1 << 20)),
            StoreType::Persistent,
            None,
        )
        .unwrap();
    *dev.held.lock().unwrap() = true;
    std::thread::scope(|sc| {
        let s2 = s.clone();
        let reader = sc.spawn(move || {
            let mut b = vec![0; 4096];
            s2.read_at(&mut b, 8192).unwrap();
            b
        });
        dev.entered.wait();
        let o2 = origin.clone();
        let writer = sc.spawn(move || o2.write_at(&[0xAB; 4096], 8192, false).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(150));
        let finished_early = writer.is_finished();
        let mut now = vec![0; 4096];
        dev.inner.read_at(&mut now, 8192).unwrap();
        // Release before asserting so a failure cannot hang the scope.
        dev.release.wait();
        let read = reader.join().unwrap();
        writer.join().unwrap();
        assert!(
            !finished_early,
            "the origin write must wait for the snapshot read"
        );
        assert_eq!(
            now,
            &init[8192..12288],
            "origin overwritten under a snapshot read"
        );
        assert_eq!(read, &init[8192..12288]);
    });
    let mut b = vec![0; 4096];
    s.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, &init[8192..12288]);
    origin.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![0xAB; 4096]);
}

/// Adding a snapshot under a stream of origin writes takes a consistent
/// point: the snapshot holds exactly the first `j` writes for some `j`, and
/// at least every write acknowledged before `add_snapshot` was called. The
/// writer keeps going (wrapping around the device) until the snapshot has
/// been read back, so the snapshot always lands mid-stream.
#[test]
fn add_snapshot_under_writes_is_a_consistent_point() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    const N: u64 = 4096; // sectors
    for st in store_types() {
        let origin = Origin::new(Arc::new(MemDev::new(N * 512)));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::scope(|sc| {
            let (o, a, stop2) = (origin.clone(), acked.clone(), stop.clone());
            sc.spawn(move || {
                let mut i = 0u64;
                while !stop2.load(SeqCst) {
                    let mut sector = [0u8; 512];
                    sector[..8].copy_from_slice(&(i + 1).to_le_bytes());
                    o.write_at(&sector, (i % N) * 512, false).unwrap();
                    i += 1;
                    a.store(i, SeqCst);
                }
            });
            while acked.load(SeqCst) < 3 * N / 2 {
                std::thread::yield_now();
            }
            let before = acked.load(SeqCst);
            let s = origin
                .add_snapshot(
                    "mid",
                    Arc::new(MemDev::new(8 << 20)),
                    st,
                    Some(ChunkSize::DEFAULT),
                )
                .unwrap();
            let mut b = vec![0u8; (N * 512) as usize];
            s.read_at(&mut b, 0).unwrap();
            // Writes went on while we read: the snapshot must not move.
            let mut again = vec![0u8; (N * 512) as usize];
            s.read_at(&mut again, 0).unwrap();
            stop.store(true, SeqCst);
            assert!(b == again, "{st}: the snapshot changed under origin writes");
            let vals: Vec<u64> = b
                .chunks(512)
                .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
                .collect();
            // The state after exactly j writes: sector k holds 1 + the last
            // i < j with i ≡ k (mod N).
            let j = *vals.iter().max().unwrap();
            assert!(
                j >= before,
                "{st}: a write acknowledged before add_snapshot is missing ({j} < {before})"
            );
            let last = j - 1;
            for (k, &v) in vals.iter().enumerate() {
                let k = k as u64;
                let want = if last >= k {
                    last - ((last - k) % N) + 1
                } else {
                    0
                };
                assert_eq!(
                    v, want,
                    "{st}: sector {k} is not the state after {j} writes"
                );
            }
        });
    }
}

/// A COW write error invalidates that snapshot only: the origin write goes
/// on, the other snapshot keeps working and keeps its content.
#[test]
fn cow_error_invalidates_only_that_snapshot() {
    use dmsnap::io::testing::{Fault, FaultyDev, OpKind};
    for st in store_types() {
        let init = fill(11, ORIGIN as usize);
        let origin = Origin::new(Arc::new(MemDev::from_vec(init.clone())));
        let bad = Arc::new(FaultyDev::new(MemDev::new(1 << 20)));
        let sbad = origin.add_snapshot("bad", bad.clone(), st, None).unwrap();
        let sgood = origin
            .add_snapshot("good", Arc::new(MemDev::new(1 << 20)), st, None)
            .unwrap();
        bad.add(Fault::Always {
            kind: OpKind::Write,
        });
        let d = fill(12, 10_000);
        origin.write_at(&d, 5000, false).unwrap();
        assert_eq!(sbad.status().state, SnapState::Invalid, "{st}");
        assert_eq!(sgood.status().state, SnapState::Active, "{st}");
        let mut b = vec![0; ORIGIN as usize];
        sgood.read_at(&mut b, 0).unwrap();
        assert!(b == init, "{st}: the good snapshot changed");
        origin.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[5000..15000], &d[..]);
        assert!(matches!(
            sbad.read_at(&mut b[..512], 0),
            Err(DevError::Invalid)
        ));
        // Later origin writes are not held up by the invalid snapshot.
        origin.write_at(&d, 50_000, false).unwrap();
        sgood.read_at(&mut b, 0).unwrap();
        assert!(b == init, "{st}: the good snapshot changed");
    }
}
