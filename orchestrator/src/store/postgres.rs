//! [`SagaStore`] on PostgreSQL. The SQL stays portable to PostgreSQL-wire
//! engines (CockroachDB, YugabyteDB): no advisory locks, no LISTEN/NOTIFY,
//! `FOR UPDATE SKIP LOCKED` for the queue.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use super::{
    Commit, Derived, JournalEntry, LeaseChange, ListFilter, NewSaga, NextAttempt, SagaRecord,
    SagaStore, Stats, journal_entry, record,
};
use crate::error::Error;
use crate::saga::Status;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres/orchestrator");

/// Every column of a saga row, in the shape [`record`] reads.
const SAGA_COLUMNS: &str = "saga_id, idempotency_key, customer_id, items, state, status, version,
    extract(epoch FROM next_attempt_at)::float8 AS next_attempt_at, lease_owner,
    extract(epoch FROM lease_expires_at)::float8 AS lease_expires_at,
    extract(epoch FROM created_at)::float8 AS created_at,
    extract(epoch FROM updated_at)::float8 AS updated_at,
    extract(epoch FROM progress_at)::float8 AS progress_at,
    extract(epoch FROM finished_at)::float8 AS finished_at";

/// Statuses with no more work for the executor.
const SETTLED: &str = "('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')";

/// A statement built once from constants, kept for the life of the process:
/// the hot path neither formats nor allocates its SQL again.
macro_rules! sql {
    ($($format:tt)*) => {{
        static SQL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
        *SQL.get_or_init(|| format!($($format)*).leak())
    }};
}

