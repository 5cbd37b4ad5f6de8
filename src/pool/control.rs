//! The control socket (`POOL/control.sock`): how `snapshot create`,
//! `status`, `merge`, … reach a running daemon. One JSON request per line, one
//! JSON reply per line. Requests are bounded in size before they are read.

use super::{error_chain, ActivePool, CowSpec, MergeProgress, PoolError, SnapshotRequest};
use crate::store::StoreType;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    SnapshotCreate {
        name: String,
        /// Bytes.
        chunk_size: Option<u64>,
        cow: CowSpec,
        store: StoreType,
    },
    SnapshotRemove {
        name: String,
    },
    MergeStart {
        name: String,
    },
    MergeStatus,
    /// `diff FROM [TO]` (`to`: `None` or `"origin"` for the origin).
    Diff {
        from: String,
        #[serde(default)]
        to: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Reply {
    fn ok(result: serde_json::Value) -> Self {
        Reply {
            ok: true,
            error: None,
            result,
        }
    }
    fn err(e: &PoolError) -> Self {
        Reply {
            ok: false,
            error: Some(error_chain(e)),
            result: serde_json::Value::Null,
        }
    }
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("talking to the dmsnap daemon on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon sent a reply that is not valid: {0}")]
    BadReply(String),
    /// The daemon refused the request; the message is its error chain.
    #[error("{0}")]
    Refused(String),
}

fn handle(pool: &ActivePool, req: Request) -> Reply {
    let r: Result<serde_json::Value, PoolError> = (|| match req {
        Request::Status => Ok(serde_json::to_value(pool.status()).unwrap_or_default()),
        Request::SnapshotCreate {
            name,
            chunk_size,
            cow,
            store,
        } => {
            let chunk_size = chunk_size.map(super::check_chunk_size).transpose()?;
            let e = pool.create_snapshot(&SnapshotRequest {
                name,
                chunk_size,
                cow,
                store,
            })?;
            Ok(serde_json::to_value(e).unwrap_or_default())
        }
        Request::SnapshotRemove { name } => {
            pool.remove_snapshot(&name)?;
            Ok(serde_json::Value::Null)
        }
        Request::MergeStart { name } => {
            pool.start_merge(&name)?;
            Ok(serde_json::to_value(pool.poll_merge()?).unwrap_or_default())
        }
        Request::MergeStatus => Ok(serde_json::to_value(pool.poll_merge()?).unwrap_or_default()),
        Request::Diff { from, to } => {
            Ok(serde_json::to_value(pool.diff(&from, to.as_deref())?).unwrap_or_default())
        }
    })();
    match r {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(&e),
    }
}

fn serve_conn(pool: &ActivePool, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(u64::MAX));
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_REQUEST_BYTES {
            let r = Reply::err(&PoolError::Invalid("control request too long".into()));
            writeln!(writer, "{}", serde_json::to_string(&r).unwrap_or_default())?;
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(pool, req),
            Err(e) => Reply::err(&PoolError::Invalid(format!("bad control request: {e}"))),
        };
        let mut text = serde_json::to_vec(&reply).unwrap_or_default();
        text.push(b'\n');
        writer.write_all(&text)?;
    }
}

/// The daemon's side: accepts control connections on a background thread.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (mode 0600) and serve `pool` until [`ControlServer::stop`].
    pub fn start(pool: Arc<ActivePool>, path: &Path) -> io::Result<ControlServer> {
        let listener = bind_unix(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let pool = pool.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || {
                                    if let Err(e) = serve_conn(&pool, s) {
                                        tracing::debug!("control connection: {e}");
                                    }
                                });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            tracing::warn!("control socket accept: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stop accepting and remove the socket file.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bind a Unix socket with mode 0600, replacing a stale socket file (one
/// nothing listens on) but never a live one.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // SAFETY: umask only changes this process's file-creation mask; we
    // restore it right after bind. No memory is involved.
    let old = unsafe { libc::umask(0o177) };
    let r = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = r?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The client side, used by the CLI.
pub struct ControlClient {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connect to the daemon of pool `dir`, if one runs.
    pub fn connect(dir: &Path) -> Option<ControlClient> {
        let path = dir.join(super::CONTROL_SOCKET);
        let s = UnixStream::connect(&path).ok()?;
        Some(ControlClient {
            path,
            stream: BufReader::new(s),
        })
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ControlError> {
        let path = self.path.clone();
        let io = |source| ControlError::Io { path, source };
        let mut text =
            serde_json::to_vec(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
        text.push(b'\n');
        self.stream.get_mut().write_all(&text).map_err(io)?;
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::BadReply(
                "the daemon closed the connection".into(),
            ));
        }
        let r: Reply =
            serde_json::from_str(&line).map_err(|e| ControlError::BadReply(e.to_string()))?;
        if r.ok {
            Ok(r.result)
        } else {
            Err(ControlError::Refused(
                r.error.unwrap_or_else(|| "unknown error".into()),
            ))
        }
    }

    /// Ask for the merge's progress.
    pub fn merge_status(&mut self) -> Result<Option<MergeProgress>, ControlError> {
        let v = self.call(&Request::MergeStatus)?;
        serde_json::from_value(v).map_err(|e| ControlError::BadReply(e.to_string()))
    }
}
