//! A fixed-newstyle NBD server for any [`ExportSet`].
//!
//! Threads: one accept thread per listener; per connection one thread that
//! does the handshake and then reads requests, and a small pool of workers
//! that run them against the [`Device`] and write the replies (possibly out
//! of order) through one mutex-held writer. Memory per connection is
//! bounded: payload bytes in flight are capped ([`ServerOptions::max_in_flight_bytes`];
//! the reader blocks), and every length from the wire is checked by
//! [`proto`] before anything is allocated.

use super::proto::{
    self, cmd, cmd_flags, errno, handshake, opt, rep, tflags, NbdOption, OptionLength,
    PayloadCheck, Request,
};
use crate::device::{DevError, Device, ExportSet, MetaContext};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Predicate deciding which export names are served read-only.
pub type ReadOnlyFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Server tunables.
#[derive(Clone)]
pub struct ServerOptions {
    /// Exports for which this returns true are read-only (in addition to
    /// devices that say they are), e.g. "all but `origin`".
    pub read_only: ReadOnlyFn,
    /// Connections beyond this are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Worker threads per connection in the transmission phase.
    pub workers_per_connection: usize,
    /// Payload bytes (write data received, read data to send) in flight per
    /// connection before the reader stops reading requests.
    pub max_in_flight_bytes: usize,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// On [`NbdServer::shutdown`], how long connections get to finish their
    /// requests before their sockets are cut.
    pub shutdown_grace: Duration,
    /// The export served to clients asking for the empty name (the spec's
    /// "default export", what `nbd+unix:///?socket=...` asks for).
    pub default_export: Option<String>,
    /// Most extents per metadata context in one `BLOCK_STATUS` reply.
    pub max_block_status_extents: usize,
    /// A `BLOCK_STATUS` reply holds writes to its range back until it is
    /// sent; if the client does not take it within this time, the
    /// connection is cut (so writers wait at most this long).
    pub block_status_send_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            read_only: Arc::new(|_| false),
            max_connections: 1024,
            workers_per_connection: 16,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            default_export: None,
            max_block_status_extents: crate::snap::MAX_EXTENTS,
            block_status_send_timeout: Duration::from_secs(10),
        }
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket, created with mode 0600.
    Unix(PathBuf),
    /// A TCP `host:port` (port 0 picks one; see [`BoundListener::local_addr`]).
    Tcp(String),
}

/// `unix:PATH` or `tcp:HOST:PORT`, as `serve --listen` takes them.
impl std::str::FromStr for Listen {
    type Err = ListenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(ListenParseError(s.to_string()));
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            match hp.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Listen::Tcp(hp.to_string()))
                }
                _ => Err(ListenParseError(s.to_string())),
            }
        } else {
            Err(ListenParseError(s.to_string()))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// A `--listen` value that is neither `unix:PATH` nor `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {0:?}: expected unix:PATH or tcp:HOST:PORT")]
pub struct ListenParseError(pub String);

/// The address a listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A listener that accepts connections (on a background thread) from the
/// moment it is returned.
#[derive(Debug, Clone)]
pub struct BoundListener {
    addr: BoundAddr,
}

impl BoundListener {
    pub fn local_addr(&self) -> &BoundAddr {
        &self.addr
    }
    /// The TCP address, if this is a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.addr {
            BoundAddr::Tcp(a) => Some(a),
            BoundAddr::Unix(_) => None,
        }
    }
}

/// The NBD server. Cheap to share; [`NbdServer::shutdown`] stops everything.
pub struct NbdServer {
    shared: Arc<Shared>,
}

struct Shared {
    exports: Arc<dyn ExportSet>,
    opts: ServerOptions,
    stopping: AtomicBool,
    accept_threads: Mutex<Vec<JoinHandle<()>>>,
    unix_paths: Mutex<Vec<PathBuf>>,
    conns: Mutex<ConnTable>,
    conns_changed: Condvar,
    next_id: AtomicU64,
    /// [`NbdServer::shutdown`] ran to its end (later calls return at once).
    shut_down: AtomicBool,
}

#[derive(Default)]
struct ConnTable {
    live: HashMap<u64, ConnEntry>,
    /// Threads of connections that ended, to be joined.
    finished: Vec<JoinHandle<()>>,
}

struct ConnEntry {
    /// A clone of the socket, to cut it on shutdown.
    stream: Stream,
    thread: Option<JoinHandle<()>>,
    /// The connection's transmission state, once the handshake is over: on
    /// shutdown, the requests still unanswered after the grace period are
    /// answered with an error through it.
    conn: Option<std::sync::Weak<Conn>>,
}

/// After the grace period, how long connections whose requests were
/// answered with an error get to end before shutdown leaves them behind
/// (their worker is stuck in a device call that never returns).
const ABORT_WAIT: Duration = Duration::from_secs(1);

