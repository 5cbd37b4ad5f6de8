//! Pool commands: `create`, `snapshot create|list|remove`, `status`, `serve`,
//! `merge`. Each talks to a running daemon over the control socket when there
//! is one, and works on the pool directly otherwise.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dmsnap::device::ExportSet;
use dmsnap::export::nbd::{Listen, NbdServer, ServerOptions};
use dmsnap::pool::control::{ControlClient, ControlServer, Request};
use dmsnap::pool::{
    self, ActivateOptions, ActivePool, CowSpec, MergeProgress, OriginSpec, Pool, PoolStatus,
    SnapshotEntry, SnapshotRequest,
};
use dmsnap::store::StoreType;
use dmsnap::units::{human_bytes, parse_size, ChunkSize};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A SIZE argument: no file can be larger than 2^63 - 1 bytes (`off_t`).
fn size_arg(s: &str) -> Result<u64, String> {
    let b = parse_size(s)?;
    if b > i64::MAX as u64 {
        return Err(format!(
            "'{s}' is {b} bytes, larger than any file or device can be (at most 2^63 - 1 bytes)"
        ));
    }
    Ok(b)
}

fn chunk_arg(s: &str) -> Result<ChunkSize, String> {
    pool::check_chunk_size(parse_size(s)?).map_err(|e| pool::error_chain(&e))
}

/// Create a pool: a directory with its manifest `POOL/pool.json`.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("origin_src").required(true).args(["size", "origin"]))]
pub struct CreateArgs {
    /// The pool directory (created if missing).
    pub pool: PathBuf,
    /// Make a sparse origin image POOL/origin.img of this size (e.g. 1G, 512M, 4096).
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,
    /// Use an existing file or block device as the origin, in place (never copied).
    #[arg(long)]
    pub origin: Option<PathBuf>,
}

pub fn create(a: CreateArgs) -> Result<()> {
    let spec = match (a.size, a.origin) {
        (Some(s), None) => OriginSpec::Size(s),
        (None, Some(p)) => OriginSpec::Path(p),
        _ => bail!("give exactly one of --size and --origin"),
    };
    let made = pool::create_pool(&a.pool, spec)
        .with_context(|| format!("cannot create pool {}", a.pool.display()))?;
    eprintln!("created pool {}", a.pool.display());
    tail_note(made.origin_bytes - made.exported_bytes);
    Ok(())
}

/// Say that a partial last sector of the origin is not exported.
fn tail_note(unexported: u64) {
    if unexported > 0 {
        eprintln!(
            "note: the origin's size is not a multiple of 512 bytes: its last {unexported} bytes are not exported (devices are made of whole 512-byte sectors)"
        );
    }
}

/// Create, list and remove snapshots.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot of the origin as it is now (works offline and while `serve` runs).
    Create(SnapshotCreateArgs),
    /// List the pool's snapshots.
    List {
        /// The pool directory.
        pool: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (its COW is deleted if the pool created it).
    Remove {
        /// The pool directory.
        pool: PathBuf,
        /// The snapshot to remove.
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct SnapshotCreateArgs {
    /// The pool directory.
    pub pool: PathBuf,
    /// Snapshot name; also its NBD export name and FUSE file name.
    pub name: String,
    /// Chunk size, a power of two from 4 KiB [default: 4 KiB, or the adopted COW's].
    #[arg(long, value_parser = chunk_arg)]
    pub chunk_size: Option<ChunkSize>,
    /// Size of a new sparse POOL/NAME.cow [default: origin size plus metadata room: never overflows].
    #[arg(long, value_parser = size_arg, conflicts_with = "cow")]
    pub cow_size: Option<u64>,
    /// Use this existing file or device as the COW. A kernel-format COW (e.g. an LVM
    /// snapshot's) is adopted with its exceptions; anything else is formatted.
    #[arg(long)]
    pub cow: Option<PathBuf>,
    /// Exception store: P persistent, PO persistent with overflow mode, N transient.
    #[arg(long, default_value = "P")]
    pub store: StoreType,
}

pub fn snapshot(cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create(a) => snapshot_create(a),
        SnapshotCmd::List { pool, json } => snapshot_list(&pool, json),
        SnapshotCmd::Remove { pool, name } => snapshot_remove(&pool, &name),
    }
}

fn snapshot_create(a: SnapshotCreateArgs) -> Result<()> {
    let cow = match a.cow {
        Some(p) => CowSpec::Existing(p),
        None => CowSpec::New(a.cow_size),
    };
    let ctx = || format!("cannot create snapshot '{}'", a.name);
    let entry: SnapshotEntry = if let Some(mut c) = ControlClient::connect(&a.pool) {
        let v = c
            .call(&Request::SnapshotCreate {
                name: a.name.clone(),
                chunk_size: a.chunk_size.map(|c| c.bytes()),
                cow,
                store: a.store,
            })
            .with_context(ctx)?;
        serde_json::from_value(v).context("the daemon's answer")?
    } else {
        let mut p = open_offline(&a.pool)?;
        p.create_snapshot(&SnapshotRequest {
            name: a.name.clone(),
            chunk_size: a.chunk_size,
            cow,
            store: a.store,
        })
        .with_context(ctx)?
    };
    eprintln!(
        "created snapshot '{}' ({} chunks, store {})",
        entry.name,
        human_bytes(entry.chunk_size),
        entry.store
    );
    Ok(())
}

fn open_offline(dir: &Path) -> Result<Pool> {
    match Pool::open(dir) {
        Ok(p) => Ok(p),
        Err(pool::PoolError::Busy(_)) => {
            bail!(
                "the pool {} is locked by another dmsnap process, but no daemon answers on its control socket; retry in a moment",
                dir.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("cannot open pool {}", dir.display())),
    }
}

fn snapshot_list(dir: &Path, json: bool) -> Result<()> {
    let st = get_status(dir)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &st.snapshots)?;
        writeln!(out)?;
        return Ok(());
    }
    for s in &st.snapshots {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}",
            s.name,
            s.store,
            human_bytes(s.chunk_size),
            s.state,
            s.cow.display()
        )?;
    }
    Ok(())
}

