//! Power loss at every write/flush of a persistent-store workload.
//!
//! The workload mimics the engine: exceptions are prepared in batches (so
//! several are pending at once), the data chunk of each is written before
//! it is recorded, records arrive in allocation order, a sync job runs
//! when an area fills and otherwise only now and then (group commit: one
//! job for many records), areas fill and roll over (4 KiB chunks: 256
//! records per area), and the tail is then merged back one kernel step at
//! a time (`prepare_merge_batch(1)`). For every `k` the device loses power
//! at its `k`-th write or flush; the durable image (and the durable image
//! plus part or all of the disk's write cache) must reopen, and load
//! exactly a prefix of the recorded sequence that contains every exception
//! `durable_seq` reported durable, each pointing at its own data.

use dmsnap::format::DiskException;
use dmsnap::io::testing::CrashDev;
use dmsnap::io::{BlockDev, MemDev, WriteFlags};
use dmsnap::store::{ExceptionStore, MergeRun, PersistentStore};
use dmsnap::units::Chunk;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const CHUNK: u64 = 4096;
const COW_CHUNKS: u64 = 640;
const EXCEPTIONS: usize = 560;
const MERGE_RECORDS: usize = 330;

/// The data an exception's COW chunk holds: derived from its old_chunk.
fn stamp(old_chunk: u64) -> Vec<u8> {
    let word = old_chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_0000_0000_a5a5;
    (0..CHUNK / 8)
        .flat_map(|i| (word ^ i).to_le_bytes())
        .collect()
}

/// What the workload saw: the committed sequence and how much of it is
/// known durable.
#[derive(Default)]
struct Model {
    /// Exceptions handed to record_exception, in order, minus merged ones.
    log: Vec<DiskException>,
    /// Every exception before this index is durable (`durable_seq` reached
    /// it and it was not merged since).
    durable: usize,
    /// Merge steps whose commit_merge_batch succeeded.
    merge_steps: usize,
}

fn run_workload(dev: Arc<dyn BlockDev>, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Model::default();
    let Ok(mut s) = PersistentStore::open(dev.clone(), None, false) else {
        return m;
    };
    let mut queue: std::collections::VecDeque<(DiskException, bool)> = Default::default();
    let mut old = 0u64;
    let mut prepared = 0;
    while prepared < EXCEPTIONS || !queue.is_empty() {
        let prepare = prepared < EXCEPTIONS && (queue.is_empty() || rng.gen_bool(0.55));
        if prepare {
            // A batch of concurrent copies.
            for _ in 0..rng.gen_range(1..=12) {
                if prepared == EXCEPTIONS {
                    break;
                }
                let Ok(c) = s.prepare_exception() else {
                    prepared = EXCEPTIONS;
                    break;
                };
                prepared += 1;
                // Mostly runs of consecutive origin chunks, with jumps.
                old += if rng.gen_bool(0.8) {
                    1
                } else {
                    rng.gen_range(2..50)
                };
                let e = DiskException {
                    old_chunk: Chunk(old),
                    new_chunk: c,
                };
                let copied = dev
                    .write_at(&stamp(old), c.0 * CHUNK, WriteFlags::NONE)
                    .is_ok();
                queue.push_back((e, copied));
            }
        } else {
            // Copies complete in allocation order.
            for _ in 0..rng.gen_range(1..=queue.len()) {
                let Some((e, copied)) = queue.pop_front() else {
                    break;
                };
                m.log.push(e);
                let _ = s.record_exception(e, copied);
            }
            // An area filled, or (now and then, and at the end) a
            // record must become durable.
            let last = prepared == EXCEPTIONS && queue.is_empty();
            if s.has_full_areas() || last || rng.gen_bool(0.3) {
                let _ = s.sync_inline();
            }
            // Records are numbered from 1 in log order (no merge yet).
            m.durable = m.durable.max(s.durable_seq() as usize);
        }
    }
    // Merge the tail back, stepping back across an area boundary.
    let target = m.log.len().saturating_sub(MERGE_RECORDS);
    while m.log.len() > target {
        let Some(&MergeRun {
            last_old: old,
            last_new: new,
            n,
        }) = s
            .prepare_merge_batch(1)
            .ok()
            .as_deref()
            .and_then(<[_]>::first)
        else {
            break;
        };
        let last = m.log.last().copied();
        assert_eq!(
            last.map(|e| (e.old_chunk, e.new_chunk)),
            Some((old, new)),
            "prepare_merge returns the last committed record"
        );
        let n = n as usize;
        // Whatever happens next, the durable list may be the shorter one.
        m.durable = m.durable.min(m.log.len() - n);
        if s.commit_merge_batch(n as u64).is_err() {
            break;
        }
        m.log.truncate(m.log.len() - n);
        m.merge_steps += 1;
    }
    m
}

