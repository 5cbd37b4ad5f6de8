//! Read-ahead for loading metadata areas (the kernel's dm-bufio prefetch,
//! `DM_PREFETCH_CHUNKS`): keep a window of area reads in flight while the
//! caller decodes, so that a load runs at the device's queue depth instead
//! of one round trip per area.
//!
//! Two readers:
//! - **io_uring** ([`crate::io::uring`]), when the device is a plain file
//!   descriptor ([`BlockDev::raw_fd`]) and the kernel allows it: one thread
//!   keeps up to [`URING_WINDOW`] reads in flight and the caller decodes
//!   each area in place in the ring's buffer. An area the ring fails to
//!   read is read again through [`BlockDev::read_at`], whose result counts
//!   (so errors are the same whichever reader ran).
//! - **threads**, everywhere else: a few reader threads claim areas inside
//!   a window of `DM_PREFETCH_CHUNKS + 1` and hand them over a channel.
//!
//! Either way areas are handed to the caller strictly in order, at most a
//! window of area buffers exists at once whatever the device size, and
//! reads past the last (partial) area are wasted, as in the kernel.

use crate::format::{area_location, DM_PREFETCH_CHUNKS};
use crate::io::uring::RingReader;
use crate::io::BlockDev;
use crate::units::ChunkSize;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;

/// Bytes of area buffers the read-ahead may hold at once (bounds the
/// window for huge chunk sizes).
const MAX_WINDOW_BYTES: u64 = 64 << 20;

/// Area reads the io_uring reader keeps in flight (for small chunks): fio
/// on a virtio disk gains up to QD 64–128 for 4 KiB reads.
pub(super) const URING_WINDOW: u64 = 128;

/// Bytes the io_uring reader aims to keep in flight: more areas than this
/// only delay the first one (the load decodes in order) and gained nothing
/// for 64 KiB chunks (16 in flight did as well as 128).
const URING_INFLIGHT_BYTES: u64 = 1 << 20;

/// Areas the io_uring reader keeps in flight at least (big chunks).
const URING_MIN_WINDOW: u64 = 4;

/// The read-ahead window for a chunk size: the area being read plus
/// `DM_PREFETCH_CHUNKS` ahead, fewer if the chunks are huge.
pub(super) fn window(chunk_size: ChunkSize) -> u64 {
    (MAX_WINDOW_BYTES / chunk_size.bytes()).clamp(1, 1 + DM_PREFETCH_CHUNKS as u64)
}

/// The io_uring reader's window for a chunk size.
pub(super) fn uring_window(chunk_size: ChunkSize) -> u64 {
    (URING_INFLIGHT_BYTES / chunk_size.bytes())
        .clamp(URING_MIN_WINDOW, URING_WINDOW)
        .min((MAX_WINDOW_BYTES / chunk_size.bytes()).max(1))
}

/// Which reader a load used (or is to use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// One area at a time on the caller's thread (a single area).
    Sync,
    Threads,
    Uring,
}

thread_local! {
    /// Tests: the reader the next loads on this thread must use
    /// (`Threads` forces the fallback; `Uring` still falls back when
    /// io_uring cannot be used).
    static FORCE: Cell<Option<Reader>> = const { Cell::new(None) };
    /// The reader the last load on this thread used.
    static LAST: Cell<Option<Reader>> = const { Cell::new(None) };
}

/// Run `f` with loads on this thread restricted to `reader`
/// (`Reader::Threads`: never io_uring); returns `f`'s result and the
/// reader the last load inside `f` used.
#[cfg(test)]
pub(super) fn with_reader<R>(reader: Reader, f: impl FnOnce() -> R) -> (R, Option<Reader>) {
    let before = FORCE.with(|c| c.replace(Some(reader)));
    LAST.with(|c| c.set(None));
    let out = f();
    FORCE.with(|c| c.set(before));
    (out, LAST.with(|c| c.get()))
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
    inner: Inner<'a>,
    /// The last area read through `read_at` (sync and threaded readers,
    /// and the io_uring reader's retries).
    cur: Vec<u8>,
}

enum Inner<'a> {
    /// Read synchronously on the caller's thread.
    Sync,
    Threaded(Threaded<'a>),
    /// Boxed: the ring is big and there is one per load.
    Uring(Box<Uring<'a>>),
}

struct Threaded<'a> {
    shared: &'a Shared,
    threads: u64,
    rx: Receiver<AreaResult>,
    /// Areas that arrived before the one wanted (out of order).
    early: BTreeMap<u64, io::Result<Vec<u8>>>,
}