fn snapshot_remove(dir: &Path, name: &str) -> Result<()> {
    let ctx = || format!("cannot remove snapshot '{name}'");
    if let Some(mut c) = ControlClient::connect(dir) {
        c.call(&Request::SnapshotRemove { name: name.into() })
            .with_context(ctx)?;
    } else {
        open_offline(dir)?.remove_snapshot(name).with_context(ctx)?;
    }
    eprintln!("removed snapshot '{name}'");
    Ok(())
}

fn get_status(dir: &Path) -> Result<PoolStatus> {
    if let Some(mut c) = ControlClient::connect(dir) {
        let v = c
            .call(&Request::Status)
            .context("cannot get the pool's status from its daemon")?;
        return serde_json::from_value(v).context("the daemon's status answer");
    }
    // Only reads: a shared lock taken read-only, so a read-only pool works.
    let p = match Pool::open_read_only(dir) {
        Err(pool::PoolError::Busy(_)) => bail!(
            "the pool {} is locked by another dmsnap process, but no daemon answers on its control socket; retry in a moment",
            dir.display()
        ),
        r => r.with_context(|| format!("cannot open pool {}", dir.display()))?,
    };
    p.status()
        .with_context(|| format!("cannot read the status of pool {}", dir.display()))
}

/// Show the origin and each snapshot's usage as `dmsetup status` prints it.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The pool directory.
    pub pool: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let st = get_status(&a.pool)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    if a.json {
        serde_json::to_writer(&mut out, &st)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "origin: {} ({})",
        st.origin.path.display(),
        human_bytes(st.origin.size)
    )?;
    if st.origin.unexported_bytes > 0 {
        writeln!(
            out,
            "  its last {} bytes are not exported (not a whole 512-byte sector)",
            st.origin.unexported_bytes
        )?;
    }
    if st.snapshots.is_empty() {
        writeln!(out, "no snapshots")?;
    }
    for s in &st.snapshots {
        let used = if s.total_sectors > 0 {
            format!(
                "{} of {} COW used ({:.1}%)",
                human_bytes(s.allocated_sectors * 512),
                human_bytes(s.total_sectors * 512),
                s.allocated_sectors as f64 * 100.0 / s.total_sectors as f64
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "{}: {} (store {}, chunk {}, {}) {}",
            s.name,
            s.dm_status,
            s.store,
            human_bytes(s.chunk_size),
            s.state,
            used
        )?;
        if let Some(m) = &s.merge {
            writeln!(
                out,
                "  merging into the origin: {} of {} chunks left{}",
                m.chunks_left,
                m.chunks_total,
                m.failed
                    .as_deref()
                    .map(|f| format!(" (failed: {f})"))
                    .unwrap_or_default()
            )?;
        }
        if let Some(e) = &s.error {
            writeln!(out, "  error: {e}")?;
        }
        for w in &s.warnings {
            writeln!(out, "  note: {w}")?;
        }
    }
    Ok(())
}

