//! systemd socket activation (`sd_listen_fds(3)`): listening sockets passed
//! by the service manager as descriptors 3, 4, … with `LISTEN_PID` (our
//! pid) and `LISTEN_FDS` (how many) in the environment. `serve` takes them
//! as listeners, unix or TCP, so dmsnap runs as a socket-activated service
//! (`contrib/dmsnap@.socket` + `dmsnap@.service`).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More than any sensible unit passes; a bound before taking descriptors.
const MAX_LISTEN_FDS: usize = 64;

/// Why the passed listeners cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors from 1 to {MAX_LISTEN_FDS}")]
    BadCount(String),
}

/// Take the listeners the service manager passed, if it passed any to this
/// process (`LISTEN_PID` names another process, or is unset: none). The
/// variables are removed so that children do not take them too; call this
/// early, before threads are started. Each descriptor is marked
/// close-on-exec and owned by the caller from now on.
pub fn take_listen_fds() -> Result<Vec<OwnedFd>, ActivationError> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let (true, Some(count)) = (for_us, count) else {
        return Ok(Vec::new());
    };
    let n: usize = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=MAX_LISTEN_FDS).contains(n))
        .ok_or(ActivationError::BadCount(count))?;
    Ok((0..n)
        .map(|k| {
            let fd = LISTEN_FDS_START + k as RawFd;
            // SAFETY: the service manager passed descriptors
            // LISTEN_FDS_START..+n to this process (LISTEN_PID is ours) and
            // nothing else in the process owns them; the variables are
            // removed above, so each is taken exactly once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own, with valid arguments.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            owned
        })
        .collect())
}
