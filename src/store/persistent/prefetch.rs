//! Read-ahead for loading metadata areas (the kernel's dm-bufio prefetch,
//! `DM_PREFETCH_CHUNKS`): a few reader threads keep up to a window of area
//! reads in flight while the caller decodes, so that a load runs at the
//! device's queue depth instead of one round trip per area.
//!
//! Areas are handed to the caller strictly in order. The readers only claim
//! areas inside the window `[wanted, wanted + window)`, so at most `window`
//! area buffers exist at once whatever the device size; reads past the last
//! (partial) area are wasted, as in the kernel.

use crate::format::{area_location, DM_PREFETCH_CHUNKS};
use crate::io::BlockDev;
use crate::units::ChunkSize;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::io;

/// Bytes of area buffers the read-ahead may hold at once (bounds the
/// window for huge chunk sizes).
const MAX_WINDOW_BYTES: u64 = 64 << 20;

/// The read-ahead window for a chunk size: the area being read plus
/// `DM_PREFETCH_CHUNKS` ahead, fewer if the chunks are huge.
pub(super) fn window(chunk_size: ChunkSize) -> u64 {
    (MAX_WINDOW_BYTES / chunk_size.bytes()).clamp(1, 1 + DM_PREFETCH_CHUNKS as u64)
}

struct Window {
    /// Next area no reader has claimed yet.
    next: u64,
    /// The area the consumer waits for (everything before it is consumed).
    wanted: u64,
    stop: bool,
}

struct Shared {
    win: Mutex<Window>,
    cv: Condvar,
}

type AreaResult = (u64, io::Result<Vec<u8>>);

/// Hands out metadata areas in order; see [`with_areas`].
pub(super) struct AreaSource<'a> {
    cow: &'a dyn BlockDev,
    chunk_size: ChunkSize,
    /// `None`: read synchronously on the caller's thread.
    threaded: Option<Threaded<'a>>,
}

struct Threaded<'a> {
    shared: &'a Shared,
    threads: u64,
    rx: Receiver<AreaResult>,
    /// Areas that arrived before the one wanted (out of order).
    early: BTreeMap<u64, io::Result<Vec<u8>>>,
}

fn read_area(cow: &dyn BlockDev, chunk_size: ChunkSize, area: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; chunk_size.bytes() as usize];
    let offset = chunk_size.chunk_to_byte(area_location(chunk_size, area));
    cow.read_at(&mut buf, offset)?;
    Ok(buf)
}

impl AreaSource<'_> {
    /// The contents of metadata area `area`. Call with increasing `area`;
    /// the caller checks that the area lies on the device.
    pub(super) fn get(&mut self, area: u64) -> io::Result<Vec<u8>> {
        let Some(t) = self.threaded.as_mut() else {
            return read_area(self.cow, self.chunk_size, area);
        };
        {
            let mut w = t.shared.win.lock();
            let slid = area - w.wanted.min(area);
            w.wanted = area;
            // A caller that skipped areas: let the readers catch up.
            w.next = w.next.max(area);
            // Each area the window slid by frees one claim: wake that many
            // readers, not all of them.
            for _ in 0..slid.min(t.threads) {
                t.shared.cv.notify_one();
            }
        }
        t.early.retain(|&a, _| a >= area);
        loop {
            if let Some(r) = t.early.remove(&area) {
                return r;
            }
            match t.rx.recv() {
                Ok((a, r)) => {
                    if a >= area {
                        t.early.insert(a, r);
                    }
                }
                // Every reader is gone (cannot happen while `stop` is
                // unset and the area is on the device): read it ourselves.
                Err(_) => return read_area(self.cow, self.chunk_size, area),
            }
        }
    }
}

fn reader(
    cow: &dyn BlockDev,
    chunk_size: ChunkSize,
    areas: u64,
    window: u64,
    shared: &Shared,
    tx: Sender<AreaResult>,
) {
    loop {
        let area = {
            let mut w = shared.win.lock();
            loop {
                if w.stop || w.next >= areas {
                    return;
                }
                if w.next < w.wanted + window {
                    break;
                }
                shared.cv.wait(&mut w);
            }
            w.next += 1;
            w.next - 1
        };
        let r = read_area(cow, chunk_size, area);
        if tx.send((area, r)).is_err() {
            return;
        }
    }
}

/// Run `consume` with an [`AreaSource`] over the `areas` metadata areas that
/// lie on `cow`, reading ahead on helper threads when more than one area
/// exists. The helpers are stopped and joined before this returns.
pub(super) fn with_areas<R>(
    cow: &dyn BlockDev,
    chunk_size: ChunkSize,
    areas: u64,
    consume: impl FnOnce(&mut AreaSource<'_>) -> R,
) -> R {
    let window = window(chunk_size);
    let threads = window.min(areas);
    if threads <= 1 {
        return consume(&mut AreaSource {
            cow,
            chunk_size,
            threaded: None,
        });
    }
    let shared = Shared {
        win: Mutex::new(Window {
            next: 0,
            wanted: 0,
            stop: false,
        }),
        cv: Condvar::new(),
    };
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded(window as usize);
        let mut spawned = 0u64;
        for _ in 0..threads {
            let tx = tx.clone();
            let shared = &shared;
            let r = std::thread::Builder::new()
                .name("dmsnap-prefetch".into())
                .spawn_scoped(s, move || {
                    reader(cow, chunk_size, areas, window, shared, tx)
                });
            match r {
                Ok(_) => spawned += 1,
                Err(e) => {
                    tracing::debug!("cannot start a metadata read-ahead thread: {e}");
                    break;
                }
            }
        }
        drop(tx);
        let mut src = AreaSource {
            cow,
            chunk_size,
            threaded: (spawned > 0).then(|| Threaded {
                shared: &shared,
                threads: spawned,
                rx,
                early: BTreeMap::new(),
            }),
        };
        let out = consume(&mut src);
        {
            let mut w = shared.win.lock();
            w.stop = true;
            shared.cv.notify_all();
        }
        // Dropping the receiver makes a reader blocked in `send` give up.
        drop(src);
        out
    })
}
