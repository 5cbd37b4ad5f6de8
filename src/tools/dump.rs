//! `dmsnap dump`: the header and every exception record in on-disk order.
//!
//! Output is streamed record by record (a COW can hold hundreds of millions
//! of records). An invalidated store (`valid = 0`) is dumped all the same:
//! the kernel would not read its records, but they are on disk.
//!
//! JSON shape (CLI.md), the listed keys first and exactly so; later keys are
//! extras that `restore` reads when present:
//! ```json
//! {"magic": "0x70416e53", "valid": true, "version": 1, "chunk_size": 8,
//!  "exceptions": [{"old_chunk": 0, "new_chunk": 2}, ...],
//!  "exceptions_per_area": 256, "areas_used": 1, "next_free_chunk": 4, "cow_size": 65536}
//! ```

use super::{
    walk_metadata, Event, RawHeaderFields, StoreSummary, SummaryBuilder, ToolError, WalkOpts,
};
use crate::format::exceptions_per_area;
use crate::io::BlockDev;
use crate::units::ChunkSize;
use std::io::Write;

/// Output form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DumpFormat {
    /// A header block, then `old_chunk new_chunk area` per record.
    #[default]
    Human,
    /// CLI.md's JSON document.
    Json,
}

/// Options of [`dump`].
pub struct DumpOptions<'a> {
    /// The COW device.
    pub dev: &'a dyn BlockDev,
    pub format: DumpFormat,
    /// Metadata areas read ahead in parallel (0: one at a time).
    pub readahead: usize,
}

impl<'a> DumpOptions<'a> {
    /// Options with the kernel's read-ahead depth.
    pub fn new(dev: &'a dyn BlockDev, format: DumpFormat) -> Self {
        DumpOptions {
            dev,
            format,
            readahead: crate::format::DM_PREFETCH_CHUNKS,
        }
    }
}

/// What was dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpReport {
    pub header: RawHeaderFields,
    pub chunk_size: ChunkSize,
    pub summary: StoreSummary,
    /// The walk ended without a terminator (area beyond the device end or
    /// unreadable): the records shown are those before that point, and the
    /// kernel would refuse the store. `check` says more.
    pub incomplete: Option<Incomplete>,
}

/// Why the record list ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// Area `area` lies beyond the end of the device.
    AreaBeyondEnd { area: u64 },
    /// Area `area` could not be read.
    AreaUnreadable { area: u64 },
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incomplete::AreaBeyondEnd { area } => write!(
                f,
                "the record list has no terminator: area {area} is beyond the end of the device"
            ),
            Incomplete::AreaUnreadable { area } => {
                write!(
                    f,
                    "the record list ends early: area {area} could not be read"
                )
            }
        }
    }
}

/// Dump the store on `opts.dev` to `out`. Errors writing `out` come back as
/// [`ToolError::Output`] (a closed pipe is [`ToolError::is_broken_pipe`]).
pub fn dump(opts: &DumpOptions<'_>, out: &mut dyn Write) -> Result<DumpReport, ToolError> {
    let dev = opts.dev;
    let header = RawHeaderFields::read(dev)?;
    let cs = header.validate()?;
    let walk = WalkOpts {
        readahead: opts.readahead,
        ..WalkOpts::default()
    };
    match opts.format {
        DumpFormat::Human => dump_human(dev, header, cs, walk, out),
        DumpFormat::Json => dump_json(dev, header, cs, walk, out),
    }
}

/// One pass that only counts (for the human header block, which comes
/// before the records).
fn summarise(
    dev: &dyn BlockDev,
    cs: ChunkSize,
    walk: WalkOpts<'_>,
) -> (StoreSummary, Option<Incomplete>) {
    let mut sb = SummaryBuilder::new(cs);
    let mut incomplete = None;
    walk_metadata(dev, cs, walk, &mut |ev| {
        match ev {
            Event::Record { exception, .. } => sb.add(&exception),
            Event::AreaBeyondEnd { area, .. } => {
                incomplete = Some(Incomplete::AreaBeyondEnd { area })
            }
            Event::AreaUnreadable { area, .. } => {
                incomplete = Some(Incomplete::AreaUnreadable { area })
            }
            Event::Terminator { .. } => {}
        }
        true
    });
    (sb.finish(), incomplete)
}