/// Serve the pool: NBD on POOL/nbd.sock (and TCP or FUSE when asked) until SIGINT/SIGTERM.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The pool directory.
    pub pool: PathBuf,
    /// Where to listen for NBD clients: unix:PATH or tcp:HOST:PORT; repeatable
    /// [default: unix:POOL/nbd.sock, or only the sockets passed by systemd
    /// socket activation (LISTEN_FDS) when there are any].
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Also mount a FUSE filesystem at DIR with one file per device (DIR/origin, DIR/NAME).
    #[arg(long, value_name = "DIR")]
    pub fuse: Option<PathBuf>,
    /// Export snapshots read-only (the origin stays writable).
    #[arg(long)]
    pub read_only_snapshots: bool,
    /// Create the pool with a sparse origin of this size if POOL does not exist yet.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub create: Option<u64>,
    /// Open the origin and COW devices with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Acknowledge a write that gives a snapshot chunk its own copy only once
    /// the COW record is on disk, as the kernel does. By default the record
    /// becomes durable with the client's next FLUSH or FUA write, like the
    /// written data itself (much faster random first writes to snapshots).
    #[arg(long)]
    pub sync_snapshot_writes: bool,
}

fn parse_listen(s: &str) -> Result<Listen> {
    if let Some(p) = s.strip_prefix("unix:") {
        Ok(Listen::Unix(PathBuf::from(p)))
    } else if let Some(a) = s.strip_prefix("tcp:") {
        Ok(Listen::Tcp(a.to_string()))
    } else {
        bail!("--listen '{s}' is neither unix:PATH nor tcp:HOST:PORT")
    }
}

