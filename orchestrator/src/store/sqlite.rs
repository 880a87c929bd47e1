//! [`SagaStore`] on SQLite, for the embedded mode (`orchestrator dev`).
//! One connection serializes every statement, so the version and lease
//! checks need no row locks; times come from this process's clock, which
//! is the only clock an embedded database has.

use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;

use super::{
    Claimable, Commit, CommitPlan, Due, JournalEntry, ListBind, ListDialect, ListFilter, ListQuery,
    NewSaga, SagaBrief, SagaRecord, SagaStore, Stats, TERMINAL, brief, journal_entry, record,
};
use crate::error::Error;
use crate::executor::now_epoch;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite/orchestrator");

const SAGA_COLUMNS: &str = "saga_id, idempotency_key, customer_id, items, state, status, version,
    definition_name, definition_version, trace_parent,
    next_attempt_at, lease_owner, lease_expires_at, created_at, updated_at, progress_at, finished_at";

/// The two queries of [`SagaStore::stats`] on SQLite (`?1` is the time
/// now, in epoch seconds), public so a test can read their plans: the same
/// reads as on PostgreSQL (see [`super::stats_sql`]), through the partial
/// indexes `sagas_stuck` (the sagas that are not terminal; named, so the
/// planner never prefers a scan of every saga) and `sagas_finished`.
pub fn stats_sql() -> [&'static str; 2] {
    [
        sql!(
            "SELECT status, count(*), ?1 - min(created_at),
                    count(*) FILTER (WHERE created_at > ?1 - 60)
             FROM sagas INDEXED BY sagas_stuck WHERE status NOT IN {TERMINAL} GROUP BY status"
        ),
        "SELECT count(*), count(*) FILTER (WHERE created_at > ?1 - 60)
         FROM sagas INDEXED BY sagas_finished WHERE finished_at > ?1 - 60",
    ]
}

/// Saga persistence on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// A store on `pool` (one connection), after applying the migrations.
    pub async fn migrate(pool: SqlitePool) -> Result<Self, Error> {
        MIGRATIONS.run(&pool).await?;
        Ok(Self { pool })
    }
}

fn records(rows: &[SqliteRow]) -> Result<Vec<SagaRecord>, Error> {
    rows.iter().map(record).collect()
}

