//! Block status and changed-block tracking at the engine: every context
//! (`base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:S`) and
//! `Origin::diff` checked against a model for random workloads with 1–3
//! snapshots of mixed chunk sizes; the write fences (an answer holds writes
//! to its range back until it is dropped); and a concurrent writer against
//! the rule "a chunk reported clean does not change before the answer is
//! delivered".

mod common;

use common::fill;
use dmsnap::device::{Device, Extent, MetaContext, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use dmsnap::io::{DevRef, FileDev, MemDev, OpenOptions};
use dmsnap::snap::{ExportDevice, Origin, Snapshot};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 160 * 1024 + 1536; // the last chunk is partial for every chunk size
const SECTOR: u64 = 512;

struct ModelSnap {
    snap: Arc<Snapshot>,
    cs: u64,
    data: Vec<u8>,
    /// Chunks (in `cs`) with an exception: origin writes since the
    /// snapshot was taken and writes to the snapshot.
    exc: BTreeSet<u64>,
}

impl ModelSnap {
    fn touch(&mut self, off: u64, len: u64) {
        for c in off / self.cs..=(off + len - 1) / self.cs {
            self.exc.insert(c);
        }
    }
    fn has(&self, byte: u64) -> bool {
        self.exc.contains(&(byte / self.cs))
    }
}

struct Model {
    _dir: tempfile::TempDir,
    origin: Arc<Origin>,
    data: Vec<u8>,
    snaps: Vec<ModelSnap>,
}

fn sparse_origin(dir: &std::path::Path) -> DevRef {
    Arc::new(FileDev::create_sparse(&dir.join("origin.img"), SIZE, OpenOptions::default()).unwrap())
}

impl Model {
    fn new() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::new(sparse_origin(dir.path()));
        Model {
            _dir: dir,
            origin,
            data: vec![0; SIZE as usize],
            snaps: Vec::new(),
        }
    }
    fn add(&mut self, shift: u32, persistent: bool) {
        let cs = 4096u64 << shift;
        let name = format!("s{}", self.snaps.len() + 1);
        let store = if persistent {
            StoreType::Persistent
        } else {
            StoreType::Transient
        };
        let snap = self
            .origin
            .add_snapshot(
                &name,
                Arc::new(MemDev::new(2 << 20)),
                store,
                Some(ChunkSize::from_bytes(cs).unwrap()),
            )
            .unwrap();
        self.snaps.push(ModelSnap {
            snap,
            cs,
            data: self.data.clone(),
            exc: BTreeSet::new(),
        });
    }
    fn origin_write(&mut self, off: u64, len: u64, seed: u64) {
        let buf = fill(seed, len as usize);
        self.origin.write_at(&buf, off, false).unwrap();
        self.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
        for s in &mut self.snaps {
            s.touch(off, len);
        }
    }
    fn snap_write(&mut self, i: usize, off: u64, len: u64, seed: u64) {
        let buf = fill(seed, len as usize);
        let s = &mut self.snaps[i];
        s.snap.write_at(&buf, off, false).unwrap();
        s.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
        s.touch(off, len);
    }

    /// The export `x` (`None`: the origin) and its model data.
    fn export(&self, x: Option<usize>) -> (ExportDevice, &[u8]) {
        match x {
            None => (ExportDevice::origin(self.origin.clone()), &self.data),
            Some(i) => (
                ExportDevice::snapshot(self.origin.clone(), self.snaps[i].snap.clone()),
                &self.snaps[i].data,
            ),
        }
    }

    /// Every context of every export, walked with `cap` extents per answer.
    fn check(&self, cap: usize) -> Result<(), TestCaseError> {
        let exports: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..self.snaps.len()).map(Some))
            .collect();
        for &x in &exports {
            let (dev, data) = self.export(x);
            let ctxs = dev.meta_contexts();
            prop_assert_eq!(ctxs.len(), 2 + self.snaps.len());
            for ctx in &ctxs {
                let flags = walk(&dev, ctx, cap)?;
                for (sec, &f) in flags.iter().enumerate() {
                    let b = sec as u64 * SECTOR;
                    let zero = data[b as usize..((b + SECTOR).min(SIZE)) as usize]
                        .iter()
                        .all(|&v| v == 0);
                    let own = x.map(|i| self.snaps[i].has(b));
                    let what = format!("{ctx:?} on {x:?} at byte {b}: flags {f}");
                    match (ctx, own) {
                        (MetaContext::Allocation, None) => {
                            prop_assert!(f == 0 || f == STATE_HOLE | STATE_ZERO, "{}", what);
                            prop_assert!(f & STATE_ZERO == 0 || zero, "{}", what);
                        }
                        (MetaContext::Allocation, Some(has)) => {
                            prop_assert_eq!(f & STATE_HOLE == 0, has, "{}", what);
                            prop_assert!(f & STATE_ZERO == 0 || (zero && !has), "{}", what);
                        }
                        (MetaContext::AllocationDepth, None) => {
                            prop_assert!(f == 1 || (f == 0 && zero), "{}", what);
                        }
                        (MetaContext::AllocationDepth, Some(has)) => {
                            prop_assert_eq!(f == 1, has, "{}", what);
                            prop_assert!(f != 0 || zero, "{}", what);
                            prop_assert!(f <= 2, "{}", what);
                        }
                        (MetaContext::DirtyBitmap(name), _) => {
                            let s = self
                                .snaps
                                .iter()
                                .position(|s| s.snap.name() == name)
                                .unwrap();
                            let base = &self.snaps[s];
                            let expect = match x {
                                None => base.has(b),
                                Some(t) if t == s => false,
                                Some(t) => base.has(b) || self.snaps[t].has(b),
                            };
                            prop_assert_eq!(f == STATE_DIRTY, expect, "{}", what);
                            // Never a miss: content differing is dirty.
                            let end = ((b + SECTOR).min(SIZE)) as usize;
                            if data[b as usize..end] != base.data[b as usize..end] {
                                prop_assert_eq!(f, STATE_DIRTY, "{} (content differs)", what);
                            }
                        }
                    }
                }
            }
        }
        // `diff` gives the bitmaps' extents.
        for (i, s) in self.snaps.iter().enumerate() {
            for to in std::iter::once(None).chain((0..self.snaps.len()).map(Some)) {
                let to_name = to.map(|t: usize| self.snaps[t].snap.name().to_string());
                let (ext, _) = self.origin.diff(s.snap.name(), to_name.as_deref()).unwrap();
                let mut got = vec![false; SIZE.div_ceil(SECTOR) as usize];
                for (o, l) in ext {
                    prop_assert!(o % SECTOR == 0 && o + l <= SIZE);
                    for sec in o / SECTOR..(o + l).div_ceil(SECTOR) {
                        got[sec as usize] = true;
                    }
                }
                for (sec, &g) in got.iter().enumerate() {
                    let b = sec as u64 * SECTOR;
                    let expect = match to {
                        None => s.has(b),
                        Some(t) if t == i => false,
                        Some(t) => s.has(b) || self.snaps[t].has(b),
                    };
                    prop_assert_eq!(g, expect, "diff {} {:?} at {}", i, to, b);
                }
            }
        }
        Ok(())
    }
}

