//! `dmsnap restore`: write a COW's metadata from a `dump --json` document.
//!
//! Writes the header (with `valid` as in the dump) and the areas in order;
//! the record list is always followed by a zeroed terminator (a partial last
//! area is zero-padded; a full last area gets a zeroed next area). Data
//! chunks are not touched. The records are checked first, and an
//! inconsistent dump is refused before anything is written.
//!
//! Sizing: a missing file is created sparse, as large as the dump's
//! `cow_size` (when present) and at least header + areas + up to the
//! highest `new_chunk`. An existing regular file smaller than that is
//! extended; an existing block device must already be large enough.

use super::{area_location_checked, ToolError};
use crate::format::{
    area_location, encode_area, exceptions_per_area, is_metadata_chunk, DiskException, DiskHeader,
    SNAPSHOT_DISK_VERSION, SNAP_MAGIC,
};
use crate::io::{BlockDev, FileDev, OpenOptions, WriteFlags};
use crate::units::{Chunk, ChunkSize};
use std::path::{Path, PathBuf};

/// A `dump --json` document (extra keys are ignored).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct DumpDoc {
    pub magic: String,
    pub valid: bool,
    pub version: u32,
    /// In 512-byte sectors, as on disk.
    pub chunk_size: u32,
    pub exceptions: Vec<DumpRecord>,
    /// Size of the dumped device in bytes (a dmsnap extra).
    #[serde(default)]
    pub cow_size: Option<u64>,
}

/// One record of a [`DumpDoc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct DumpRecord {
    pub old_chunk: u64,
    pub new_chunk: u64,
}

impl DumpDoc {
    /// Parse a document.
    pub fn parse(text: &[u8]) -> Result<Self, ToolError> {
        serde_json::from_slice(text).map_err(ToolError::ParseDump)
    }

    /// Check the document and work out the geometry it needs.
    pub fn plan(&self) -> Result<Plan, ToolError> {
        let bad = |s: String| Err(ToolError::BadDump(s));
        let magic = self.magic.trim_start_matches("0x").trim_start_matches("0X");
        if u32::from_str_radix(magic, 16).ok() != Some(SNAP_MAGIC) {
            return bad(format!(
                "magic is \"{}\", expected \"{SNAP_MAGIC:#010x}\"",
                self.magic
            ));
        }
        if self.version != SNAPSHOT_DISK_VERSION {
            return bad(format!(
                "version {} is not {SNAPSHOT_DISK_VERSION}",
                self.version
            ));
        }
        let cs = match ChunkSize::from_sectors(u64::from(self.chunk_size)) {
            Ok(cs) => cs,
            Err(e) => return bad(format!("chunk_size: {e}")),
        };
        let e = exceptions_per_area(cs);
        let n = self.exceptions.len() as u64;
        let mut max_new = 0u64;
        for (i, r) in self.exceptions.iter().enumerate() {
            let at = || format!("record {i} (area {} slot {})", i as u64 / e, i as u64 % e);
            if r.new_chunk == 0 {
                return bad(format!(
                    "{}: new_chunk is 0 (that is the terminator; the list would end there)",
                    at()
                ));
            }
            if is_metadata_chunk(cs, Chunk(r.new_chunk)) {
                return bad(format!(
                    "{}: new_chunk {} is a metadata area",
                    at(),
                    r.new_chunk
                ));
            }
            max_new = max_new.max(r.new_chunk);
        }
        for (what, key) in [
            (
                "old_chunk",
                (|r: &DumpRecord| r.old_chunk) as fn(&DumpRecord) -> u64,
            ),
            ("new_chunk", |r: &DumpRecord| r.new_chunk),
        ] {
            let mut keys: Vec<(u64, usize)> = self
                .exceptions
                .iter()
                .enumerate()
                .map(|(i, r)| (key(r), i))
                .collect();
            keys.sort_unstable();
            let dup = keys.windows(2).find_map(|w| match w {
                [a, b] if a.0 == b.0 => Some((a.0, a.1, b.1)),
                _ => None,
            });
            if let Some((chunk, first, second)) = dup {
                return bad(format!(
                    "{what} {chunk} appears in records {first} and {second}"
                ));
            }
        }
        // The area holding the terminator (zeroed, or zero-padded).
        let last_area = n / e;
        let too_big =
            || ToolError::BadDump("the records need a device larger than 2^64 bytes".into());
        let meta_end = area_location_checked(cs, last_area).ok_or_else(too_big)? + 1;
        let chunks = meta_end.max(max_new.checked_add(1).ok_or_else(too_big)?);
        let needed = chunks.checked_mul(cs.bytes()).ok_or_else(too_big)?;
        Ok(Plan {
            chunk_size: cs,
            valid: self.valid,
            needed_bytes: needed,
            preferred_bytes: self.cow_size.unwrap_or(0).max(needed),
        })
    }

