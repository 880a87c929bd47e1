//! [`SagaStore`] on PostgreSQL. The SQL stays portable to PostgreSQL-wire
//! engines (CockroachDB, YugabyteDB): no advisory locks, no LISTEN/NOTIFY,
//! `FOR UPDATE SKIP LOCKED` for the queue.

use std::time::Duration;

use common::batch::Batcher;
use sqlx::PgPool;
use sqlx::postgres::PgRow;

use super::{
    Claimable, Commit, CommitPlan, Due, JournalEntry, ListBind, ListDialect, ListFilter, ListQuery,
    NewSaga, SagaBrief, SagaRecord, SagaStore, Stats, TERMINAL, brief, journal_entry, record,
};
use crate::error::Error;

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres/orchestrator");

/// Every column of a saga row, in the shape [`record`] reads.
const SAGA_COLUMNS: &str = "saga_id, idempotency_key, customer_id, items, state, status, version,
    definition_name, definition_version, trace_parent,
    extract(epoch FROM next_attempt_at)::float8 AS next_attempt_at, lease_owner,
    extract(epoch FROM lease_expires_at)::float8 AS lease_expires_at,
    extract(epoch FROM created_at)::float8 AS created_at,
    extract(epoch FROM updated_at)::float8 AS updated_at,
    extract(epoch FROM progress_at)::float8 AS progress_at,
    extract(epoch FROM finished_at)::float8 AS finished_at";

fn stopped(_: common::batch::Stopped) -> Error {
    Error::Unavailable("the store's batch writer stopped".into())
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
        columns.extend(entries);
        columns
    }

    fn extend(&mut self, entries: &[JournalEntry]) {
        let columns = self;
        for e in entries {
            columns.step.push(e.step.clone());
            columns.kind.push(e.kind.as_str().to_owned());
            columns.attempt.push(e.attempt);
            columns.outcome.push(e.outcome.as_str().to_owned());
            columns.detail.push(e.detail.clone());
            columns.rpc.push(e.rpc.clone());
            columns.actor.push(e.actor.clone());
            columns.started_at.push(e.started_at);
            columns.finished_at.push(e.finished_at);
        }
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

/// Most writes flushed in one statement.
const MAX_BATCH: usize = 256;
/// Batches of each kind (creations, durable and asynchronous transitions)
/// written at once, each on a connection of its own. One: what queues
/// while a batch is written forms the next one, so batches grow with the
/// load and fixed costs are paid once per batch (measured with two writers
/// per kind: more CPU per saga and lower throughput).
const WRITERS: usize = 1;

/// Connections of the batch writers, beside the pool of `--max-connections`.
pub const WRITER_CONNECTIONS: u32 = 3 * WRITERS as u32;

/// Saga persistence on PostgreSQL.
///
/// Creations and transitions go through a group commit ([`Batcher`]): the
/// writes of concurrent sagas are flushed together, one statement and one
/// WAL flush for the whole batch, and each saga's write is still checked
/// on its own (version and lease) and answered on its own. A lone write
/// goes out at once; batches form only while an earlier one is in flight.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    creates: Batcher<CreateRow, Result<(SagaRecord, bool), Error>>,
    durable_commits: Batcher<CommitPlan, Result<Option<i64>, Error>>,
    async_commits: Batcher<CommitPlan, Result<Option<i64>, Error>>,
}

/// The two queries of [`SagaStore::stats`], public so a test can read their
/// plans. Neither reads more than live work: the first reads the unsettled
/// sagas through the partial index `sagas_stuck` (per status: how many, the
/// oldest one's age, how many started in the last minute); the second reads
/// the last minute's finishes through `sagas_finished` (how many, and how
/// many of them started in the last minute too). Settled sagas of the past
/// are never counted, so the cost does not grow with history.
pub fn stats_sql() -> [&'static str; 2] {
    [
        sql!(
            "SELECT status, count(*),
                    extract(epoch FROM now() - min(created_at))::float8,
                    count(*) FILTER (WHERE created_at > now() - interval '1 minute')
             FROM sagas WHERE status NOT IN {TERMINAL} GROUP BY status"
        ),
        "SELECT count(*), count(*) FILTER (WHERE created_at > now() - interval '1 minute')
         FROM sagas WHERE finished_at > now() - interval '1 minute'",
    ]
}