struct Uring<'a> {
    ring: RingReader<'a>,
    /// Slots (= areas in flight at most).
    window: u64,
    /// Areas on the device.
    areas: u64,
    /// Next area not yet started.
    next: u64,
}

fn area_offset(chunk_size: ChunkSize, area: u64) -> u64 {
    chunk_size.chunk_to_byte(area_location(chunk_size, area))
}

fn read_area(cow: &dyn BlockDev, chunk_size: ChunkSize, area: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; chunk_size.bytes() as usize];
    cow.read_at(&mut buf, area_offset(chunk_size, area))?;
    Ok(buf)
}

impl AreaSource<'_> {
    /// The contents of metadata area `area`. Call with increasing `area`;
    /// the caller checks that the area lies on the device.
    pub(super) fn get(&mut self, area: u64) -> io::Result<&[u8]> {
        match &mut self.inner {
            Inner::Sync => {
                self.cur = read_area(self.cow, self.chunk_size, area)?;
                Ok(&self.cur)
            }
            Inner::Threaded(t) => {
                self.cur = t.get(self.cow, self.chunk_size, area)?;
                Ok(&self.cur)
            }
            Inner::Uring(u) => {
                let slot = u.wait(self.chunk_size, area);
                match slot {
                    Ok(slot) => u.ring.slot(slot).ok_or_else(|| {
                        io::Error::other(format!("metadata area {area}: read still in flight"))
                    }),
                    Err(e) => {
                        tracing::debug!(
                            "io_uring read of metadata area {area} failed ({e}); reading it again"
                        );
                        self.cur = read_area(self.cow, self.chunk_size, area)?;
                        Ok(&self.cur)
                    }
                }
            }
        }
    }
}

impl Uring<'_> {
    /// Start every area of the window that begins at `area`, then wait for
    /// `area`: the slot holding it.
    fn wait(&mut self, chunk_size: ChunkSize, area: u64) -> io::Result<usize> {
        // A caller that skipped areas: start from the one wanted.
        self.next = self.next.max(area);
        let end = area.saturating_add(self.window).min(self.areas);
        while self.next < end {
            let a = self.next;
            self.ring
                .start((a % self.window) as usize, area_offset(chunk_size, a))?;
            self.next += 1;
        }
        let slot = (area % self.window) as usize;
        self.ring.wait(slot)?;
        Ok(slot)
    }
}