impl NbdServer {
    pub fn new(exports: Arc<dyn ExportSet>, opts: ServerOptions) -> Self {
        NbdServer {
            shared: Arc::new(Shared {
                exports,
                opts,
                stopping: AtomicBool::new(false),
                accept_threads: Mutex::new(Vec::new()),
                unix_paths: Mutex::new(Vec::new()),
                conns: Mutex::new(ConnTable::default()),
                conns_changed: Condvar::new(),
                next_id: AtomicU64::new(0),
                shut_down: AtomicBool::new(false),
            }),
        }
    }

    fn check_running(&self) -> io::Result<()> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(io::Error::other("the NBD server is shutting down"));
        }
        Ok(())
    }

    /// Accept and serve on `listener`, on a background thread.
    fn accept_on(&self, listener: Listener, addr: BoundAddr) -> io::Result<BoundListener> {
        let shared = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&shared, listener))?;
        self.shared.accept_threads.lock().push(t);
        Ok(BoundListener { addr })
    }

    /// Bind now, then accept and serve on background threads.
    pub fn listen(&self, l: &Listen) -> io::Result<BoundListener> {
        self.check_running()?;
        let (listener, addr) = match l {
            Listen::Unix(path) => {
                let ul = bind_unix(path)?;
                self.shared.unix_paths.lock().push(path.clone());
                (Listener::Unix(ul), BoundAddr::Unix(path.clone()))
            }
            Listen::Tcp(hostport) => {
                let tl = TcpListener::bind(hostport.as_str())?;
                let a = tl.local_addr()?;
                (Listener::Tcp(tl), BoundAddr::Tcp(a))
            }
        };
        self.accept_on(listener, addr)
    }

    /// Serve on a listening socket passed in (systemd socket activation:
    /// [`activation::take_listen_fds`](super::activation::take_listen_fds)),
    /// unix or TCP. Its socket file, if any, belongs to whoever made it and
    /// is left in place at shutdown.
    pub fn listen_fd(&self, fd: std::os::fd::OwnedFd) -> io::Result<BoundListener> {
        self.check_running()?;
        let ul = UnixListener::from(fd);
        let (listener, addr) = match ul.local_addr() {
            Ok(a) => {
                let path = a.as_pathname().map(Path::to_path_buf).unwrap_or_default();
                (Listener::Unix(ul), BoundAddr::Unix(path))
            }
            Err(_) => {
                let tl = TcpListener::from(std::os::fd::OwnedFd::from(ul));
                let a = tl.local_addr().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("a passed descriptor is neither a unix nor a TCP socket: {e}"),
                    )
                })?;
                (Listener::Tcp(tl), BoundAddr::Tcp(a))
            }
        };
        self.accept_on(listener, addr)
    }

    /// Number of connections being served.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().live.len()
    }

    /// Stop accepting, let in-flight requests finish, close connections,
    /// join threads. Bounded: after [`ServerOptions::shutdown_grace`], the
    /// requests still unanswered (a device that does not answer, a client
    /// that does not read) get an `ESHUTDOWN` reply and their sockets are
    /// cut; connections whose workers are stuck in a device call are then
    /// left behind (their late replies are dropped). Returns within about
    /// `shutdown_grace` + 2 s. Idempotent.
    pub fn shutdown(&self) {
        let sh = &self.shared;
        if sh.shut_down.load(Ordering::SeqCst) {
            return;
        }
        sh.stopping.store(true, Ordering::SeqCst);
        let accepts: Vec<_> = sh.accept_threads.lock().drain(..).collect();
        for t in accepts {
            let _ = t.join();
        }
        for p in sh.unix_paths.lock().drain(..) {
            let _ = std::fs::remove_file(p);
        }
        // Readers see end-of-file, stop taking requests, finish the ones in
        // flight and close.
        let mut table = sh.conns.lock();
        for e in table.live.values() {
            let _ = e.stream.shutdown(Shutdown::Read);
        }
        wait_for_no_connections(sh, &mut table, Instant::now() + sh.opts.shutdown_grace);
        if !table.live.is_empty() {
            // Stuck devices or clients that do not read their replies:
            // answer what is left with an error, cut the sockets.
            let conns: Vec<_> = table
                .live
                .values()
                .map(|e| {
                    let _ = e.stream.set_write_timeout(Some(ABORT_WAIT));
                    (
                        e.conn.as_ref().and_then(|w| w.upgrade()),
                        e.stream.try_clone(),
                    )
                })
                .collect();
            // Not under the table lock: answering writes to sockets.
            drop(table);
            let mut answered = 0;
            for (conn, stream) in conns {
                if let Some(c) = conn {
                    answered += c.abort(errno::ESHUTDOWN, "the server is shutting down");
                }
                if let Ok(s) = stream {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            table = sh.conns.lock();
            wait_for_no_connections(sh, &mut table, Instant::now() + ABORT_WAIT);
            tracing::warn!(
                answered,
                stuck = table.live.len(),
                "nbd: shutdown grace over: unanswered requests got ESHUTDOWN; \
                 connections stuck in a device are left behind"
            );
        }
        let finished: Vec<_> = table.finished.drain(..).collect();
        drop(table);
        for t in finished {
            let _ = t.join();
        }
        sh.shut_down.store(true, Ordering::SeqCst);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Sockets

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Ask for large socket buffers (a 32 MiB read reply should not need
/// hundreds of round trips through a 200 KiB buffer). The kernel caps the
/// values; failure is harmless.
fn set_socket_buffers(fd: RawFd) {
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `fd` is an open socket owned by the caller for the whole
        // call; the option value points to a live c_int whose size is passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Wait until `fd` is readable or `timeout_ms` passed.
fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd living across the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Remove a socket file left by a dead server; refuse if a server listens
/// there or if the path is not a socket.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server already listens on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Create a listening Unix socket with mode 0600: bind, chmod, then
/// listen, so no client can connect before the mode is set.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    remove_stale_socket(path)?;
    // SAFETY: plain socket(2) call; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not usable as a Unix socket path", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `addr` is an initialised sockaddr_un (NUL-terminated path, as
    // the rest is zero) and the length passed is its size; `fd` is open.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: `fd` is a bound stream socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Wait (on `conns_changed`, which connection threads signal as they end)
/// until no connection is live or `deadline` passed.
fn wait_for_no_connections(
    sh: &Shared,
    table: &mut parking_lot::MutexGuard<'_, ConnTable>,
    deadline: Instant,
) {
    while !table.live.is_empty() {
        if sh.conns_changed.wait_until(table, deadline).timed_out() {
            break;
        }
    }
}

fn accept_loop(sh: &Arc<Shared>, listener: Listener) {
    while !sh.stopping.load(Ordering::SeqCst) {
        match wait_readable(listener.fd(), 100) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!("nbd: poll on listener failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!("nbd: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        start_connection(sh, stream);
    }
}

fn start_connection(sh: &Arc<Shared>, stream: Stream) {
    let mut table = sh.conns.lock();
    let finished: Vec<_> = table.finished.drain(..).collect();
    for t in finished {
        let _ = t.join();
    }
    if table.live.len() >= sh.opts.max_connections {
        tracing::warn!(
            "nbd: refusing a connection: {} already open",
            table.live.len()
        );
        return; // dropping the stream closes it
    }
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("nbd: cannot clone socket: {e}");
            return;
        }
    };
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    let sh2 = sh.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            if let Err(e) = serve_connection(&sh2, id, stream) {
                tracing::debug!("nbd: connection {id} ended: {e}");
            }
            let mut t = sh2.conns.lock();
            if let Some(mut e) = t.live.remove(&id) {
                if let Some(h) = e.thread.take() {
                    t.finished.push(h);
                }
            }
            sh2.conns_changed.notify_all();
        });
    match spawned {
        Ok(h) => {
            table.live.insert(
                id,
                ConnEntry {
                    stream: clone,
                    thread: Some(h),
                    conn: None,
                },
            );
        }
        Err(e) => tracing::warn!("nbd: cannot start a connection thread: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Handshake

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket error")]
    Io(#[from] io::Error),
    #[error("protocol violation")]
    Proto(#[from] proto::ProtoError),
    #[error("export name {0:?} is unknown (NBD_OPT_EXPORT_NAME has no error reply)")]
    UnknownExport(String),
    #[error("client sent an invalid NBD_OPT_EXPORT_NAME")]
    InvalidExportName(#[source] proto::OptionInvalid),
}

/// An export as the connection serves it.
struct Export {
    name: String,
    dev: Arc<dyn Device>,
    read_only: bool,
}

impl Export {
    fn transmission_flags(&self) -> u16 {
        let mut f = tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES
            | tflags::CAN_MULTI_CONN
            | tflags::SEND_CACHE;
        if self.read_only {
            f |= tflags::READ_ONLY;
        }
        f
    }
    fn preferred_block_size(&self) -> u32 {
        let p = self.dev.preferred_block_size();
        let p = p.checked_next_power_of_two().unwrap_or(proto::MAX_PAYLOAD);
        p.clamp(proto::MIN_BLOCK_SIZE, proto::MAX_PAYLOAD)
    }
}

fn resolve(sh: &Shared, name: &str) -> Option<Export> {
    let name = match (name, &sh.opts.default_export) {
        ("", Some(default)) => default.as_str(),
        _ => name,
    };
    let dev = sh.exports.get(name)?;
    let read_only = dev.read_only() || (sh.opts.read_only)(name);
    Some(Export {
        name: name.to_string(),
        dev,
        read_only,
    })
}

fn serve_connection(sh: &Arc<Shared>, id: u64, stream: Stream) -> Result<(), ConnError> {
    set_socket_buffers(stream.fd());
    // A client that neither talks nor listens must not hold a slot forever
    // during the handshake (in transmission, idle clients are normal).
    stream.set_read_timeout(Some(sh.opts.handshake_timeout))?;
    stream.set_write_timeout(Some(sh.opts.handshake_timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(256 << 10, stream);
    let Some((export, structured, contexts)) = handshake(sh, &mut reader, &mut writer)? else {
        return Ok(());
    };
    reader.get_ref().set_read_timeout(None)?;
    reader.get_ref().set_write_timeout(None)?;
    tracing::debug!("nbd: serving {:?}", export.name);
    transmission(sh, id, reader, writer, export, structured, contexts)
}

/// What the handshake settled: the export, structured replies, and the
/// metadata contexts selected for it (with their ids).
type Negotiated = (Export, bool, Vec<(u32, MetaContext)>);

/// Contexts selected with `NBD_OPT_SET_META_CONTEXT`: for which export,
/// and `(id, context)` pairs.
type Selected = Option<(String, Vec<(u32, MetaContext)>)>;

/// The contexts of `available` a query selects. `list` (for
/// `NBD_OPT_LIST_META_CONTEXT`): a bare namespace (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`) selects all of its contexts, as qemu-nbd does;
/// otherwise only exact names select.
fn query_matches(query: &str, ctx: &MetaContext, list: bool) -> bool {
    let name = ctx.name();
    if name == query {
        return true;
    }
    list && matches!(query, "base:" | "qemu:" | MetaContext::DIRTY_BITMAP_PREFIX)
        && name.starts_with(query)
}

/// Answer LIST/SET_META_CONTEXT. Returns the new selection for SET.
fn meta_context_option(
    sh: &Shared,
    out: &mut Vec<u8>,
    option: u32,
    structured: bool,
    req: &proto::MetaContextRequest,
) -> Option<Selected> {
    let list = option == opt::LIST_META_CONTEXT;
    if !structured {
        proto::encode_option_error(
            out,
            option,
            rep::ERR_INVALID,
            "negotiate structured replies before metadata contexts",
        );
        return None;
    }
    let Some(export) = resolve(sh, &req.name) else {
        proto::encode_option_error(
            out,
            option,
            rep::ERR_UNKNOWN,
            &format!("no export named {:?}", req.name),
        );
        return None;
    };
    let available = export.dev.meta_contexts();
    let mut chosen: Vec<MetaContext> = Vec::new();
    for ctx in &available {
        let hit = if req.queries.is_empty() {
            list
        } else {
            req.queries.iter().any(|q| query_matches(q, ctx, list))
        };
        if hit && !chosen.contains(ctx) {
            chosen.push(ctx.clone());
        }
    }
    let mut selected = Vec::with_capacity(chosen.len());
    for (i, ctx) in chosen.into_iter().enumerate() {
        let id = if list { 0 } else { i as u32 + 1 };
        proto::encode_meta_context(out, option, id, &ctx.name());
        selected.push((id, ctx));
    }
    proto::encode_option_reply(out, option, rep::ACK, &[]);
    if list {
        None
    } else {
        Some(Some((export.name, selected)))
    }
}

/// Run option haggling. `Some` when transmission starts.
fn handshake(
    sh: &Shared,
    r: &mut BufReader<Stream>,
    w: &mut Stream,
) -> Result<Option<Negotiated>, ConnError> {
    let server_flags = handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES;
    w.write_all(&proto::encode_greeting(server_flags))?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf)?;
    let client = proto::parse_client_flags(cf, server_flags)?;
    let mut structured = false;
    let mut selected: Selected = None;
    // The contexts selected for the export finally chosen (none if the
    // client selected them for another one).
    let contexts_for = |selected: &Selected, export: &Export| match selected {
        Some((name, v)) if *name == export.name => v.clone(),
        _ => Vec::new(),
    };
    let mut out = Vec::with_capacity(256);
    let mut data = Vec::new();
    loop {
        out.clear();
        let mut hb = [0u8; proto::OPTION_HEADER_LEN];
        r.read_exact(&mut hb)?;
        let h = proto::parse_option_header(&hb)?;
        match proto::check_option_length(h.length)? {
            OptionLength::Discard => {
                let n = io::copy(&mut r.by_ref().take(u64::from(h.length)), &mut io::sink())?;
                if n != u64::from(h.length) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                if h.option == opt::EXPORT_NAME {
                    return Err(ConnError::InvalidExportName(proto::OptionInvalid(
                        "export name too long",
                    )));
                }
                proto::encode_option_error(
                    &mut out,
                    h.option,
                    rep::ERR_TOO_BIG,
                    "option data too long",
                );
                w.write_all(&out)?;
                continue;
            }
            OptionLength::Read => {
                data.clear();
                data.resize(h.length as usize, 0);
                r.read_exact(&mut data)?;
            }
        }
        let parsed = match proto::parse_option(h.option, &data) {
            Ok(o) => o,
            Err(e) if h.option == opt::EXPORT_NAME => return Err(ConnError::InvalidExportName(e)),
            Err(e) => {
                proto::encode_option_error(&mut out, h.option, rep::ERR_INVALID, e.0);
                w.write_all(&out)?;
                continue;
            }
        };
        if sh.stopping.load(Ordering::SeqCst) && parsed != NbdOption::Abort {
            if h.option == opt::EXPORT_NAME {
                return Ok(None);
            }
            proto::encode_option_error(
                &mut out,
                h.option,
                rep::ERR_SHUTDOWN,
                "server shutting down",
            );
            w.write_all(&out)?;
            continue;
        }
        match parsed {
            NbdOption::ExportName(name) => {
                let export = resolve(sh, &name).ok_or(ConnError::UnknownExport(name))?;
                proto::encode_export_name_reply(
                    &mut out,
                    export.dev.size(),
                    export.transmission_flags(),
                    client.no_zeroes,
                );
                w.write_all(&out)?;
                let contexts = contexts_for(&selected, &export);
                return Ok(Some((export, structured, contexts)));
            }
            NbdOption::Abort => {
                proto::encode_option_reply(&mut out, opt::ABORT, rep::ACK, &[]);
                // The client may already have gone: ignore errors.
                let _ = w.write_all(&out);
                return Ok(None);
            }
            NbdOption::List => {
                for name in sh.exports.names() {
                    let desc = sh.exports.description(&name);
                    proto::encode_rep_server(&mut out, &name, desc.as_deref());
                }
                proto::encode_option_reply(&mut out, opt::LIST, rep::ACK, &[]);
            }
            NbdOption::Info(req) | NbdOption::Go(req) => {
                let option = h.option;
                match resolve(sh, &req.name) {
                    None => proto::encode_option_error(
                        &mut out,
                        option,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {:?}", req.name),
                    ),
                    Some(export) => {
                        proto::encode_info_export(
                            &mut out,
                            option,
                            export.dev.size(),
                            export.transmission_flags(),
                        );
                        if req.requests.contains(&proto::info::NAME) {
                            proto::encode_info_name(&mut out, option, &export.name);
                        }
                        if req.requests.contains(&proto::info::DESCRIPTION) {
                            if let Some(d) = sh.exports.description(&export.name) {
                                proto::encode_info_description(&mut out, option, &d);
                            }
                        }
                        proto::encode_info_block_size(
                            &mut out,
                            option,
                            proto::MIN_BLOCK_SIZE,
                            export.preferred_block_size(),
                            proto::MAX_PAYLOAD,
                        );
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        if option == opt::GO {
                            w.write_all(&out)?;
                            let contexts = contexts_for(&selected, &export);
                            return Ok(Some((export, structured, contexts)));
                        }
                    }
                }
            }
            NbdOption::StructuredReply => {
                if structured {
                    proto::encode_option_error(
                        &mut out,
                        opt::STRUCTURED_REPLY,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    proto::encode_option_reply(&mut out, opt::STRUCTURED_REPLY, rep::ACK, &[]);
                }
            }
            NbdOption::StartTls => proto::encode_option_error(
                &mut out,
                opt::STARTTLS,
                rep::ERR_UNSUP,
                "TLS is not supported",
            ),
            NbdOption::ListMetaContext(req) | NbdOption::SetMetaContext(req) => {
                if let Some(s) = meta_context_option(sh, &mut out, h.option, structured, &req) {
                    selected = s;
                }
            }
            NbdOption::Other(o) => {
                proto::encode_option_error(&mut out, o, rep::ERR_UNSUP, "option not supported")
            }
        }
        w.write_all(&out)?;
    }
}

// ---------------------------------------------------------------------------
// Transmission

/// Counting semaphore over payload bytes in flight.
struct InFlight {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl InFlight {
    /// Take `n` bytes (a single request larger than the cap is let through
    /// alone).
    fn acquire(&self, n: usize) -> usize {
        let n = n.min(self.max);
        let mut used = self.used.lock();
        while *used > 0 && *used + n > self.max {
            self.freed.wait(&mut used);
        }
        *used += n;
        n
    }
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        *self.used.lock() -= n;
        self.freed.notify_all();
    }
}

/// State shared by a connection's reader and workers.
struct Conn {
    writer: Mutex<Stream>,
    export: Export,
    structured: bool,
    in_flight: InFlight,
    /// Spare buffers for payloads, reused so steady-state I/O allocates nothing.
    buffers: Mutex<Vec<Vec<u8>>>,
    /// The socket failed, or shutdown answered what was left: stop doing
    /// work for this client, send nothing more.
    dead: AtomicBool,
    /// Metadata contexts selected, with their ids.
    contexts: Vec<(u32, MetaContext)>,
    max_extents: usize,
    block_status_timeout: Duration,
    /// A clone of the socket, to cut it without the writer lock.
    cut: Stream,
    /// Requests handed to the workers and not answered yet, by cookie (with
    /// a count: a client may reuse a cookie), so that shutdown can answer
    /// them when a device does not.
    unanswered: Mutex<HashMap<u64, (Request, u32)>>,
}

struct Job {
    req: Request,
    /// The WRITE payload, or a buffer to READ into (taken in the worker).
    buf: Option<Vec<u8>>,
    /// Bytes taken from `Conn::in_flight`.
    held: usize,
}

/// Spare buffers kept per connection, and the largest one kept.
const MAX_POOLED_BUFFERS: usize = 8;
const MAX_POOLED_BUFFER: usize = 4 << 20;

impl Conn {
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self.buffers.lock().pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }
    fn give_buffer(&self, b: Vec<u8>) {
        if b.len() > MAX_POOLED_BUFFER {
            return;
        }
        let mut pool = self.buffers.lock();
        if pool.len() < MAX_POOLED_BUFFERS {
            pool.push(b);
        }
    }

    /// Write one reply made of `parts`, atomically with respect to other
    /// replies. On failure the connection is dead.
    fn send(&self, parts: &mut [IoSlice<'_>]) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.writer.lock();
        // Checked again under the writer lock: after `abort` nothing more
        // goes out (it may have answered this request already).
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        // Every reply, simple or a structured chunk, carries the cookie in
        // bytes 8..16 of its header (the first part).
        if let Some(c) = parts.first().and_then(|p| p.get(8..16)) {
            let cookie = u64::from_be_bytes(c.try_into().unwrap_or_default());
            self.answered(cookie);
        }
        if let Err(e) = write_all_vectored(&mut *w, parts) {
            tracing::debug!("nbd: reply failed: {e}");
            self.dead.store(true, Ordering::Relaxed);
            let _ = w.shutdown(Shutdown::Both);
        }
    }

    /// Note a request as handed to the workers.
    fn track(&self, req: &Request) {
        self.unanswered
            .lock()
            .entry(req.cookie)
            .or_insert((*req, 0))
            .1 += 1;
    }

    /// A reply for `cookie` is going out.
    fn answered(&self, cookie: u64) {
        let mut u = self.unanswered.lock();
        if let Some(e) = u.get_mut(&cookie) {
            e.1 -= 1;
            if e.1 == 0 {
                u.remove(&cookie);
            }
        }
    }

    /// Shutdown after the grace period: answer every request not answered
    /// yet with `error`, and send nothing more (replies of workers that
    /// come back later are dropped). Returns the number answered.
    fn abort(&self, error: u32, msg: &str) -> usize {
        let Some(mut w) = self.writer.try_lock_for(ABORT_WAIT) else {
            // A reply is stuck on a client that does not read: cutting the
            // socket (the caller does) is all that can be done.
            self.dead.store(true, Ordering::Relaxed);
            return 0;
        };
        let was_dead = self.dead.swap(true, Ordering::Relaxed);
        let left: Vec<(Request, u32)> = self.unanswered.lock().drain().map(|(_, v)| v).collect();
        if was_dead {
            return 0;
        }
        let mut n = 0;
        for (req, count) in left {
            for _ in 0..count {
                let out = self.encode_reply(&req, error, msg);
                if write_all_vectored(&mut *w, &mut [IoSlice::new(&out)]).is_err() {
                    return n;
                }
                n += 1;
            }
        }
        n
    }

    /// The bytes of a reply that carries no data: success or `error`.
    fn encode_reply(&self, req: &Request, error: u32, msg: &str) -> Vec<u8> {
        if self.structured && req.command == cmd::READ {
            if error == 0 {
                proto::encode_none_chunk(req.cookie).to_vec()
            } else {
                let mut out = Vec::with_capacity(64);
                proto::encode_error_chunk(&mut out, req.cookie, error, None, msg, true);
                out
            }
        } else {
            proto::encode_simple_reply(error, req.cookie).to_vec()
        }
    }

    /// Reply to a request that carries no data: success or `error`.
    fn reply(&self, req: &Request, error: u32, msg: &str) {
        if self.structured && req.command == cmd::READ {
            if error == 0 {
                self.send(&mut [IoSlice::new(&proto::encode_none_chunk(req.cookie))]);
            } else {
                let mut out = Vec::with_capacity(64);
                proto::encode_error_chunk(&mut out, req.cookie, error, None, msg, true);
                self.send(&mut [IoSlice::new(&out)]);
            }
        } else {
            self.send(&mut [IoSlice::new(&proto::encode_simple_reply(error, req.cookie))]);
        }
    }
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn transmission(
    sh: &Shared,
    id: u64,
    mut reader: BufReader<Stream>,
    writer: Stream,
    export: Export,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
) -> Result<(), ConnError> {
    let nr_workers = sh.opts.workers_per_connection.max(1);
    let cut = writer.try_clone()?;
    let conn = Arc::new(Conn {
        writer: Mutex::new(writer),
        export,
        structured,
        in_flight: InFlight {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max: sh.opts.max_in_flight_bytes.max(1),
        },
        buffers: Mutex::new(Vec::new()),
        dead: AtomicBool::new(false),
        contexts,
        max_extents: sh.opts.max_block_status_extents.max(1),
        block_status_timeout: sh.opts.block_status_send_timeout,
        cut,
        unanswered: Mutex::new(HashMap::new()),
    });
    if let Some(e) = sh.conns.lock().live.get_mut(&id) {
        e.conn = Some(Arc::downgrade(&conn));
    }
    let (tx, rx) = crossbeam_channel::bounded::<Job>(nr_workers * 16);
    let mut workers = Vec::with_capacity(nr_workers);
    for i in 0..nr_workers {
        let conn = conn.clone();
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || worker(&conn, &rx));
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) if workers.is_empty() => return Err(e.into()),
            Err(_) => break,
        }
    }
    drop(rx);
    let result = read_requests(&conn, &mut reader, &tx);
    // Finish what is in flight (DISC, shutdown, or a broken client alike).
    drop(tx);
    for h in workers {
        let _ = h.join();
    }
    result
}

/// Read requests until DISC, end of file, or an error.
fn read_requests(
    conn: &Conn,
    r: &mut BufReader<Stream>,
    tx: &Sender<Job>,
) -> Result<(), ConnError> {
    loop {
        let mut hb = [0u8; proto::REQUEST_LEN];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if conn.dead.load(Ordering::Relaxed) {
            return Ok(());
        }
        let req = proto::parse_request(&hb)?;
        let job = match req.command {
            cmd::DISC => return Ok(()),
            cmd::WRITE => match proto::check_payload(req.length)? {
                PayloadCheck::Discard => {
                    let len = u64::from(req.length);
                    let n = io::copy(&mut r.by_ref().take(len), &mut io::sink())?;
                    if n != len {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    conn.reply(&req, errno::EINVAL, "write payload above 32 MiB");
                    continue;
                }
                PayloadCheck::Accept => {
                    let len = req.length as usize;
                    let held = conn.in_flight.acquire(len);
                    let mut buf = conn.take_buffer(len);
                    if let Err(e) = r.read_exact(&mut buf[..len]) {
                        conn.in_flight.release(held);
                        return Err(e.into());
                    }
                    Job {
                        req,
                        buf: Some(buf),
                        held,
                    }
                }
            },
            cmd::READ if req.length <= proto::MAX_PAYLOAD => {
                let held = conn.in_flight.acquire(req.length as usize);
                Job {
                    req,
                    buf: None,
                    held,
                }
            }
            _ => Job {
                req,
                buf: None,
                held: 0,
            },
        };
        conn.track(&job.req);
        if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
            conn.in_flight.release(job.held);
            return Ok(());
        }
    }
}

fn worker(conn: &Conn, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let held = job.held;
        if !conn.dead.load(Ordering::Relaxed) {
            // A panic in a device call (a bug) answers that request with
            // EIO; the connection and its other requests go on.
            let req = job.req;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(conn, job)));
            if r.is_err() {
                tracing::error!(cookie = req.cookie, "a panic while serving a request");
                conn.reply(&req, errno::EIO, "internal error");
            }
        }
        conn.in_flight.release(held);
    }
}

fn dev_error(e: &DevError) -> u32 {
    errno::from_host(e.errno())
}

/// Check the command flags against those valid for the command.
fn flags_ok(req: &Request) -> bool {
    let allowed = match req.command {
        cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
        cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
        _ => cmd_flags::FUA,
    };
    req.flags & !allowed == 0
}

fn in_range(req: &Request, size: u64) -> bool {
    req.offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size)
}

/// Execute one request and send its reply.
fn run(conn: &Conn, job: Job) {
    let req = job.req;
    let dev = &conn.export.dev;
    let known = matches!(
        req.command,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    );
    let result: Result<(), (u32, String)> = if !known {
        Err((errno::EINVAL, format!("unknown command {}", req.command)))
    } else if !flags_ok(&req) {
        Err((
            errno::EINVAL,
            format!("invalid command flags {:#x}", req.flags),
        ))
    } else {
        let fua = req.flags & cmd_flags::FUA != 0;
        let size = dev.size();
        let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        let range_errno = match req.command {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        if writes && conn.export.read_only {
            Err((errno::EPERM, "the export is read-only".into()))
        } else if req.command != cmd::FLUSH && !in_range(&req, size) {
            Err((range_errno, "request beyond the end of the export".into()))
        } else {
            match req.command {
                cmd::READ => {
                    if req.length > proto::MAX_PAYLOAD {
                        Err((errno::EINVAL, "read above 32 MiB".into()))
                    } else {
                        return do_read(conn, req);
                    }
                }
                cmd::WRITE => {
                    let buf = job.buf.unwrap_or_default();
                    let r = match buf.get(..req.length as usize) {
                        Some(data) => dev
                            .write_at(data, req.offset, fua)
                            .map_err(|e| (dev_error(&e), e.to_string())),
                        None => Err((errno::EIO, "write payload missing".into())),
                    };
                    conn.give_buffer(buf);
                    r
                }
                cmd::BLOCK_STATUS => {
                    if !conn.structured || conn.contexts.is_empty() {
                        Err((
                            errno::EINVAL,
                            "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)".into(),
                        ))
                    } else if req.length == 0 {
                        Err((errno::EINVAL, "block status of zero bytes".into()))
                    } else {
                        return do_block_status(conn, req);
                    }
                }
                cmd::FLUSH => dev.flush().map_err(|e| (dev_error(&e), e.to_string())),
                cmd::TRIM => dev
                    .discard(req.offset, u64::from(req.length))
                    .and_then(|()| if fua { dev.flush() } else { Ok(()) })
                    .map_err(|e| (dev_error(&e), e.to_string())),
                cmd::WRITE_ZEROES => dev
                    .write_zeroes(req.offset, u64::from(req.length), fua)
                    .map_err(|e| (dev_error(&e), e.to_string())),
                _ => Ok(()), // CACHE: nothing to prefetch into
            }
        }
    };
    match result {
        Ok(()) => conn.reply(&req, 0, ""),
        Err((e, msg)) => conn.reply(&req, e, &msg),
    }
}

/// READ: read first, then send header and data together, so a read error
/// becomes an error reply rather than a broken stream.
fn do_read(conn: &Conn, req: Request) {
    let len = req.length as usize;
    let mut buf = conn.take_buffer(len);
    match conn.export.dev.read_at(&mut buf[..len], req.offset) {
        Err(e) => conn.reply(&req, dev_error(&e), &e.to_string()),
        Ok(()) if len == 0 => conn.reply(&req, 0, ""),
        Ok(()) => {
            if conn.structured {
                let h = proto::encode_offset_data_header(req.cookie, req.offset, req.length, true);
                conn.send(&mut [IoSlice::new(&h), IoSlice::new(&buf[..len])]);
            } else {
                let h = proto::encode_simple_reply(0, req.cookie);
                conn.send(&mut [IoSlice::new(&h), IoSlice::new(&buf[..len])]);
            }
        }
    }
    conn.give_buffer(buf);
}

/// BLOCK_STATUS: compute the extents of every selected context (the
/// device holds writes to the range back until the guard drops), send one
/// chunk per context, then release. The send is bounded by
/// `block_status_timeout`: a client that does not take the reply loses the
/// connection rather than stalling the writers.
fn do_block_status(conn: &Conn, req: Request) {
    let ctxs: Vec<MetaContext> = conn.contexts.iter().map(|(_, c)| c.clone()).collect();
    let one = req.flags & cmd_flags::REQ_ONE != 0;
    let max = if one { 1 } else { conn.max_extents };
    let status = match conn
        .export
        .dev
        .block_status(req.offset, u64::from(req.length), &ctxs, max)
    {
        Ok(s) => s,
        Err(e) => return conn.reply(&req, dev_error(&e), &e.to_string()),
    };
    let mut out = Vec::new();
    let n = conn.contexts.len();
    for (i, ((id, _), ext)) in conn.contexts.iter().zip(&status.extents).enumerate() {
        let mut d: Vec<(u32, u32)> = ext
            .iter()
            .map(|e| (u32::try_from(e.len).unwrap_or(u32::MAX), e.flags))
            .collect();
        if one {
            d.truncate(1);
        }
        if d.is_empty() {
            // Never an empty chunk: the device always covers a byte; be safe.
            d.push((req.length, 0));
        }
        proto::encode_block_status(&mut out, req.cookie, *id, &d, i + 1 == n);
    }
    let deadline = Instant::now() + conn.block_status_timeout;
    conn.send_by(&out, deadline);
    drop(status.guard);
}

/// Send `buf` on `fd` without blocking past `deadline` (non-blocking sends
/// and poll, leaving the socket's mode alone for the other threads).
fn send_until(fd: RawFd, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of the given length; `fd` is the
        // connection's socket, open while its writer lock is held.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r >= 0 {
            buf = buf.get(r as usize..).unwrap_or_default();
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd living across the call, nfds 1.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

impl Conn {
    /// Send one reply, giving up (and cutting the connection) at `deadline`.
    fn send_by(&self, buf: &[u8], deadline: Instant) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let Some(w) = self.writer.try_lock_until(deadline) else {
            tracing::debug!("nbd: block status reply timed out waiting for the socket");
            self.dead.store(true, Ordering::Relaxed);
            // Another reply is stuck in the socket: cut it (that thread
            // sees an error and lets go of the writer).
            let _ = self.cut.shutdown(Shutdown::Both);
            return;
        };
        // As in `send`: nothing goes out after `abort`, and the request is
        // answered (its cookie is in bytes 8..16 of the first chunk).
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        if let Some(c) = buf.get(8..16) {
            self.answered(u64::from_be_bytes(c.try_into().unwrap_or_default()));
        }
        if let Err(e) = send_until(w.fd(), buf, deadline) {
            tracing::debug!("nbd: block status reply failed: {e}");
            self.dead.store(true, Ordering::Relaxed);
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_unix_and_tcp() {
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(Listen::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse(),
            Ok(Listen::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!("tcp:[::1]:0".parse(), Ok(Listen::Tcp("[::1]:0".into())));
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "udp:x:1",
        ] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
        let l = Listen::Tcp("localhost:1".into());
        assert_eq!(l.to_string().parse(), Ok(l));
    }
}
