//! What happened during a run, as it happened: every fault, kill, crash,
//! cancel and abort with its time offset, and the recovery after each kill
//! or crash.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One thing that happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Seconds since the run's fault phase began.
    pub at_seconds: f64,
    /// What kind (`kill-orchestrator`, `participant-fault`, `cancel`, ...).
    pub kind: String,
    /// What it hit (a service, an order id).
    pub target: String,
    /// The particulars.
    pub detail: String,
}

/// How a process or database came back after a kill or crash.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// The fault's kind.
    pub kind: String,
    /// What was killed or crashed.
    pub target: String,
    /// How long it was kept down, in milliseconds.
    pub down_ms: u64,
    /// From the restart until it served (health SERVING, or the database
    /// accepting connections), in milliseconds.
    pub serving_ms: u64,
    /// From the restart until a canary order placed through it completed,
    /// in milliseconds; None if none completed in time.
    pub canary_ms: Option<u64>,
}

/// The run's log, shared by the fault injector and the client.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<Event>>,
    recoveries: Mutex<Vec<Recovery>>,
    echo: bool,
}

impl Timeline {
    /// An empty log starting now; `echo` prints fault events as they
    /// happen (not cancels and aborts, which are many).
    pub fn new(echo: bool) -> Self {
        Self {
            start: Instant::now(),
            events: Mutex::default(),
            recoveries: Mutex::default(),
            echo,
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records an event now.
    pub fn record(&self, kind: &str, target: &str, detail: impl Into<String>) {
        let event = Event {
            at_seconds: (self.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            kind: kind.to_owned(),
            target: target.to_owned(),
            detail: detail.into(),
        };
        if self.echo && !matches!(kind, "cancel" | "abort") {
            println!("{}", format_event(&event));
        }
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// Records a recovery.
    pub fn recovered(&self, recovery: Recovery) {
        self.recoveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(recovery);
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every recovery so far.
    pub fn recoveries(&self) -> Vec<Recovery> {
        self.recoveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One line: `+  12.345s  kind  target  detail`.
pub fn format_event(event: &Event) -> String {
    format!(
        "  +{:>8.3}s  {:<24} {:<16} {}",
        event.at_seconds, event.kind, event.target, event.detail
    )
}
