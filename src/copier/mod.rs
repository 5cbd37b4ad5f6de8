//! The copy engine: the kcopyd analogue (`dm-kcopyd.c`, §1.14).
//!
//! A job reads one source region **once** and writes it to every destination
//! (or zeroes the destinations). Jobs larger than a sub-job
//! ([`SUB_JOB_BYTES`], kernel `kcopyd_subjob_size_kb`) are cut into sub-jobs
//! that the worker threads run in parallel. The number of jobs in flight is
//! bounded (`copy` blocks when it is reached: back-pressure like the
//! snapshot's `cow_threshold`). A job's `done` callback runs on the worker
//! that finished its last sub-job, after the in-flight slot was released.
//!
//! [`OrderedCompletions`] is the helper that turns completions arriving in
//! any order into deliveries one at a time in sequence order (kernel
//! commit 230c83af), with external completions (a full-chunk snapshot write
//! that skipped the copy) going through the same path.

mod ordered;

pub use ordered::OrderedCompletions;

use crate::io::{DevRef, WriteFlags};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Sub-job size (kernel default 512 KiB).
pub const SUB_JOB_BYTES: u64 = 512 << 10;
/// Default worker threads.
pub const DEFAULT_WORKERS: usize = 4;
/// Default bound on jobs in flight (kernel `cow_threshold`).
pub const DEFAULT_MAX_JOBS: usize = 2048;

/// A byte range of a device.
#[derive(Clone)]
pub struct Region {
    pub dev: DevRef,
    /// Bytes.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({}+{})", self.offset, self.len)
    }
}

/// The outcome of a job: the read error apart from each destination's
/// write error (kernel `read_err` and the `write_err` bitmap). The first
/// error of each kind is kept.
#[derive(Debug, Default)]
pub struct CopyResult {
    pub read_err: Option<io::Error>,
    /// One slot per destination, in the order given.
    pub write_errs: Vec<Option<io::Error>>,
}

impl CopyResult {
    fn new(dests: usize) -> Self {
        CopyResult {
            read_err: None,
            write_errs: (0..dests).map(|_| None).collect(),
        }
    }
    /// Everything succeeded.
    pub fn is_ok(&self) -> bool {
        self.read_err.is_none() && self.write_errs.iter().all(Option::is_none)
    }
    /// Destination `i` holds the source data.
    pub fn dest_ok(&self, i: usize) -> bool {
        self.read_err.is_none() && self.write_errs.get(i).is_some_and(Option::is_none)
    }
    /// Fold a sub-job's outcome in (first error of each kind wins).
    fn absorb(&mut self, sub: CopyResult) {
        if self.read_err.is_none() {
            self.read_err = sub.read_err;
        }
        for (mine, theirs) in self.write_errs.iter_mut().zip(sub.write_errs) {
            if mine.is_none() {
                *mine = theirs;
            }
        }
    }
}

/// Cut `len` bytes into sub-jobs of at most `sub` bytes: `(offset, len)`
/// relative to the job's start.
pub fn split_job(len: u64, sub: u64) -> Vec<(u64, u64)> {
    let sub = sub.max(1);
    let mut out = Vec::with_capacity(len.div_ceil(sub) as usize);
    let mut off = 0;
    while off < len {
        let n = sub.min(len - off);
        out.push((off, n));
        off += n;
    }
    out
}

