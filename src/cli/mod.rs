//! Command-line front end (clap derive; the doc comments are the help text).
//!
//! One file per command family under `src/cli/`; [`Command`] has one variant
//! per subcommand and [`Command::run`] dispatches. This is the only place that
//! knows about exit codes:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success (for `check`: the store is consistent) |
//! | 1 | the input is corrupt, foreign or inconsistent (`check` found problems) |
//! | 2 | could not run: usage error, missing file, I/O error |
//!
//! Errors print to stderr as one line, `dmsnap: ` then the error and its
//! cause chain (`{:#}`). Data goes to stdout; a closed stdout pipe
//! (`dmsnap dump COW | head`) ends the command quietly with exit 0.

mod bench;
mod pool;
mod tools;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Linux device-mapper snapshots (dm-snapshot) in userspace: an origin,
/// copy-on-write snapshots in the kernel's persistent COW format, merge, and
/// NBD/FUSE exports.
#[derive(Debug, Parser)]
#[command(name = "dmsnap", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a pool: a directory with its manifest POOL/pool.json and an origin.
    Create(pool::CreateArgs),
    /// Create, list and remove snapshots of the pool's origin.
    #[command(subcommand)]
    Snapshot(pool::SnapshotCmd),
    /// Show the origin and each snapshot's usage, as `dmsetup status` prints it.
    Status(pool::StatusArgs),
    /// Serve the pool's devices over NBD (and FUSE) until SIGINT/SIGTERM.
    Serve(pool::ServeArgs),
    /// Roll the origin back to a snapshot (the kernel's snapshot-merge).
    Merge(pool::MergeArgs),
    /// Changed-block tracking: the byte ranges where TO (default: the origin)
    /// may differ from snapshot FROM — what an incremental backup reads.
    ///
    /// One `OFFSET LENGTH` line per extent, then a total; `--json` prints
    /// {"from", "to", "chunk_size", "extents": [{"offset", "length"}]}. Works
    /// online (through the daemon) and offline (from the COWs).
    Diff(pool::DiffArgs),
    /// Print a COW device's header and every exception record in on-disk order.
    Dump(tools::DumpArgs),
    /// Check a COW device and report every problem with its location.
    ///
    /// Exit status: 0 consistent (an invalidated snapshot is consistent), 1
    /// corruption found, 2 could not run.
    Check(tools::CheckArgs),
    /// Write a COW device's metadata from a `dump --json` document.
    Restore(tools::RestoreArgs),
    /// Library benchmarks for bench/bench.py (JSON on stdout).
    #[command(subcommand, hide = true)]
    Bench(bench::BenchCmd),
}

/// Exit statuses (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Corrupt = 1,
    Failed = 2,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// A command failure: the error to print and the exit status to use.
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            exit: Exit::Failed,
            error: error.into(),
        }
    }
    pub fn corrupt(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            exit: Exit::Corrupt,
            error: error.into(),
        }
    }
}

/// What a command returns: an exit status on success (`check` may report
/// corruption without an error), or a failure.
pub type CmdResult = Result<Exit, Failure>;

impl Command {
    pub fn run(self) -> CmdResult {
        let failed = |r: anyhow::Result<()>| r.map(|()| Exit::Ok).map_err(Failure::failed);
        match self {
            Command::Create(a) => failed(pool::create(a)),
            Command::Snapshot(c) => failed(pool::snapshot(c)),
            Command::Status(a) => failed(pool::status(a)),
            Command::Serve(a) => failed(pool::serve(a)),
            Command::Merge(a) => failed(pool::merge(a)),
            Command::Diff(a) => failed(pool::diff(a)),
            Command::Dump(a) => tools::dump(a),
            Command::Check(a) => tools::check(a),
            Command::Restore(a) => tools::restore(a),
            Command::Bench(c) => failed(bench::bench(c)),
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parse the command line, run, print any error, and return the exit code.
pub fn main() -> ExitCode {
    // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
    let cli = Cli::parse();
    init_tracing();
    match cli.command.run() {
        Ok(exit) => exit.into(),
        Err(f) => {
            eprintln!("dmsnap: {:#}", f.error);
            f.exit.into()
        }
    }
}
