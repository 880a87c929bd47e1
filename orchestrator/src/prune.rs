//! Retention: the pruner deletes finished sagas (COMPLETED, FAILED,
//! CANCELLED) and their journals once they have been finished for longer
//! than `--retention` (30 days by default; `off` keeps them forever).
//!
//! - Every replica runs it, every `--prune-interval` (with ±20% jitter so
//!   replicas drift apart); replicas share the work, since each batch skips
//!   the rows another replica is deleting (PostgreSQL `SKIP LOCKED`).
//! - It works in batches of `--prune-batch` sagas, each its own short
//!   transaction over the index of finished sagas, and goes on while full
//!   batches come back, up to [`MAX_BATCHES_PER_ROUND`] per round, so a
//!   backlog (a first start on years of history) drains without one long
//!   transaction or lock.
//! - It never touches a saga in flight or NEEDS_ATTENTION: only a terminal
//!   saga has a finish time. An idempotency key lives in its saga's row,
//!   so a key is honoured while its saga is in flight and for the retention
//!   period after it finished (the key's window), and pruning ends it.
//! - Its progress is exported: `saga_pruned_total`, `saga_prune_rounds_total`,
//!   `saga_prune_errors_total`, `saga_prune_lag_seconds` (how long past its
//!   retention the oldest kept finished saga is; 0 when none is overdue)
//!   and `saga_retention_seconds`.
//!
//! `sagactl export --finished-before T` (AdminService/ExportSagas) reads
//! what the pruner would delete, for an archive kept before it does.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::executor::now_epoch;
use crate::store::SagaStore;

/// Default `--retention`: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// The shortest `--retention` accepted: shorter would race a saga's last
/// journal entries and the clients reading its outcome.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);
/// Default `--prune-batch`.
pub const DEFAULT_PRUNE_BATCH: i64 = 500;
/// Most batches in one round; the next round goes on.
pub const MAX_BATCHES_PER_ROUND: usize = 100;

/// Sagas deleted by the pruner.
pub const PRUNED: &str = "saga_pruned_total";
/// Pruning rounds run.
pub const ROUNDS: &str = "saga_prune_rounds_total";
/// Pruning rounds that failed (the next round tries again).
pub const ERRORS: &str = "saga_prune_errors_total";
/// How far behind the pruner is.
pub const LAG: &str = "saga_prune_lag_seconds";
/// The retention period (0: off).
pub const RETENTION: &str = "saga_retention_seconds";

/// Declares the pruner's metrics.
pub fn describe() {
    use common::metrics::{describe_counter, describe_gauge};
    describe_counter(
        PRUNED,
        "Finished sagas deleted (with their journals) by the pruner.",
    );
    describe_counter(ROUNDS, "Pruning rounds run.");
    describe_counter(
        ERRORS,
        "Pruning rounds that failed; the next round tries again.",
    );
    describe_gauge(
        LAG,
        "How long past its retention the oldest kept finished saga is, in seconds (0: none overdue).",
    );
    describe_gauge(
        RETENTION,
        "The retention period in seconds (0: off, kept forever).",
    );
}

/// What the pruner keeps and how it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long a finished saga is kept; None keeps them forever.
    pub keep: Option<Duration>,
    /// Sagas per batch (one transaction).
    pub batch: i64,
    /// Time between rounds.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: Some(DEFAULT_RETENTION),
            batch: DEFAULT_PRUNE_BATCH,
            interval: Duration::from_secs(60),
        }
    }
}

/// The pruner's flags (`orchestrator serve` and `orchestrator dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// How long a finished saga (COMPLETED, FAILED, CANCELLED) and its
    /// journal are kept before the pruner deletes them, e.g. 30d, 12h; at
    /// least 1m, or `off` to keep every saga. A saga's idempotency key is
    /// honoured for as long as the saga is kept. Sagas in flight and
    /// NEEDS_ATTENTION are never pruned. Archive with `sagactl export
    /// --finished-before` first if you need the history.
    #[arg(long, env = "ORCHESTRATOR_RETENTION", default_value = "30d",
          value_parser = parse_retention)]
    pub retention: Keep,

    /// Most sagas the pruner deletes in one transaction.
    #[arg(long, env = "ORCHESTRATOR_PRUNE_BATCH", default_value_t = DEFAULT_PRUNE_BATCH,
          value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub prune_batch: i64,

    /// Time between pruning rounds on this replica (±20% jitter).
    #[arg(long, env = "ORCHESTRATOR_PRUNE_INTERVAL", default_value = "1m",
          value_parser = common::cli::parse_duration)]
    pub prune_interval: Duration,
}