impl PgStore {
    /// A store on `pool`, after applying the embedded migrations. Starts
    /// the batch writers, so it needs a Tokio runtime.
    pub async fn migrate(pool: PgPool) -> Result<Self, Error> {
        MIGRATIONS.run(&pool).await?;
        // The batch statements run on connections of their own that plan
        // them once: planning a batch statement costs more than running it.
        let writers = common::db::generic_plan_pool(&pool, WRITER_CONNECTIONS);
        let creates = {
            let pool = writers.clone();
            Batcher::named("saga", "create", MAX_BATCH, WRITERS, move |rows| {
                let pool = pool.clone();
                async move { create_batch(&pool, rows).await }
            })
        };
        // Durable and asynchronous transitions queue apart: a progress
        // write that may skip the WAL flush never waits for one because a
        // durable write shares its batch.
        let commits = |writers: &PgPool, workers, writer| {
            let pool = writers.clone();
            Batcher::named("saga", writer, MAX_BATCH, workers, move |rows| {
                let pool = pool.clone();
                async move { commit_batch(&pool, rows).await }
            })
        };
        let durable_commits = commits(&writers, WRITERS, "durable_commit");
        let async_commits = commits(&writers, WRITERS, "async_commit");
        Ok(Self {
            pool,
            creates,
            durable_commits,
            async_commits,
        })
    }

    /// The pool, for tests that inspect the tables.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A creation waiting in the batch queue.
#[derive(Debug)]
struct CreateRow {
    saga_id: String,
    idempotency_key: Option<String>,
    customer_id: String,
    items: String,
    status: &'static str,
    state: String,
    owner: String,
    ttl: f64,
    definition_name: &'static str,
    definition_version: i64,
    trace_parent: Option<String>,
}

/// Inserts a batch of sagas in one statement. A saga whose idempotency key
/// was used before (or comes twice in the batch) is not inserted; it is
/// answered with the saga that holds the key.
/// The message for a batch that failed because the database is away
/// (unreachable, connection lost, too many clients), not because of one of
/// its rows. Such a batch fails as a whole at once: writing its rows one by
/// one would wait out the pool's acquire timeout once per row, and the
/// callers queued behind them longer still.
fn database_away(error: &Error) -> Option<&'static str> {
    use common::error::Transient;
    match error {
        Error::Database(e) => match common::error::transient(e) {
            None | Some(Transient::Conflict) => None,
            Some(kind) => Some(kind.message()),
        },
        _ => None,
    }
}

/// `rows` answers of a batch that failed with `error`, if the database is
/// away (see [`database_away`]).
fn all_unavailable<T>(error: &Error, rows: usize) -> Option<Vec<Result<T, Error>>> {
    let message = database_away(error)?;
    tracing::warn!(%error, rows, "database unavailable; batch failed");
    Some(
        (0..rows)
            .map(|_| Err(Error::Unavailable(message.to_owned())))
            .collect(),
    )
}

async fn create_batch(
    pool: &PgPool,
    rows: Vec<CreateRow>,
) -> Vec<Result<(SagaRecord, bool), Error>> {
    let inserted = match insert_sagas(pool, &rows).await {
        Ok(inserted) => inserted,
        Err(error) if rows.len() > 1 && database_away(&error).is_some() => {
            return all_unavailable(&error, rows.len()).unwrap_or_default();
        }
        // One bad row fails the statement: write each on its own so only
        // that one fails.
        Err(_) if rows.len() > 1 => {
            let mut answers = Vec::with_capacity(rows.len());
            for row in rows {
                answers.extend(Box::pin(create_batch(pool, vec![row])).await);
            }
            return answers;
        }
        Err(error) => return vec![Err(error)],
    };
    let mut answers = Vec::with_capacity(rows.len());
    for row in &rows {
        answers.push(match inserted.iter().find(|r| r.saga_id == row.saga_id) {
            Some(record) => Ok((record.clone(), true)),
            None => by_key(pool, &row.customer_id, row.idempotency_key.as_deref()).await,
        });
    }
    answers
}