/// Run one sub-job synchronously: read `src` once (or use zeroes), write
/// every destination.
fn run_sub_job(
    src: Option<&Region>,
    dests: &[Region],
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> CopyResult {
    let mut res = CopyResult::new(dests.len());
    if let Some(src) = src {
        // The worker's buffer is reused: zeroed only when it grows, since
        // the read fills all of it (or the job fails).
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        let buf = &mut buf[..len as usize];
        if let Err(e) = src.dev.read_at(buf, src.offset + off) {
            res.read_err = Some(e);
            return res;
        }
        for (d, slot) in dests.iter().zip(res.write_errs.iter_mut()) {
            if let Err(e) = d.dev.write_at(buf, d.offset + off, WriteFlags::NONE) {
                *slot = Some(e);
            }
        }
    } else {
        for (d, slot) in dests.iter().zip(res.write_errs.iter_mut()) {
            if let Err(e) = d.dev.write_zeroes(d.offset + off, len, WriteFlags::NONE) {
                *slot = Some(e);
            }
        }
    }
    res
}

type DoneFn = Box<dyn FnOnce(CopyResult) + Send>;

struct Job {
    src: Option<Region>,
    dests: Vec<Region>,
    remaining: AtomicUsize,
    result: Mutex<CopyResult>,
    done: Mutex<Option<DoneFn>>,
}

struct SubJob {
    job: Arc<Job>,
    off: u64,
    len: u64,
}

struct Throttle {
    in_flight: Mutex<usize>,
    cond: Condvar,
    max: usize,
}

/// The copy engine. Dropping it lets the workers finish queued jobs and exit.
pub struct Copier {
    tx: Option<Sender<SubJob>>,
    workers: Vec<JoinHandle<()>>,
    throttle: Arc<Throttle>,
    sub_job_bytes: u64,
}

impl Copier {
    /// `workers` threads, at most `max_jobs` jobs in flight.
    pub fn new(workers: usize, max_jobs: usize) -> Arc<Copier> {
        Self::with_sub_job(workers, max_jobs, SUB_JOB_BYTES)
    }

    /// As [`new`](Self::new) with a chosen sub-job size (tests).
    pub fn with_sub_job(workers: usize, max_jobs: usize, sub_job_bytes: u64) -> Arc<Copier> {
        let (tx, rx) = crossbeam_channel::unbounded::<SubJob>();
        let throttle = Arc::new(Throttle {
            in_flight: Mutex::new(0),
            cond: Condvar::new(),
            max: max_jobs.max(1),
        });
        let workers = (0..workers.max(1))
            .map(|i| {
                let rx: Receiver<SubJob> = rx.clone();
                let th = throttle.clone();
                std::thread::Builder::new()
                    .name(format!("dmsnap-kcopyd-{i}"))
                    .spawn(move || worker(rx, th))
                    .expect("spawning a copier thread")
            })
            .collect();
        Arc::new(Copier {
            tx: Some(tx),
            workers,
            throttle,
            sub_job_bytes: sub_job_bytes.max(512),
        })
    }

    /// Jobs submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        *self.throttle.in_flight.lock()
    }

    /// `dm_kcopyd_copy`: copy `src` to every destination (each as long as
    /// `src`), then call `done`. Blocks while the in-flight bound is reached.
    pub fn copy(
        &self,
        src: Region,
        dests: Vec<Region>,
        done: impl FnOnce(CopyResult) + Send + 'static,
    ) {
        debug_assert!(dests.iter().all(|d| d.len == src.len));
        let len = src.len;
        self.submit(Some(src), dests, len, Box::new(done));
    }

    /// `dm_kcopyd_zero`: zero every destination, then call `done`.
    pub fn zero(&self, dests: Vec<Region>, done: impl FnOnce(CopyResult) + Send + 'static) {
        let len = dests.first().map_or(0, |d| d.len);
        self.submit(None, dests, len, Box::new(done));
    }

    /// Copy and wait for the result on this thread.
    pub fn copy_sync(&self, src: Region, dests: Vec<Region>) -> CopyResult {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.copy(src, dests, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| CopyResult {
            read_err: Some(io::Error::other("copier stopped")),
            write_errs: Vec::new(),
        })
    }

    fn submit(&self, src: Option<Region>, dests: Vec<Region>, len: u64, done: DoneFn) {
        let subs = split_job(len, self.sub_job_bytes);
        if subs.is_empty() || dests.is_empty() {
            done(CopyResult::new(dests.len()));
            return;
        }
        {
            let mut n = self.throttle.in_flight.lock();
            while *n >= self.throttle.max {
                self.throttle.cond.wait(&mut n);
            }
            *n += 1;
        }
        let job = Arc::new(Job {
            result: Mutex::new(CopyResult::new(dests.len())),
            src,
            dests,
            remaining: AtomicUsize::new(subs.len()),
            done: Mutex::new(Some(done)),
        });
        let tx = self.tx.as_ref().expect("copier running");
        for (off, len) in subs {
            let sj = SubJob {
                job: job.clone(),
                off,
                len,
            };
            if let Err(e) = tx.send(sj) {
                // No worker left (cannot happen while self lives): run inline.
                let sj = e.into_inner();
                finish_sub_job(sj, &self.throttle, &mut Vec::new());
            }
        }
    }
}

/// Run a sub-job and, after the last one of its job, the job's `done`.
/// A panic in the sub-job's I/O fails the sub-job (every destination of
/// it); a panic in `done` is caught and logged: either way the worker
/// lives on and the in-flight slot is released.
fn finish_sub_job(sj: SubJob, th: &Throttle, buf: &mut Vec<u8>) {
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_sub_job(sj.job.src.as_ref(), &sj.job.dests, sj.off, sj.len, buf)
    }))
    .unwrap_or_else(|_| {
        tracing::error!("a panic in a copy's I/O");
        CopyResult {
            read_err: Some(io::Error::other("a panic in the copy's I/O")),
            write_errs: Vec::new(),
        }
    });
    sj.job.result.lock().absorb(res);
    if sj.job.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        let result = std::mem::take(&mut *sj.job.result.lock());
        let done = sj.job.done.lock().take();
        {
            let mut n = th.in_flight.lock();
            *n -= 1;
            th.cond.notify_one();
        }
        if let Some(done) = done {
            let _ = crate::io::catch_panic("completing a copy job", || {
                done(result);
                Ok(())
            });
        }
    }
}

