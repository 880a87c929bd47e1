//! `saga.v1.AdminService`, for operators and `sagactl`: find stuck sagas,
//! explain them, resume or abort them; reconcile the sagas with the
//! participants' records (the join itself is in [`crate::reconcile`]).
//! Every mutating call is journalled with who asked and why. Who may call
//! what is decided in [`crate::auth`]: each handler's first line asks it.

use std::sync::Arc;
use std::time::Duration;

use common::domain::{Id, bounded_text};
use proto::saga::v1 as pb;
use tonic::{Request, Response, Status};

use crate::api::{
    history_pb, items_pb, page_size, page_token, status_filter, status_pb, timestamp,
};
use crate::auth::{AdminRpc, authorize};
use crate::error::Error;
use crate::executor::{Executor, RequestEffect, now_epoch};
use crate::reconcile;
use crate::saga::{Event, Kind, Registry, Status as SagaStatus};
use crate::store::{ListFilter, SagaRecord};

/// Longest operator name and reason accepted, in bytes.
const MAX_OPERATOR_BYTES: usize = 128;
const MAX_REASON_BYTES: usize = 512;

/// "1h02m", "4m05s", "12s", "850ms": short and exact enough for a table.
pub fn human_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0) as u64);
    }
    let total = seconds as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) => format!("{minutes}m{secs:02}s"),
        (0, _, _) => format!("{hours}h{minutes:02}m"),
        _ => format!("{days}d{hours:02}h"),
    }
}

/// Why a saga counts as stuck at `now`, or None; its steps are named by
/// its definition in `registry`.
pub fn stuck_reason(
    saga: &SagaRecord,
    registry: &Registry,
    now: f64,
    stuck_after: Duration,
) -> Option<String> {
    let reason = saga.state.failure_reason.as_deref().unwrap_or("");
    if saga.status == SagaStatus::NeedsAttention {
        return Some(format!("needs an operator: {reason}"));
    }
    let idle = now - saga.progress_at;
    if saga.status.is_terminal() || idle <= stuck_after.as_secs_f64() {
        return None;
    }
    let (step, kind) = saga.current_step(registry)?;
    let mut why = format!(
        "no progress for {} at {} {} (attempt {})",
        human_duration(idle),
        step.name,
        match kind {
            Kind::Action => "action",
            Kind::Compensation => "compensation",
        },
        saga.state.current_attempts() + 1,
    );
    if let Some(error) = &saga.state.last_error {
        why.push_str(&format!("; last error: {error}"));
    }
    match (
        &saga.next_attempt_at,
        &saga.lease_owner,
        saga.lease_expires_at,
    ) {
        (Some(at), _, _) if *at > now => {
            why.push_str(&format!("; next attempt in {}", human_duration(at - now)))
        }
        (_, Some(owner), Some(until)) if until > now => {
            why.push_str(&format!("; driven by {owner}, call in flight"))
        }
        _ => why.push_str("; no replica holds it (a sweeper will claim it)"),
    }
    Some(why)
}

/// The summary line of a saga.
pub fn summary_pb(
    saga: &SagaRecord,
    registry: &Registry,
    now: f64,
    stuck_after: Duration,
) -> pb::SagaSummary {
    let current = saga.state.current().filter(|_| !saga.status.is_terminal());
    pb::SagaSummary {
        saga_id: saga.saga_id.clone(),
        status: status_pb(saga.status).into(),
        current_step: current
            .and_then(|_| saga.current_step(registry))
            .map(|(step, _)| step.name.to_owned())
            .unwrap_or_default(),
        attempts: if current.is_some() {
            saga.state.current_attempts()
        } else {
            0
        },
        last_error: saga.state.last_error.clone().unwrap_or_default(),
        created_at: Some(timestamp(saga.created_at)),
        updated_at: Some(timestamp(saga.updated_at)),
        next_attempt_at: saga.next_attempt_at.map(timestamp),
        lease_owner: saga
            .lease_owner
            .clone()
            .filter(|_| saga.lease_expires_at.is_some_and(|until| until > now))
            .unwrap_or_default(),
        stuck_reason: stuck_reason(saga, registry, now, stuck_after).unwrap_or_default(),
        customer_id: saga.customer_id.clone(),
        progress_at: Some(timestamp(saga.progress_at)),
    }
}

/// The longest filter duration accepted: a century.
const MAX_FILTER_SECONDS: i64 = 100 * 365 * 24 * 3600;