fn dump_human(
    dev: &dyn BlockDev,
    header: RawHeaderFields,
    cs: ChunkSize,
    walk: WalkOpts<'_>,
    out: &mut dyn Write,
) -> Result<DumpReport, ToolError> {
    let (summary, incomplete) = summarise(dev, cs, walk);
    let usage = summary.usage(cs, dev.len());
    let w = |out: &mut dyn Write, s: std::fmt::Arguments<'_>| -> Result<(), ToolError> {
        out.write_fmt(s).map_err(ToolError::Output)
    };
    w(out, format_args!("magic: {:#010x} (SnAp)\n", header.magic))?;
    w(
        out,
        format_args!(
            "valid: {} ({})\n",
            header.valid,
            if header.is_valid() {
                "valid"
            } else {
                "invalidated"
            }
        ),
    )?;
    w(out, format_args!("version: {}\n", header.version))?;
    w(
        out,
        format_args!(
            "chunk_size: {} sectors ({} bytes)\n",
            cs.sectors(),
            cs.bytes()
        ),
    )?;
    w(
        out,
        format_args!("exceptions_per_area: {}\n", exceptions_per_area(cs)),
    )?;
    w(out, format_args!("areas_used: {}\n", summary.areas_used))?;
    w(out, format_args!("exceptions: {}\n", summary.exceptions))?;
    w(
        out,
        format_args!("next_free_chunk: {}\n", summary.next_free),
    )?;
    w(out, format_args!("device_size: {} bytes\n", dev.len()))?;
    if header.is_valid() {
        w(out, format_args!("status: {usage}\n"))?;
    } else {
        w(out, format_args!("status: Invalid\n"))?;
    }
    if let Some(inc) = incomplete {
        w(out, format_args!("warning: {inc}\n"))?;
    }
    w(out, format_args!("# old_chunk new_chunk area\n"))?;
    let mut result = Ok(());
    walk_metadata(dev, cs, walk, &mut |ev| {
        if let Event::Record {
            area, exception, ..
        } = ev
        {
            if let Err(e) = writeln!(
                out,
                "{} {} {}",
                exception.old_chunk, exception.new_chunk, area
            ) {
                result = Err(ToolError::Output(e));
                return false;
            }
        }
        true
    });
    result?;
    out.flush().map_err(ToolError::Output)?;
    Ok(DumpReport {
        header,
        chunk_size: cs,
        summary,
        incomplete,
    })
}

