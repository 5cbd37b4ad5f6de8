//! Power loss at every write/flush of a workload: origin and two persistent
//! COWs on one simulated power supply (`CrashGroup`). After each cut the
//! durable images are reopened and checked against byte models:
//! - every snapshot reads as its snapshot-time content plus its own
//!   acknowledged writes; only bytes of writes not yet covered by a flush
//!   (or the write in flight) may differ, and only to those writes' bytes;
//! - every flushed or FUA origin write is on the origin;
//! - hence the origin was never overwritten before the copy and its record
//!   were durable (else a snapshot chunk would read the new origin data).

mod common;

use common::fill;
use dmsnap::device::Device;
use dmsnap::io::testing::{CrashDev, CrashGroup};
use dmsnap::io::{DevRef, MemDev};
use dmsnap::snap::{Origin, SnapState, Snapshot};
use dmsnap::store::StoreType;
use dmsnap::units::ChunkSize;
use std::sync::Arc;

const ORIGIN: u64 = 160 * 1024 + 512;
const COW: u64 = 1 << 20;

/// A device's content as far as a crash may leave it.
#[derive(Clone)]
struct DevModel {
    durable: Vec<u8>,
    /// Writes not yet covered by a flush, in order.
    unflushed: Vec<(usize, Vec<u8>)>,
}

