//! A watchdog for engine tests: [`watched`] runs a device call (or any
//! step) and, should it take longer than [`limit`] (10 s; the environment's
//! `DMSNAP_WATCHDOG_SECS` overrides it), prints what hung with the stacks of
//! every thread of the process (through `gdb`, installed by
//! `scripts/test.sh`; the kernel's view from `/proc` when gdb is missing)
//! and aborts the test process. A hang fails the test with its evidence
//! instead of stalling the suite.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Watch {
    calls: Mutex<HashMap<u64, (String, Instant)>>,
    next: AtomicU64,
}

fn watch() -> &'static Watch {
    static W: OnceLock<Watch> = OnceLock::new();
    W.get_or_init(|| {
        std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(monitor)
            .expect("spawning the watchdog");
        Watch {
            calls: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    })
}

/// How long one watched call may take.
pub fn limit() -> Duration {
    let secs = std::env::var("DMSNAP_WATCHDOG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// Run `f` under the watchdog, named `what` in its report.
pub fn watched<T>(what: impl Into<String>, f: impl FnOnce() -> T) -> T {
    let w = watch();
    let id = w.next.fetch_add(1, Ordering::Relaxed);
    w.calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (what.into(), Instant::now()));
    struct Done(u64);
    impl Drop for Done {
        fn drop(&mut self) {
            watch()
                .calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.0);
        }
    }
    let _done = Done(id);
    f()
}

fn monitor() {
    let limit = limit();
    // Blocks until the first `watch()` (which spawned this thread) is done.
    let w = watch();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let late: Vec<(String, Duration)> = w
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|(_, t)| t.elapsed() > limit)
            .map(|(what, t)| (what.clone(), t.elapsed()))
            .collect();
        if !late.is_empty() {
            report_and_abort(&late);
        }
    }
}

fn report_and_abort(late: &[(String, Duration)]) -> ! {
    eprintln!(
        "\n==== WATCHDOG: a call took longer than {:?} ====",
        limit()
    );
    for (what, d) in late {
        eprintln!("  {what}: running for {d:?}");
    }
    let pid = std::process::id();
    // gdb stops this process while it looks; should it be killed on its
    // time-out, the process would stay stopped: the shell wakes it.
    let script = format!(
        "timeout -s KILL 45 gdb -p {pid} -batch -nx -iex 'set auto-load off' \
         -ex 'set pagination off' -ex 'thread apply all bt 40' 2>&1; \
         kill -CONT {pid}"
    );
    let gdb = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .output();
    match gdb {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("Thread ") => {
            eprintln!("---- thread stacks (gdb) ----");
            eprintln!("{}", String::from_utf8_lossy(&o.stdout));
        }
        _ => {
            eprintln!("---- threads (gdb unavailable: the kernel's view) ----");
            if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
                for t in tasks.flatten() {
                    let p = t.path();
                    let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                    let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                    let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
                    eprintln!(
                        "{} {} wchan={wchan}\n{stack}",
                        t.file_name().to_string_lossy(),
                        comm.trim()
                    );
                }
            }
        }
    }
    eprintln!("==== WATCHDOG: aborting the test process ====");
    std::process::abort();
}