/// Block SIGINT/SIGTERM in this thread (and every thread it starts later),
/// so one thread can wait for them with sigwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only reads it. No memory is shared.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t; sigwait writes one c_int.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let sigs = block_signals();
    if !a.pool.join(pool::MANIFEST).exists() {
        match a.create {
            Some(size) => {
                pool::create_pool(&a.pool, OriginSpec::Size(size))
                    .with_context(|| format!("cannot create pool {}", a.pool.display()))?;
                eprintln!("created pool {} with a {} origin", a.pool.display(), human_bytes(size));
            }
            None => bail!(
                "{} is not a dmsnap pool (create it with `dmsnap create {} --size SIZE`, or pass --create SIZE)",
                a.pool.display(),
                a.pool.display()
            ),
        }
    }
    // Listeners passed by a service manager (systemd socket activation),
    // taken before any thread starts (it edits the environment).
    let passed = dmsnap::export::nbd::activation::take_listen_fds()
        .context("cannot take the listeners passed by the service manager")?;
    let listens: Vec<Listen> = if !passed.is_empty() && a.listen.is_empty() {
        Vec::new()
    } else if a.listen.is_empty() {
        vec![Listen::Unix(a.pool.join(pool::NBD_SOCKET))]
    } else {
        a.listen
            .iter()
            .map(|s| parse_listen(s))
            .collect::<Result<_>>()?
    };
    let p = match Pool::open(&a.pool) {
        Err(pool::PoolError::Busy(_)) => bail!(
            "the pool {} is already being served by another dmsnap",
            a.pool.display()
        ),
        r => r.with_context(|| format!("cannot open pool {}", a.pool.display()))?,
    };
    let active = p
        .activate(ActivateOptions {
            direct: a.direct,
            sync_snapshot_writes: a.sync_snapshot_writes,
        })
        .with_context(|| format!("cannot activate pool {}", a.pool.display()))?;
    let exports: Arc<dyn ExportSet> = active.clone();
    let ro_snaps = a.read_only_snapshots;
    let read_only: Arc<dyn Fn(&str) -> bool + Send + Sync> =
        Arc::new(move |name: &str| ro_snaps && name != "origin");
    let server = NbdServer::new(
        exports.clone(),
        ServerOptions {
            read_only: read_only.clone(),
            ..ServerOptions::default()
        },
    );
    for l in &listens {
        let bound = server
            .listen(l)
            .with_context(|| format!("cannot listen on {l:?}"))?;
        match bound.local_addr() {
            dmsnap::export::nbd::BoundAddr::Unix(p) => {
                eprintln!("serving NBD on unix:{}", p.display())
            }
            dmsnap::export::nbd::BoundAddr::Tcp(a) => eprintln!("serving NBD on tcp:{a}"),
        }
    }
    for fd in passed {
        let bound = server
            .listen_fd(fd)
            .context("cannot serve on a listener passed by the service manager")?;
        match bound.local_addr() {
            dmsnap::export::nbd::BoundAddr::Unix(p) => {
                eprintln!("serving NBD on unix:{} (socket activation)", p.display())
            }
            dmsnap::export::nbd::BoundAddr::Tcp(a) => {
                eprintln!("serving NBD on tcp:{a} (socket activation)")
            }
        }
    }
    #[cfg(feature = "fuse")]
    let fuse = match &a.fuse {
        Some(dir) => {
            let m = dmsnap::export::fuse::mount(
                exports.clone(),
                dir,
                dmsnap::export::fuse::FuseOptions {
                    read_only: read_only.clone(),
                    ..Default::default()
                },
            )
            .with_context(|| format!("cannot mount the FUSE export at {}", dir.display()))?;
            eprintln!("FUSE export mounted at {}", dir.display());
            Some(m)
        }
        None => None,
    };
    #[cfg(not(feature = "fuse"))]
    if a.fuse.is_some() {
        bail!("this dmsnap was built without FUSE support (feature `fuse`)");
    }
    let mut control = ControlServer::start(active.clone(), &a.pool.join(pool::CONTROL_SOCKET))
        .context("cannot open the control socket")?;
    // Every 200 ms: a merge's progress and end. Every second: the records
    // of snapshot first writes acknowledged without a FLUSH become durable.
    let stop_monitor = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let active = active.clone();
        let stop = stop_monitor.clone();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = active.poll_merge() {
                        tracing::error!("merge: {}", pool::error_chain(&e));
                    }
                    tick += 1;
                    if tick % 5 == 0 {
                        active.commit_records();
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })?
    };
    println!("ready");
    std::io::stdout().flush()?;

    let sig = wait_signal(&sigs);
    eprintln!("signal {sig}: finishing in-flight requests and shutting down");
    // Everything below is bounded so that the daemon ends within
    // SHUTDOWN_BUDGET of the signal even when a device does not answer: the
    // NBD server gives in-flight requests its grace period, then answers the
    // rest with ESHUTDOWN; unmounting, the monitor and the final flush get
    // what is left of the budget.
    let deadline = std::time::Instant::now() + SHUTDOWN_BUDGET;
    control.stop();
    server.shutdown();
    let mut stuck: Vec<&str> = Vec::new();
    #[cfg(feature = "fuse")]
    if let Some(m) = fuse {
        match bounded(deadline, move || m.unmount()) {
            Some(Ok(())) => {}
            Some(Err(e)) => eprintln!(
                "dmsnap: unmounting the FUSE export: {}",
                pool::error_chain(&e)
            ),
            None => stuck.push("unmounting the FUSE export"),
        }
    }
    stop_monitor.store(true, std::sync::atomic::Ordering::Relaxed);
    if bounded(deadline, move || monitor.join()).is_none() {
        stuck.push("the monitor (a sync of snapshot records)");
    }
    let flushed = if stuck.is_empty() {
        let active = active.clone();
        bounded(deadline, move || active.shutdown())
    } else {
        None
    };
    for l in &listens {
        if let Listen::Unix(p) = l {
            let _ = std::fs::remove_file(p);
        }
    }
    match flushed {
        Some(r) => r.context("shutting down the pool")?,
        None => {
            if stuck.is_empty() {
                stuck.push("the final flush");
            }
            // Threads are stuck in device calls that may never return:
            // do not run destructors that would join them.
            eprintln!(
                "dmsnap: a device does not answer ({} did not finish within {} s of the signal); \
                 stopping without the final flush (unflushed writes may be lost, as in a crash; \
                 everything clients flushed is durable)",
                stuck.join(", "),
                SHUTDOWN_BUDGET.as_secs()
            );
            let _ = std::io::stderr().flush();
            std::process::exit(0);
        }
    }
    eprintln!("stopped");
    Ok(())
}

/// From SIGINT/SIGTERM to the end of the process, at most this long (the NBD
/// server's grace period for in-flight requests is 5 s of it).
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(9);

/// Run `f` on its own thread and wait for it until `deadline`; None if it
/// did not finish by then (the thread is left running).
fn bounded<T: Send + 'static>(
    deadline: std::time::Instant,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_deadline(deadline).ok()
}

/// Roll the origin back to snapshot NAME (the kernel's snapshot-merge).
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The pool directory.
    pub pool: PathBuf,
    /// The snapshot to roll the origin back to.
    pub name: String,
    /// With a daemon running: wait until the merge ends (with a progress bar on a TTY).
    #[arg(long)]
    pub wait: bool,
}

