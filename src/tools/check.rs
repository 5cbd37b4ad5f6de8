//! `dmsnap check`: walk a whole COW store and report **every** problem with
//! its location, keeping going wherever the layout still makes sense.
//!
//! What is checked (kernel rules in `dm-snap-persistent.c`):
//! - header: magic, version, chunk size (fatal: nothing else can be read);
//!   `valid = 0` is reported as a note (an invalidated store is consistent);
//! - the device holds the header and area 0 (fatal otherwise);
//! - every area the list reaches lies inside the device and can be read; a
//!   full area must be followed by an area holding the terminator;
//! - each record: `new_chunk` not on the header or a metadata area, not
//!   beyond the end of the device;
//! - no `old_chunk` twice (the kernel keeps one of them, depending on hash
//!   order), no `new_chunk` twice (two origin chunks would share storage);
//! - notes: non-zero slots after the terminator (the kernel ignores them), a
//!   device size that is not a whole number of chunks.
//!
//! Memory: duplicate detection sorts one `Vec<(u64, u64)>` of (chunk,
//! record index), 16 bytes per record, reused for `old_chunk` then
//! `new_chunk` (the metadata is walked twice). Its length is bounded by the
//! device size / 16 (the records must fit in areas inside the device), and
//! the allocation is fallible.

use super::{walk_metadata, Event, RawHeaderFields, SummaryBuilder, ToolError, WalkEnd, WalkOpts};
use crate::format::{
    area_location, exceptions_per_area, is_metadata_chunk, DM_PREFETCH_CHUNKS,
    SNAPSHOT_DISK_VERSION, SNAP_MAGIC,
};
use crate::io::BlockDev;
use crate::report::Progress;
use crate::units::ChunkSize;
use std::fmt;
use std::sync::Arc;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; the kernel would load the store the same way.
    Note,
    /// Corruption: the kernel would refuse the store or misread data.
    Error,
}

/// What is wrong. Locations (area, slot, chunk) live in [`Finding`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FindingKind {
    /// The device cannot even hold the 16-byte header.
    TooShortForHeader {
        len: u64,
    },
    /// Magic 0: an unformatted store (the kernel formats it on activation).
    Unformatted,
    BadMagic {
        magic: u32,
    },
    BadVersion {
        version: u32,
    },
    BadChunkSize {
        sectors: u32,
    },
    /// `valid = 0`: the kernel loads it as `Invalid` and ignores the records.
    Invalidated,
    /// The device ends before area 0 ends.
    TooShortForArea0 {
        len: u64,
        needed: u64,
    },
    /// The device size is not a whole number of chunks (the tail is unused).
    PartialTailChunk {
        tail_bytes: u64,
    },
    /// A full area is followed by no area inside the device: no terminator.
    MissingTerminator {
        previous_full_area: u64,
    },
    /// Reading an area failed (the kernel: "Failed to read snapshot metadata").
    AreaUnreadable {
        error: String,
    },
    /// `new_chunk` is a metadata area.
    NewChunkOnMetadata,
    /// `new_chunk` is at or beyond the end of the device.
    NewChunkBeyondEnd {
        device_chunks: u64,
    },
    /// `old_chunk` was already mapped by an earlier record.
    DuplicateOldChunk {
        first_area: u64,
        first_slot: u64,
    },
    /// `new_chunk` was already used by an earlier record.
    DuplicateNewChunk {
        first_area: u64,
        first_slot: u64,
    },
    /// Non-zero slots after the terminator inside the terminating area.
    StaleAfterTerminator {
        nonzero_slots: u64,
    },
}

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Metadata area index, when the problem is inside one.
    pub area: Option<u64>,
    /// Record slot inside `area`.
    pub slot: Option<u64>,
    /// The chunk concerned (the record's `old_chunk` or `new_chunk`, or an area's chunk).
    pub chunk: Option<u64>,
    pub kind: FindingKind,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.area, self.slot) {
            (Some(a), Some(s)) => write!(f, "area {a} slot {s}: ")?,
            (Some(a), None) => write!(f, "area {a}: ")?,
            _ => write!(f, "header: ")?,
        }
        let c = self.chunk.unwrap_or(0);
        match &self.kind {
            FindingKind::TooShortForHeader { len } => {
                write!(f, "the device is {len} bytes, too short for a header")
            }
            FindingKind::Unformatted => write!(
                f,
                "magic is 0: an unformatted store (the kernel would format it, discarding area 0)"
            ),
            FindingKind::BadMagic { magic } => write!(
                f,
                "bad magic {magic:#010x}, expected {SNAP_MAGIC:#010x} (\"SnAp\"): not a snapshot COW"
            ),
            FindingKind::BadVersion { version } => write!(
                f,
                "unsupported disk version {version}, expected {SNAPSHOT_DISK_VERSION}"
            ),
            FindingKind::BadChunkSize { sectors } => write!(
                f,
                "invalid chunk size of {sectors} sectors (must be a power of two, at most {} sectors)",
                ChunkSize::MAX_SECTORS
            ),
            FindingKind::Invalidated => write!(
                f,
                "the snapshot is invalidated (valid = 0): the kernel loads it as Invalid and ignores its records"
            ),
            FindingKind::TooShortForArea0 { len, needed } => write!(
                f,
                "the device is {len} bytes, shorter than the header and area 0 ({needed} bytes)"
            ),
            FindingKind::PartialTailChunk { tail_bytes } => write!(
                f,
                "the device size is not a whole number of chunks: the last {tail_bytes} bytes are never used"
            ),
            FindingKind::MissingTerminator { previous_full_area } => write!(
                f,
                "no terminator: area {previous_full_area} is full and this area (chunk {c}) is beyond the end of the device (truncated?); the kernel would fail to load the store"
            ),
            FindingKind::AreaUnreadable { error } => write!(
                f,
                "cannot read the area at chunk {c} ({error}); the record list ends here"
            ),
            FindingKind::NewChunkOnMetadata => {
                write!(f, "new_chunk {c} points at a metadata area")
            }
            FindingKind::NewChunkBeyondEnd { device_chunks } => write!(
                f,
                "new_chunk {c} is beyond the end of the device ({device_chunks} chunks)"
            ),
            FindingKind::DuplicateOldChunk {
                first_area,
                first_slot,
            } => write!(
                f,
                "old_chunk {c} is already mapped by area {first_area} slot {first_slot}"
            ),
            FindingKind::DuplicateNewChunk {
                first_area,
                first_slot,
            } => write!(
                f,
                "new_chunk {c} is already used by area {first_area} slot {first_slot}"
            ),
            FindingKind::StaleAfterTerminator { nonzero_slots } => write!(
                f,
                "{nonzero_slots} non-zero slot(s) after the terminator at slot {} (ignored by the kernel)",
                self.slot.unwrap_or(0)
            ),
        }
    }
}

