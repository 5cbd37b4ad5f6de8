//! The soak (`bench/soak.py`) as part of the suite: a short run against the
//! release binary must end with exit 0 (no mismatch against its model, no
//! hang). It drives the daemon with libnbd's Python bindings
//! (python3-libnbd, installed by scripts/test.sh) through Debian's python3.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn soak(minutes: &str, without: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = vec![
        root.join("bench/soak.py").to_string_lossy().into_owned(),
        "--minutes".into(),
        minutes.into(),
        "--dmsnap".into(),
        env!("CARGO_BIN_EXE_dmsnap").into(),
    ];
    if !without.is_empty() {
        args.push(format!("--without={without}"));
    }
    let mut child = Command::new("/usr/bin/python3")
        .args(&args)
        .spawn()
        .expect("run /usr/bin/python3 bench/soak.py");
    // The soak stops on its own at a hang (30 s); this is the last resort.
    let deadline = Duration::from_secs(60 * 3);
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            panic!("bench/soak.py did not end within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st.success(),
        "bench/soak.py --minutes {minutes}: {st} (its report is above)"
    );
}

/// Every fault the soak knows (PO overflows, full P stores, merges,
/// SIGTERM and kill -9 restarts), half a minute.
#[test]
fn soak_half_a_minute() {
    soak("0.5", "");
}
