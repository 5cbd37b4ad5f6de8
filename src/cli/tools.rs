//! `dump`, `check`, `restore`: the offline tools for any COW device.

use super::{CmdResult, Exit, Failure};
use dmsnap::io::{FileDev, OpenOptions};
use dmsnap::report::{Progress, ProgressMode, ProgressMonitor};
use dmsnap::tools::check::{check_with, CheckOptions};
use dmsnap::tools::dump::{dump as dump_cow, DumpFormat, DumpOptions};
use dmsnap::tools::restore::{read_dump, restore as restore_cow, RestoreOptions};
use dmsnap::tools::ToolError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `dmsnap dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The COW device or image file.
    pub cow: PathBuf,
    /// Print JSON (`{"magic", "valid", "version", "chunk_size", "exceptions": [...]}`),
    /// the input of `dmsnap restore`.
    #[arg(long)]
    pub json: bool,
    /// Read with O_DIRECT, bypassing the page cache (for the COW of a live
    /// kernel snapshot, whose metadata the page cache may hold stale).
    #[arg(long)]
    pub direct: bool,
    /// Metadata areas to read ahead in parallel (0: one at a time).
    #[arg(long, hide = true, default_value_t = dmsnap::format::DM_PREFETCH_CHUNKS)]
    pub readahead: usize,
}

/// Arguments of `dmsnap check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The COW device or image file.
    pub cow: PathBuf,
    /// Never draw a progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Read with O_DIRECT, bypassing the page cache (for the COW of a live
    /// kernel snapshot, whose metadata the page cache may hold stale).
    #[arg(long)]
    pub direct: bool,
    /// Metadata areas to read ahead in parallel (0: one at a time).
    #[arg(long, hide = true, default_value_t = dmsnap::format::DM_PREFETCH_CHUNKS)]
    pub readahead: usize,
}

/// Arguments of `dmsnap restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// A document written by `dmsnap dump --json`.
    pub dump: PathBuf,
    /// The COW to write (created, sparse, when missing; data chunks are left alone).
    pub cow: PathBuf,
}

/// Map a library error: corruption → 1, anything else → 2, closed stdout → quiet 0.
fn tool_failure(e: ToolError) -> Failure {
    if e.is_corruption() {
        Failure::corrupt(e)
    } else {
        Failure::failed(e)
    }
}

fn open_ro(path: &Path, direct: bool) -> Result<FileDev, Failure> {
    FileDev::open(
        path,
        OpenOptions {
            read_only: true,
            direct,
        },
    )
    .map_err(|source| {
        Failure::failed(ToolError::Open {
            path: path.to_path_buf(),
            source,
        })
    })
}

pub fn dump(a: DumpArgs) -> CmdResult {
    let dev = open_ro(&a.cow, a.direct)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let format = if a.json {
        DumpFormat::Json
    } else {
        DumpFormat::Human
    };
    let mut opts = DumpOptions::new(&dev, format);
    opts.readahead = a.readahead;
    match dump_cow(&opts, &mut out) {
        Ok(report) => {
            if let Some(inc) = report.incomplete {
                eprintln!(
                    "dmsnap: warning: {}: {inc}; run `dmsnap check` for details",
                    a.cow.display()
                );
            }
            Ok(Exit::Ok)
        }
        Err(e) if e.is_broken_pipe() => Ok(Exit::Ok),
        Err(e) => Err(tool_failure(e)),
    }
}

pub fn check(a: CheckArgs) -> CmdResult {
    let dev = open_ro(&a.cow, a.direct)?;
    let progress = Progress::new();
    let mode = if a.quiet {
        ProgressMode::Off
    } else {
        // Worth a bar from 1 GiB of device (the walk covers it twice).
        ProgressMode::Auto { min_total: 2 << 30 }
    };
    let monitor = ProgressMonitor::start("checking", Arc::clone(&progress), mode);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut opts = CheckOptions::new(&dev);
    opts.progress = Some(progress);
    opts.readahead = a.readahead;
    let r = check_with(&opts, &mut |f| {
        if monitor.is_drawing() {
            // Keep finding lines and the bar apart on the terminal.
            monitor
                .suspend(|| writeln!(out, "{f}").and_then(|()| out.flush()))
                .map_err(ToolError::Output)
        } else {
            writeln!(out, "{f}").map_err(ToolError::Output)
        }
    });
    monitor.finish();
    let report = match r {
        Ok(r) => r,
        Err(e) if e.is_broken_pipe() => return Ok(Exit::Ok),
        Err(e) => return Err(tool_failure(e)),
    };
    let summary = (|| -> std::io::Result<()> {
        let name = a.cow.display();
        if let (true, Some(cs)) = (report.header_ok, report.chunk_size_sectors) {
            writeln!(
                out,
                "{name}: chunk size {cs} sectors, {} exceptions in {} areas, status {}",
                report.exceptions,
                report.areas_used,
                report.dm_status.as_deref().unwrap_or("?")
            )?;
        }
        if report.is_consistent() {
            let what = if report.header_ok && !report.valid {
                "consistent (the snapshot is invalidated)"
            } else if !report.header_ok {
                "consistent (unformatted)"
            } else {
                "consistent"
            };
            writeln!(out, "{name}: {what}; {} note(s)", report.notes)?;
        } else {
            writeln!(
                out,
                "{name}: {} error(s), {} note(s): the store is corrupt",
                report.errors, report.notes
            )?;
        }
        out.flush()
    })();
    match summary {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(Failure::failed(ToolError::Output(e))),
        Ok(()) => {}
    }
    Ok(if report.is_consistent() {
        Exit::Ok
    } else {
        Exit::Corrupt
    })
}

pub fn restore(a: RestoreArgs) -> CmdResult {
    let doc = read_dump(&a.dump).map_err(tool_failure)?;
    let r = restore_cow(&RestoreOptions {
        doc: &doc,
        output: a.cow.clone(),
    })
    .map_err(tool_failure)?;
    println!(
        "{} {}: {} exceptions in {} area(s), device {} bytes",
        if r.created { "created" } else { "wrote" },
        a.cow.display(),
        r.exceptions,
        r.areas_written,
        r.device_bytes
    );
    Ok(Exit::Ok)
}