/// Options of [`check`].
pub struct CheckOptions<'a> {
    /// The COW device.
    pub dev: &'a dyn BlockDev,
    /// Progress in bytes of the device walked (the walk runs twice, so the
    /// total is twice the device size).
    pub progress: Option<Arc<Progress>>,
    /// Keep at most this many findings in [`CheckReport::findings`] (all are
    /// counted and all go to the sink of [`check_with`]).
    pub max_kept_findings: usize,
    /// Metadata areas read ahead in parallel (the kernel prefetches
    /// [`DM_PREFETCH_CHUNKS`]); 0 reads one area at a time.
    pub readahead: usize,
}

impl<'a> CheckOptions<'a> {
    pub fn new(dev: &'a dyn BlockDev) -> Self {
        CheckOptions {
            dev,
            progress: None,
            max_kept_findings: 10_000,
            readahead: DM_PREFETCH_CHUNKS,
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The first `max_kept_findings` findings, in the order found.
    pub findings: Vec<Finding>,
    pub errors: u64,
    pub notes: u64,
    /// The header could be read and validated (chunk size known).
    pub header_ok: bool,
    /// `valid` field of the header was non-zero.
    pub valid: bool,
    pub chunk_size_sectors: Option<u64>,
    /// Records before the terminator (or before the walk had to stop).
    pub exceptions: u64,
    pub areas_used: u64,
    pub next_free_chunk: u64,
    /// The dmsetup-style status the kernel would print (`Invalid` or usage).
    pub dm_status: Option<String>,
}

impl CheckReport {
    /// No corruption found (notes allowed; an invalidated store is consistent).
    pub fn is_consistent(&self) -> bool {
        self.errors == 0
    }
}

/// Check without a live sink: findings are collected in the report.
pub fn check(opts: &CheckOptions<'_>) -> Result<CheckReport, ToolError> {
    check_with(opts, &mut |_| Ok(()))
}

/// Check, handing every finding to `sink` as it is found (the CLI prints
/// them). A sink error stops the check and is returned.
pub fn check_with(
    opts: &CheckOptions<'_>,
    sink: &mut dyn FnMut(&Finding) -> Result<(), ToolError>,
) -> Result<CheckReport, ToolError> {
    let mut c = Checker {
        report: CheckReport::default(),
        max_kept: opts.max_kept_findings,
        sink,
    };
    c.run(opts)?;
    Ok(c.report)
}

struct Checker<'s> {
    report: CheckReport,
    max_kept: usize,
    sink: &'s mut dyn FnMut(&Finding) -> Result<(), ToolError>,
}

impl Checker<'_> {
    fn emit(&mut self, f: Finding) -> Result<(), ToolError> {
        match f.severity {
            Severity::Error => self.report.errors += 1,
            Severity::Note => self.report.notes += 1,
        }
        (self.sink)(&f)?;
        if self.report.findings.len() < self.max_kept {
            self.report.findings.push(f);
        }
        Ok(())
    }