fn dump_json(
    dev: &dyn BlockDev,
    header: RawHeaderFields,
    cs: ChunkSize,
    walk: WalkOpts<'_>,
    out: &mut dyn Write,
) -> Result<DumpReport, ToolError> {
    let o = |out: &mut dyn Write, s: std::fmt::Arguments<'_>| -> Result<(), ToolError> {
        out.write_fmt(s).map_err(ToolError::Output)
    };
    o(
        out,
        format_args!(
            "{{\"magic\": \"{:#010x}\", \"valid\": {}, \"version\": {}, \"chunk_size\": {},\n \"exceptions\": [",
            header.magic,
            header.is_valid(),
            header.version,
            header.chunk_size
        ),
    )?;
    let mut sb = SummaryBuilder::new(cs);
    let mut incomplete = None;
    let mut result = Ok(());
    let mut first = true;
    walk_metadata(dev, cs, walk, &mut |ev| {
        match ev {
            Event::Record { exception, .. } => {
                sb.add(&exception);
                let sep = if first { "\n  " } else { ",\n  " };
                first = false;
                if let Err(e) = write!(
                    out,
                    "{sep}{{\"old_chunk\": {}, \"new_chunk\": {}}}",
                    exception.old_chunk, exception.new_chunk
                ) {
                    result = Err(ToolError::Output(e));
                    return false;
                }
            }
            Event::AreaBeyondEnd { area, .. } => {
                incomplete = Some(Incomplete::AreaBeyondEnd { area })
            }
            Event::AreaUnreadable { area, .. } => {
                incomplete = Some(Incomplete::AreaUnreadable { area })
            }
            Event::Terminator { .. } => {}
        }
        true
    });
    result?;
    let summary = sb.finish();
    let close = if first { "]" } else { "\n ]" };
    o(
        out,
        format_args!(
            "{close},\n \"exceptions_per_area\": {}, \"areas_used\": {}, \"next_free_chunk\": {}, \"cow_size\": {}}}\n",
            exceptions_per_area(cs),
            summary.areas_used,
            summary.next_free,
            dev.len()
        ),
    )?;
    out.flush().map_err(ToolError::Output)?;
    Ok(DumpReport {
        header,
        chunk_size: cs,
        summary,
        incomplete,
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::{encode_area, DiskException, DiskHeader};
    use crate::io::{MemDev, WriteFlags};
    use crate::units::Chunk;

    fn store(records: &[(u64, u64)], valid: bool, chunks: u64) -> MemDev {
        let cs = ChunkSize::from_sectors(8).unwrap();
        let dev = MemDev::new(chunks * 4096);
        let h = DiskHeader {
            valid,
            chunk_size: cs,
        };
        dev.write_at(&h.encode_chunk(), 0, WriteFlags::NONE)
            .unwrap();
        let recs: Vec<_> = records
            .iter()
            .map(|&(o, n)| DiskException {
                old_chunk: Chunk(o),
                new_chunk: Chunk(n),
            })
            .collect();
        dev.write_at(&encode_area(&recs, 4096), 4096, WriteFlags::NONE)
            .unwrap();
        dev
    }

    #[test]
    fn json_shape_is_cli_md() {
        let dev = store(&[(0, 2), (2, 3)], true, 16);
        let mut out = Vec::new();
        let r = dump(&DumpOptions::new(&dev, DumpFormat::Json), &mut out).unwrap();
        assert_eq!(r.summary.exceptions, 2);
        assert_eq!(r.summary.next_free, 4);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with(
                "{\"magic\": \"0x70416e53\", \"valid\": true, \"version\": 1, \"chunk_size\": 8,"
            ),
            "{s}"
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        // serde_json's map is sorted unless preserve_order; check the text order instead.
        assert!(keys.contains(&"exceptions".to_string()));
        assert_eq!(
            v["exceptions"],
            serde_json::json!([{"old_chunk": 0, "new_chunk": 2}, {"old_chunk": 2, "new_chunk": 3}])
        );
        let pos = |k: &str| s.find(&format!("\"{k}\"")).unwrap();
        assert!(pos("magic") < pos("valid"));
        assert!(pos("valid") < pos("version"));
        assert!(pos("version") < pos("chunk_size"));
        assert!(pos("chunk_size") < pos("exceptions"));
        assert!(pos("exceptions") < pos("exceptions_per_area"));
    }

    #[test]
    fn empty_and_invalid_stores() {
        let dev = store(&[], false, 16);
        let mut out = Vec::new();
        dump(&DumpOptions::new(&dev, DumpFormat::Json), &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["valid"], false);
        assert_eq!(v["exceptions"], serde_json::json!([]));
        let mut out = Vec::new();
        dump(&DumpOptions::new(&dev, DumpFormat::Human), &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("status: Invalid\n"), "{s}");
    }

    #[test]
    fn full_area_without_room_for_terminator_is_incomplete() {
        // 256 records fill area 0; the device ends where area 1 would be.
        let recs: Vec<_> = (0..256).map(|i| (i, i + 2)).collect();
        let dev = store(&recs, true, 258);
        let mut out = Vec::new();
        let r = dump(&DumpOptions::new(&dev, DumpFormat::Human), &mut out).unwrap();
        assert_eq!(r.incomplete, Some(Incomplete::AreaBeyondEnd { area: 1 }));
        assert_eq!(r.summary.exceptions, 256);
    }
}