fn worker(rx: Receiver<SubJob>, th: Arc<Throttle>) {
    let mut buf = Vec::new();
    for sj in rx.iter() {
        finish_sub_job(sj, &th, &mut buf);
        if buf.capacity() > 4 * SUB_JOB_BYTES as usize {
            buf = Vec::new();
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.tx.take();
        // The last reference may go away inside a completion callback, on a
        // worker: that worker cannot join itself; it exits on its own once
        // the callback returns and the channel is empty.
        let me = std::thread::current().id();
        for w in self.workers.drain(..) {
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testing::{Fault, FaultyDev, OpKind};
    use crate::io::{BlockDev, MemDev};

    #[test]
    fn splitting_covers_the_job_exactly() {
        assert_eq!(split_job(0, 512), vec![]);
        assert_eq!(split_job(100, 512), vec![(0, 100)]);
        assert_eq!(split_job(1024, 512), vec![(0, 512), (512, 512)]);
        assert_eq!(
            split_job(1300, 512),
            vec![(0, 512), (512, 512), (1024, 276)]
        );
        let big = split_job(10 * SUB_JOB_BYTES + 7, SUB_JOB_BYTES);
        assert_eq!(big.len(), 11);
        assert_eq!(big.iter().map(|s| s.1).sum::<u64>(), 10 * SUB_JOB_BYTES + 7);
    }

    #[test]
    fn errors_are_aggregated_per_destination_without_threads() {
        let src = MemDev::from_vec((0..=255u8).cycle().take(4096).collect());
        let src = Region {
            dev: Arc::new(src),
            offset: 0,
            len: 4096,
        };
        let good: DevRef = Arc::new(MemDev::new(8192));
        let bad_dev = FaultyDev::new(MemDev::new(8192));
        bad_dev.add(Fault::Range {
            kind: OpKind::Write,
            offset: 5000,
            len: 10,
        });
        let bad: DevRef = Arc::new(bad_dev);
        let dests = vec![
            Region {
                dev: good.clone(),
                offset: 4096,
                len: 4096,
            },
            Region {
                dev: bad.clone(),
                offset: 4096,
                len: 4096,
            },
        ];
        let mut total = CopyResult::new(2);
        let mut buf = Vec::new();
        for (off, len) in split_job(4096, 1024) {
            total.absorb(run_sub_job(Some(&src), &dests, off, len, &mut buf));
        }
        assert!(total.read_err.is_none());
        assert!(total.dest_ok(0));
        assert!(!total.dest_ok(1));
        let mut got = vec![0; 4096];
        good.read_at(&mut got, 4096).unwrap();
        let mut want = vec![0; 4096];
        src.dev.read_at(&mut want, 0).unwrap();
        assert_eq!(got, want);
        // A read error fails every destination.
        let rs = FaultyDev::new(MemDev::new(4096));
        rs.add(Fault::Always { kind: OpKind::Read });
        let src2 = Region {
            dev: Arc::new(rs),
            offset: 0,
            len: 4096,
        };
        let r = run_sub_job(Some(&src2), &dests, 0, 4096, &mut buf);
        assert!(r.read_err.is_some() && !r.dest_ok(0) && !r.dest_ok(1));
    }

    #[test]
    fn big_jobs_split_across_workers_and_read_once() {
        let len = 5 * SUB_JOB_BYTES + 4096;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let src: DevRef = Arc::new(MemDev::from_vec(data.clone()));
        let d1: Arc<MemDev> = Arc::new(MemDev::new(len + 512));
        let d2: Arc<MemDev> = Arc::new(MemDev::new(len));
        let c = Copier::new(4, 8);
        let r = c.copy_sync(
            Region {
                dev: src,
                offset: 0,
                len,
            },
            vec![
                Region {
                    dev: d1.clone(),
                    offset: 512,
                    len,
                },
                Region {
                    dev: d2.clone(),
                    offset: 0,
                    len,
                },
            ],
        );
        assert!(r.is_ok());
        assert_eq!(&d1.snapshot()[512..], &data[..]);
        assert_eq!(d2.snapshot(), data);
        let z = {
            let (tx, rx) = crossbeam_channel::bounded(1);
            c.zero(
                vec![Region {
                    dev: d2.clone(),
                    offset: 4096,
                    len: 8192,
                }],
                move |r| tx.send(r.is_ok()).unwrap(),
            );
            rx.recv().unwrap()
        };
        assert!(z);
        assert!(d2.snapshot()[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn back_pressure_bounds_jobs_in_flight() {
        let src: DevRef = Arc::new(MemDev::new(1 << 20));
        let dst: DevRef = Arc::new(MemDev::new(1 << 20));
        let c = Copier::new(2, 3);
        let max_seen = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..64u64 {
            let c2 = c.clone();
            let m = max_seen.clone();
            let tx = tx.clone();
            c.copy(
                Region {
                    dev: src.clone(),
                    offset: i * 4096,
                    len: 4096,
                },
                vec![Region {
                    dev: dst.clone(),
                    offset: i * 4096,
                    len: 4096,
                }],
                move |r| {
                    m.fetch_max(c2.in_flight() + 1, Ordering::Relaxed);
                    tx.send(r.is_ok()).unwrap();
                },
            );
            assert!(c.in_flight() <= 3);
        }
        drop(tx);
        assert_eq!(rx.iter().filter(|ok| *ok).count(), 64);
        assert!(max_seen.load(Ordering::Relaxed) <= 4);
    }
}