fn check_image(img: Vec<u8>, m: &Model, what: &str) {
    let dev = Arc::new(MemDev::from_vec(img));
    let mut s = PersistentStore::open(dev.clone(), None, false)
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    assert!(s.is_valid(), "{what}");
    let mut loaded = Vec::new();
    s.read_metadata(&mut |e| loaded.push(e))
        .unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
    assert!(
        loaded.len() >= m.durable,
        "{what}: {} loaded but {} were acknowledged",
        loaded.len(),
        m.durable
    );
    assert!(
        loaded.len() <= m.log.len(),
        "{what}: {} loaded but only {} committed",
        loaded.len(),
        m.log.len()
    );
    assert_eq!(
        loaded[..],
        m.log[..loaded.len()],
        "{what}: not a prefix of the commits"
    );
    let mut buf = vec![0u8; CHUNK as usize];
    for e in &loaded {
        dev.read_at(&mut buf, e.new_chunk.0 * CHUNK).unwrap();
        assert!(
            buf == stamp(e.old_chunk.0),
            "{what}: data of old_chunk {} (new_chunk {}) is not durable",
            e.old_chunk,
            e.new_chunk
        );
    }
    // Still a working store.
    if s.prepare_exception().is_err() {
        panic!("{what}: the reopened store cannot allocate");
    }
}

/// A COW device whose chunk 0 is zero (a fresh store will be made) and
/// whose every other byte is 0xff: a metadata area the store forgets to
/// zero reads as corrupt records.
fn stale_cow() -> CrashDev {
    let mut img = vec![0xffu8; (COW_CHUNKS * CHUNK) as usize];
    img[..CHUNK as usize].fill(0);
    CrashDev::from_vec(img)
}

#[test]
fn power_loss_at_every_write_and_flush() {
    let seed = 0x00c0_ffee;
    // A clean run: how many write/flush operations the workload issues.
    let clean = Arc::new(stale_cow());
    let full = run_workload(clean.clone(), seed);
    let total = clean.ops();
    assert!(
        full.log.len() > 256 * 2 - MERGE_RECORDS,
        "the workload crosses areas"
    );
    assert_eq!(
        full.durable,
        full.log.len(),
        "a clean run acknowledges everything"
    );
    check_image(clean.crash(), &full, "clean");

    let mut merged_crashes = 0;
    for k in 0..=total {
        let dev = Arc::new(stale_cow());
        dev.crash_after(k);
        let m = run_workload(dev.clone(), seed);
        assert_eq!(dev.has_crashed(), k < total, "crash point {k}");
        if m.merge_steps > 0 && k < total {
            merged_crashes += 1;
        }
        check_image(dev.crash(), &m, &format!("crash at op {k}"));
        // The disk may also have written back some or all of its cache.
        let cached = dev.unflushed_writes();
        for keep in [cached / 2, cached] {
            check_image(
                dev.crash_keeping(keep),
                &m,
                &format!("crash at op {k}, {keep} of {cached} cached writes kept"),
            );
        }
    }
    assert!(
        merged_crashes > 0,
        "some crash points fall inside the merge"
    );
}
