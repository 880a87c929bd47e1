//! The HTTP port (`--http-listen`, served by [`common::probe`]): `/healthz`
//! (200 while serving, 503 while stopping), `/readyz` (the database and
//! each participant's gRPC health, checked in the background every
//! second; 503 while any fails) and `/metrics` (Prometheus text: the
//! in-process metrics of [`crate::metrics`], and a few gauges read from
//! live work in the database at scrape time).
//!
//! gRPC health follows the same checks. The server as a whole (service
//! `""`, what a gRPC probe asks by default) is SERVING exactly when
//! `/readyz` answers 200: the database and every participant. The
//! orchestrator's own services (`saga.v1.OrderService`,
//! `saga.v1.AdminService`) follow the database only: an orchestrator whose
//! participant is down still takes orders and keeps them durably until the
//! participant returns, so a client or balancer that asks for
//! `saga.v1.OrderService` keeps sending them, while a readiness probe on
//! the whole server sees the outage.

use std::sync::Arc;
use std::time::Duration;

use common::probe::{Check, Probes, Readiness};
use tonic::transport::Channel;
use tonic_health::server::HealthReporter;

use crate::clients::ParticipantUrls;
use crate::executor::Executor;

/// How often readiness is checked.
pub const READINESS_EVERY: Duration = Duration::from_secs(1);
/// How long a participant's health check may take.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// The probes and metrics of `executor`, with `readiness` as checked by
/// [`watch_readiness`], and `routes` beside them (the web console).
pub fn probes(
    executor: Arc<Executor>,
    readiness: Arc<Readiness>,
    routes: Option<axum::Router>,
) -> Probes {
    crate::metrics::describe();
    let stopping = executor.stopping();
    Probes {
        readiness,
        stopping,
        metrics: Arc::new(move || {
            let executor = executor.clone();
            Box::pin(async move { render(&executor).await })
        }),
        routes,
    }
}

/// Checks the database and every participant now and every
/// [`READINESS_EVERY`] until the executor stops, into `readiness` and the
/// gRPC health (the whole server: every check; `services`: the database).
pub async fn watch_readiness(
    executor: Arc<Executor>,
    participants: ParticipantUrls,
    readiness: Arc<Readiness>,
    reporter: HealthReporter,
    services: Vec<&'static str>,
) {
    let channels: Vec<(String, Result<Channel, String>)> = [
        ("inventory", &participants.inventory),
        ("payment", &participants.payment),
        ("fulfillment", &participants.fulfillment),
    ]
    .into_iter()
    .map(|(name, url)| {
        // The step calls' TLS: the check reaches the participant as the
        // calls do.
        let channel = participants
            .endpoint(name, url)
            .map(|endpoint| endpoint.connect_timeout(HEALTH_TIMEOUT).connect_lazy())
            .map_err(|e| e.to_string());
        (format!("participant:{name}"), channel)
    })
    .collect();
    let check = || {
        let executor = executor.clone();
        let channels = channels.clone();
        async move {
            let database = async {
                let ready = tokio::time::timeout(HEALTH_TIMEOUT, executor.store().ready()).await;
                Check::of(
                    "database",
                    ready.unwrap_or_else(|_| Err(format!("no answer within {HEALTH_TIMEOUT:?}"))),
                )
            };
            // Checked concurrently: one slow participant does not delay
            // the others' results.
            let participants: Vec<_> = channels
                .into_iter()
                .map(|(name, channel)| {
                    tokio::spawn(async move {
                        let result = match channel {
                            Ok(channel) => {
                                common::probe::grpc_health(channel, HEALTH_TIMEOUT).await
                            }
                            Err(error) => Err(error),
                        };
                        Check::of(name, result)
                    })
                })
                .collect();
            let mut checks = vec![database.await];
            for participant in participants {
                if let Ok(check) = participant.await {
                    checks.push(check);
                }
            }
            checks
        }
    };
    common::probe::watch_readiness(
        readiness,
        reporter,
        services,
        READINESS_EVERY,
        executor.stopping(),
        |check| check.name == "database",
        check,
    )
    .await;
}

async fn render(executor: &Executor) -> String {
    use common::metrics::set;
    set(crate::metrics::IN_FLIGHT, &[], executor.in_flight() as f64);
    set(
        crate::metrics::MAX_IN_FLIGHT,
        &[],
        executor.config().max_in_flight as f64,
    );
    set(
        crate::metrics::WATCH_STREAMS,
        &[],
        executor.watch_streams() as f64,
    );
    set(
        crate::metrics::MAX_WATCHES,
        &[],
        executor.config().max_watches as f64,
    );
    if let Some((in_use, idle, max)) = executor.store().pool_state() {
        set(
            crate::metrics::POOL,
            &[("state", "in_use")],
            f64::from(in_use),
        );
        set(crate::metrics::POOL, &[("state", "idle")], f64::from(idle));
        set(crate::metrics::POOL_MAX, &[], f64::from(max));
    }
    if let Some(waiting) = executor.store().writes_waiting() {
        set(crate::metrics::POOL_WAITING, &[], waiting as f64);
    }
    let mut text = common::metrics::render();
    // Read from live work only (the unsettled sagas' index and the last
    // minute's finishes), the same reads as the admin Stats call.
    if let Ok(stats) = executor.store().stats().await {
        text.push_str(
            "# HELP saga_sagas Sagas per status that is not terminal (in flight, NEEDS_ATTENTION), all replicas.\n\
             # TYPE saga_sagas gauge\n",
        );
        for status in crate::saga::Status::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
        {
            let count = stats
                .counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, count)| *count);
            text.push_str(&format!("saga_sagas{{status=\"{status}\"}} {count}\n"));
        }
        text.push_str(&format!(
            "# HELP saga_oldest_open_age_seconds Age of the oldest saga that is not terminal, all replicas (0 when none).\n\
             # TYPE saga_oldest_open_age_seconds gauge\nsaga_oldest_open_age_seconds {}\n\
             # HELP saga_started_last_minute Sagas placed in the last minute, all replicas.\n\
             # TYPE saga_started_last_minute gauge\nsaga_started_last_minute {}\n\
             # HELP saga_finished_last_minute Sagas that reached a terminal status in the last minute, all replicas.\n\
             # TYPE saga_finished_last_minute gauge\nsaga_finished_last_minute {}\n",
            stats.oldest_active_age.unwrap_or(0.0).max(0.0),
            stats.started_last_minute,
            stats.finished_last_minute
        ));
    }
    text
}