fn duration(value: Option<prost_types::Duration>, field: &str) -> Result<Option<Duration>, Error> {
    value
        .map(|d| {
            // Normalized, as google.protobuf.Duration requires: nanos in
            // 0..1e9 for a non-negative duration.
            if !(0..1_000_000_000).contains(&d.nanos) || d.seconds < 0 {
                return Err(Error::invalid(format!(
                    "{field} must be a normalized, non-negative duration \
                     (seconds >= 0, 0 <= nanos < 1000000000); got {}s {}ns",
                    d.seconds, d.nanos
                )));
            }
            if d.seconds > MAX_FILTER_SECONDS {
                return Err(Error::invalid(format!(
                    "{field} is {}s; the limit is {MAX_FILTER_SECONDS}s (100 years)",
                    d.seconds
                )));
            }
            Ok(Duration::new(d.seconds as u64, d.nanos as u32))
        })
        .transpose()
}

/// What a RetrySaga did, for the operator.
fn retry_message(saga: &SagaRecord, effect: RequestEffect) -> &'static str {
    match effect {
        RequestEffect::Changed if saga.state.waiting_retry => {
            "retry recorded with a fresh attempt budget"
        }
        RequestEffect::Changed => "retrying now with a fresh attempt budget",
        RequestEffect::Unchanged => {
            "retry recorded; nothing to reset: an attempt is in flight and none failed since the last retry"
        }
        RequestEffect::NotWritten => "nothing to retry",
    }
}

/// What an AbortSaga did, for the operator.
fn abort_message(saga: &SagaRecord, effect: RequestEffect) -> &'static str {
    match effect {
        RequestEffect::Changed if saga.state.stop_requested.is_some() => {
            "abort recorded: compensation starts when the call in flight ends"
        }
        RequestEffect::Changed => "aborting: compensating now",
        RequestEffect::Unchanged => "abort recorded; the saga was already compensating",
        RequestEffect::NotWritten => "nothing to abort",
    }
}

/// `saga.v1.AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    executor: Arc<Executor>,
    stuck_after: Duration,
}

impl AdminApi {
    /// The service over `executor`; `stuck_after` is the default threshold.
    pub fn new(executor: Arc<Executor>, stuck_after: Duration) -> Self {
        Self {
            executor,
            stuck_after,
        }
    }

    /// A saga with its journal, as GetSaga and ExportSagas answer it.
    async fn saga_pb(&self, saga: SagaRecord) -> Result<pb::GetSagaResponse, Error> {
        let journal = self.executor.store().journal(&saga.saga_id).await?;
        let registry = &self.executor.config().registry;
        Ok(pb::GetSagaResponse {
            saga: Some(summary_pb(&saga, registry, now_epoch(), self.stuck_after)),
            items: items_pb(&saga.items),
            total_amount_cents: saga.total_amount_cents(),
            failure_reason: saga.state.failure_reason.clone().unwrap_or_default(),
            step_outputs: saga.state.outputs.clone().into_iter().collect(),
            journal: history_pb(&saga, registry, journal),
            cancel_requested: saga.state.cancel_requested(),
            version: saga.version,
            idempotency_key: saga.idempotency_key.clone().unwrap_or_default(),
            trace_id: saga.trace_id(),
            finished_at: saga.finished_at.map(timestamp),
        })
    }