async fn insert_sagas(pool: &PgPool, rows: &[CreateRow]) -> Result<Vec<SagaRecord>, Error> {
    // Inserted in idempotency-key order: two batches that share keys wait
    // for each other on the unique index in the same order, never in a
    // cycle.
    let mut sorted: Vec<&CreateRow> = rows.iter().collect();
    sorted.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
    let rows = sorted;
    let column = |f: fn(&CreateRow) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    // The products of each saga created (not of one whose key was taken)
    // go into saga_products in the same statement.
    let inserted = sqlx::query(sql!(
        "WITH created AS (
             INSERT INTO sagas (saga_id, idempotency_key, customer_id, items, status, state,
                                lease_owner, lease_expires_at, definition_name,
                                definition_version, trace_parent)
             SELECT n.saga_id, n.idempotency_key, n.customer_id, n.items::jsonb, n.status,
                    n.state::jsonb, n.owner, now() + make_interval(secs => n.ttl),
                    n.definition_name, n.definition_version, n.trace_parent
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::float8[], $9::text[], $10::bigint[], $11::text[])
                  AS n(saga_id, idempotency_key, customer_id, items, status, state, owner, ttl,
                       definition_name, definition_version, trace_parent)
             ON CONFLICT (customer_id, idempotency_key) DO NOTHING
             RETURNING {SAGA_COLUMNS}),
         products AS (
             INSERT INTO saga_products (product_id, saga_id)
             SELECT item ->> 'product_id', created.saga_id
             FROM created, jsonb_array_elements(created.items) AS item)
         SELECT * FROM created"
    ))
    .bind(column(|r| &r.saga_id))
    .bind(
        rows.iter()
            .map(|r| r.idempotency_key.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(column(|r| &r.customer_id))
    .bind(column(|r| &r.items))
    .bind(column(|r| r.status))
    .bind(column(|r| &r.state))
    .bind(column(|r| &r.owner))
    .bind(rows.iter().map(|r| r.ttl).collect::<Vec<_>>())
    .bind(column(|r| r.definition_name))
    .bind(
        rows.iter()
            .map(|r| r.definition_version)
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.trace_parent.as_deref())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?;
    records(&inserted)
}

/// The saga holding an idempotency key, for a creation that found it used.
async fn by_key(
    pool: &PgPool,
    customer_id: &str,
    key: Option<&str>,
) -> Result<(SagaRecord, bool), Error> {
    let row = find_by_key(pool, customer_id, key.unwrap_or_default())
        .await?
        .ok_or_else(|| Error::Corrupt("a conflicting key vanished".into()))?;
    Ok((row, false))
}

/// The saga a customer placed with an idempotency key, if any.
async fn find_by_key(
    pool: &PgPool,
    customer_id: &str,
    key: &str,
) -> Result<Option<SagaRecord>, Error> {
    sqlx::query(sql!(
        "SELECT {SAGA_COLUMNS} FROM sagas WHERE customer_id = $1 AND idempotency_key = $2"
    ))
    .bind(customer_id)
    .bind(key)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(record)
    .transpose()
}

/// Writes a batch of transitions in one statement. Each saga row is updated
/// only if its version (and lease) still match; its journal rows only if it
/// was. The batch is flushed to disk before it returns unless every write
/// in it may be lost (see [`Commit::durable`]).
async fn commit_batch(pool: &PgPool, rows: Vec<CommitPlan>) -> Vec<Result<Option<i64>, Error>> {
    match update_sagas(pool, &rows).await {
        Ok(versions) => versions.into_iter().map(Ok).collect(),
        Err(error) if rows.len() > 1 && database_away(&error).is_some() => {
            all_unavailable(&error, rows.len()).unwrap_or_default()
        }
        Err(_) if rows.len() > 1 => {
            // One bad row (or a deadlock with a concurrent batch) fails the
            // statement: write each on its own so only a bad one fails.
            let mut answers = Vec::with_capacity(rows.len());
            for row in rows {
                answers.extend(Box::pin(commit_batch(pool, vec![row])).await);
            }
            answers
        }
        Err(error) => vec![Err(error)],
    }
}

async fn update_sagas(pool: &PgPool, rows: &[CommitPlan]) -> Result<Vec<Option<i64>>, Error> {
    let mut journal = JournalColumns::default();
    let mut journal_of = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        journal.extend(&row.journal);
        journal_of.extend(std::iter::repeat_n(n as i64 + 1, row.journal.len()));
    }
    let durable = rows.iter().any(|r| r.durable);
    let sql = sql!(
        "WITH c AS (
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                                 $6::text[], $7::text[], $8::text[], $9::int[], $10::bool[],
                                 $11::text[], $12::float8[], $13::text[], $14::text[], $15::float8[],
                                 $27::bool[])
                WITH ORDINALITY AS c(saga_id, expected_version, state, status, total_amount_cents,
                                     failure_reason, last_error, current_step, attempts,
                                     cancel_requested, next_mode, next_secs, lease_mode, owner,
                                     ttl, wake, n)
        ), locked AS (
            -- Row locks in saga_id order, as every multi-row write here
            -- takes them, so concurrent batches and the lease renewer
            -- queue behind each other instead of deadlocking.
            SELECT s.saga_id FROM sagas s WHERE s.saga_id IN (SELECT saga_id FROM c)
            ORDER BY s.saga_id FOR UPDATE
        ), updated AS (
            UPDATE sagas s SET
                state = c.state::jsonb, status = c.status,
                -- Never a version issued before (see SagaRecord::version).
                version = greatest(s.version + 1,
                                   (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
                total_amount_cents = c.total_amount_cents, failure_reason = c.failure_reason,
                last_error = c.last_error, current_step = c.current_step,
                attempts = c.attempts, cancel_requested = c.cancel_requested,
                next_attempt_at = CASE c.next_mode
                    WHEN 'keep' THEN s.next_attempt_at
                    WHEN 'clear' THEN NULL
                    ELSE now() + make_interval(secs => c.next_secs) END,
                lease_owner = CASE c.lease_mode WHEN 'release' THEN NULL ELSE s.lease_owner END,
                lease_expires_at = CASE c.lease_mode
                    WHEN 'release' THEN NULL
                    WHEN 'extend' THEN now() + make_interval(secs => c.ttl)
                    ELSE s.lease_expires_at END,
                updated_at = now(),
                wake_requested_at = CASE WHEN c.wake THEN now() END,
                progress_at = CASE
                    WHEN s.status IS DISTINCT FROM c.status
                      OR s.current_step IS DISTINCT FROM c.current_step
                    THEN now() ELSE s.progress_at END,
                finished_at = CASE WHEN c.status IN {TERMINAL}
                    THEN coalesce(s.finished_at, now()) ELSE NULL END
            FROM c JOIN locked l ON l.saga_id = c.saga_id
            WHERE s.saga_id = c.saga_id AND s.version = c.expected_version
              AND (c.owner IS NULL OR s.lease_owner = c.owner)
            -- Two writes to one saga in a batch: at most one matches.
            RETURNING c.n, c.saga_id, s.version
        ), journal AS (
            INSERT INTO saga_journal
                (saga_id, step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)
            SELECT u.saga_id, j.step, j.kind, j.attempt, j.outcome, j.detail, j.rpc, j.actor,
                   to_timestamp(j.started_at), to_timestamp(j.finished_at)
            FROM updated u
            JOIN unnest($16::bigint[], $17::text[], $18::text[], $19::int[], $20::text[],
                        $21::text[], $22::text[], $23::text[], $24::float8[], $25::float8[])
                 WITH ORDINALITY AS j(n, step, kind, attempt, outcome, detail, rpc, actor,
                                      started_at, finished_at, position)
              ON j.n = u.n
            ORDER BY j.position
        ), flush AS (
            -- Read at commit time: 'off' lets this transaction return
            -- before its WAL is flushed.
            SELECT set_config('synchronous_commit', CASE WHEN $26 THEN 'on' ELSE 'off' END, true)
        )
        SELECT u.n, u.version FROM updated u, flush"
    );
    let column = |f: fn(&CommitPlan) -> &str| rows.iter().map(f).collect::<Vec<_>>();
    let query = sqlx::query_as::<_, (i64, i64)>(sql)
        .bind(column(|r| &r.saga_id))
        .bind(rows.iter().map(|r| r.expected_version).collect::<Vec<_>>())
        .bind(column(|r| &r.state))
        .bind(column(|r| r.status))
        .bind(
            rows.iter()
                .map(|r| r.total_amount_cents)
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.failure_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.last_error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.current_step).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempts).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.cancel_requested).collect::<Vec<_>>())
        .bind(column(|r| r.next_mode))
        .bind(rows.iter().map(|r| r.next_secs).collect::<Vec<_>>())
        .bind(column(|r| r.lease_mode))
        .bind(rows.iter().map(|r| r.owner.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ttl).collect::<Vec<_>>())
        .bind(&journal_of);
    let updated = bind_journal!(query, journal)
        .bind(durable)
        .bind(rows.iter().map(|r| r.wake).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
    let mut versions = vec![None; rows.len()];
    for (n, version) in updated {
        versions[n as usize - 1] = Some(version);
    }
    Ok(versions)
}