    fn header_finding(&mut self, kind: FindingKind) -> Result<(), ToolError> {
        let severity = match kind {
            FindingKind::Invalidated | FindingKind::Unformatted => Severity::Note,
            FindingKind::PartialTailChunk { .. } => Severity::Note,
            _ => Severity::Error,
        };
        self.emit(Finding {
            severity,
            area: None,
            slot: None,
            chunk: None,
            kind,
        })
    }

    fn run(&mut self, opts: &CheckOptions<'_>) -> Result<(), ToolError> {
        let dev = opts.dev;
        let len = dev.len();
        if len < 16 {
            return self.header_finding(FindingKind::TooShortForHeader { len });
        }
        // An I/O error on the header is "could not run", not a finding.
        let h = RawHeaderFields::read(dev)?;
        if h.magic == 0 {
            self.report.dm_status = Some("unformatted".into());
            return self.header_finding(FindingKind::Unformatted);
        }
        if h.magic != SNAP_MAGIC {
            return self.header_finding(FindingKind::BadMagic { magic: h.magic });
        }
        if h.version != SNAPSHOT_DISK_VERSION {
            self.header_finding(FindingKind::BadVersion { version: h.version })?;
        }
        let cs = match ChunkSize::from_sectors(u64::from(h.chunk_size)) {
            Ok(cs) => cs,
            Err(_) => {
                return self.header_finding(FindingKind::BadChunkSize {
                    sectors: h.chunk_size,
                })
            }
        };
        if h.version != SNAPSHOT_DISK_VERSION {
            // The layout of another version is unknown: stop here.
            return Ok(());
        }
        self.report.header_ok = true;
        self.report.valid = h.is_valid();
        self.report.chunk_size_sectors = Some(cs.sectors());
        if !h.is_valid() {
            self.header_finding(FindingKind::Invalidated)?;
        }
        let needed = cs.bytes().saturating_mul(2);
        if len < needed {
            return self.header_finding(FindingKind::TooShortForArea0 { len, needed });
        }
        let tail = cs.offset_in_chunk(len);
        if tail != 0 {
            self.header_finding(FindingKind::PartialTailChunk { tail_bytes: tail })?;
        }
        // In an invalidated store the kernel reads no record: problems there
        // are worth showing but are not corruption.
        let record_severity = if h.is_valid() {
            Severity::Error
        } else {
            Severity::Note
        };
        if let Some(p) = &opts.progress {
            p.set_total(len.saturating_mul(2));
        }

        // Pass 1: structure, per-record checks, old_chunk index.
        let dev_chunks = cs.whole_chunks(len);
        let e = exceptions_per_area(cs);
        let bound = (len / 16) as usize;
        let mut index: Vec<(u64, u64)> = Vec::new();
        let mut sb = SummaryBuilder::new(cs);
        let mut result: Result<(), ToolError> = Ok(());
        let mut records: u64 = 0;
        let progress = opts.progress.as_deref();
        let walk = WalkOpts {
            scan_tail: true,
            progress,
            readahead: opts.readahead,
        };
        let end = walk_metadata(dev, cs, walk, &mut |ev| {
            match self.pass1_event(ev, cs, dev_chunks, record_severity, &mut sb) {
                Ok(Some((old, idx))) => {
                    records += 1;
                    if index.len() >= bound {
                        // Cannot happen: records live in areas inside the device.
                        return true;
                    }
                    if index.try_reserve(1).is_err() {
                        result = Err(ToolError::OutOfMemory(records));
                        return false;
                    }
                    index.push((old, idx));
                    true
                }
                Ok(None) => true,
                Err(err) => {
                    result = Err(err);
                    false
                }
            }
        });
        result?;
        if let WalkEnd::Stopped = end {
            return Ok(());
        }
        let summary = sb.finish();
        self.report.exceptions = summary.exceptions;
        self.report.areas_used = summary.areas_used;
        self.report.next_free_chunk = summary.next_free;
        self.report.dm_status = Some(if h.is_valid() {
            summary.usage(cs, len).to_string()
        } else {
            "Invalid".into()
        });

        // Duplicate old_chunk.
        self.report_duplicates(&mut index, e, record_severity, |first_area, first_slot| {
            FindingKind::DuplicateOldChunk {
                first_area,
                first_slot,
            }
        })?;

        // Pass 2: new_chunk index, same Vec (capacity already there).
        index.clear();
        let mut idx = 0u64;
        let base = len;
        let p2 = opts.progress.clone();
        let walk = WalkOpts {
            scan_tail: false,
            progress: None,
            readahead: opts.readahead,
        };
        walk_metadata(dev, cs, walk, &mut |ev| {
            if let Event::Record { exception, .. } = ev {
                if index.len() < index.capacity() {
                    index.push((exception.new_chunk.0, idx));
                }
                idx += 1;
                if let Some(p) = &p2 {
                    if idx % e == 0 {
                        let next_area = area_location(cs, idx / e);
                        p.set_done(base.saturating_add(cs.chunk_to_byte(next_area)));
                    }
                }
            }
            true
        });
        self.report_duplicates(&mut index, e, record_severity, |first_area, first_slot| {
            FindingKind::DuplicateNewChunk {
                first_area,
                first_slot,
            }
        })?;
        if let Some(p) = &opts.progress {
            p.set_done(p.total());
        }
        Ok(())
    }