    /// Records as format types.
    pub fn disk_exceptions(&self) -> impl Iterator<Item = DiskException> + '_ {
        self.exceptions.iter().map(|r| DiskException {
            old_chunk: Chunk(r.old_chunk),
            new_chunk: Chunk(r.new_chunk),
        })
    }
}

/// What [`DumpDoc::plan`] worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub chunk_size: ChunkSize,
    pub valid: bool,
    /// Smallest device that holds the metadata and every `new_chunk`.
    pub needed_bytes: u64,
    /// Size for a new file: the dumped device's size when known, at least `needed_bytes`.
    pub preferred_bytes: u64,
}

/// Options of [`restore`].
pub struct RestoreOptions<'a> {
    /// The document, already parsed.
    pub doc: &'a DumpDoc,
    /// The COW to write; created when missing.
    pub output: PathBuf,
}

/// What [`restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub exceptions: u64,
    /// Areas written, the terminating one included.
    pub areas_written: u64,
    pub device_bytes: u64,
    pub created: bool,
}

/// Read and parse a dump file.
pub fn read_dump(path: &Path) -> Result<DumpDoc, ToolError> {
    let text = std::fs::read(path).map_err(|source| ToolError::ReadDump {
        path: path.to_path_buf(),
        source,
    })?;
    DumpDoc::parse(&text)
}

/// Write the COW at `opts.output` from `opts.doc`.
pub fn restore(opts: &RestoreOptions<'_>) -> Result<RestoreReport, ToolError> {
    let plan = opts.doc.plan()?;
    let path = &opts.output;
    let (dev, created) = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dev = FileDev::create_sparse(path, plan.preferred_bytes, OpenOptions::default())
                .map_err(|source| ToolError::Create {
                    path: path.clone(),
                    source,
                })?;
            (dev, true)
        }
        Err(source) => {
            return Err(ToolError::Open {
                path: path.clone(),
                source,
            })
        }
        Ok(meta) => {
            if meta.is_file() && meta.len() < plan.needed_bytes {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(plan.needed_bytes))
                    .map_err(|source| ToolError::Open {
                        path: path.clone(),
                        source,
                    });
                f?;
            }
            let dev =
                FileDev::open(path, OpenOptions::default()).map_err(|source| ToolError::Open {
                    path: path.clone(),
                    source,
                })?;
            (dev, false)
        }
    };
    if dev.len() < plan.needed_bytes {
        return Err(ToolError::DoesNotFit {
            path: path.clone(),
            needed: plan.needed_bytes,
            have: dev.len(),
        });
    }
    let report = write_metadata(&dev, opts.doc, &plan)?;
    Ok(RestoreReport { created, ..report })
}

