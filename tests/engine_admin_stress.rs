//! Administrative operations against I/O (issue 10): for every pair of
//! operations among snapshot create, snapshot remove, merge (start, wait,
//! remove the merged snapshot), status and stop (stop the merge and resume
//! it, as a daemon restart does), two threads repeat them while writers hit
//! the origin and every snapshot. Every call runs under the watchdog (a
//! call over 10 s prints every stack and aborts): no pair may hang, origin
//! writes never fail, and snapshot I/O fails only with the errors its
//! state explains (removed, merging, invalid).

mod common;

use common::stamp;
use common::watchdog::watched;
use dmsnap::device::{DevError, Device};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, SnapError};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    Create,
    Remove,
    Merge,
    Status,
    Stop,
}

const ALL: [Admin; 5] = [
    Admin::Create,
    Admin::Remove,
    Admin::Merge,
    Admin::Status,
    Admin::Stop,
];

fn add(origin: &Arc<Origin>, name: &str) -> Result<(), SnapError> {
    let cs = ChunkSize::from_sectors(8 << (name.len() % 3)).unwrap();
    watched(format!("create {name}"), || {
        origin.add_snapshot(
            name,
            Arc::new(MemDev::new(2 * CHUNKS * CHUNK + (1 << 20))) as DevRef,
            StoreType::Persistent,
            Some(cs),
        )
    })
    .map(|_| ())
}

/// Errors an admin call may give because of what the other thread did.
fn benign(e: &SnapError) -> bool {
    matches!(
        e,
        SnapError::NotFound(_)
            | SnapError::Exists(_)
            | SnapError::AlreadyMerging
            | SnapError::Merging(_)
            | SnapError::NotMergeable(_)
    )
}

fn admin(origin: &Arc<Origin>, op: Admin, k: u64, who: u64, names: &AtomicU64) {
    let pick = |k: u64| -> Option<String> {
        let s = origin.snapshots();
        (!s.is_empty()).then(|| s[(k as usize) % s.len()].name().to_string())
    };
    let r = match op {
        Admin::Create => {
            let n = names.fetch_add(1, Ordering::Relaxed);
            add(origin, &format!("n{who}-{n}"))
        }
        Admin::Remove => match pick(k) {
            Some(n) => watched(format!("remove {n}"), || origin.remove_snapshot(&n)).map(|_| ()),
            None => Ok(()),
        },
        Admin::Merge => match pick(k + 1) {
            Some(n) => watched(format!("merge {n}"), || {
                origin.start_merge(&n)?;
                origin.wait_merge()?;
                origin.remove_snapshot(&n).map(|_| ())
            }),
            None => Ok(()),
        },
        Admin::Status => {
            watched("status", || {
                for s in origin.snapshots() {
                    let _ = s.status();
                }
                let _ = origin.merge_status();
            });
            Ok(())
        }
        Admin::Stop => watched("stop and resume the merge", || {
            let merging = origin
                .merge_status()
                .filter(|m| !m.done && m.failed.is_none());
            origin.stop_merge();
            match merging {
                Some(m) => origin.start_merge(&m.name),
                None => Ok(()),
            }
        }),
    };
    if let Err(e) = r {
        assert!(benign(&e), "{op:?}: {e}");
    }
}

fn pair(a: Admin, b: Admin) {
    let origin = Origin::new(Arc::new(MemDev::new(CHUNKS * CHUNK)) as DevRef);
    origin.set_merge_batch_chunks(Some(16));
    for n in ["a", "bb", "ccc"] {
        add(&origin, n).unwrap();
    }
    let names = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Writers: the origin, and whichever snapshots exist.
        for t in 0..3u64 {
            let (origin, stop) = (&origin, &stop);
            s.spawn(move || {
                let mut k = t;
                while !stop.load(Ordering::Relaxed) {
                    k = k
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let c = (k >> 33) % CHUNKS;
                    let data = stamp((k % 200) as u8 + 1, c);
                    if t == 0 {
                        let r =
                            watched("origin write", || origin.write_at(&data, c * CHUNK, false));
                        r.expect("origin writes never fail");
                    } else {
                        let snaps = origin.snapshots();
                        if snaps.is_empty() {
                            continue;
                        }
                        let snap = &snaps[(k as usize) % snaps.len()];
                        let r = watched(format!("write to {}", snap.name()), || {
                            if k % 3 == 0 {
                                let mut b = vec![0; 4096];
                                snap.read_at(&mut b, c * CHUNK)
                            } else {
                                snap.write_at(&data, c * CHUNK, k % 7 == 0)
                            }
                        });
                        if let Err(e) = r {
                            assert!(
                                matches!(e, DevError::Gone | DevError::Invalid),
                                "snapshot I/O: {e:?}"
                            );
                        }
                        if k % 11 == 0 {
                            let _ = watched("snapshot flush", || snap.flush());
                        }
                    }
                }
            });
        }
        let admins = [(a, 0u64), (b, 1u64)].map(|(op, who)| {
            let (origin, names) = (&origin, &names);
            s.spawn(move || {
                for k in 0..16u64 {
                    admin(origin, op, k * 7 + who, who, names);
                }
            })
        });
        for h in admins {
            h.join().expect("an admin thread");
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Everything still answers: finish a merge left running, flush.
    watched("final merge wait", || {
        let _ = origin.wait_merge();
    });
    watched("final flush", || origin.flush()).unwrap();
    for s in origin.snapshots() {
        let mut b = vec![0; 4096];
        let r = watched("final read", || s.read_at(&mut b, 0));
        assert!(
            r.is_ok() || matches!(r, Err(DevError::Gone | DevError::Invalid)),
            "{}: {r:?}",
            s.name()
        );
    }
}

#[test]
fn every_pair_of_admin_operations_against_io_never_hangs() {
    // Merges that last a while (a pause per step; nextest runs each test
    // in its own process), so that they overlap the other operation.
    std::env::set_var("DMSNAP_MERGE_STEP_DELAY_MS", "2");
    for (i, &a) in ALL.iter().enumerate() {
        for &b in &ALL[i..] {
            eprintln!("pair {a:?} + {b:?}");
            pair(a, b);
        }
    }
}