#[tonic::async_trait]
impl SagaStore for PgStore {
    async fn create(
        &self,
        saga: &NewSaga,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<(SagaRecord, bool), Error> {
        let encode = |e: serde_json::Error| Error::Corrupt(format!("cannot encode the saga: {e}"));
        let row = CreateRow {
            saga_id: saga.saga_id.clone(),
            idempotency_key: saga.idempotency_key.clone(),
            customer_id: saga.customer_id.clone(),
            items: serde_json::to_string(&saga.items).map_err(encode)?,
            status: saga.state.status(saga.definition).as_str(),
            state: serde_json::to_string(&saga.state).map_err(encode)?,
            owner: owner.to_owned(),
            ttl: lease_ttl.as_secs_f64(),
            definition_name: saga.definition.name,
            definition_version: saga.definition.version.into(),
            trace_parent: saga.trace_parent.clone(),
        };
        self.creates.submit(row).await.map_err(stopped)?
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
        let row = CommitPlan::of(&commit)?;
        let queue = if row.durable {
            &self.durable_commits
        } else {
            &self.async_commits
        };
        queue.submit(row).await.map_err(stopped)?
    }

    async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease_ttl: Duration,
    ) -> Result<Vec<SagaRecord>, Error> {
        // The lease each claimed saga had (another replica's, expired: a
        // takeover) comes back with it, for the takeover count.
        let rows = sqlx::query(sql!(
            "UPDATE sagas SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
             FROM (
                 SELECT saga_id AS due_id, lease_owner AS previous_owner FROM sagas
                 WHERE {claimable} AND {due}
                 ORDER BY next_attempt_at NULLS FIRST
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED) AS due
             WHERE saga_id = due.due_id
             RETURNING {SAGA_COLUMNS}, due.previous_owner",
            claimable = Claimable("now()"),
            due = Due("now()"),
        ))
        .bind(owner)
        .bind(lease_ttl.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let takeovers = rows
            .iter()
            .filter(|row| {
                sqlx::Row::try_get::<Option<String>, _>(*row, "previous_owner")
                    .ok()
                    .flatten()
                    .is_some_and(|previous| previous != owner)
            })
            .count();
        if takeovers > 0 {
            common::metrics::count(crate::metrics::TAKEOVERS, &[], takeovers as u64);
        }
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
             WHERE saga_id = $1 AND {claimable}
             RETURNING {SAGA_COLUMNS}",
            claimable = Claimable("now()"),
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
             WHERE saga_id IN (SELECT saga_id FROM sagas
                               WHERE saga_id = ANY($2) AND lease_owner = $1
                               ORDER BY saga_id FOR UPDATE)
             RETURNING saga_id",
        )
        .bind(owner)
        .bind(saga_ids)
        .bind(lease_ttl.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, Error> {
        // Only a saga not terminal holds a lease (a settled commit releases
        // it): look among the live sagas, read apart through their partial
        // index, not through the settled history.
        Ok(sqlx::query(sql!(
            "UPDATE sagas SET lease_owner = NULL, lease_expires_at = NULL
             WHERE saga_id IN (
                 SELECT saga_id FROM sagas
                 WHERE saga_id IN (
                     WITH live AS MATERIALIZED (
                         SELECT saga_id, lease_owner FROM sagas WHERE status NOT IN {TERMINAL})
                     SELECT saga_id FROM live WHERE lease_owner = $1)
                 ORDER BY saga_id FOR UPDATE)"
        ))
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn take_wakes(&self, owner: &str) -> Result<Vec<String>, Error> {
        // Locks in saga_id order, like every multi-row write here. Nothing
        // marked (the usual case): an index probe, no write.
        Ok(sqlx::query_scalar(
            "UPDATE sagas SET wake_requested_at = NULL
             WHERE saga_id IN (SELECT saga_id FROM sagas
                               WHERE lease_owner = $1 AND wake_requested_at IS NOT NULL
                               ORDER BY saga_id FOR UPDATE)
             RETURNING saga_id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?)
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
        const DIALECT: ListDialect = ListDialect {
            placeholder: '$',
            product_join: "JOIN",
            older: |column, seconds| format!("{column} < now() - make_interval(secs => {seconds})"),
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

    fn writes_waiting(&self) -> Option<usize> {
        Some(self.creates.queued() + self.durable_commits.queued() + self.async_commits.queued())
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let [open, finished] = stats_sql();
        let rows: Vec<(String, i64, Option<f64>, i64)> =
            sqlx::query_as(open).fetch_all(&self.pool).await?;
        let (finished, finished_started): (i64, i64) =
            sqlx::query_as(finished).fetch_one(&self.pool).await?;
        Ok(Stats::from_open(rows, finished, finished_started))
    }

    async fn sagas_by_id(&self, after: &str, limit: i64) -> Result<Vec<SagaBrief>, Error> {
        let rows = sqlx::query(
            "SELECT saga_id, status, customer_id, items, total_amount_cents FROM sagas
             WHERE saga_id > $1 ORDER BY saga_id LIMIT $2",
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
        find_by_key(&self.pool, customer_id, idempotency_key).await
    }

    async fn prune_finished(&self, before: f64, limit: i64) -> Result<u64, Error> {
        // One statement, so one transaction: the rows it picks are locked
        // until it commits, and a replica pruning at the same time skips
        // them and takes the next ones.
        let pruned: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH doomed AS (
                 SELECT saga_id, items FROM sagas
                 WHERE finished_at < to_timestamp($1) AND status IN {TERMINAL}
                 ORDER BY finished_at LIMIT $2
                 FOR UPDATE SKIP LOCKED),
             journal AS (
                 DELETE FROM saga_journal j USING doomed d WHERE j.saga_id = d.saga_id),
             products AS (
                 DELETE FROM saga_products p
                 USING doomed d, jsonb_array_elements(d.items) AS item
                 WHERE p.product_id = item ->> 'product_id' AND p.saga_id = d.saga_id),
             gone AS (
                 DELETE FROM sagas s USING doomed d WHERE s.saga_id = d.saga_id RETURNING 1)
             SELECT count(*) FROM gone"
        )))
        .bind(before)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(pruned).unwrap_or_default())
    }

    async fn oldest_finished(&self) -> Result<Option<f64>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT extract(epoch FROM min(finished_at))::float8 FROM sagas
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
             WHERE finished_at < to_timestamp($1) AND status IN {TERMINAL} AND saga_id > $2
             ORDER BY saga_id LIMIT $3"
        )))
        .bind(before)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }
}