async fn insert_journal(
    tx: &mut sqlx::SqliteConnection,
    saga_id: &str,
    entries: &[JournalEntry],
) -> Result<(), Error> {
    for e in entries {
        sqlx::query(
            "INSERT INTO saga_journal
                 (saga_id, step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(saga_id)
        .bind(&e.step)
        .bind(e.kind.as_str())
        .bind(e.attempt)
        .bind(e.outcome.as_str())
        .bind(&e.detail)
        .bind(&e.rpc)
        .bind(&e.actor)
        .bind(e.started_at)
        .bind(e.finished_at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[tonic::async_trait]
impl SagaStore for SqliteStore {
    async fn create(
        &self,
        saga: &NewSaga,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<(SagaRecord, bool), Error> {
        let now = now_epoch();
        let status = saga.state.status(saga.definition);
        let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO sagas (saga_id, idempotency_key, customer_id, items, status, state,
                                lease_owner, lease_expires_at, created_at, updated_at, progress_at,
                                definition_name, definition_version, trace_parent)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (customer_id, idempotency_key) DO NOTHING
             RETURNING {SAGA_COLUMNS}"
        )))
        .bind(&saga.saga_id)
        .bind(&saga.idempotency_key)
        .bind(&saga.customer_id)
        .bind(Json(&saga.items))
        .bind(status.as_str())
        .bind(Json(&saga.state))
        .bind(owner)
        .bind(now + lease_ttl.as_secs_f64())
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(saga.definition.name)
        .bind(i64::from(saga.definition.version))
        .bind(&saga.trace_parent)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok((record(&row)?, true));
        }
        let key = saga.idempotency_key.as_deref().unwrap_or_default();
        let existing = self.find_by_key(&saga.customer_id, key).await?;
        Ok((
            existing.ok_or_else(|| Error::Corrupt("a conflicting key vanished".into()))?,
            false,
        ))
    }

    async fn load(&self, saga_id: &str) -> Result<Option<SagaRecord>, Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE saga_id = ?"
        )))
        .bind(saga_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record)
        .transpose()
    }

    async fn commit(&self, commit: Commit<'_>) -> Result<Option<i64>, Error> {
        let now = now_epoch();
        let plan = CommitPlan::of(&commit)?;
        let mut tx = self.pool.begin().await?;
        let version: Option<i64> = sqlx::query_scalar(sql!(
            "UPDATE sagas SET
                 state = ?3, status = ?4,
                 -- Never a version issued before (see SagaRecord::version).
                 version = max(version + 1,
                               CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
                 total_amount_cents = ?5, failure_reason = ?6, last_error = ?7,
                 current_step = ?8, attempts = ?9, cancel_requested = ?10,
                 next_attempt_at = CASE ?11 WHEN 'keep' THEN next_attempt_at
                                            WHEN 'clear' THEN NULL ELSE ?12 END,
                 lease_owner = CASE ?13 WHEN 'release' THEN NULL ELSE lease_owner END,
                 lease_expires_at = CASE ?13 WHEN 'release' THEN NULL
                                             WHEN 'extend' THEN ?15 ELSE lease_expires_at END,
                 progress_at = CASE WHEN status IS NOT ?4 OR current_step IS NOT ?8
                                    THEN ?16 ELSE progress_at END,
                 updated_at = ?16,
                 wake_requested_at = CASE WHEN ?17 THEN ?16 END,
                 finished_at = CASE WHEN ?4 IN {TERMINAL}
                                    THEN coalesce(finished_at, ?16) ELSE NULL END
             WHERE saga_id = ?1 AND version = ?2 AND (?14 IS NULL OR lease_owner = ?14)
             RETURNING version"
        ))
        .bind(&plan.saga_id)
        .bind(plan.expected_version)
        .bind(&plan.state)
        .bind(plan.status)
        .bind(plan.total_amount_cents)
        .bind(&plan.failure_reason)
        .bind(&plan.last_error)
        .bind(plan.current_step)
        .bind(plan.attempts)
        .bind(plan.cancel_requested)
        .bind(plan.next_mode)
        .bind(now + plan.next_secs)
        .bind(plan.lease_mode)
        .bind(&plan.owner)
        .bind(now + plan.ttl)
        .bind(now)
        .bind(plan.wake)
        .fetch_optional(&mut *tx)
        .await?;
        if version.is_some() {
            insert_journal(&mut tx, &plan.saga_id, &plan.journal).await?;
            tx.commit().await?;
        }
        Ok(version)
    }

    async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease_ttl: Duration,
    ) -> Result<Vec<SagaRecord>, Error> {
        let now = now_epoch();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sagas SET lease_owner = ?1, lease_expires_at = ?2
             WHERE saga_id IN (
                 SELECT saga_id FROM sagas
                 WHERE {claimable} AND {due}
                 ORDER BY next_attempt_at
                 LIMIT ?4)
             RETURNING {SAGA_COLUMNS}",
            claimable = Claimable("?3"),
            due = Due("?3"),
        )))
        .bind(owner)
        .bind(now + lease_ttl.as_secs_f64())
        .bind(now)
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
        let now = now_epoch();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sagas SET lease_owner = ?2, lease_expires_at = ?3
             WHERE saga_id = ?1 AND {claimable}
             RETURNING {SAGA_COLUMNS}",
            claimable = Claimable("?4"),
        )))
        .bind(saga_id)
        .bind(owner)
        .bind(now + lease_ttl.as_secs_f64())
        .bind(now)
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
        let expires = now_epoch() + lease_ttl.as_secs_f64();
        let mut renewed = Vec::new();
        let mut tx = self.pool.begin().await?;
        for saga_id in saga_ids {
            let done = sqlx::query(
                "UPDATE sagas SET lease_expires_at = ? WHERE saga_id = ? AND lease_owner = ?",
            )
            .bind(expires)
            .bind(saga_id)
            .bind(owner)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 1 {
                renewed.push(saga_id.clone());
            }
        }
        tx.commit().await?;
        Ok(renewed)
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, Error> {
        // Only a saga not terminal holds a lease (a settled commit releases
        // it): the partial index of live sagas, not the settled history.
        Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sagas INDEXED BY sagas_stuck SET lease_owner = NULL, lease_expires_at = NULL
             WHERE status NOT IN {TERMINAL} AND lease_owner = ?1"
        )))
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn take_wakes(&self, owner: &str) -> Result<Vec<String>, Error> {
        Ok(sqlx::query_scalar(
            "UPDATE sagas SET wake_requested_at = NULL
             WHERE lease_owner = ? AND wake_requested_at IS NOT NULL
             RETURNING saga_id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn journal(&self, saga_id: &str) -> Result<Vec<JournalEntry>, Error> {
        let rows = sqlx::query(
            "SELECT step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at
             FROM saga_journal WHERE saga_id = ? ORDER BY entry_id",
        )
        .bind(saga_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(journal_entry).collect()
    }

    async fn append_journal(&self, saga_id: &str, entries: &[JournalEntry]) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        insert_journal(&mut tx, saga_id, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, Error> {
        const DIALECT: ListDialect = ListDialect {
            placeholder: '?',
            product_join: "CROSS JOIN",
            older: |column, seconds| {
                format!("{column} < (julianday('now') - 2440587.5) * 86400.0 - {seconds}")
            },
        };
        let ListQuery { sql, binds } = ListQuery::new(filter, SAGA_COLUMNS, &DIALECT);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for bind in binds {
            query = match bind {
                ListBind::Text(text) => query.bind(text),
                ListBind::Seconds(seconds) => query.bind(seconds),
                ListBind::Limit(limit) => query.bind(limit),
            };
        }
        records(&query.fetch_all(&self.pool).await?)
    }

    async fn ready(&self) -> Result<String, String> {
        let latest = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
        let applied = sqlx::query_scalar(common::probe::MIGRATED_SQL)
            .fetch_one(&self.pool)
            .await;
        common::probe::migrated(applied, latest)
    }

    fn pool_state(&self) -> Option<(u32, u32, u32)> {
        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        let size = self.pool.size();
        Some((
            size.saturating_sub(idle),
            idle,
            self.pool.options().get_max_connections(),
        ))
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let now = now_epoch();
        let [open, finished] = stats_sql();
        let rows: Vec<(String, i64, Option<f64>, i64)> =
            sqlx::query_as(open).bind(now).fetch_all(&self.pool).await?;
        let (finished, finished_started): (i64, i64) = sqlx::query_as(finished)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        Ok(Stats::from_open(rows, finished, finished_started))
    }

    async fn sagas_by_id(&self, after: &str, limit: i64) -> Result<Vec<SagaBrief>, Error> {
        let rows = sqlx::query(
            "SELECT saga_id, status, customer_id, items, total_amount_cents FROM sagas
             WHERE saga_id > ?1 ORDER BY saga_id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(brief).collect()
    }

    async fn find_by_key(
        &self,
        customer_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<SagaRecord>, Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE customer_id = ? AND idempotency_key = ?"
        )))
        .bind(customer_id)
        .bind(idempotency_key)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record)
        .transpose()
    }

    async fn prune_finished(&self, before: f64, limit: i64) -> Result<u64, Error> {
        // The same rows for both statements: one transaction, which holds
        // the only write lock from its first statement on.
        let doomed = format!(
            "SELECT saga_id FROM sagas INDEXED BY sagas_finished
             WHERE finished_at < ?1 AND status IN {TERMINAL}
             ORDER BY finished_at, saga_id LIMIT ?2"
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM saga_journal WHERE saga_id IN ({doomed})"
        )))
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        let pruned = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM sagas WHERE saga_id IN ({doomed})"
        )))
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(pruned)
    }

    async fn oldest_finished(&self) -> Result<Option<f64>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT min(finished_at) FROM sagas INDEXED BY sagas_finished
             WHERE finished_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn finished_page(
        &self,
        before: f64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SagaRecord>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas
             WHERE finished_at < ?1 AND status IN {TERMINAL} AND saga_id > ?2
             ORDER BY saga_id LIMIT ?3"
        )))
        .bind(before)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        records(&rows)
    }
}
