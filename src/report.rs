//! Progress reporting for long offline work (`check`, `merge`, ...).
//!
//! The library side only bumps a [`Progress`] (two atomics: work done and
//! work total, in whatever unit the job picks, usually bytes). The front end
//! decides whether anybody sees it: [`ProgressMonitor`] samples the counter
//! from a thread and draws an `indicatif` bar on stderr, only when stderr is a
//! terminal and the job is big enough to be worth a bar. Workers never block
//! on the display and never touch the terminal themselves.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Shared progress of one job: `done` out of `total` units.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A fresh counter, shareable between the worker and a monitor.
    pub fn new() -> Arc<Self> {
        Arc::new(Progress::default())
    }
    /// Set the amount of work (it may be raised once the job knows more).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }
    /// Record `n` more units done.
    pub fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    /// Set the units done outright (for jobs that know their position).
    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// When to draw a bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Never draw (scripts, tests, `--quiet`).
    Off,
    /// Draw when stderr is a terminal and `total` reaches the threshold.
    Auto {
        /// Smallest total (in the job's unit) worth a bar.
        min_total: u64,
    },
}

/// Samples a [`Progress`] every 100 ms and shows it as a bar on stderr.
/// Dropping it (or [`ProgressMonitor::finish`]) stops the thread and clears
/// the bar.
pub struct ProgressMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The bar once drawn, shared with the sampling thread.
    bar: Arc<parking_lot::Mutex<Option<indicatif::ProgressBar>>>,
}

impl ProgressMonitor {
    /// Start monitoring `progress`, labelled `label` (e.g. "checking").
    /// Returns a monitor that does nothing when `mode` says no bar.
    pub fn start(label: &str, progress: Arc<Progress>, mode: ProgressMode) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bar = Arc::new(parking_lot::Mutex::new(None));
        let min_total = match mode {
            ProgressMode::Off => {
                return ProgressMonitor {
                    stop,
                    thread: None,
                    bar,
                };
            }
            ProgressMode::Auto { min_total } => min_total,
        };
        if !std::io::stderr().is_terminal() {
            return ProgressMonitor {
                stop,
                thread: None,
                bar,
            };
        }
        let label = label.to_owned();
        let stop2 = Arc::clone(&stop);
        let bar2 = Arc::clone(&bar);
        let spawned = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || monitor_loop(&label, &progress, &stop2, &bar2, min_total));
        ProgressMonitor {
            stop,
            // Without a thread there is simply no bar; the job is unaffected.
            thread: spawned.ok(),
            bar,
        }
    }

    /// True while a bar is on screen.
    pub fn is_drawing(&self) -> bool {
        self.bar.lock().is_some()
    }

    /// Run `f` (which prints to the terminal) with the bar hidden, so
    /// output lines and the bar do not overwrite each other.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        let guard = self.bar.lock();
        match guard.as_ref() {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// Stop and clear the bar.
    pub fn finish(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProgressMonitor {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn monitor_loop(
    label: &str,
    progress: &Progress,
    stop: &AtomicBool,
    shared: &parking_lot::Mutex<Option<indicatif::ProgressBar>>,
    min_total: u64,
) {
    while !stop.load(Ordering::Relaxed) {
        let total = progress.total();
        let mut bar = shared.lock();
        if bar.is_none() && total >= min_total && total > 0 {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent:>3}% ({elapsed} elapsed, eta {eta})",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.to_owned());
            *bar = Some(b);
        }
        if let Some(b) = bar.as_ref() {
            b.set_length(total.max(1));
            b.set_position(progress.done().min(total));
        }
        drop(bar);
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(b) = shared.lock().take() {
        b.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_counts_and_off_monitor_is_inert() {
        let p = Progress::new();
        p.set_total(10);
        p.inc(3);
        p.inc(4);
        assert_eq!((p.done(), p.total()), (7, 10));
        p.set_done(10);
        assert_eq!(p.done(), 10);
        let m = ProgressMonitor::start("test", Arc::clone(&p), ProgressMode::Off);
        assert!(m.thread.is_none());
        assert!(!m.is_drawing());
        assert_eq!(m.suspend(|| 5), 5);
        m.finish();
    }
}