    /// Handle one walk event of pass 1. Returns the (old_chunk, index) to
    /// remember for a record.
    fn pass1_event(
        &mut self,
        ev: Event<'_>,
        cs: ChunkSize,
        dev_chunks: u64,
        record_severity: Severity,
        sb: &mut SummaryBuilder,
    ) -> Result<Option<(u64, u64)>, ToolError> {
        let e = exceptions_per_area(cs);
        match ev {
            Event::Record {
                area,
                slot,
                exception,
            } => {
                sb.add(&exception);
                let new = exception.new_chunk;
                if is_metadata_chunk(cs, new) {
                    self.emit(Finding {
                        severity: record_severity,
                        area: Some(area),
                        slot: Some(slot),
                        chunk: Some(new.0),
                        kind: FindingKind::NewChunkOnMetadata,
                    })?;
                } else if new.0 >= dev_chunks {
                    self.emit(Finding {
                        severity: record_severity,
                        area: Some(area),
                        slot: Some(slot),
                        chunk: Some(new.0),
                        kind: FindingKind::NewChunkBeyondEnd {
                            device_chunks: dev_chunks,
                        },
                    })?;
                }
                Ok(Some((exception.old_chunk.0, area * e + slot)))
            }
            Event::Terminator {
                area,
                slot,
                nonzero_tail,
            } => {
                if nonzero_tail > 0 {
                    self.emit(Finding {
                        severity: Severity::Note,
                        area: Some(area),
                        slot: Some(slot),
                        chunk: None,
                        kind: FindingKind::StaleAfterTerminator {
                            nonzero_slots: nonzero_tail,
                        },
                    })?;
                }
                Ok(None)
            }
            Event::AreaBeyondEnd { area, chunk } => {
                self.emit(Finding {
                    severity: record_severity,
                    area: Some(area),
                    slot: None,
                    chunk: Some(chunk.0),
                    kind: FindingKind::MissingTerminator {
                        previous_full_area: area.saturating_sub(1),
                    },
                })?;
                Ok(None)
            }
            Event::AreaUnreadable { area, chunk, error } => {
                self.emit(Finding {
                    severity: record_severity,
                    area: Some(area),
                    slot: None,
                    chunk: Some(chunk.0),
                    kind: FindingKind::AreaUnreadable {
                        error: error.to_string(),
                    },
                })?;
                Ok(None)
            }
        }
    }

    /// Sort (chunk, index) pairs and report every record that repeats the
    /// chunk of an earlier one (earlier = lower on-disk index). Findings come
    /// grouped by chunk; no memory beyond the index itself.
    fn report_duplicates(
        &mut self,
        index: &mut [(u64, u64)],
        e: u64,
        severity: Severity,
        kind: impl Fn(u64, u64) -> FindingKind,
    ) -> Result<(), ToolError> {
        index.sort_unstable();
        let mut prev: Option<(u64, u64)> = None;
        for &(chunk, idx) in index.iter() {
            match prev {
                Some((c, first)) if c == chunk => {
                    self.emit(Finding {
                        severity,
                        area: Some(idx / e),
                        slot: Some(idx % e),
                        chunk: Some(chunk),
                        kind: kind(first / e, first % e),
                    })?;
                }
                _ => prev = Some((chunk, idx)),
            }
        }
        Ok(())
    }
}