/// Walk the whole export for `ctx`, `cap` extents per answer; the flags of
/// every sector.
fn walk(dev: &ExportDevice, ctx: &MetaContext, cap: usize) -> Result<Vec<u32>, TestCaseError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < SIZE {
        let bs = dev
            .block_status(off, SIZE - off, std::slice::from_ref(ctx), cap)
            .unwrap();
        let ext: &[Extent] = &bs.extents[0];
        prop_assert!(!ext.is_empty() && ext.len() <= cap, "{} extents", ext.len());
        for w in ext.windows(2) {
            prop_assert!(w[0].flags != w[1].flags, "adjacent extents not merged");
        }
        for e in ext {
            prop_assert!(e.len > 0 && off + e.len <= SIZE);
            prop_assert!(off % SECTOR == 0 && e.len % SECTOR == 0 || off + e.len == SIZE);
            for _ in 0..e.len.div_ceil(SECTOR) {
                out.push(e.flags);
            }
            off += e.len;
        }
    }
    prop_assert_eq!(out.len() as u64, SIZE.div_ceil(SECTOR));
    Ok(out)
}

#[derive(Debug, Clone)]
enum Op {
    OriginWrite(u64, u64, u64),
    SnapWrite(usize, u64, u64, u64),
    Add(u32, bool),
    Check(usize),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..SIZE / SECTOR, 1u64..40).prop_map(|(s, n)| (s * SECTOR, n * SECTOR)),
        (0..SIZE, 1u64..20_000),
    ]
    .prop_map(|(o, l)| (o, l.min(SIZE - o).max(1)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (range(), any::<u64>()).prop_map(|((o, l), s)| Op::OriginWrite(o, l, s)),
        3 => (0usize..3, range(), any::<u64>()).prop_map(|(i, (o, l), s)| Op::SnapWrite(i, o, l, s)),
        1 => (0u32..3, any::<bool>()).prop_map(|(sh, p)| Op::Add(sh, p)),
        1 => prop_oneof![Just(1usize), Just(3), Just(usize::MAX)].prop_map(Op::Check),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn every_context_matches_the_model(
        first in (0u32..3, any::<bool>()),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut m = Model::new();
        m.add(first.0, first.1);
        for op in ops {
            match op {
                Op::OriginWrite(o, l, s) => m.origin_write(o, l, s),
                Op::SnapWrite(i, o, l, s) => {
                    let i = i % m.snaps.len();
                    m.snap_write(i, o, l, s);
                }
                Op::Add(sh, p) => {
                    if m.snaps.len() < 3 {
                        m.add(sh, p);
                    }
                }
                Op::Check(cap) => m.check(cap)?,
            }
        }
        m.check(usize::MAX)?;
        m.check(2)?;
    }
}

#[test]
fn a_fresh_sparse_origin_is_one_hole_and_a_written_chunk_is_data() {
    let mut m = Model::new();
    m.add(0, false);
    let dev = ExportDevice::origin(m.origin.clone());
    let all = dev
        .block_status(0, SIZE, &[MetaContext::Allocation], 100)
        .unwrap();
    assert_eq!(
        all.extents[0],
        vec![Extent {
            len: SIZE,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );
    drop(all);
    m.origin_write(64 * 1024, 4096, 1);
    let bs = dev
        .block_status(0, SIZE, &[MetaContext::Allocation], 100)
        .unwrap();
    let e = &bs.extents[0];
    assert_eq!(e[0].flags, STATE_HOLE | STATE_ZERO);
    assert_eq!(e[0].len, 64 * 1024);
    assert_eq!(e[1].flags, 0);
    drop(bs);
    // The snapshot's view: a COW copy (data) where the origin was written.
    let s = ExportDevice::snapshot(m.origin.clone(), m.snaps[0].snap.clone());
    let bs = s
        .block_status(
            0,
            SIZE,
            &[
                MetaContext::Allocation,
                MetaContext::DirtyBitmap("s1".into()),
            ],
            100,
        )
        .unwrap();
    assert_eq!(
        bs.extents[0][1],
        Extent {
            len: 4096,
            flags: 0
        }
    );
    assert_eq!(
        bs.extents[1],
        vec![Extent {
            len: SIZE,
            flags: 0
        }],
        "a snapshot never differs from itself"
    );
}

fn pool(size: u64, chunks: &[u64]) -> (Arc<Origin>, Vec<Arc<Snapshot>>) {
    let origin = Origin::new(Arc::new(MemDev::new(size)));
    origin.write_at(&fill(1, size as usize), 0, false).unwrap();
    let snaps = chunks
        .iter()
        .enumerate()
        .map(|(i, &cs)| {
            origin
                .add_snapshot(
                    &format!("s{}", i + 1),
                    Arc::new(MemDev::new(2 * size)),
                    StoreType::Transient,
                    Some(ChunkSize::from_bytes(cs).unwrap()),
                )
                .unwrap()
        })
        .collect();
    (origin, snaps)
}

/// Run `f` on a thread; true if it finished within `t`.
fn finishes_within(
    f: impl FnOnce() + Send + 'static,
    t: Duration,
) -> (bool, std::thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let h = std::thread::spawn(move || {
        f();
        d.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    while start.elapsed() < t && !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    (done.load(Ordering::SeqCst), h)
}

#[test]
fn an_answer_holds_overlapping_writes_back_until_it_is_dropped() {
    let (origin, snaps) = pool(1 << 20, &[4096]);
    let dev = ExportDevice::origin(origin.clone());
    let bs = dev
        .block_status(0, 64 * 1024, &[MetaContext::DirtyBitmap("s1".into())], 100)
        .unwrap();
    assert_eq!(
        bs.extents[0],
        vec![Extent {
            len: 64 * 1024,
            flags: 0
        }]
    );
    // Outside the range: not held.
    let o = origin.clone();
    let (done, h) = finishes_within(
        move || o.write_at(&[7u8; 4096], 512 * 1024, false).unwrap(),
        Duration::from_secs(10),
    );
    assert!(done, "a write outside the fenced range waited");
    h.join().unwrap();
    // Inside: the origin write and a write to the bitmap's snapshot wait.
    let o = origin.clone();
    let (done_o, ho) = finishes_within(
        move || o.write_at(&[8u8; 4096], 8192, false).unwrap(),
        Duration::from_millis(300),
    );
    let s = snaps[0].clone();
    let (done_s, hs) = finishes_within(
        move || s.write_at(&[9u8; 100], 60 * 1024, false).unwrap(),
        Duration::from_millis(50),
    );
    assert!(
        !done_o && !done_s,
        "a write inside the fenced range went ahead"
    );
    // While held, the answer is still true.
    let mut a = vec![0u8; 64 * 1024];
    let mut b = vec![0u8; 64 * 1024];
    origin.read_at(&mut a, 0).unwrap();
    snaps[0].read_at(&mut b, 0).unwrap();
    assert_eq!(a, b);
    drop(bs);
    ho.join().unwrap();
    hs.join().unwrap();
    let bs = dev
        .block_status(0, 64 * 1024, &[MetaContext::DirtyBitmap("s1".into())], 100)
        .unwrap();
    assert_eq!(
        bs.extents[0],
        vec![
            Extent {
                len: 8192,
                flags: 0
            },
            Extent {
                len: 4096,
                flags: STATE_DIRTY
            },
            Extent {
                len: 48 * 1024,
                flags: 0
            },
            Extent {
                len: 4096,
                flags: STATE_DIRTY
            },
        ]
    );
}

#[test]
fn a_chunk_reported_clean_does_not_change_while_writers_run() {
    const N: u64 = 16 << 20;
    let (origin, snaps) = pool(N, &[4096, 16384]);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (origin, snaps, stop, writes) =
            (origin.clone(), snaps.clone(), stop.clone(), writes.clone());
        writers.push(std::thread::spawn(move || {
            let mut x = w * 7919 + 1;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 20) % (N - 8192);
                let len = 1 + (x >> 8) % 8192;
                let buf = vec![(x >> 56) as u8 | 1; len as usize];
                match (x >> 4) % 5 {
                    0 => snaps[1].write_at(&buf, off, false).unwrap(),
                    1 => snaps[0].write_at(&buf, off, false).unwrap(),
                    _ => origin.write_at(&buf, off, false).unwrap(),
                }
                writes.fetch_add(1, Ordering::Relaxed);
                // Leave some of the device clean for a while.
                std::thread::sleep(Duration::from_micros(300));
            }
        }));
    }
    let exports = [
        ExportDevice::origin(origin.clone()),
        ExportDevice::snapshot(origin.clone(), snaps[1].clone()),
    ];
    let ctx = [MetaContext::DirtyBitmap("s1".into())];
    let start = Instant::now();
    let mut checks = 0u64;
    let mut clean_bytes = 0u64;
    let mut x = 12345u64;
    while start.elapsed() < Duration::from_millis(1500) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 20) % N) & !511;
        let len = (1 + (x >> 8) % (1 << 20)).min(N - off);
        let dev = &exports[(x >> 60) as usize % 2];
        let bs = dev.block_status(off, len, &ctx, 1 << 14).unwrap();
        // Reads do not wait for fences: under the answer, compare now.
        let covered: u64 = bs.extents[0].iter().map(|e| e.len).sum();
        let mut a = vec![0u8; covered as usize];
        let mut b = vec![0u8; covered as usize];
        dev.read_at(&mut a, off).unwrap();
        snaps[0].read_at(&mut b, off).unwrap();
        let mut pos = 0usize;
        for e in &bs.extents[0] {
            let n = e.len as usize;
            if e.flags & STATE_DIRTY == 0 {
                assert!(
                    a[pos..pos + n] == b[pos..pos + n],
                    "bytes {}..{} reported clean differ from s1",
                    off + pos as u64,
                    off + (pos + n) as u64
                );
                clean_bytes += e.len;
            }
            pos += n;
        }
        drop(bs);
        checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let writes = writes.load(Ordering::Relaxed);
    assert!(
        checks > 20 && writes > 100,
        "{checks} checks, {writes} writes"
    );
    assert!(
        clean_bytes > 0,
        "nothing was ever clean: the test proves nothing"
    );
}

#[test]
fn a_stream_of_overlapping_answers_does_not_starve_a_writer() {
    let (origin, _snaps) = pool(1 << 20, &[4096]);
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = [MetaContext::DirtyBitmap("s1".into())];
    // Two threads keep a fence over the first 64 KiB at all times.
    let queriers: Vec<_> = (0..2)
        .map(|_| {
            let (origin, stop, ctx) = (origin.clone(), stop.clone(), ctx.clone());
            std::thread::spawn(move || {
                let dev = ExportDevice::origin(origin);
                while !stop.load(Ordering::Relaxed) {
                    let bs = dev.block_status(0, 64 * 1024, &ctx, 100).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    drop(bs);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let o = origin.clone();
    let t = Instant::now();
    let (done, h) = finishes_within(
        move || {
            for i in 0..5u64 {
                o.write_at(&[3u8; 4096], i * 4096, false).unwrap();
            }
        },
        Duration::from_secs(10),
    );
    stop.store(true, Ordering::Relaxed);
    for q in queriers {
        q.join().unwrap();
    }
    assert!(done, "the writer starved behind overlapping answers");
    h.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
