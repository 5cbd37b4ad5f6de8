//! Warnings of an offline read, kept for its output instead of the log.
//!
//! Offline `status` is a report, not a daemon: what the layers below would
//! log as a WARN line while it reads a COW ("snapshot is marked invalid")
//! belongs in the status it prints. [`capture_warnings`] runs a closure with
//! a subscriber for the current thread that keeps WARN and ERROR events and
//! drops everything else (events of threads the closure starts go to the
//! global subscriber as before).

use parking_lot::Mutex;
use std::fmt::Write as _;
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

#[derive(Default)]
struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        // Levels order by verbosity: WARN and ERROR are the ones <= WARN.
        *m.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut m = Message(String::new());
        e.record(&mut m);
        self.lines.lock().push(m.0.trim().to_string());
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Run `f`; return its result and the warnings it raised on this thread.
pub(crate) fn capture_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let c = Capture::default();
    let lines = c.lines.clone();
    let r = tracing::subscriber::with_default(c, f);
    let lines = std::mem::take(&mut *lines.lock());
    (r, lines)
}

#[cfg(test)]
mod tests {
    #[test]
    fn warnings_are_kept_and_the_rest_dropped() {
        let (v, w) = super::capture_warnings(|| {
            tracing::info!("not kept");
            tracing::warn!(snapshot = "a", "marked {}", "invalid");
            7
        });
        assert_eq!(v, 7);
        assert_eq!(w, vec!["marked invalid snapshot=a".to_string()]);
    }
}
