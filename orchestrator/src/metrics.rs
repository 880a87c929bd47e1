//! The orchestrator's metrics: their names, help texts and the few helpers
//! the executor and the API call. Everything is counted in this process
//! (`common::metrics`); nothing here touches the database. The table of
//! every metric is in README.md ("Metrics and health").

use common::metrics::{self, SECONDS, SIZES};

/// Sagas this replica created (PlaceOrder), by definition.
pub const STARTED: &str = "saga_started_total";
/// Sagas this replica drove to a settled status, by outcome.
pub const FINISHED: &str = "saga_finished_total";
/// Sagas driven by this replica now.
pub const IN_FLIGHT: &str = "saga_in_flight";
/// The in-flight bound (--max-in-flight).
pub const MAX_IN_FLIGHT: &str = "saga_max_in_flight";
/// WatchOrder streams open on this replica now.
pub const WATCH_STREAMS: &str = "saga_watch_streams";
/// The WatchOrder bound (--max-watches).
pub const MAX_WATCHES: &str = "saga_max_watches";
/// Each participant call's duration, by step, kind and outcome.
pub const STEP_SECONDS: &str = "saga_step_duration_seconds";
/// Participant calls, by step, kind and gRPC code.
pub const ATTEMPTS: &str = "saga_step_attempts_total";
/// Participant calls that failed retryably (the saga retries), by code.
pub const RETRIES: &str = "saga_step_retries_total";
/// Sagas set aside for an operator.
pub const NEEDS_ATTENTION: &str = "saga_needs_attention_total";
/// PlaceOrders refused at the in-flight bound.
pub const SHED: &str = "saga_place_order_shed_total";
/// Sagas claimed, by source (sweeper, resume).
pub const CLAIMS: &str = "saga_lease_claims_total";
/// Sagas claimed whose lease another replica held and let expire
/// (PostgreSQL; the embedded mode has one replica).
pub const TAKEOVERS: &str = "saga_lease_takeovers_total";
/// How overdue the most overdue saga of a sweep's claim was.
pub const SWEEPER_LAG: &str = "saga_sweeper_lag_seconds";
/// How long one sweep (claim query) took.
pub const SWEEP_SECONDS: &str = "saga_sweep_duration_seconds";
/// Sagas claimed per sweep.
pub const SWEEP_CLAIMED: &str = "saga_sweep_claimed";
/// Database pool connections, by state (in_use, idle).
pub const POOL: &str = "saga_db_pool_connections";
/// The database pool's bound.
pub const POOL_MAX: &str = "saga_db_pool_max_connections";
/// Gauge: writes waiting for a batch writer's connection.
pub const POOL_WAITING: &str = "saga_db_pool_waiting";

/// Declares every metric, so a scrape shows them from the start.
pub fn describe() {
    metrics::describe_counter(STARTED, "Sagas this replica created, by definition.");
    metrics::describe_counter(
        FINISHED,
        "Sagas this replica drove to a settled status, by outcome (COMPLETED, FAILED, CANCELLED, NEEDS_ATTENTION).",
    );
    metrics::describe_gauge(IN_FLIGHT, "Sagas driven by this replica now.");
    metrics::describe_gauge(MAX_IN_FLIGHT, "The in-flight bound (--max-in-flight).");
    metrics::describe_gauge(
        WATCH_STREAMS,
        "WatchOrder streams open on this replica now.",
    );
    metrics::describe_gauge(MAX_WATCHES, "The WatchOrder bound (--max-watches).");
    metrics::describe_histogram(
        STEP_SECONDS,
        "Participant call durations, by step, kind (action, compensation) and outcome.",
    );
    metrics::describe_counter(ATTEMPTS, "Participant calls, by step, kind and gRPC code.");
    metrics::describe_counter(
        RETRIES,
        "Participant calls that failed retryably, by step, kind and gRPC code.",
    );
    metrics::describe_counter(NEEDS_ATTENTION, "Sagas set aside as NEEDS_ATTENTION.");
    metrics::describe_counter(SHED, "PlaceOrders refused at the --max-in-flight bound.");
    metrics::describe_counter(CLAIMS, "Sagas claimed by this replica, by source.");
    metrics::describe_counter(
        TAKEOVERS,
        "Sagas claimed whose lease another replica held and let expire.",
    );
    metrics::describe_histogram(
        SWEEPER_LAG,
        "How overdue the most overdue saga of a sweep's claim was, in seconds.",
    );
    metrics::describe_histogram(SWEEP_SECONDS, "Duration of one sweep's claim query.");
    metrics::describe_histogram(SWEEP_CLAIMED, "Sagas claimed per sweep that claimed any.");
    metrics::describe_gauge(POOL, "Database pool connections, by state (in_use, idle).");
    metrics::describe_gauge(POOL_MAX, "The database pool's bound.");
    metrics::describe_gauge(
        POOL_WAITING,
        "Writes (creations and transitions) queued for a batch writer's database connection.",
    );
    metrics::describe_histogram("saga_batch_size", "Rows per group-commit flush, by writer.");
    metrics::describe_histogram(
        "saga_batch_commit_seconds",
        "Duration of one group-commit flush, by writer.",
    );
}

/// One participant call: its duration, its attempt, and a retry if it
/// failed retryably.
pub fn call(step: &str, kind: &str, outcome: &str, code: &str, seconds: f64, retryable: bool) {
    let labels = [("step", step), ("kind", kind), ("outcome", outcome)];
    metrics::observe(STEP_SECONDS, &labels, seconds, SECONDS);
    let labels = [("step", step), ("kind", kind), ("code", code)];
    metrics::count(ATTEMPTS, &labels, 1);
    if retryable {
        metrics::count(RETRIES, &labels, 1);
    }
}

/// A sweep: its duration, what it claimed and how late the latest was.
pub fn sweep(seconds: f64, claimed: usize, lag: Option<f64>) {
    metrics::observe(SWEEP_SECONDS, &[], seconds, SECONDS);
    if claimed > 0 {
        metrics::observe(SWEEP_CLAIMED, &[], claimed as f64, SIZES);
        metrics::count(CLAIMS, &[("source", "sweeper")], claimed as u64);
    }
    if let Some(lag) = lag {
        metrics::observe(SWEEPER_LAG, &[], lag.max(0.0), SECONDS);
    }
}