impl Threaded<'_> {
    fn get(&mut self, cow: &dyn BlockDev, chunk_size: ChunkSize, area: u64) -> io::Result<Vec<u8>> {
        {
            let mut w = self.shared.win.lock();
            let slid = area - w.wanted.min(area);
            w.wanted = area;
            // A caller that skipped areas: let the readers catch up.
            w.next = w.next.max(area);
            // Each area the window slid by frees one claim: wake that many
            // readers, not all of them.
            for _ in 0..slid.min(self.threads) {
                self.shared.cv.notify_one();
            }
        }
        self.early.retain(|&a, _| a >= area);
        loop {
            if let Some(r) = self.early.remove(&area) {
                return r;
            }
            match self.rx.recv() {
                Ok((a, r)) => {
                    if a >= area {
                        self.early.insert(a, r);
                    }
                }
                // Every reader is gone (cannot happen while `stop` is
                // unset and the area is on the device): read it ourselves.
                Err(_) => return read_area(cow, chunk_size, area),
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
/// lie on `cow`, reading ahead (io_uring, else helper threads) when more
/// than one area exists. Every read is finished and the helpers joined
/// before this returns.
pub(super) fn with_areas<R>(
    cow: &dyn BlockDev,
    chunk_size: ChunkSize,
    areas: u64,
    consume: impl FnOnce(&mut AreaSource<'_>) -> R,
) -> R {
    let force = FORCE.with(|c| c.get());
    let ring = match force {
        Some(Reader::Sync | Reader::Threads) => None,
        _ if areas <= 1 => None,
        _ => uring_reader(cow, chunk_size, areas),
    };
    if let Some(ring) = ring {
        LAST.with(|c| c.set(Some(Reader::Uring)));
        let window = ring.slots() as u64;
        let mut src = AreaSource {
            cow,
            chunk_size,
            inner: Inner::Uring(Box::new(Uring {
                ring,
                window,
                areas,
                next: 0,
            })),
            cur: Vec::new(),
        };
        // Dropping the source waits for the reads still in flight.
        return consume(&mut src);
    }
    let window = window(chunk_size);
    let threads = if force == Some(Reader::Sync) {
        0
    } else {
        window.min(areas)
    };
    if threads <= 1 {
        LAST.with(|c| c.set(Some(Reader::Sync)));
        return consume(&mut AreaSource {
            cow,
            chunk_size,
            inner: Inner::Sync,
            cur: Vec::new(),
        });
    }
    LAST.with(|c| c.set(Some(Reader::Threads)));
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
            inner: if spawned > 0 {
                Inner::Threaded(Threaded {
                    shared: &shared,
                    threads: spawned,
                    rx,
                    early: BTreeMap::new(),
                })
            } else {
                Inner::Sync
            },
            cur: Vec::new(),
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

/// An io_uring reader for the areas of `cow`, if it is a plain file
/// descriptor whose block size the areas are aligned to and the kernel
/// lets us make a ring.
fn uring_reader(cow: &dyn BlockDev, chunk_size: ChunkSize, areas: u64) -> Option<RingReader<'_>> {
    let fd = cow.raw_fd()?;
    let block = u64::from(cow.logical_block_size().max(512));
    // Area offsets are chunk multiples: aligned when the chunk size is a
    // multiple of the block size (O_DIRECT needs that).
    if chunk_size.bytes() % block != 0 || !block.is_power_of_two() {
        return None;
    }
    let window = uring_window(chunk_size).min(areas);
    match RingReader::new(
        fd,
        window as usize,
        chunk_size.bytes() as usize,
        block.max(4096) as usize,
    ) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!("metadata load without io_uring: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::MetadataChunks;
    use super::super::PersistentStore;
    use super::*;
    use crate::format::{
        encode_area, exceptions_per_area, is_metadata_chunk, skip_metadata, DiskException,
        DiskHeader,
    };
    use crate::io::testing::{Fault, FaultyDev, OpKind};
    use crate::io::{DevRef, FileDev, OpenOptions};
    use crate::store::{ExceptionStore, StoreError};
    use crate::units::Chunk;
    use proptest::prelude::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::Arc;

    /// Everything a load leaves behind, comparable across readers.
    #[derive(Debug, PartialEq, Eq)]
    struct Loaded {
        /// The sink's records, in order (also those before an error).
        records: Vec<DiskException>,
        /// `Ok` or the error's Debug form (kind, area, slot, message).
        result: Result<(), String>,
        /// `(next_free, current_area, current_committed)` after a good load.
        state: Option<(Chunk, u64, u64)>,
    }

    fn load_with(reader: Reader, cow: DevRef) -> (Loaded, Option<Reader>) {
        with_reader(reader, || {
            let mut s = PersistentStore::open(cow, None, false).expect("open the store");
            let mut records = Vec::new();
            let r = s.read_metadata(&mut |e| records.push(e));
            let state = r
                .is_ok()
                .then(|| (s.next_free(), s.current_area(), s.current_committed()));
            Loaded {
                records,
                result: r.map_err(|e| format!("{e:?}")),
                state,
            }
        })
    }

    fn open(path: &Path, direct: bool) -> DevRef {
        Arc::new(
            FileDev::open(
                path,
                OpenOptions {
                    read_only: true,
                    direct,
                },
            )
            .expect("open the COW file"),
        )
    }

    /// `n` records in allocation order (old chunks from `olds`, cycled).
    fn records(cs: ChunkSize, n: usize, olds: &[u64]) -> Vec<DiskException> {
        let mut next = Chunk(2);
        (0..n)
            .map(|i| {
                let e = DiskException {
                    old_chunk: Chunk(olds.get(i % olds.len().max(1)).copied().unwrap_or(0)),
                    new_chunk: next,
                };
                next = skip_metadata(cs, Chunk(next.0 + 1));
                e
            })
            .collect()
    }

    /// Write a COW file: header, the areas holding `recs` (then the
    /// terminating area), `tail` bytes after the last area's terminator,
    /// `len_chunks` chunks long.
    fn write_cow(path: &Path, cs: ChunkSize, recs: &[DiskException], tail: &[u8], len_chunks: u64) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(len_chunks * cs.bytes()).unwrap();
        let epa = exceptions_per_area(cs) as usize;
        let put = |buf: &[u8], chunk: u64| {
            if (chunk + 1) * cs.bytes() <= len_chunks * cs.bytes() {
                f.write_all_at(buf, cs.chunk_to_byte(Chunk(chunk))).unwrap();
            }
        };
        put(
            &DiskHeader {
                valid: true,
                chunk_size: cs,
            }
            .encode_chunk(),
            0,
        );
        let areas = recs.len() / epa + 1;
        for a in 0..areas {
            let these = &recs[(a * epa).min(recs.len())..((a + 1) * epa).min(recs.len())];
            let mut buf = encode_area(these, cs.bytes() as usize);
            if a + 1 == areas {
                let start = (these.len() + 1) * 16;
                let n = tail.len().min(buf.len().saturating_sub(start));
                buf[start..start + n].copy_from_slice(&tail[..n]);
            }
            put(&buf, area_location(cs, a as u64).0);
        }
        f.sync_all().unwrap();
    }

    /// The reader a load that may use io_uring uses (this build).
    fn ring_reader() -> Reader {
        if cfg!(feature = "uring") {
            Reader::Uring
        } else {
            Reader::Threads
        }
    }

    fn areas_on(cs: ChunkSize, len_chunks: u64) -> u64 {
        if len_chunks < 2 {
            return 0;
        }
        (len_chunks - 2) / (exceptions_per_area(cs) + 1) + 1
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// The io_uring reader and the threaded fallback load the same
        /// records, state and errors from any store: partial or full last
        /// area, garbage after the terminator, corrupt records (beyond the
        /// device, on a metadata chunk, an early terminator), a device
        /// that ends before the terminating area; through the page cache
        /// and with O_DIRECT; more areas than the ring has slots.
        #[test]
        fn uring_and_threads_load_the_same(
            sectors in prop::sample::select(vec![1u64, 2, 8]),
            n in 0usize..12_000,
            olds in prop::collection::vec(any::<u64>(), 1..64),
            tail in prop::collection::vec(any::<u8>(), 0..64),
            corrupt in prop::option::of((any::<prop::sample::Index>(), 0u8..3)),
            extra in 0u64..3,
            shrink in prop::bool::weighted(0.1),
            direct in any::<bool>(),
        ) {
            let cs = ChunkSize::from_sectors(sectors).unwrap();
            let mut recs = records(cs, n, &olds);
            let last_area = (n as u64) / exceptions_per_area(cs);
            let last_loc = area_location(cs, last_area).0;
            let data_end = recs.last().map_or(0, |e| e.new_chunk.0 + 1);
            let mut len_chunks = data_end.max(last_loc + 1) + extra;
            if shrink && last_area > 0 {
                len_chunks = last_loc;
            }
            let mut broken = false;
            if let (Some((i, kind)), false) = (corrupt, recs.is_empty()) {
                let i = i.index(recs.len());
                recs[i].new_chunk = match kind {
                    0 => Chunk(len_chunks + i as u64),
                    1 => area_location(cs, i as u64 % (last_area + 1)),
                    _ => Chunk(0),
                };
                broken = true;
            }
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let path = dir.path().join("cow");
            write_cow(&path, cs, &recs, &tail, len_chunks);

            let (threads, used_t) = load_with(Reader::Threads, open(&path, direct));
            let (uring, used_u) = load_with(Reader::Uring, open(&path, direct));
            let areas = areas_on(cs, len_chunks);
            prop_assert_eq!(used_t, Some(if areas > 1 { Reader::Threads } else { Reader::Sync }));
            // Precondition: io_uring works on this machine (CI's too).
            prop_assert_eq!(used_u, Some(if areas > 1 { ring_reader() } else { Reader::Sync }),
                "io_uring unavailable: the test cannot compare the readers");
            prop_assert_eq!(&uring, &threads);
            let cut = shrink && last_area > 0;
            if !broken && !cut {
                prop_assert_eq!(&uring.result, &Ok(()));
                prop_assert_eq!(&uring.records, &recs);
                prop_assert_eq!(uring.state.map(|s| (s.1, s.2)),
                    Some((last_area, n as u64 % exceptions_per_area(cs))));
            }
        }

        /// The division-free metadata test agrees with `is_metadata_chunk`.
        #[test]
        fn metadata_chunks_agree(sectors_log in 0u32..22, c in any::<u64>(), small in 0u64..100_000) {
            let cs = ChunkSize::from_sectors(1 << sectors_log).unwrap();
            let m = MetadataChunks::new(cs);
            for chunk in [c, small, 0, 1, u64::MAX] {
                prop_assert_eq!(m.contains(Chunk(chunk)), is_metadata_chunk(cs, Chunk(chunk)), "chunk {}", chunk);
            }
            for a in [0u64, 1, small] {
                let loc = area_location(cs, a).0;
                for chunk in [loc.wrapping_sub(1), loc, loc + 1] {
                    prop_assert_eq!(m.contains(Chunk(chunk)), is_metadata_chunk(cs, Chunk(chunk)), "chunk {}", chunk);
                }
            }
        }
    }

    /// A COW file with `areas` full areas of 512-byte chunks (and the
    /// terminating one); returns the records.
    fn full_areas(path: &Path, areas: usize) -> (ChunkSize, Vec<DiskException>) {
        let cs = ChunkSize::from_sectors(1).unwrap();
        let recs = records(
            cs,
            areas * exceptions_per_area(cs) as usize,
            &[7, 3, 1 << 40],
        );
        let len = recs.last().unwrap().new_chunk.0 + 1;
        let len = len.max(area_location(cs, areas as u64).0 + 1);
        write_cow(path, cs, &recs, &[], len);
        (cs, recs)
    }

    /// A device that fails one area's read (EIO): the load fails with that
    /// area, after handing over exactly the records of the areas before.
    /// FaultyDev has no file descriptor, so both requests run the threads.
    #[test]
    fn a_failing_area_read_is_reported_with_its_area() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("cow");
        let (cs, recs) = full_areas(&path, 40);
        let epa = exceptions_per_area(cs) as usize;
        for reader in [Reader::Threads, Reader::Uring] {
            let file = FileDev::open(&path, OpenOptions::default()).unwrap();
            let dev = FaultyDev::new(file);
            dev.add(Fault::Range {
                kind: OpKind::Read,
                offset: cs.chunk_to_byte(area_location(cs, 17)),
                len: cs.bytes(),
            });
            let dev = Arc::new(dev);
            let (got, used) = with_reader(reader, || {
                let mut s = PersistentStore::open(dev.clone(), None, false).unwrap();
                let mut v = Vec::new();
                let r = s.read_metadata(&mut |e| v.push(e));
                (r, v)
            });
            assert_eq!(used, Some(Reader::Threads), "no fd: the fallback runs");
            let (r, v) = got;
            match r {
                Err(StoreError::ReadArea { area: 17, source }) => {
                    assert_eq!(source.raw_os_error(), Some(libc::EIO))
                }
                other => panic!("{reader:?}: {other:?}"),
            }
            assert_eq!(v, recs[..17 * epa], "{reader:?}");
            assert_eq!(dev.injected(), 1, "{reader:?}");
        }
    }

    /// The io_uring reader meets a read that cannot complete (the file
    /// shrank under an open device: end of file at area 23): the same
    /// error and records as the threads.
    #[test]
    fn uring_reports_a_short_read_like_the_threads() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("cow");
        let (cs, recs) = full_areas(&path, 300);
        let epa = exceptions_per_area(cs) as usize;
        let mut results = Vec::new();
        for reader in [Reader::Threads, Reader::Uring] {
            let dev = open(&path, false);
            // Cut in the middle of area 23.
            let cut = cs.chunk_to_byte(area_location(cs, 23)) + 100;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let (l, used) = load_with(reader, dev);
            let expected = if reader == Reader::Uring {
                ring_reader()
            } else {
                reader
            };
            assert_eq!(used, Some(expected));
            assert_eq!(l.records, recs[..23 * epa], "{reader:?}");
            assert!(
                l.result
                    .as_ref()
                    .unwrap_err()
                    .contains("ReadArea { area: 23"),
                "{l:?}"
            );
            assert!(
                l.result.as_ref().unwrap_err().contains("UnexpectedEof"),
                "{l:?}"
            );
            results.push(l);
            // Restore for the next reader.
            full_areas(&path, 300);
        }
        assert_eq!(results[0], results[1]);
    }

    /// The ring window is bounded by bytes for big chunks.
    #[test]
    fn uring_window_is_bounded() {
        assert_eq!(
            uring_window(ChunkSize::from_sectors(8).unwrap()),
            URING_WINDOW
        );
        assert_eq!(uring_window(ChunkSize::from_sectors(128).unwrap()), 16);
        assert_eq!(uring_window(ChunkSize::from_sectors(2048).unwrap()), 4);
        assert_eq!(uring_window(ChunkSize::from_sectors(1 << 21).unwrap()), 1);
    }
}