impl DevModel {
    fn new(init: Vec<u8>) -> Self {
        DevModel {
            durable: init,
            unflushed: Vec::new(),
        }
    }
    fn write(&mut self, off: u64, data: &[u8], fua: bool) {
        let off = off as usize;
        if fua {
            self.durable[off..off + data.len()].copy_from_slice(data);
            // An older cached write to these bytes can no longer show.
            for (o, d) in &mut self.unflushed {
                let (s, e) = ((*o).max(off), (*o + d.len()).min(off + data.len()));
                if s < e {
                    d[s - *o..e - *o].copy_from_slice(&data[s - off..e - off]);
                }
            }
        } else {
            self.unflushed.push((off, data.to_vec()));
        }
    }
    fn flush(&mut self) {
        for (o, d) in self.unflushed.drain(..) {
            self.durable[o..o + d.len()].copy_from_slice(&d);
        }
    }
    /// Every byte is the durable one or one an unflushed write put there.
    fn check(&self, got: &[u8], what: &str) {
        assert_eq!(got.len(), self.durable.len());
        for (i, (&g, &d)) in got.iter().zip(&self.durable).enumerate() {
            if g != d
                && !self
                    .unflushed
                    .iter()
                    .any(|(o, w)| i >= *o && i < o + w.len() && w[i - o] == g)
            {
                panic!("{what}: byte {i} is {g:#x}, durable model says {d:#x} and no unflushed write explains it");
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Origin {
        off: u64,
        len: usize,
        fua: bool,
        seed: u64,
    },
    Snap {
        which: usize,
        off: u64,
        len: usize,
        fua: bool,
        seed: u64,
    },
    FlushOrigin,
    FlushSnap(usize),
}

fn workload() -> Vec<Op> {
    let mut r = 12345u64;
    let mut next = move || {
        r = r
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        r >> 33
    };
    let mut ops = Vec::new();
    for i in 0..48u64 {
        let k = next() % 10;
        let fua = next() % 6 == 0;
        let (off, len) = if next() % 3 == 0 {
            // Whole chunks (full-chunk snapshot writes skip the origin read).
            let c = next() % (ORIGIN / 4096 - 2);
            (c * 4096, 4096 * (1 + next() % 2) as usize)
        } else {
            let off = next() % (ORIGIN - 1);
            (off, ((1 + next() % 9000).min(ORIGIN - off)) as usize)
        };
        ops.push(match k {
            0..=4 => Op::Origin {
                off,
                len,
                fua,
                seed: i,
            },
            5..=7 => Op::Snap {
                which: (next() % 2) as usize,
                off,
                len,
                fua,
                seed: i,
            },
            8 => Op::FlushOrigin,
            _ => Op::FlushSnap((next() % 2) as usize),
        });
    }
    ops
}

struct Rig {
    group: Arc<CrashGroup>,
    origin_dev: Arc<CrashDev>,
    cows: Vec<Arc<CrashDev>>,
    origin: Arc<Origin>,
    snaps: Vec<Arc<Snapshot>>,
}

fn rig(init: &[u8], durable: bool) -> Rig {
    let group = CrashGroup::new();
    let origin_dev = group.device(init.to_vec());
    let origin = Origin::new(origin_dev.clone() as DevRef);
    origin.set_durable_snapshot_writes(durable);
    let cows: Vec<Arc<CrashDev>> = (0..2)
        .map(|_| group.device(vec![0; COW as usize]))
        .collect();
    let snaps = [8u64, 32]
        .iter()
        .zip(&cows)
        .enumerate()
        .map(|(i, (&sec, cow))| {
            origin
                .add_snapshot(
                    &format!("s{i}"),
                    cow.clone() as DevRef,
                    StoreType::Persistent,
                    Some(ChunkSize::from_sectors(sec).unwrap()),
                )
                .unwrap()
        })
        .collect();
    Rig {
        group,
        origin_dev,
        cows,
        origin,
        snaps,
    }
}

/// Run the workload with power cut at op `cut` (after set-up); returns the
/// models as of the cut.
fn run(rig: &Rig, ops: &[Op], init: &[u8], cut: Option<u64>) -> (DevModel, Vec<DevModel>) {
    let mut mo = DevModel::new(init.to_vec());
    let mut ms = vec![DevModel::new(init.to_vec()); 2];
    if let Some(k) = cut {
        rig.group.crash_after(rig.group.ops() + k);
    }
    for op in ops {
        let ok = match *op {
            Op::Origin {
                off,
                len,
                fua,
                seed,
            } => {
                let d = fill(seed, len);
                let r = rig.origin.write_at(&d, off, fua);
                // Acknowledged or in flight: both may be on disk.
                mo.write(off, &d, fua && r.is_ok());
                r.is_ok()
            }
            Op::Snap {
                which,
                off,
                len,
                fua,
                seed,
            } => {
                let d = fill(seed + 1000, len);
                let r = rig.snaps[which].write_at(&d, off, fua);
                ms[which].write(off, &d, fua && r.is_ok());
                r.is_ok()
            }
            Op::FlushOrigin => {
                let r = rig.origin.flush();
                if r.is_ok() {
                    mo.flush();
                    ms.iter_mut().for_each(DevModel::flush);
                }
                r.is_ok()
            }
            Op::FlushSnap(which) => {
                let r = rig.snaps[which].flush();
                if r.is_ok() {
                    ms[which].flush();
                    mo.flush();
                }
                r.is_ok()
            }
        };
        if !ok || rig.group.has_crashed() {
            assert!(
                rig.group.has_crashed(),
                "an op failed without a power cut: {op:?}"
            );
            break;
        }
    }
    (mo, ms)
}

#[test]
fn crash_at_every_write_and_flush_keeps_snapshots_and_flushed_writes() {
    crash_at_every_op(false);
}

#[test]
fn crash_at_every_op_with_durable_snapshot_writes() {
    crash_at_every_op(true);
}

/// Snapshot first writes acknowledged before (`durable = false`) or after
/// their records are durable: the same guarantees hold after every cut.
fn crash_at_every_op(durable: bool) {
    let init = fill(77, ORIGIN as usize);
    let ops = workload();
    // A run without power loss: how many ops, and the final state is exact.
    let full = rig(&init, durable);
    let base = full.group.ops();
    let (mo, ms) = run(&full, &ops, &init, None);
    let total = full.group.ops() - base;
    assert!(total > 100, "workload too small: {total} ops");
    for (s, m) in full.snaps.iter().zip(&ms) {
        let mut b = vec![0; ORIGIN as usize];
        s.read_at(&mut b, 0).unwrap();
        let mut all = m.clone();
        all.flush();
        all.check(&b, "no-crash snapshot");
    }
    let _ = mo;
    println!("crash points: {total}");
    for k in 0..=total {
        let r = rig(&init, durable);
        let (mo, ms) = run(&r, &ops, &init, Some(k));
        // What survives: the durable images, and (a disk may persist part
        // of its cache, in order) the durable images plus every unflushed
        // write, or half of them.
        let devs: Vec<&CrashDev> = std::iter::once(&*r.origin_dev)
            .chain(r.cows.iter().map(|c| &**c))
            .collect();
        for keep in [Keep::None, Keep::Half, Keep::All] {
            let imgs: Vec<Vec<u8>> = devs
                .iter()
                .map(|d| match keep {
                    Keep::None => d.crash(),
                    Keep::Half => d.crash_keeping(d.unflushed_writes() / 2),
                    Keep::All => d.crash_keeping(usize::MAX),
                })
                .collect();
            check_images(k, keep, &imgs, &mo, &ms);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Keep {
    None,
    Half,
    All,
}

fn check_images(k: u64, keep: Keep, imgs: &[Vec<u8>], mo: &DevModel, ms: &[DevModel]) {
    mo.check(&imgs[0], &format!("cut {k} {keep:?}: origin"));
    // Reopen from what survived.
    let o2 = Origin::new(Arc::new(MemDev::from_vec(imgs[0].clone())));
    for (i, (cow, m)) in imgs[1..].iter().zip(ms).enumerate() {
        let s = o2
            .add_snapshot(
                &format!("s{i}"),
                Arc::new(MemDev::from_vec(cow.clone())) as DevRef,
                StoreType::Persistent,
                None,
            )
            .unwrap_or_else(|e| panic!("cut {k} {keep:?}: reopening s{i}: {e}"));
        assert_eq!(
            s.status().state,
            SnapState::Active,
            "cut {k} {keep:?}: s{i} after reopen"
        );
        let mut b = vec![0; ORIGIN as usize];
        s.read_at(&mut b, 0).unwrap();
        m.check(&b, &format!("cut {k} {keep:?}: snapshot s{i}"));
    }
}