impl Default for RetentionArgs {
    /// The flags' defaults.
    fn default() -> Self {
        let retention = Retention::default();
        Self {
            retention: Keep(retention.keep),
            prune_batch: retention.batch,
            prune_interval: retention.interval,
        }
    }
}

impl RetentionArgs {
    /// The retention the flags ask for; the error names the wrong flag.
    pub fn retention(&self) -> Result<Retention, Error> {
        if self.prune_interval < Duration::from_secs(1) {
            return Err(Error::invalid("--prune-interval must be at least 1s"));
        }
        Ok(Retention {
            keep: self.retention.0,
            batch: self.prune_batch,
            interval: self.prune_interval,
        })
    }
}

/// A parsed `--retention`: how long, or None for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

/// Parses `--retention`: a duration of at least a minute ("30d", "12h"),
/// or `off` (or 0) to keep every saga.
pub fn parse_retention(text: &str) -> Result<Keep, String> {
    if matches!(text.trim(), "off" | "0") {
        return Ok(Keep(None));
    }
    let keep = common::cli::parse_duration(text.trim())?;
    if keep < MIN_RETENTION {
        return Err(format!(
            "{text:?} is shorter than a minute; give 1m or more, or off"
        ));
    }
    Ok(Keep(Some(keep)))
}

/// One round: deletes the sagas finished before `now - keep`, batch after
/// batch while batches come back full (at most
/// [`MAX_BATCHES_PER_ROUND`]); returns how many it deleted. Updates the
/// metrics.
pub async fn prune_round(
    store: &dyn SagaStore,
    keep: Duration,
    batch: i64,
    now: f64,
) -> Result<u64, Error> {
    let cutoff = now - keep.as_secs_f64();
    let mut pruned = 0;
    for _ in 0..MAX_BATCHES_PER_ROUND {
        let deleted = store.prune_finished(cutoff, batch).await?;
        pruned += deleted;
        common::metrics::count(PRUNED, &[], deleted);
        if deleted < u64::try_from(batch).unwrap_or(u64::MAX) {
            break;
        }
    }
    let lag = match store.oldest_finished().await? {
        Some(oldest) => (cutoff - oldest).max(0.0),
        None => 0.0,
    };
    common::metrics::set(LAG, &[], lag);
    common::metrics::count(ROUNDS, &[], 1);
    Ok(pruned)
}

/// Runs the pruner until the task is dropped (nothing when retention is
/// off).
pub async fn run(store: Arc<dyn SagaStore>, retention: Retention) {
    common::metrics::set(
        RETENTION,
        &[],
        retention.keep.map_or(0.0, |keep| keep.as_secs_f64()),
    );
    let Some(keep) = retention.keep else {
        tracing::info!("retention is off: finished sagas are kept forever");
        return;
    };
    tracing::info!(
        retention = %crate::admin::human_duration(keep.as_secs_f64()),
        batch = retention.batch,
        "pruning finished sagas older than the retention period"
    );
    loop {
        tokio::time::sleep(jittered(retention.interval)).await;
        match prune_round(store.as_ref(), keep, retention.batch, now_epoch()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned finished sagas past their retention"),
            Err(error) => {
                common::metrics::count(ERRORS, &[], 1);
                tracing::warn!(%error, "pruning failed; the next round tries again");
            }
        }
    }
}

/// `interval` ±20%.
fn jittered(interval: Duration) -> Duration {
    let unit = (common::domain::random_u64() % 1_000) as f64 / 1_000.0;
    interval.mul_f64(0.8 + 0.4 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_a_minute_or_more_or_off() {
        let days = |n: u64| Keep(Some(Duration::from_secs(n * 86_400)));
        assert_eq!(parse_retention("30d"), Ok(days(30)));
        assert_eq!(
            parse_retention("1m"),
            Ok(Keep(Some(Duration::from_secs(60))))
        );
        assert_eq!(parse_retention("off"), Ok(Keep(None)));
        assert_eq!(parse_retention("0"), Ok(Keep(None)));
        for bad in ["59s", "500ms", "soon", "-1d", ""] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rounds_drift_within_a_fifth_of_the_interval() {
        let interval = Duration::from_secs(60);
        for _ in 0..1000 {
            let wait = jittered(interval);
            assert!(wait >= interval.mul_f64(0.8) && wait <= interval.mul_f64(1.2));
        }
    }
}