fn progress_bar(total_bytes: u64) -> ProgressBar {
    let pb = ProgressBar::new(total_bytes);
    pb.set_style(
        ProgressStyle::with_template(
            "merging [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Follow a merge until it ends, driving a progress bar. `poll` returns the
/// merge's progress, or None once it is gone.
fn follow_merge(
    chunk_bytes: u64,
    mut poll: impl FnMut() -> Result<Option<MergeProgress>>,
    mut tick: impl FnMut(),
) -> Result<()> {
    let mut pb: Option<ProgressBar> = None;
    loop {
        let Some(m) = poll()? else {
            break;
        };
        let bar = pb.get_or_insert_with(|| progress_bar(m.chunks_total * chunk_bytes));
        bar.set_position((m.chunks_total.saturating_sub(m.chunks_left)) * chunk_bytes);
        if let Some(f) = m.failed {
            bar.abandon();
            bail!("the merge failed: {f}");
        }
        if m.done {
            bar.finish();
            break;
        }
        tick();
    }
    Ok(())
}

/// `merge NAME` once NAME's merge has ended: that is success.
fn merged_already(name: &str) {
    eprintln!("merge of '{name}' completed; the snapshot left the pool");
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let ctx = || format!("cannot merge snapshot '{}'", a.name);
    if let Some(mut c) = ControlClient::connect(&a.pool) {
        let st: PoolStatus = serde_json::from_value(c.call(&Request::Status)?)?;
        let Some(chunk) = st
            .snapshots
            .iter()
            .find(|s| s.name == a.name)
            .map(|s| s.chunk_size)
        else {
            if st.merged.contains(&a.name) {
                merged_already(&a.name);
                return Ok(());
            }
            bail!("no snapshot named '{}' in this pool", a.name);
        };
        c.call(&Request::MergeStart {
            name: a.name.clone(),
        })
        .with_context(ctx)?;
        if a.wait {
            follow_merge(
                chunk,
                || Ok(c.merge_status()?),
                || std::thread::sleep(Duration::from_millis(200)),
            )?;
            eprintln!("merge of '{}' complete", a.name);
        } else {
            eprintln!("merging '{}' into the origin in the background (the origin already reads as the snapshot)", a.name);
        }
        return Ok(());
    }
    // Offline: bring the pool up in this process (other snapshots must keep
    // getting exceptions while the merge writes the origin), merge to the end.
    let p = open_offline(&a.pool)?;
    if p.manifest().was_merged(&a.name) {
        merged_already(&a.name);
        return Ok(());
    }
    let entry = p.manifest().snapshot(&a.name).cloned().with_context(|| {
        format!(
            "no snapshot named '{}' in pool {}",
            a.name,
            a.pool.display()
        )
    })?;
    let active: Arc<ActivePool> = p.activate(ActivateOptions::default()).with_context(ctx)?;
    active.start_merge(&a.name).with_context(ctx)?;
    // In process: woken as soon as the merge ends, not at the next tick.
    let r = follow_merge(
        entry.chunk_size,
        || Ok(active.poll_merge()?),
        || active.origin().wait_merge_for(Duration::from_millis(200)),
    );
    active.shutdown().context("closing the pool")?;
    r?;
    eprintln!("merge of '{}' complete; the snapshot left the pool", a.name);
    Ok(())
}

/// Show where a snapshot (or the origin) may differ from snapshot FROM.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The pool directory.
    pub pool: PathBuf,
    /// The snapshot to compare with (the base of an incremental backup).
    pub from: String,
    /// The device that may have changed: `origin` (the default) or a snapshot.
    pub to: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn diff(a: DiffArgs) -> Result<()> {
    let ctx = || {
        format!(
            "cannot compare '{}' with snapshot '{}'",
            a.to.as_deref().unwrap_or("origin"),
            a.from
        )
    };
    let report: pool::DiffReport = if let Some(mut c) = ControlClient::connect(&a.pool) {
        let v = c
            .call(&Request::Diff {
                from: a.from.clone(),
                to: a.to.clone(),
            })
            .with_context(ctx)?;
        serde_json::from_value(v).context("the daemon's diff answer")?
    } else {
        open_offline(&a.pool)?
            .diff(&a.from, a.to.as_deref())
            .with_context(ctx)?
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    if a.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for e in &report.extents {
            writeln!(out, "{} {}", e.offset, e.length)?;
        }
        writeln!(
            out,
            "total {} bytes in {} extents ({})",
            report.total(),
            report.extents.len(),
            human_bytes(report.total())
        )?;
    }
    out.flush()?;
    Ok(())
}
