//! Progress of long work (log replay, `aggr check`) for the person waiting.
//!
//! On a terminal (and with human-readable logs) a bar redrawn in place on
//! stderr; otherwise, e.g. under systemd, one plain log line at most every
//! few seconds. Nothing at all for work that ends before the first update
//! is due, so short runs stay quiet.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static LOG_JSON: AtomicBool = AtomicBool::new(false);

/// Logs are JSON lines: never draw a bar among them.
pub fn set_log_json(json: bool) {
    LOG_JSON.store(json, Ordering::Relaxed);
}

pub struct Progress {
    what: &'static str,
    tty: bool,
    started: Instant,
    last: Option<Instant>,
    drawn: bool,
}

const BAR: usize = 30;

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        Progress {
            what,
            tty: std::io::stderr().is_terminal() && !LOG_JSON.load(Ordering::Relaxed),
            started: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    fn interval(&self) -> Duration {
        if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        }
    }

    /// `done` of `total` units; `note` says what is being worked on.
    pub fn update(&mut self, done: u64, total: u64, note: &str) {
        let now = Instant::now();
        let due = match self.last {
            Some(t) => now.duration_since(t) >= self.interval(),
            None => now.duration_since(self.started) >= self.interval(),
        };
        if !due {
            return;
        }
        self.last = Some(now);
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        if self.tty {
            let fill = (pct as usize * BAR) / 100;
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "\r\x1b[2K{} [{}{}] {pct:>3}% {done}/{total} {note}",
                self.what,
                "#".repeat(fill),
                " ".repeat(BAR - fill)
            );
            let _ = e.flush();
            self.drawn = true;
        } else {
            tracing::info!(done, total, percent = pct, at = note, "{}", self.what);
        }
    }

    /// Ends the bar's line, if one was drawn.
    pub fn finish(self) {
        if self.drawn {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(
                e,
                "\r\x1b[2K{}: done in {:.1?}",
                self.what,
                self.started.elapsed()
            );
        }
    }
}
