//! Offline tools for any persistent COW device, kernel-made ones included:
//! [`dump`] (header and every record in on-disk order, human or JSON),
//! [`check`] (walk everything, report every problem with its location) and
//! [`restore`] (write a COW back from a `dump --json` document).
//!
//! They read the device straight through [`crate::format`] and
//! [`crate::io::BlockDev`], not through the exception store, so they can
//! walk a store the engine would refuse. Like thin-provisioning-tools, each
//! tool is an options struct and one function; the CLI only parses
//! arguments and maps errors to exit codes.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

pub mod check;
pub mod dump;
pub mod restore;

use crate::format::{
    area_location, exceptions_per_area, DiskException, RawDiskException, RawDiskHeader,
    DISK_EXCEPTION_BYTES, SNAPSHOT_DISK_VERSION, SNAP_MAGIC,
};
use crate::io::BlockDev;
use crate::report::Progress;
use crate::units::{Chunk, ChunkSize, ChunkSizeError};
use std::io;
use std::path::PathBuf;
use zerocopy::FromBytes;

/// Why a tool could not do its job. [`ToolError::is_corruption`] tells a
/// damaged or foreign COW (exit 1) from a failure to run at all (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the COW header")]
    ReadHeader(#[source] io::Error),
    #[error("the device is {len} bytes, too short to hold a snapshot header")]
    TooShortForHeader { len: u64 },
    #[error("no snapshot header: the magic is 0 (an unformatted store the kernel would format)")]
    Unformatted,
    #[error("not a snapshot COW: the magic is {0:#010x}, expected 0x70416e53 (\"SnAp\")")]
    BadMagic(u32),
    #[error("unsupported snapshot disk version {0} (only version 1 exists)")]
    BadVersion(u32),
    #[error("invalid on-disk chunk size of {sectors} sectors")]
    BadChunkSize {
        sectors: u32,
        #[source]
        source: ChunkSizeError,
    },
    #[error("reading metadata area {area} at chunk {chunk}")]
    ReadArea {
        area: u64,
        chunk: Chunk,
        #[source]
        source: io::Error,
    },
    #[error("writing {what}")]
    Write {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the output")]
    Output(#[source] io::Error),
    #[error("reading the dump {}", path.display())]
    ReadDump {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the dump is not a dmsnap dump --json document")]
    ParseDump(#[source] serde_json::Error),
    #[error("the dump is inconsistent: {0}")]
    BadDump(String),
    #[error("the records need a device of {needed} bytes but {} is only {have} bytes", path.display())]
    DoesNotFit {
        path: PathBuf,
        needed: u64,
        have: u64,
    },
    #[error("not enough memory for {0} records")]
    OutOfMemory(u64),
}

impl ToolError {
    /// True when the input itself is damaged, foreign or inconsistent (CLI
    /// exit 1), false when the tool could not run (exit 2).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            ToolError::TooShortForHeader { .. }
                | ToolError::Unformatted
                | ToolError::BadMagic(_)
                | ToolError::BadVersion(_)
                | ToolError::BadChunkSize { .. }
                | ToolError::BadDump(_)
                | ToolError::ParseDump(_)
                | ToolError::DoesNotFit { .. }
        )
    }

    /// True when writing our output hit a closed pipe (`dump | head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ToolError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

//------------------------------------------

/// The four header fields as they are on disk, unvalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeaderFields {
    pub magic: u32,
    pub valid: u32,
    pub version: u32,
    pub chunk_size: u32,
}

impl RawHeaderFields {
    /// Read the first 16 bytes of `dev`.
    pub fn read(dev: &dyn BlockDev) -> Result<Self, ToolError> {
        let len = dev.len();
        if len < 16 {
            return Err(ToolError::TooShortForHeader { len });
        }
        let mut b = [0u8; 16];
        dev.read_at(&mut b, 0).map_err(ToolError::ReadHeader)?;
        let raw = RawDiskHeader::read_from_bytes(&b[..]).map_err(|_| {
            // Cannot happen: the buffer is exactly the header's size.
            ToolError::TooShortForHeader { len }
        })?;
        Ok(RawHeaderFields {
            magic: raw.magic.get(),
            valid: raw.valid.get(),
            version: raw.version.get(),
            chunk_size: raw.chunk_size.get(),
        })
    }

    /// Validate like the kernel's `read_header` (plus: magic 0 is refused,
    /// since an offline tool has no chunk size to format with).
    pub fn validate(&self) -> Result<ChunkSize, ToolError> {
        if self.magic == 0 {
            return Err(ToolError::Unformatted);
        }
        if self.magic != SNAP_MAGIC {
            return Err(ToolError::BadMagic(self.magic));
        }
        if self.version != SNAPSHOT_DISK_VERSION {
            return Err(ToolError::BadVersion(self.version));
        }
        ChunkSize::from_sectors(u64::from(self.chunk_size)).map_err(|source| {
            ToolError::BadChunkSize {
                sectors: self.chunk_size,
                source,
            }
        })
    }

    /// The kernel treats any non-zero `valid` as valid.
    pub fn is_valid(&self) -> bool {
        self.valid != 0
    }
}

//------------------------------------------

/// What the metadata walk found at one step.
pub(crate) enum Event<'a> {
    /// A record before the terminator (`new_chunk != 0`).
    Record {
        area: u64,
        slot: u64,
        exception: DiskException,
    },
    /// The terminator: the first slot whose `new_chunk` is 0. `nonzero_tail`
    /// counts later slots of that area that are not all zero (only counted
    /// when the walk was asked to scan tails).
    Terminator {
        area: u64,
        slot: u64,
        nonzero_tail: u64,
    },
    /// Area `area` (after a full area) does not fit in the device: the list
    /// has no terminator; the kernel would fail to load it.
    AreaBeyondEnd { area: u64, chunk: Chunk },
    /// Reading area `area` failed.
    AreaUnreadable {
        area: u64,
        chunk: Chunk,
        error: &'a io::Error,
    },
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalkEnd {
    /// At the terminator in `area`, `slot` records in.
    Terminated { area: u64, slot: u64 },
    /// Area `area` lies beyond the device end.
    BeyondEnd { area: u64 },
    /// Area `area` could not be read.
    Unreadable { area: u64 },
    /// The visitor asked to stop.
    Stopped,
}

/// Largest piece of an area read at once: areas of huge chunks are read in
/// pieces so memory stays bounded whatever the header claims.
const PIECE_BYTES: u64 = 1 << 20;

/// How to walk.
#[derive(Clone, Copy, Default)]
pub(crate) struct WalkOpts<'a> {
    /// Also read the slots after the terminator (to count non-zero ones).
    pub scan_tail: bool,
    /// Set to the byte position reached.
    pub progress: Option<&'a Progress>,
    /// Areas read ahead in parallel (0: one read at a time).
    pub readahead: usize,
}

/// Walk the metadata areas of a store with chunk size `cs` like the kernel's
/// `read_exceptions`: area after area, each slot in order, until the first
/// `new_chunk == 0`. Every area is checked to lie inside `dev` before it is
/// read. `visit` returns false to stop early.
///
/// With `readahead > 0` (and chunks of at most 1 MiB) the next `readahead`
/// areas are read by as many threads while the current one is walked, as
/// the kernel prefetches `DM_PREFETCH_CHUNKS` areas: areas are a chunk
/// apart, so one at a time costs a seek (or a round trip) each.
pub(crate) fn walk_metadata(
    dev: &dyn BlockDev,
    cs: ChunkSize,
    opts: WalkOpts<'_>,
    visit: &mut dyn FnMut(Event<'_>) -> bool,
) -> WalkEnd {
    if opts.readahead == 0 || cs.bytes() > PIECE_BYTES {
        return walk_inner(
            dev,
            cs,
            opts,
            &mut |_area, off, buf| dev.read_at(buf, off),
            visit,
        );
    }
    std::thread::scope(|scope| {
        let mut ra = ReadAhead::start(scope, dev, cs, opts.readahead);
        walk_inner(
            dev,
            cs,
            opts,
            &mut |area, off, buf| ra.read(area, off, buf),
            visit,
        )
        // `ra` drops here, closing the job queue; the scope joins the readers.
    })
}

type ReadFn<'r> = dyn FnMut(u64, u64, &mut [u8]) -> io::Result<()> + 'r;

fn walk_inner(
    dev: &dyn BlockDev,
    cs: ChunkSize,
    opts: WalkOpts<'_>,
    read: &mut ReadFn<'_>,
    visit: &mut dyn FnMut(Event<'_>) -> bool,
) -> WalkEnd {
    let e = exceptions_per_area(cs);
    let dev_chunks = cs.whole_chunks(dev.len());
    let piece_bytes = PIECE_BYTES.min(cs.bytes());
    // piece_bytes ≤ 1 MiB, so this allocation is bounded.
    let mut buf = vec![0u8; piece_bytes as usize];
    let mut area: u64 = 0;
    loop {
        let chunk = match area_location_checked(cs, area) {
            Some(c) if c < dev_chunks => Chunk(c),
            other => {
                visit(Event::AreaBeyondEnd {
                    area,
                    chunk: Chunk(other.unwrap_or(u64::MAX)),
                });
                return WalkEnd::BeyondEnd { area };
            }
        };
        let base = cs.chunk_to_byte(chunk);
        if let Some(p) = opts.progress {
            p.set_done(base);
        }
        let mut terminated: Option<u64> = None;
        let mut nonzero_tail = 0u64;
        let mut slot = 0u64;
        while slot < e {
            let off = base + slot * DISK_EXCEPTION_BYTES;
            if let Err(error) = read(area, off, &mut buf) {
                visit(Event::AreaUnreadable {
                    area,
                    chunk,
                    error: &error,
                });
                return WalkEnd::Unreadable { area };
            }
            for rec in buf.chunks_exact(DISK_EXCEPTION_BYTES as usize) {
                let Ok(raw) = RawDiskException::read_from_bytes(rec) else {
                    break;
                };
                if terminated.is_some() {
                    if raw.old_chunk.get() != 0 || raw.new_chunk.get() != 0 {
                        nonzero_tail += 1;
                    }
                } else if raw.new_chunk.get() == 0 {
                    terminated = Some(slot);
                    if !opts.scan_tail {
                        break;
                    }
                } else if !visit(Event::Record {
                    area,
                    slot,
                    exception: raw.into(),
                }) {
                    return WalkEnd::Stopped;
                }
                slot += 1;
            }
            if terminated.is_some() && !opts.scan_tail {
                break;
            }
        }
        if let Some(t) = terminated {
            visit(Event::Terminator {
                area,
                slot: t,
                nonzero_tail,
            });
            return WalkEnd::Terminated { area, slot: t };
        }
        area += 1;
    }
}

/// `area_location` without overflow (hostile chunk sizes × huge areas).
pub(crate) fn area_location_checked(cs: ChunkSize, area: u64) -> Option<u64> {
    area.checked_mul(exceptions_per_area(cs) + 1)?
        .checked_add(area_location(cs, 0).0)
}

type AreaRead = (u64, io::Result<Vec<u8>>);

/// Whole-area reads issued ahead of the walk to a few reader threads.
/// Areas are requested in increasing order; results may arrive in any order.
struct ReadAhead {
    jobs: Option<crossbeam_channel::Sender<(u64, u64)>>,
    results: crossbeam_channel::Receiver<AreaRead>,
    ready: std::collections::HashMap<u64, io::Result<Vec<u8>>>,
    /// Next area not yet issued.
    issued: u64,
    depth: u64,
    cs: ChunkSize,
    dev_chunks: u64,
}

impl ReadAhead {
    fn start<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        dev: &'env dyn BlockDev,
        cs: ChunkSize,
        depth: usize,
    ) -> Self {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<(u64, u64)>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded::<AreaRead>();
        let chunk_bytes = cs.bytes() as usize; // ≤ PIECE_BYTES here
        for _ in 0..depth {
            let jobs_rx = jobs_rx.clone();
            let res_tx = res_tx.clone();
            scope.spawn(move || {
                for (area, off) in jobs_rx.iter() {
                    let mut v = vec![0u8; chunk_bytes];
                    let r = dev.read_at(&mut v, off).map(|()| v);
                    if res_tx.send((area, r)).is_err() {
                        break;
                    }
                }
            });
        }
        ReadAhead {
            jobs: Some(jobs_tx),
            results: res_rx,
            ready: std::collections::HashMap::new(),
            issued: 0,
            depth: depth as u64,
            cs,
            dev_chunks: cs.whole_chunks(dev.len()),
        }
    }

    fn read(&mut self, area: u64, _off: u64, buf: &mut [u8]) -> io::Result<()> {
        let stopped = || io::Error::other("metadata read-ahead stopped");
        // Keep `depth` areas in flight past this one (never past the device end).
        self.issued = self.issued.max(area);
        while self.issued <= area.saturating_add(self.depth) {
            let Some(loc) = area_location_checked(self.cs, self.issued) else {
                break;
            };
            if loc >= self.dev_chunks {
                break;
            }
            let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
            jobs.send((self.issued, self.cs.chunk_to_byte(Chunk(loc))))
                .map_err(|_| stopped())?;
            self.issued += 1;
        }
        loop {
            if let Some(r) = self.ready.remove(&area) {
                let v = r?;
                // The walk asks for whole areas (chunk ≤ PIECE_BYTES), at their start.
                let src = v.get(..buf.len()).ok_or_else(stopped)?;
                buf.copy_from_slice(src);
                return Ok(());
            }
            let (a, r) = self.results.recv().map_err(|_| stopped())?;
            self.ready.insert(a, r);
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Close the queue so the reader threads finish their current read and exit.
        self.jobs.take();
    }
}

/// Summary of a store as the kernel would load it (valid or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StoreSummary {
    /// Records before the terminator.
    pub exceptions: u64,
    /// Areas holding at least one record (`ceil(exceptions / E)`).
    pub areas_used: u64,
    /// The area holding the terminator (kernel `current_area` after load).
    pub current_area: u64,
    /// Kernel `next_free` after load: past every `new_chunk`, never on metadata.
    pub next_free: u64,
}

impl StoreSummary {
    /// `dmsetup status` usage of a loaded valid store:
    /// `<next_free × cs>/<device sectors> <(current_area + 2) × cs>`.
    pub fn usage(&self, cs: ChunkSize, dev_len: u64) -> crate::store::Usage {
        use crate::units::Sector;
        crate::store::Usage {
            allocated: Sector(self.next_free.saturating_mul(cs.sectors())),
            total: Sector::from_bytes(dev_len),
            metadata: Sector(
                self.current_area
                    .saturating_add(2)
                    .saturating_mul(cs.sectors()),
            ),
        }
    }
}

/// Folds records into a [`StoreSummary`] the way `read_exceptions` does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SummaryBuilder {
    cs: ChunkSize,
    exceptions: u64,
    next_free: u64,
}

impl SummaryBuilder {
    pub(crate) fn new(cs: ChunkSize) -> Self {
        SummaryBuilder {
            cs,
            exceptions: 0,
            // Kernel: next_free starts after the header and area 0.
            next_free: area_location(cs, 0).0 + 1,
        }
    }
    pub(crate) fn add(&mut self, e: &DiskException) {
        self.exceptions += 1;
        self.next_free = self.next_free.max(e.new_chunk.0.saturating_add(1));
    }
    pub(crate) fn finish(self) -> StoreSummary {
        let e = exceptions_per_area(self.cs);
        StoreSummary {
            exceptions: self.exceptions,
            areas_used: self.exceptions.div_ceil(e),
            current_area: self.exceptions / e,
            // Kernel skip_metadata, saturating: a hostile new_chunk near
            // u64::MAX must not overflow.
            next_free: if crate::format::is_metadata_chunk(self.cs, Chunk(self.next_free)) {
                self.next_free.saturating_add(1)
            } else {
                self.next_free
            },
        }
    }
}