    async fn load(&self, saga_id: String) -> Result<SagaRecord, Error> {
        let saga_id = Id::parse("saga_id", saga_id)?;
        self.executor
            .store()
            .load(saga_id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no saga {saga_id}")))
    }

    /// Applies an operator request; returns the saga after it and what
    /// the request did.
    async fn operate(
        &self,
        saga_id: String,
        operator: String,
        event: Event,
        name: &str,
        detail: String,
    ) -> Result<(SagaRecord, RequestEffect), Error> {
        let saga_id = Id::parse("saga_id", saga_id)?;
        let operator = match bounded_text("operator", operator, MAX_OPERATOR_BYTES)? {
            operator if operator.trim().is_empty() => "unknown operator".to_owned(),
            operator => operator,
        };
        self.executor
            .request_with_effect(
                saga_id.as_str(),
                &event,
                name,
                &format!("operator {operator}"),
                &detail,
            )
            .await
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        authorize(&request, AdminRpc::ListSagas)?;
        let request = request.into_inner();
        let limit = page_size(request.limit)?;
        let stuck_after = duration(request.stuck_after, "stuck_after")?.unwrap_or(self.stuck_after);
        let filter = ListFilter {
            status: status_filter(request.status)?,
            customer_id: match request.customer_id {
                id if id.is_empty() => None,
                id => Some(
                    Id::parse("customer_id", id)
                        .map_err(Error::from)?
                        .into_inner(),
                ),
            },
            product_id: match request.product_id {
                id if id.is_empty() => None,
                id => Some(
                    Id::parse("product_id", id)
                        .map_err(Error::from)?
                        .into_inner(),
                ),
            },
            older_than: duration(request.older_than, "older_than")?,
            stuck_after: request.stuck_only.then_some(stuck_after),
            before_id: page_token(request.page_token)?,
            limit: limit + 1,
        };
        let mut sagas = self.executor.store().list(&filter).await?;
        let next_page_token = if sagas.len() as i64 > limit {
            sagas.truncate(limit as usize);
            sagas.last().map(|s| s.saga_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let now = now_epoch();
        Ok(Response::new(pb::ListSagasResponse {
            sagas: sagas
                .iter()
                .map(|saga| summary_pb(saga, &self.executor.config().registry, now, stuck_after))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::GetSagaResponse>, Status> {
        authorize(&request, AdminRpc::GetSaga)?;
        let saga = self.load(request.into_inner().saga_id).await?;
        Ok(Response::new(self.saga_pb(saga).await?))
    }

    async fn export_sagas(
        &self,
        request: Request<pb::ExportSagasRequest>,
    ) -> Result<Response<pb::ExportSagasResponse>, Status> {
        authorize(&request, AdminRpc::ExportSagas)?;
        let request = request.into_inner();
        let before = match request.finished_before {
            Some(t) if (0..1_000_000_000).contains(&t.nanos) => {
                t.seconds as f64 + f64::from(t.nanos) / 1e9
            }
            Some(_) => return Err(Error::invalid("finished_before has nanos out of range").into()),
            None => return Err(Error::invalid("finished_before is required").into()),
        };
        let limit = page_size(request.page_size)?;
        let after = page_token(request.page_token)?.unwrap_or_default();
        let mut sagas = self
            .executor
            .store()
            .finished_page(before, &after, limit + 1)
            .await?;
        let next_page_token = if sagas.len() as i64 > limit {
            sagas.truncate(limit as usize);
            sagas.last().map(|s| s.saga_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let mut page = Vec::with_capacity(sagas.len());
        for saga in sagas {
            page.push(self.saga_pb(saga).await?);
        }
        Ok(Response::new(pb::ExportSagasResponse {
            sagas: page,
            next_page_token,
        }))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::RetrySagaResponse>, Status> {
        authorize(&request, AdminRpc::RetrySaga)?;
        let request = request.into_inner();
        let reason = bounded_text("reason", request.reason, MAX_REASON_BYTES)?;
        let detail = if reason.is_empty() {
            "retry now with a fresh attempt budget".to_owned()
        } else {
            format!("retry now with a fresh attempt budget: {reason}")
        };
        let saga_id = request.saga_id.clone();
        let (saga, effect) = self
            .operate(
                request.saga_id,
                request.operator,
                Event::OperatorRetry,
                "retry",
                detail,
            )
            .await?;
        Ok(Response::new(pb::RetrySagaResponse {
            saga_id,
            status: status_pb(saga.status).into(),
            message: retry_message(&saga, effect).to_owned(),
        }))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::AbortSagaResponse>, Status> {
        authorize(&request, AdminRpc::AbortSaga)?;
        let request = request.into_inner();
        let reason = bounded_text("reason", request.reason, MAX_REASON_BYTES)?;
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason is required: say why the saga is aborted").into());
        }
        let saga_id = request.saga_id.clone();
        let (saga, effect) = self
            .operate(
                request.saga_id,
                request.operator,
                Event::OperatorAbort {
                    reason: reason.clone(),
                },
                "abort",
                format!("abort: {reason}"),
            )
            .await?;
        Ok(Response::new(pb::AbortSagaResponse {
            saga_id,
            status: status_pb(saga.status).into(),
            message: abort_message(&saga, effect).to_owned(),
        }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        authorize(&request, AdminRpc::Stats)?;
        let mut stats = self.executor.store().stats().await?;
        // Terminal statuses: what this replica settled since it started
        // (counted in process), so that the call reads no history.
        for status in SagaStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            let count = i64::try_from(self.executor.settled_count(status)).unwrap_or(i64::MAX);
            if count > 0 {
                stats.counts.push((status, count));
            }
        }
        Ok(Response::new(pb::StatsResponse {
            counts: stats
                .counts
                .into_iter()
                .map(|(status, count)| pb::StatusCount {
                    status: status_pb(status).into(),
                    count,
                })
                .collect(),
            oldest_non_terminal_age: stats.oldest_active_age.and_then(|age| {
                prost_types::Duration::try_from(Duration::from_secs_f64(age.max(0.0))).ok()
            }),
            started_last_minute: stats.started_last_minute,
            finished_last_minute: stats.finished_last_minute,
            in_flight: self.executor.in_flight() as i64,
        }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let rpc = if request.get_ref().repair {
            AdminRpc::ReconcileRepair
        } else {
            AdminRpc::Reconcile
        };
        authorize(&request, rpc)?;
        let request = request.into_inner();
        let operator = match bounded_text("operator", request.operator, MAX_OPERATOR_BYTES)? {
            operator if operator.trim().is_empty() => "unknown operator".to_owned(),
            operator => operator,
        };
        let limit = match request.limit {
            0 => DEFAULT_RECONCILE_LIMIT,
            n @ 1..=MAX_RECONCILE_LIMIT => n,
            n => {
                return Err(Error::invalid(format!(
                    "limit is {n}; it must be between 1 and {MAX_RECONCILE_LIMIT} (0 for {DEFAULT_RECONCILE_LIMIT})"
                ))
                .into());
            }
        };
        let page_size = match request.page_size {
            0 => MAX_RECONCILE_PAGE,
            n @ 1..=MAX_RECONCILE_PAGE => n,
            n => {
                return Err(Error::invalid(format!(
                    "page_size is {n}; it must be between 1 and {MAX_RECONCILE_PAGE} (0 for {MAX_RECONCILE_PAGE})"
                ))
                .into());
            }
        };
        let clients = self.executor.calls().records().ok_or_else(|| {
            Error::FailedPrecondition(
                "this orchestrator has no participant clients to reconcile with".to_owned(),
            )
        })?;
        let options = reconcile::Options {
            repair: request.repair,
            actor: format!("operator {operator}"),
            limit: limit as usize,
            page_size,
        };
        let started = std::time::Instant::now();
        let report = reconcile::run(self.executor.store().as_ref(), &clients, &options).await?;
        tracing::info!(
            repair = options.repair,
            actor = %options.actor,
            discrepancies = report.found,
            repaired = report.repaired,
            repair_failed = report.repair_failed,
            sagas_checked = report.sagas_checked,
            sagas_skipped = report.sagas_skipped,
            took = ?started.elapsed(),
            "reconciled"
        );
        Ok(Response::new(reconcile_pb(report)))
    }
}

/// Discrepancies returned by Reconcile when the request says 0, and at most.
const DEFAULT_RECONCILE_LIMIT: i32 = 1000;
const MAX_RECONCILE_LIMIT: i32 = 10_000;
/// Rows per page Reconcile reads from each side, by default and at most
/// (the participants' listing maximum).
const MAX_RECONCILE_PAGE: i32 = 1000;

/// The protobuf form of a reconcile report.
fn reconcile_pb(report: reconcile::Report) -> pb::ReconcileResponse {
    let [reservations, charges, shipments] = report.records_checked;
    pb::ReconcileResponse {
        discrepancies: report
            .discrepancies
            .into_iter()
            .map(|d| pb::Discrepancy {
                saga_id: d.saga_id,
                participant: match d.finding.party {
                    reconcile::Party::Inventory => pb::Participant::Inventory,
                    reconcile::Party::Payment => pb::Participant::Payment,
                    reconcile::Party::Fulfillment => pb::Participant::Fulfillment,
                }
                .into(),
                kind: match d.finding.kind {
                    reconcile::Kind::Orphan => pb::DiscrepancyKind::Orphan,
                    reconcile::Kind::Missing => pb::DiscrepancyKind::Missing,
                    reconcile::Kind::Mismatch => pb::DiscrepancyKind::Mismatch,
                }
                .into(),
                saga_status: d
                    .saga_status
                    .map_or(pb::OrderStatus::Unspecified, status_pb)
                    .into(),
                expected: d.finding.expected,
                found: d.finding.found,
                detail: d.finding.detail,
                repaired: d.repair.as_ref().is_some_and(|r| r.succeeded),
                repair: d.repair.map(|r| r.detail).unwrap_or_default(),
            })
            .collect(),
        discrepancies_found: report.found,
        sagas_checked: report.sagas_checked,
        sagas_skipped: report.sagas_skipped,
        reservations_checked: reservations,
        charges_checked: charges,
        shipments_checked: shipments,
        repaired: report.repaired,
        repair_failed: report.repair_failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well_in_a_table() {
        assert_eq!(human_duration(0.25), "250ms");
        assert_eq!(human_duration(12.7), "12s");
        assert_eq!(human_duration(245.0), "4m05s");
        assert_eq!(human_duration(3720.0), "1h02m");
        assert_eq!(human_duration(90_000.0), "1d01h");
        assert_eq!(human_duration(-3.0), "0ms");
    }
}