/// Write header and areas of `doc` to `dev` (already large enough), then flush.
pub fn write_metadata(
    dev: &dyn BlockDev,
    doc: &DumpDoc,
    plan: &Plan,
) -> Result<RestoreReport, ToolError> {
    let cs = plan.chunk_size;
    if dev.len() < plan.needed_bytes {
        return Err(ToolError::DoesNotFit {
            path: PathBuf::from("(device)"),
            needed: plan.needed_bytes,
            have: dev.len(),
        });
    }
    let e = exceptions_per_area(cs) as usize;
    let recs: Vec<DiskException> = doc.disk_exceptions().collect();
    let mut areas = 0u64;
    // Areas first, header last: a crash part-way leaves no valid-looking
    // header in front of half-written areas (unless one was there before).
    let mut chunks = recs.chunks(e);
    loop {
        let batch = chunks.next().unwrap_or(&[]);
        let buf = encode_area(batch, cs.bytes() as usize);
        let at = cs.chunk_to_byte(area_location(cs, areas));
        dev.write_at(&buf, at, WriteFlags::NONE)
            .map_err(|source| ToolError::Write {
                what: format!("metadata area {areas}"),
                source,
            })?;
        areas += 1;
        if batch.len() < e {
            break; // this area held the terminator
        }
    }
    dev.flush().map_err(|source| ToolError::Write {
        what: "(flush of) the metadata areas".into(),
        source,
    })?;
    let header = DiskHeader {
        valid: plan.valid,
        chunk_size: cs,
    };
    dev.write_at(&header.encode_chunk(), 0, WriteFlags::FUA)
        .map_err(|source| ToolError::Write {
            what: "the header".into(),
            source,
        })?;
    dev.flush().map_err(|source| ToolError::Write {
        what: "(flush of) the header".into(),
        source,
    })?;
    Ok(RestoreReport {
        exceptions: recs.len() as u64,
        areas_written: areas,
        device_bytes: dev.len(),
        created: false,
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn doc(recs: &[(u64, u64)]) -> DumpDoc {
        DumpDoc {
            magic: "0x70416e53".into(),
            valid: true,
            version: 1,
            chunk_size: 8,
            exceptions: recs
                .iter()
                .map(|&(o, n)| DumpRecord {
                    old_chunk: o,
                    new_chunk: n,
                })
                .collect(),
            cow_size: None,
        }
    }

    #[test]
    fn refuses_inconsistent_dumps() {
        let msg = |d: DumpDoc| d.plan().unwrap_err().to_string();
        assert!(msg(doc(&[(1, 0)])).contains("new_chunk is 0"));
        assert!(msg(doc(&[(1, 258)])).contains("metadata area"));
        assert!(msg(doc(&[(1, 2), (1, 3)])).contains("old_chunk 1 appears"));
        assert!(msg(doc(&[(1, 2), (2, 2)])).contains("new_chunk 2 appears"));
        assert!(msg(doc(&[(1, u64::MAX)])).contains("larger than 2^64"));
        let mut d = doc(&[]);
        d.chunk_size = 12;
        assert!(msg(d).contains("chunk_size"));
        let mut d = doc(&[]);
        d.magic = "0x1234".into();
        assert!(msg(d).contains("magic"));
    }

    #[test]
    fn plan_sizes_include_terminator_area() {
        // 256 records fill area 0: area 1 (chunk 258) must exist as terminator.
        let recs: Vec<_> = (0..256).map(|i| (i, i + 2)).collect();
        let p = doc(&recs).plan().unwrap();
        assert_eq!(p.needed_bytes, 259 * 4096);
        let p = doc(&recs[..255]).plan().unwrap();
        assert_eq!(p.needed_bytes, 257 * 4096);
        let p = doc(&[]).plan().unwrap();
        assert_eq!(p.needed_bytes, 2 * 4096);
    }

    #[test]
    fn write_then_read_back() {
        let recs: Vec<_> = (0..300)
            .map(|i| (i * 3, if i < 256 { i + 2 } else { i + 3 }))
            .collect();
        let d = doc(&recs);
        let p = d.plan().unwrap();
        let dev = crate::io::MemDev::new(p.needed_bytes);
        let r = write_metadata(&dev, &d, &p).unwrap();
        assert_eq!(r.areas_written, 2);
        let mut out = Vec::new();
        crate::tools::dump::dump(
            &crate::tools::dump::DumpOptions::new(&dev, crate::tools::dump::DumpFormat::Json),
            &mut out,
        )
        .unwrap();
        let back = DumpDoc::parse(&out).unwrap();
        assert_eq!(back.exceptions, d.exceptions);
    }
}