/// Saga persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// A store on `pool`, after applying the embedded migrations.
    pub async fn migrate(pool: PgPool) -> Result<Self, Error> {
        MIGRATIONS.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The pool, for tests that inspect the tables.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn records(rows: &[PgRow]) -> Result<Vec<SagaRecord>, Error> {
    rows.iter().map(record).collect()
}

/// Journal rows as nine parallel arrays, for one `unnest` insert.
#[derive(Default)]
struct JournalColumns {
    step: Vec<String>,
    kind: Vec<String>,
    attempt: Vec<i32>,
    outcome: Vec<String>,
    detail: Vec<String>,
    rpc: Vec<String>,
    actor: Vec<String>,
    started_at: Vec<f64>,
    finished_at: Vec<Option<f64>>,
}

impl JournalColumns {
    fn of(entries: &[JournalEntry]) -> Self {
        let mut columns = Self::default();
        for e in entries {
            columns.step.push(e.step.clone());
            columns.kind.push(e.kind.clone());
            columns.attempt.push(e.attempt);
            columns.outcome.push(e.outcome.clone());
            columns.detail.push(e.detail.clone());
            columns.rpc.push(e.rpc.clone());
            columns.actor.push(e.actor.clone());
            columns.started_at.push(e.started_at);
            columns.finished_at.push(e.finished_at);
        }
        columns
    }
}

/// The `unnest` source of journal rows, parameters `$first..$first+8`.
fn journal_source(first: usize) -> String {
    let p = |i: usize| first + i;
    format!(
        "unnest(${}::text[], ${}::text[], ${}::int[], ${}::text[], ${}::text[], ${}::text[], ${}::text[], ${}::float8[], ${}::float8[])
         AS j(step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8)
    )
}

macro_rules! bind_journal {
    ($query:expr, $columns:expr) => {
        $query
            .bind(&$columns.step)
            .bind(&$columns.kind)
            .bind(&$columns.attempt)
            .bind(&$columns.outcome)
            .bind(&$columns.detail)
            .bind(&$columns.rpc)
            .bind(&$columns.actor)
            .bind(&$columns.started_at)
            .bind(&$columns.finished_at)
    };
}

#[tonic::async_trait]
impl SagaStore for PgStore {
    async fn create(
        &self,
        saga: &NewSaga,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<(SagaRecord, bool), Error> {
        let status = saga.state.status(&crate::saga::ORDER_SAGA);
        let inserted = sqlx::query(sql!(
            "INSERT INTO sagas (saga_id, idempotency_key, customer_id, items, status, state,
                                lease_owner, lease_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {SAGA_COLUMNS}"
        ))
        .bind(&saga.saga_id)
        .bind(&saga.idempotency_key)
        .bind(&saga.customer_id)
        .bind(Json(&saga.items))
        .bind(status.as_str())
        .bind(Json(&saga.state))
        .bind(owner)
        .bind(lease_ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok((record(&row)?, true));
        }
        // The key was used before: answer with the first saga.
        let row = sqlx::query(sql!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE idempotency_key = $1"
        ))
        .bind(&saga.idempotency_key)
        .fetch_one(&self.pool)
        .await?;
        Ok((record(&row)?, false))
    }

    async fn load(&self, saga_id: &str) -> Result<Option<SagaRecord>, Error> {
        sqlx::query(sql!("SELECT {SAGA_COLUMNS} FROM sagas WHERE saga_id = $1"))
            .bind(saga_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(record)
            .transpose()
    }

    async fn commit(&self, commit: Commit<'_>) -> Result<Option<i64>, Error> {
        // Take the connection before building the statement's arguments:
        // under load, thousands of sagas may wait for one of the pool's
        // connections, and they should not each hold a copy of their state
        // and journal while they wait.
        let mut connection = self.pool.acquire().await?;
        let state = commit.state;
        let derived = Derived::of(state, commit.definition);
        let (next_mode, next_secs) = match commit.next_attempt {
            NextAttempt::Keep => ("keep", 0.0),
            NextAttempt::Clear => ("clear", 0.0),
            NextAttempt::In(delay) => ("in", delay.as_secs_f64()),
        };
        let (lease_mode, owner, ttl) = match commit.lease {
            LeaseChange::Keep => ("keep", None, 0.0),
            LeaseChange::Extend { owner, ttl } => ("extend", Some(owner), ttl.as_secs_f64()),
            LeaseChange::Release { owner } => ("release", Some(owner), 0.0),
        };
        let columns = JournalColumns::of(commit.journal);
        // One statement, so one round trip and one atomic commit: the saga
        // row (only if its version and lease still match) and its journal
        // rows (only if the row was updated).
        let sql = sql!(
            "WITH updated AS (
                UPDATE sagas SET
                    state = $3, status = $4, version = version + 1,
                    total_amount_cents = $5, failure_reason = $6, last_error = $7,
                    current_step = $8, attempts = $9, cancel_requested = $10,
                    next_attempt_at = CASE $11
                        WHEN 'keep' THEN next_attempt_at
                        WHEN 'clear' THEN NULL
                        ELSE now() + make_interval(secs => $12) END,
                    lease_owner = CASE $13 WHEN 'release' THEN NULL ELSE lease_owner END,
                    lease_expires_at = CASE $13
                        WHEN 'release' THEN NULL
                        WHEN 'extend' THEN now() + make_interval(secs => $15)
                        ELSE lease_expires_at END,
                    updated_at = now(),
                    progress_at = CASE
                        WHEN status IS DISTINCT FROM $4 OR current_step IS DISTINCT FROM $8
                        THEN now() ELSE progress_at END,
                    finished_at = CASE WHEN $4 IN ('COMPLETED', 'FAILED', 'CANCELLED')
                        THEN coalesce(finished_at, now()) ELSE NULL END
                WHERE saga_id = $1 AND version = $2
                  AND ($14::text IS NULL OR lease_owner = $14)
                RETURNING version
            ), journal AS (
                INSERT INTO saga_journal
                    (saga_id, step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)
                SELECT $1, j.step, j.kind, j.attempt, j.outcome, j.detail, j.rpc, j.actor,
                       to_timestamp(j.started_at), to_timestamp(j.finished_at)
                FROM updated, {}
            ), flush AS (
                -- Read at commit time: 'off' lets this transaction return
                -- before its WAL is flushed.
                SELECT set_config('synchronous_commit', CASE WHEN $25 THEN 'on' ELSE 'off' END, true)
            )
            SELECT version FROM updated, flush",
            journal_source(16)
        );
        let query = sqlx::query_scalar(sql)
            .bind(commit.saga_id)
            .bind(commit.expected_version)
            .bind(Json(state))
            .bind(derived.status.as_str())
            .bind(derived.total_amount_cents)
            .bind(&state.failure_reason)
            .bind(&state.last_error)
            .bind(derived.current_step)
            .bind(derived.attempts)
            .bind(derived.cancel_requested)
            .bind(next_mode)
            .bind(next_secs)
            .bind(lease_mode)
            .bind(owner)
            .bind(ttl);
        Ok(bind_journal!(query, columns)
            .bind(commit.durable)
            .fetch_optional(&mut *connection)
            .await?)
    }

    async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease_ttl: Duration,
    ) -> Result<Vec<SagaRecord>, Error> {
        let rows = sqlx::query(sql!(
            "UPDATE sagas SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
             WHERE saga_id IN (
                 SELECT saga_id FROM sagas
                 WHERE status NOT IN {SETTLED}
                   AND (lease_owner IS NULL OR lease_expires_at < now())
                   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                 ORDER BY next_attempt_at NULLS FIRST
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING {SAGA_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease_ttl.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        records(&rows)
    }

    async fn claim(
        &self,
        saga_id: &str,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<Option<SagaRecord>, Error> {
        sqlx::query(sql!(
            "UPDATE sagas SET lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3)
             WHERE saga_id = $1 AND status NOT IN {SETTLED}
               AND (lease_owner IS NULL OR lease_expires_at < now())
             RETURNING {SAGA_COLUMNS}"
        ))
        .bind(saga_id)
        .bind(owner)
        .bind(lease_ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record)
        .transpose()
    }

    async fn renew_leases(
        &self,
        owner: &str,
        saga_ids: &[String],
        lease_ttl: Duration,
    ) -> Result<Vec<String>, Error> {
        if saga_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "UPDATE sagas SET lease_expires_at = now() + make_interval(secs => $3)
             WHERE saga_id = ANY($2) AND lease_owner = $1
             RETURNING saga_id",
        )
        .bind(owner)
        .bind(saga_ids)
        .bind(lease_ttl.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, Error> {
        Ok(sqlx::query(
            "UPDATE sagas SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn journal(&self, saga_id: &str) -> Result<Vec<JournalEntry>, Error> {
        let rows = sqlx::query(
            "SELECT step, kind, attempt, outcome, detail, rpc, actor,
                    extract(epoch FROM started_at)::float8 AS started_at,
                    extract(epoch FROM finished_at)::float8 AS finished_at
             FROM saga_journal WHERE saga_id = $1 ORDER BY entry_id",
        )
        .bind(saga_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(journal_entry).collect()
    }

    async fn append_journal(&self, saga_id: &str, entries: &[JournalEntry]) -> Result<(), Error> {
        let columns = JournalColumns::of(entries);
        let sql = sql!(
            "INSERT INTO saga_journal
                 (saga_id, step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)
             SELECT $1, j.step, j.kind, j.attempt, j.outcome, j.detail, j.rpc, j.actor,
                    to_timestamp(j.started_at), to_timestamp(j.finished_at)
             FROM {}",
            journal_source(2)
        );
        let query = sqlx::query(sql).bind(saga_id);
        bind_journal!(query, columns).execute(&self.pool).await?;
        Ok(())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, Error> {
        let product = filter
            .product_id
            .as_ref()
            .map(|p| serde_json::json!([{ "product_id": p }]));
        let rows = sqlx::query(sql!(
            "SELECT {SAGA_COLUMNS} FROM sagas
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR customer_id = $2)
               AND ($3::jsonb IS NULL OR items @> $3)
               AND ($4::float8 IS NULL OR created_at < now() - make_interval(secs => $4))
               AND ($5::float8 IS NULL OR status = 'NEEDS_ATTENTION'
                    OR (status NOT IN {SETTLED} AND progress_at < now() - make_interval(secs => $5)))
               AND ($6::text IS NULL OR saga_id < $6)
             ORDER BY saga_id DESC
             LIMIT $7"
        ))
        .bind(filter.status.map(Status::as_str))
        .bind(&filter.customer_id)
        .bind(product.map(Json))
        .bind(filter.older_than.map(|d| d.as_secs_f64()))
        .bind(filter.stuck_after.map(|d| d.as_secs_f64()))
        .bind(&filter.before_id)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        records(&rows)
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let (oldest, started, finished): (Option<f64>, i64, i64) = sqlx::query_as(
            "SELECT
                 (SELECT extract(epoch FROM now() - min(created_at))::float8
                    FROM sagas WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')),
                 (SELECT count(*) FROM sagas WHERE created_at > now() - interval '1 minute'),
                 (SELECT count(*) FROM sagas WHERE finished_at > now() - interval '1 minute')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Stats::new(counts, oldest, started, finished))
    }
}
