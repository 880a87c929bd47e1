//! The saga store conformance suite: the same tests, with the same
//! expectations, on PostgreSQL and on SQLite (the embedded mode): the
//! optimistic version check, the lease check, the journal written only with
//! its transition, the idempotency key, the sweeper's claim rules, the
//! filters, and (SQLite) a file that survives a reopen.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use harness::TestDb;
use orchestrator::saga::{Cause, Event, ORDER_SAGA, Outcome, Phase, Policy, SagaState, Status};
use orchestrator::store::{
    Commit, JournalEntry, JournalKind, JournalOutcome, LeaseChange, ListFilter, NewSaga,
    NextAttempt, OrderItem, SagaBrief, SagaStore,
};

const TTL: Duration = Duration::from_secs(30);
const POLICY: Policy = Policy {
    action_attempts: 3,
    compensation_attempts: 3,
};

/// A store under test and what keeps its database alive.
struct Backend {
    store: Arc<dyn SagaStore>,
    _db: Option<TestDb>,
    file: Option<SqliteFile>,
}

/// A SQLite file removed when dropped.
struct SqliteFile(PathBuf);

impl SqliteFile {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!(
            "saga-store-{}-{}.db",
            std::process::id(),
            common::domain::new_id("t")
        )))
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

async fn postgres() -> Backend {
    let db = TestDb::create("store").await.expect("database");
    let store = orchestrator::server::connect(db.url(), 2, Duration::from_secs(5))
        .await
        .expect("store");
    Backend {
        store,
        _db: Some(db),
        file: None,
    }
}

async fn sqlite() -> Backend {
    let file = SqliteFile::new();
    let store = orchestrator::server::connect(&file.url(), 1, Duration::from_secs(5))
        .await
        .expect("store");
    Backend {
        store,
        _db: None,
        file: Some(file),
    }
}

impl Backend {
    /// Sets a saga's version behind the store's back.
    async fn set_version(&self, saga_id: &str, version: i64) {
        let sql = "UPDATE sagas SET version = $1 WHERE saga_id = $2";
        self.update(sql, sql, version, saga_id).await;
    }

    /// Moves a finished saga's finish `seconds` into the past.
    async fn age_finish(&self, saga_id: &str, seconds: f64) {
        self.update(
            "UPDATE sagas SET finished_at = finished_at - make_interval(secs => $1)
             WHERE saga_id = $2",
            "UPDATE sagas SET finished_at = finished_at - ?1 WHERE saga_id = ?2",
            seconds,
            saga_id,
        )
        .await;
    }

    /// The rows of `saga_products` for `saga_id`, read behind the store's
    /// back (the same SQL on both).
    async fn product_rows(&self, saga_id: &str) -> i64 {
        let sql = "SELECT count(*) FROM saga_products WHERE saga_id = $1";
        match (&self._db, &self.file) {
            (Some(db), _) => {
                let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
                let count = sqlx::query_scalar(sql)
                    .bind(saga_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                count
            }
            (None, Some(file)) => {
                let pool = sqlx::SqlitePool::connect(&file.url()).await.unwrap();
                let count = sqlx::query_scalar(sql)
                    .bind(saga_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                count
            }
            (None, None) => unreachable!("every backend has a database"),
        }
    }

    /// Runs one statement behind the store's back (`postgres` or `sqlite`,
    /// as the backend is), binding `value` and `saga_id`.
    async fn update<T>(&self, postgres: &str, sqlite: &str, value: T, saga_id: &str)
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
        T: for<'q> sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        T: Send + Copy + 'static,
    {
        match (&self._db, &self.file) {
            (Some(db), _) => {
                let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(postgres.to_owned()))
                    .bind(value)
                    .bind(saga_id)
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
            (None, Some(file)) => {
                let pool = sqlx::SqlitePool::connect(&file.url()).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sqlite.to_owned()))
                    .bind(value)
                    .bind(saga_id)
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
            (None, None) => unreachable!("every backend has a database"),
        }
    }
}

impl Backend {
    /// The SQL that defines the index `name`, as the database keeps it.
    async fn index_definition(&self, name: &str) -> Option<String> {
        match (&self._db, &self.file) {
            (Some(db), _) => {
                let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
                let sql =
                    sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname = $1")
                        .bind(name)
                        .fetch_optional(&pool)
                        .await
                        .unwrap();
                pool.close().await;
                sql
            }
            (None, Some(file)) => {
                let pool = sqlx::SqlitePool::connect(&file.url()).await.unwrap();
                let sql = sqlx::query_scalar(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
                )
                .bind(name)
                .fetch_optional(&pool)
                .await
                .unwrap();
                pool.close().await;
                sql
            }
            (None, None) => unreachable!("every backend has a database"),
        }
    }
}

/// Runs each named test on both backends.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::postgres().await).await;
            })*
        }
        mod on_sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::sqlite().await).await;
            })*
        }
    };
}

conformance!(
    a_commit_applies_once_per_version_and_writes_its_journal_only_then,
    only_the_lease_owner_commits_and_release_gives_the_lease_up,
    a_request_marks_its_saga_woken_for_the_lease_holder_until_the_driver_writes,
    an_idempotency_key_records_one_saga,
    the_sweeper_claims_only_due_sagas_without_a_live_lease,
    stuck_and_age_filters_select_the_right_sagas,
    product_and_customer_filters,
    concurrent_creations_and_commits_each_apply_with_their_journal,
    racing_commits_to_one_saga_apply_exactly_once,
    a_version_lost_with_the_tail_is_never_issued_again,
    an_idempotency_key_is_scoped_to_its_customer,
    sagas_are_paged_by_id_with_what_reconcile_compares,
    the_partial_indexes_leave_out_the_status_types_sets,
    a_saga_records_the_name_and_version_of_its_definition,
    a_saga_keeps_the_trace_it_was_created_in_through_commits_and_claims,
    finished_sagas_past_the_cutoff_are_pruned_in_batches_with_their_journals,
);

/// The traceparent is written at creation and read with the row by every
/// reader, and a commit leaves it alone.
async fn a_saga_keeps_the_trace_it_was_created_in_through_commits_and_claims(backend: Backend) {
    let store = &backend.store;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = NewSaga {
        trace_parent: Some(parent.into()),
        ..new_saga("s1", None)
    };
    let (created, _) = store.create(&traced, "r1", TTL).await.unwrap();
    assert_eq!(created.trace_parent.as_deref(), Some(parent));
    let (untraced, _) = store
        .create(&new_saga("s2", None), "r1", TTL)
        .await
        .unwrap();
    assert_eq!(untraced.trace_parent, None);
    let next = created.state.clone();
    let version = store
        .commit(Commit {
            saga_id: "s1",
            expected_version: created.version,
            state: &next,
            definition: &ORDER_SAGA,
            journal: &[entry("reserve")],
            next_attempt: NextAttempt::Clear,
            lease: LeaseChange::Extend {
                owner: "r1",
                ttl: TTL,
            },
            durable: true,
            wake: false,
        })
        .await
        .unwrap();
    assert!(version.is_some());
    let loaded = store.load("s1").await.unwrap().unwrap();
    assert_eq!(loaded.trace_parent.as_deref(), Some(parent));
    store.release_leases("r1").await.unwrap();
    let claimed = store.claim("s1", "r2", TTL).await.unwrap().unwrap();
    assert_eq!(claimed.trace_parent.as_deref(), Some(parent));
    assert_eq!(store.load("s2").await.unwrap().unwrap().trace_parent, None);
}

/// The migrations' partial indexes are SQL text, written once: they must
/// leave out exactly the statuses the `Status` type calls settled (the
/// sweeper's index) and terminal (the stuck filter's index), the sets the
/// queries are generated from.
async fn the_partial_indexes_leave_out_the_status_types_sets(backend: Backend) {
    type Set = fn(Status) -> bool;
    let sets: [(&str, Set); 2] = [
        ("sagas_active", Status::is_settled),
        ("sagas_stuck", Status::is_terminal),
    ];
    let mut checked = 0;
    for (index, left_out) in sets {
        // Both backends have both indexes; a missing one fails below.
        let sql = backend
            .index_definition(index)
            .await
            .unwrap_or_else(|| panic!("no index {index}"));
        checked += 1;
        for status in Status::ALL {
            assert_eq!(
                sql.contains(&format!("'{status}'")),
                left_out(status),
                "{index} and {status}: {sql}"
            );
        }
    }
    assert!(checked > 0, "no partial index found");
}

/// The stats queries read live work only: with thousands of settled sagas
/// of the past and three live ones, no plan node reads more than a handful
/// of rows of `sagas` (a sequential scan, or a full scan of an index over
/// every saga, would read them all).
#[tokio::test]
async fn on_postgres_the_stats_read_no_settled_history() {
    let backend = postgres().await;
    let db = backend._db.as_ref().expect("postgres");
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    const HISTORY: i64 = 5000;
    sqlx::query(
        "INSERT INTO sagas (saga_id, customer_id, items, status, state, created_at, finished_at)
         SELECT 'old' || i, 'c', '[]', (ARRAY['COMPLETED', 'FAILED', 'CANCELLED'])[1 + i % 3],
                '{}', now() - interval '2 days', now() - interval '1 day'
         FROM generate_series(1, $1) AS i",
    )
    .bind(HISTORY)
    .execute(&pool)
    .await
    .unwrap();
    for id in ["live1", "live2", "live3"] {
        backend
            .store
            .create(&new_saga(id, None), "r1", TTL)
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE sagas").execute(&pool).await.unwrap();

    for sql in orchestrator::store::stats_sql() {
        let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {sql}"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        let mut nodes = vec![plan[0]["Plan"].clone()];
        let mut scans = 0;
        while let Some(node) = nodes.pop() {
            if node["Relation Name"] == "sagas" {
                scans += 1;
                let read = node["Actual Rows"].as_f64().unwrap_or(0.0)
                    * node["Actual Loops"].as_f64().unwrap_or(1.0)
                    + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
                    + node["Rows Removed by Index Recheck"]
                        .as_f64()
                        .unwrap_or(0.0);
                assert!(
                    read <= 10.0,
                    "{} read {read} rows of sagas: {sql}\n{plan:#}",
                    node["Node Type"]
                );
                assert_ne!(node["Node Type"], "Seq Scan", "{sql}\n{plan:#}");
            }
            if let Some(children) = node["Plans"].as_array() {
                nodes.extend(children.iter().cloned());
            }
        }
        assert!(scans > 0, "no scan of sagas in the plan of {sql}");
    }
    let stats = backend.store.stats().await.unwrap();
    assert_eq!(stats.counts, [(Status::Pending, 3)]);
    assert_eq!(stats.started_last_minute, 3);
    assert_eq!(stats.finished_last_minute, 0);
    pool.close().await;
}

/// The same on SQLite: each stats query is answered from a partial index
/// of live work (its plan names the index and scans no table), and the
/// counts are right with thousands of settled sagas of the past.
#[tokio::test]
async fn on_sqlite_the_stats_read_no_settled_history() {
    let backend = sqlite().await;
    let file = backend.file.as_ref().expect("sqlite");
    let pool = sqlx::SqlitePool::connect(&file.url()).await.unwrap();
    sqlx::query(
        "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 5000)
         INSERT INTO sagas (saga_id, customer_id, items, status, state, created_at,
                            updated_at, progress_at, finished_at)
         SELECT 'old' || n, 'c', '[]',
                CASE n % 3 WHEN 0 THEN 'COMPLETED' WHEN 1 THEN 'FAILED' ELSE 'CANCELLED' END,
                '{}', unixepoch() - 172800, unixepoch() - 172800, unixepoch() - 86400,
                unixepoch() - 86400
         FROM i",
    )
    .execute(&pool)
    .await
    .unwrap();
    for id in ["live1", "live2", "live3"] {
        backend
            .store
            .create(&new_saga(id, None), "r1", TTL)
            .await
            .unwrap();
    }
    for (sql, index) in orchestrator::store::sqlite_stats_sql()
        .into_iter()
        .zip(["sagas_stuck", "sagas_finished"])
    {
        let plan: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind(0.0)
                .fetch_all(&pool)
                .await
                .unwrap()
                .iter()
                .map(|row| sqlx::Row::get::<String, _>(row, "detail"))
                .collect();
        let scans: Vec<&String> = plan.iter().filter(|d| d.contains("sagas")).collect();
        assert!(!scans.is_empty(), "no read of sagas in {plan:?}: {sql}");
        for detail in scans {
            assert!(
                detail.contains(&format!("INDEX {index}")),
                "{detail} (wanted {index}): {sql}"
            );
        }
    }
    let stats = backend.store.stats().await.unwrap();
    assert_eq!(stats.counts, [(Status::Pending, 3)]);
    assert_eq!(stats.started_last_minute, 3);
    assert_eq!(stats.finished_last_minute, 0);
    pool.close().await;
}

/// A second version of a saga type, only for this test.
static AUDITED_V2: orchestrator::saga::Definition = orchestrator::saga::Definition {
    name: "audited",
    version: 2,
    steps: &[orchestrator::saga::StepDef {
        name: "audit",
        status: Status::ChargingPayment,
        participant: "auditor",
        action: "audit.v1/Audit",
        compensation: "audit.v1/Unaudit",
    }],
    pivot: 0,
};

async fn a_saga_records_the_name_and_version_of_its_definition(backend: Backend) {
    let store = &backend.store;
    let (order, _) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    assert_eq!(
        (order.definition_name.as_str(), order.definition_version),
        ("order", 1)
    );
    let audited = NewSaga {
        definition: &AUDITED_V2,
        state: SagaState::new(&AUDITED_V2),
        ..new_saga("s2", None)
    };
    let (created, _) = store.create(&audited, "r1", TTL).await.unwrap();
    assert_eq!(
        (created.definition_name.as_str(), created.definition_version),
        ("audited", 2)
    );
    assert_eq!(created.status, Status::Pending);
    // Read back the way every reader gets it: a load, a claim, a list.
    let loaded = store.load("s2").await.unwrap().unwrap();
    assert_eq!(
        (loaded.definition_name.as_str(), loaded.definition_version),
        ("audited", 2)
    );
    store.release_leases("r1").await.unwrap();
    let claimed = store.claim("s2", "r2", TTL).await.unwrap().unwrap();
    assert_eq!(
        (claimed.definition_name.as_str(), claimed.definition_version),
        ("audited", 2)
    );
    let listed = store
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let names: Vec<_> = listed
        .iter()
        .map(|s| {
            (
                s.saga_id.as_str(),
                s.definition_name.as_str(),
                s.definition_version,
            )
        })
        .collect();
    assert_eq!(names, [("s2", "audited", 2), ("s1", "order", 1)]);
}

fn new_saga(id: &str, key: Option<&str>) -> NewSaga {
    NewSaga {
        saga_id: id.into(),
        idempotency_key: key.map(Into::into),
        customer_id: "alice".into(),
        items: vec![OrderItem {
            product_id: "widget".into(),
            quantity: 2,
        }],
        definition: &ORDER_SAGA,
        state: SagaState::new(&ORDER_SAGA),
        trace_parent: None,
    }
}

fn entry(step: &str) -> JournalEntry {
    JournalEntry {
        step: step.into(),
        kind: JournalKind::Action,
        attempt: 1,
        outcome: JournalOutcome::Succeeded,
        detail: String::new(),
        rpc: "x/Y".into(),
        actor: "r1".into(),
        started_at: 1.0e9,
        finished_at: Some(1.0e9 + 0.5),
    }
}

fn reserved(state: &SagaState) -> SagaState {
    state
        .apply(
            &ORDER_SAGA,
            &POLICY,
            &Event::CallFinished {
                step: 0,
                kind: orchestrator::saga::Kind::Action,
                attempt: 1,
                outcome: Outcome::Succeeded(vec![("total_amount_cents".into(), "500".into())]),
            },
        )
        .unwrap()
}

fn commit<'a>(
    id: &'a str,
    version: i64,
    state: &'a SagaState,
    journal: &'a [JournalEntry],
    lease: LeaseChange<'a>,
) -> Commit<'a> {
    Commit {
        saga_id: id,
        expected_version: version,
        state,
        definition: &ORDER_SAGA,
        journal,
        next_attempt: NextAttempt::Clear,
        lease,
        durable: true,
        wake: false,
    }
}

async fn a_commit_applies_once_per_version_and_writes_its_journal_only_then(backend: Backend) {
    let store = &backend.store;
    let (saga, created) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(saga.status, Status::Pending);
    let next = reserved(&saga.state);
    let journal = [entry("reserve_inventory")];
    let extend = LeaseChange::Extend {
        owner: "r1",
        ttl: TTL,
    };

    let version = store
        .commit(commit("s1", saga.version, &next, &journal, extend))
        .await
        .unwrap()
        .expect("the first commit applies");
    assert!(version > saga.version, "{version} after {}", saga.version);
    // The same expected version again: a lost race, nothing written.
    let stale = store
        .commit(commit("s1", saga.version, &next, &journal, extend))
        .await
        .unwrap();
    assert_eq!(stale, None);

    let saga = store.load("s1").await.unwrap().unwrap();
    assert_eq!(saga.status, Status::ChargingPayment);
    assert_eq!(saga.total_amount_cents(), 500);
    assert_eq!(saga.state, next);
    let journal = store.journal("s1").await.unwrap();
    assert_eq!(journal.len(), 1, "the stale commit wrote no journal row");
    assert_eq!(journal[0], entry("reserve_inventory"));
}

/// Many sagas written at once (PostgreSQL batches them into shared
/// statements): each creation and transition still applies on its own, with
/// its own journal rows in order, and a shared idempotency key still records
/// one saga.
async fn concurrent_creations_and_commits_each_apply_with_their_journal(backend: Backend) {
    let store = &backend.store;
    let ids: Vec<String> = (0..60).map(|n| format!("s{n:02}")).collect();
    // s00..s09 and s10..s19 share keys pairwise; the rest have none.
    let keys: Vec<Option<String>> = (0..60)
        .map(|n| (n < 20).then(|| format!("key-{}", n % 10)))
        .collect();
    let created = futures_all(ids.iter().zip(&keys).map(|(id, key)| async move {
        store
            .create(&new_saga(id, key.as_deref()), "r1", TTL)
            .await
            .unwrap()
    }))
    .await;
    for key in 0..10 {
        let (a, b) = (&created[key], &created[key + 10]);
        assert_eq!(a.0.saga_id, b.0.saga_id, "key-{key} names one saga");
        assert!(a.1 ^ b.1, "exactly one call created the saga of key-{key}");
    }
    let winners: Vec<&str> = created
        .iter()
        .filter(|(_, fresh)| *fresh)
        .map(|(saga, _)| saga.saga_id.as_str())
        .collect();
    assert_eq!(winners.len(), 50);

    let states: Vec<SagaState> = created.iter().map(|(s, _)| reserved(&s.state)).collect();
    let journals: Vec<[JournalEntry; 2]> = winners
        .iter()
        .map(|id| {
            [
                entry(&format!("{id}-first")),
                entry(&format!("{id}-second")),
            ]
        })
        .collect();
    let extend = LeaseChange::Extend {
        owner: "r1",
        ttl: TTL,
    };
    let versions = futures_all(winners.iter().zip(&journals).map(|(id, journal)| {
        let saga = &created.iter().find(|(s, _)| s.saga_id == *id).unwrap().0;
        let state = &states[created.iter().position(|(s, _)| s.saga_id == *id).unwrap()];
        store.commit(commit(id, saga.version, state, journal, extend))
    }))
    .await;
    for (id, version) in winners.iter().zip(versions) {
        assert!(version.unwrap().is_some_and(|v| v > 1), "{id} applied once");
        let saga = store.load(id).await.unwrap().unwrap();
        assert_eq!(saga.status, Status::ChargingPayment, "{id}");
        let steps: Vec<String> = store
            .journal(id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.step)
            .collect();
        assert_eq!(steps, [format!("{id}-first"), format!("{id}-second")]);
    }
}

/// Twenty writers race one saga from the same version: one wins, and only
/// its journal row is written.
async fn racing_commits_to_one_saga_apply_exactly_once(backend: Backend) {
    let store = &backend.store;
    let (saga, _) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    let next = reserved(&saga.state);
    let journals: Vec<[JournalEntry; 1]> = (0..20).map(|n| [entry(&format!("w{n}"))]).collect();
    let results = futures_all(journals.iter().map(|journal| {
        store.commit(commit(
            "s1",
            saga.version,
            &next,
            journal,
            LeaseChange::Keep,
        ))
    }))
    .await;
    let won: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Ok(Some(_))))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(won.len(), 1, "exactly one writer wins: {results:?}");
    assert!(results.iter().all(|r| r.is_ok()));
    let journal = store.journal("s1").await.unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].step, format!("w{}", won[0]));
    assert!(store.load("s1").await.unwrap().unwrap().version > saga.version);
}

/// The database loses the tail that held a version (as after a power loss
/// with asynchronous commits, or a restore): the versions written after it
/// are new ones, so the writer that still holds the lost version cannot
/// commit over a state it never read.
async fn a_version_lost_with_the_tail_is_never_issued_again(backend: Backend) {
    let store = &backend.store;
    let (saga, _) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    let next = reserved(&saga.state);
    let lost = store
        .commit(commit("s1", saga.version, &next, &[], LeaseChange::Keep))
        .await
        .unwrap()
        .unwrap();
    // The crash: the row is back as it was before that commit.
    backend.set_version("s1", saga.version).await;
    let cancel = next
        .apply(
            &ORDER_SAGA,
            &POLICY,
            &Event::CancelRequested { reason: None },
        )
        .unwrap();
    let after = store
        .commit(commit("s1", saga.version, &cancel, &[], LeaseChange::Keep))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(after, lost, "a lost version was issued again");
    // The writer that saw the lost version loses its race.
    let stale = store
        .commit(commit("s1", lost, &next, &[], LeaseChange::Keep))
        .await
        .unwrap();
    assert_eq!(stale, None);
    assert_eq!(store.load("s1").await.unwrap().unwrap().state, cancel);
}

/// Runs borrowing futures concurrently on this task; answers in order.
async fn futures_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

async fn only_the_lease_owner_commits_and_release_gives_the_lease_up(backend: Backend) {
    let store = &backend.store;
    let (saga, _) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    let next = reserved(&saga.state);
    let other = LeaseChange::Extend {
        owner: "r2",
        ttl: TTL,
    };
    assert_eq!(
        store
            .commit(commit("s1", saga.version, &next, &[], other))
            .await
            .unwrap(),
        None,
        "r2 does not hold the lease"
    );
    store
        .commit(commit(
            "s1",
            saga.version,
            &next,
            &[],
            LeaseChange::Release { owner: "r1" },
        ))
        .await
        .unwrap()
        .expect("the owner commits");
    let saga = store.load("s1").await.unwrap().unwrap();
    assert_eq!(saga.lease_owner, None);
    assert_eq!(saga.lease_expires_at, None);
}

/// A request's commit marks the saga woken; the lease holder takes the
/// mark once; a write by the driver clears a mark it has not taken.
async fn a_request_marks_its_saga_woken_for_the_lease_holder_until_the_driver_writes(
    backend: Backend,
) {
    let store = &backend.store;
    let (saga, _) = store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    assert_eq!(store.take_wakes("r1").await.unwrap(), Vec::<String>::new());
    let next = reserved(&saga.state);
    let request = |version, wake| Commit {
        wake,
        ..commit("s1", version, &next, &[], LeaseChange::Keep)
    };
    let version = store
        .commit(request(saga.version, true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.take_wakes("r2").await.unwrap(), Vec::<String>::new());
    assert_eq!(store.take_wakes("r1").await.unwrap(), ["s1"]);
    assert_eq!(store.take_wakes("r1").await.unwrap(), Vec::<String>::new());

    let version = store.commit(request(version, true)).await.unwrap().unwrap();
    let extend = LeaseChange::Extend {
        owner: "r1",
        ttl: TTL,
    };
    store
        .commit(commit("s1", version, &next, &[], extend))
        .await
        .unwrap()
        .expect("the driver's write");
    assert_eq!(store.take_wakes("r1").await.unwrap(), Vec::<String>::new());
}

async fn an_idempotency_key_records_one_saga(backend: Backend) {
    let store = &backend.store;
    let (first, created) = store
        .create(&new_saga("s1", Some("key-1")), "r1", TTL)
        .await
        .unwrap();
    assert!(created);
    let (second, created) = store
        .create(&new_saga("s2", Some("key-1")), "r1", TTL)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(second.saga_id, first.saga_id);
    assert!(store.load("s2").await.unwrap().is_none());
    // The refused creation listed no products either.
    assert_eq!(backend.product_rows("s2").await, 0);
    assert_eq!(backend.product_rows("s1").await, 1);
    // No key: every call records a saga.
    store
        .create(&new_saga("s3", None), "r1", TTL)
        .await
        .unwrap();
    store
        .create(&new_saga("s4", None), "r1", TTL)
        .await
        .unwrap();
    let all = store
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = all.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, ["s4", "s3", "s1"], "newest (highest id) first");
}

async fn the_sweeper_claims_only_due_sagas_without_a_live_lease(backend: Backend) {
    let store = &backend.store;
    // Leased to a live replica: not claimable.
    store
        .create(&new_saga("live", None), "r1", TTL)
        .await
        .unwrap();
    // Its lease has already expired: claimable.
    store
        .create(&new_saga("orphan", None), "dead", Duration::ZERO)
        .await
        .unwrap();
    // Handed back but its retry is not due yet: not claimable.
    let (later, _) = store
        .create(&new_saga("later", None), "r1", TTL)
        .await
        .unwrap();
    let mut waiting = later.state.clone();
    waiting.waiting_retry = true;
    let mut future = commit(
        "later",
        later.version,
        &waiting,
        &[],
        LeaseChange::Release { owner: "r1" },
    );
    future.next_attempt = NextAttempt::In(Duration::from_secs(3600));
    store.commit(future).await.unwrap().expect("commit");
    // Settled: never claimed.
    let (done, _) = store
        .create(&new_saga("done", None), "dead", Duration::ZERO)
        .await
        .unwrap();
    let mut completed = done.state.clone();
    completed.phase = orchestrator::saga::Phase::Completed;
    store
        .commit(commit(
            "done",
            done.version,
            &completed,
            &[],
            LeaseChange::Keep,
        ))
        .await
        .unwrap()
        .expect("commit");

    let claimed = store.claim_due("r2", 10, TTL).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, ["orphan"]);
    assert_eq!(claimed[0].lease_owner.as_deref(), Some("r2"));
    assert!(
        store.claim_due("r3", 10, TTL).await.unwrap().is_empty(),
        "claimed once"
    );

    // Renewal keeps only what the owner still holds; release hands all back.
    let renewed = store
        .renew_leases("r2", &["orphan".into(), "live".into()], TTL)
        .await
        .unwrap();
    assert_eq!(renewed, ["orphan"]);
    assert_eq!(store.release_leases("r1").await.unwrap(), 1);
    assert!(store.claim("live", "r3", TTL).await.unwrap().is_some());
}

async fn stuck_and_age_filters_select_the_right_sagas(backend: Backend) {
    let store = &backend.store;
    store
        .create(&new_saga("active", None), "r1", TTL)
        .await
        .unwrap();
    let (done, _) = store
        .create(&new_saga("done", None), "r1", TTL)
        .await
        .unwrap();
    let mut completed = done.state.clone();
    completed.phase = orchestrator::saga::Phase::Completed;
    store
        .commit(commit(
            "done",
            done.version,
            &completed,
            &[],
            LeaseChange::Keep,
        ))
        .await
        .unwrap()
        .expect("commit");
    tokio::time::sleep(Duration::from_millis(20)).await;

    let list = |stuck_after: Option<Duration>, older_than: Option<Duration>| {
        let store = store.clone();
        async move {
            let filter = ListFilter {
                stuck_after,
                older_than,
                limit: 10,
                ..ListFilter::default()
            };
            let found = store.list(&filter).await.unwrap();
            found.into_iter().map(|s| s.saga_id).collect::<Vec<_>>()
        }
    };
    // No progress for 10 ms: only the unfinished saga is stuck.
    assert_eq!(
        list(Some(Duration::from_millis(10)), None).await,
        ["active"]
    );
    assert!(list(Some(Duration::from_secs(600)), None).await.is_empty());
    assert_eq!(
        list(None, Some(Duration::from_millis(10))).await,
        ["done", "active"]
    );
    assert!(list(None, Some(Duration::from_secs(600))).await.is_empty());

    let stats = store.stats().await.unwrap();
    // Terminal statuses are not counted by the store (that would read
    // all of history).
    assert_eq!(stats.counts, [(Status::Pending, 1)]);
    assert!(stats.oldest_active_age.unwrap() >= 0.01);
    assert_eq!(stats.started_last_minute, 2);
    assert_eq!(stats.finished_last_minute, 1);
}

async fn product_and_customer_filters(backend: Backend) {
    let store = &backend.store;
    let mut bobs = new_saga("s2", None);
    bobs.customer_id = "bob".into();
    bobs.items = vec![
        OrderItem {
            product_id: "gadget".into(),
            quantity: 1,
        },
        OrderItem {
            product_id: "widget".into(),
            quantity: 1,
        },
    ];
    store
        .create(&new_saga("s1", None), "r1", TTL)
        .await
        .unwrap();
    store.create(&bobs, "r1", TTL).await.unwrap();
    let ids = |filter: ListFilter| {
        let store = store.clone();
        async move {
            let found = store.list(&filter).await.unwrap();
            found.into_iter().map(|s| s.saga_id).collect::<Vec<_>>()
        }
    };
    let all = ListFilter {
        limit: 10,
        ..ListFilter::default()
    };
    assert_eq!(
        ids(ListFilter {
            product_id: Some("gadget".into()),
            ..all.clone()
        })
        .await,
        ["s2"]
    );
    assert_eq!(
        ids(ListFilter {
            product_id: Some("widget".into()),
            ..all.clone()
        })
        .await,
        ["s2", "s1"]
    );
    assert_eq!(
        ids(ListFilter {
            customer_id: Some("alice".into()),
            ..all.clone()
        })
        .await,
        ["s1"]
    );
    assert_eq!(
        ids(ListFilter {
            status: Some(Status::Pending),
            before_id: Some("s2".into()),
            ..all.clone()
        })
        .await,
        ["s1"]
    );
    // The product filter pages (saga_products, read backwards from the
    // page's start) and combines with every other filter.
    let product = |id: &str| ListFilter {
        product_id: Some(id.into()),
        ..all.clone()
    };
    let cases: [(ListFilter, &[&str]); 6] = [
        (
            ListFilter {
                before_id: Some("s2".into()),
                ..product("widget")
            },
            &["s1"],
        ),
        (
            ListFilter {
                limit: 1,
                ..product("widget")
            },
            &["s2"],
        ),
        (
            ListFilter {
                customer_id: Some("alice".into()),
                status: Some(Status::Pending),
                ..product("widget")
            },
            &["s1"],
        ),
        (
            ListFilter {
                customer_id: Some("alice".into()),
                ..product("gadget")
            },
            &[],
        ),
        (
            ListFilter {
                stuck_after: Some(Duration::ZERO),
                ..product("gadget")
            },
            &["s2"],
        ),
        (product("nothing"), &[]),
    ];
    for (filter, want) in cases {
        assert_eq!(ids(filter.clone()).await, want, "{filter:?}");
    }
    // One row per product of each saga.
    assert_eq!(backend.product_rows("s1").await, 1);
    assert_eq!(backend.product_rows("s2").await, 2);
}

#[tokio::test]
async fn a_sqlite_file_survives_a_reopen() {
    let backend = sqlite().await;
    let (saga, _) = backend
        .store
        .create(&new_saga("s1", Some("k1")), "r1", TTL)
        .await
        .unwrap();
    let next = reserved(&saga.state);
    backend
        .store
        .commit(commit(
            "s1",
            saga.version,
            &next,
            &[entry("reserve_inventory")],
            LeaseChange::Keep,
        ))
        .await
        .unwrap()
        .expect("commit");
    let file = backend.file.as_ref().unwrap().url();
    let Backend {
        store, file: keep, ..
    } = backend;
    drop(store);

    let reopened = orchestrator::server::connect(&file, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let saga = reopened.load("s1").await.unwrap().expect("still there");
    assert_eq!(saga.state, next);
    assert_eq!(reopened.journal("s1").await.unwrap().len(), 1);
    let (again, created) = reopened
        .create(&new_saga("s9", Some("k1")), "r1", TTL)
        .await
        .unwrap();
    assert!(!created, "the idempotency key survived too");
    assert_eq!(again.saga_id, "s1");
    drop(keep);
}

async fn sagas_are_paged_by_id_with_what_reconcile_compares(backend: Backend) {
    let store = &backend.store;
    assert_eq!(store.sagas_by_id("", 10).await.unwrap(), vec![]);
    // Created out of id order: the pages are in id order, every status.
    for id in ["s3", "s1"] {
        store.create(&new_saga(id, None), "r1", TTL).await.unwrap();
    }
    let (s2, _) = store
        .create(&new_saga("s2", None), "r1", TTL)
        .await
        .unwrap();
    let next = reserved(&s2.state);
    store
        .commit(commit("s2", s2.version, &next, &[], LeaseChange::Keep))
        .await
        .unwrap()
        .expect("committed");

    let all = store.sagas_by_id("", 10).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2", "s3"]);
    assert_eq!(
        all[1],
        SagaBrief {
            saga_id: "s2".into(),
            status: Status::ChargingPayment,
            customer_id: "alice".into(),
            items: vec![OrderItem {
                product_id: "widget".into(),
                quantity: 2,
            }],
            total_amount_cents: 500,
        }
    );
    assert_eq!(
        (all[0].status, all[0].total_amount_cents),
        (Status::Pending, 0)
    );
    // What a point read says, in the same shape.
    let loaded = store.load("s2").await.unwrap().expect("s2");
    assert_eq!(SagaBrief::from(&loaded), all[1]);

    assert_eq!(store.sagas_by_id("", 2).await.unwrap(), all[..2]);
    assert_eq!(store.sagas_by_id("s2", 2).await.unwrap(), all[2..]);
    assert_eq!(store.sagas_by_id("s3", 2).await.unwrap(), vec![]);
    assert_eq!(store.sagas_by_id("s1x", 10).await.unwrap(), all[1..]);
}

/// The same key from two customers records two sagas; each finds its own.
async fn an_idempotency_key_is_scoped_to_its_customer(backend: Backend) {
    let store = &backend.store;
    let alices = store
        .create(&new_saga("s1", Some("key-1")), "r1", TTL)
        .await
        .unwrap();
    assert!(alices.1);
    let bobs = NewSaga {
        customer_id: "bob".into(),
        ..new_saga("s2", Some("key-1"))
    };
    let (bob, created) = store.create(&bobs, "r1", TTL).await.unwrap();
    assert!(created, "bob's order is his own");
    assert_eq!(bob.saga_id, "s2");
    let found = store.find_by_key("alice", "key-1").await.unwrap().unwrap();
    assert_eq!(found.saga_id, "s1");
    let found = store.find_by_key("bob", "key-1").await.unwrap().unwrap();
    assert_eq!(found.saga_id, "s2");
    assert!(store.find_by_key("carol", "key-1").await.unwrap().is_none());
    let (again, created) = store.create(&bobs, "r1", TTL).await.unwrap();
    assert!(!created);
    assert_eq!(again.saga_id, "s2");
}

/// Creates `id` and commits it into `phase` with one journal entry.
async fn saga_in(store: &Arc<dyn SagaStore>, id: &str, key: Option<&str>, phase: Phase) {
    let (saga, _) = store.create(&new_saga(id, key), "r1", TTL).await.unwrap();
    let mut state = saga.state.clone();
    state.phase = phase;
    if matches!(phase, Phase::Failed | Phase::Cancelled) {
        state.cause = Some(if phase == Phase::Cancelled {
            Cause::Cancel
        } else {
            Cause::Failure
        });
        state.failure_reason = Some("rejected".into());
    }
    store
        .commit(commit(
            id,
            saga.version,
            &state,
            &[entry("reserve")],
            LeaseChange::Keep,
        ))
        .await
        .unwrap()
        .expect("commit");
}

/// The pruner's reads and deletes: only terminal sagas finished before the
/// cutoff, oldest first, at most a batch at a time, with their journals;
/// an export page reads the same set in id order; a pruned saga's
/// idempotency key may be used again.
async fn finished_sagas_past_the_cutoff_are_pruned_in_batches_with_their_journals(
    backend: Backend,
) {
    let store = &backend.store;
    assert_eq!(store.oldest_finished().await.unwrap(), None);
    saga_in(store, "old-1", Some("k1"), Phase::Completed).await;
    saga_in(store, "old-2", None, Phase::Failed).await;
    saga_in(store, "old-3", None, Phase::Cancelled).await;
    saga_in(store, "recent", Some("k2"), Phase::Completed).await;
    saga_in(store, "attention", None, Phase::NeedsAttention { step: 0 }).await;
    saga_in(store, "active", None, Phase::Forward { step: 1 }).await;
    // The oldest finished first, so it is the first batch.
    backend.age_finish("old-2", 300.0).await;
    backend.age_finish("old-1", 200.0).await;
    backend.age_finish("old-3", 100.0).await;
    let now = orchestrator::executor::now_epoch();
    let oldest = store
        .oldest_finished()
        .await
        .unwrap()
        .expect("finished sagas");
    assert!((oldest - (now - 300.0)).abs() < 5.0, "{oldest} vs {now}");

    let cutoff = now - 50.0;
    let page = |after: &'static str, limit| async move {
        let page = store.finished_page(cutoff, after, limit).await.unwrap();
        page.into_iter().map(|s| s.saga_id).collect::<Vec<_>>()
    };
    assert_eq!(page("", 10).await, ["old-1", "old-2", "old-3"]);
    assert_eq!(page("old-1", 1).await, ["old-2"]);
    assert!(page("old-3", 10).await.is_empty());

    assert_eq!(backend.product_rows("old-2").await, 1);
    assert_eq!(store.prune_finished(cutoff, 1).await.unwrap(), 1);
    assert!(store.load("old-2").await.unwrap().is_none(), "oldest first");
    assert!(store.journal("old-2").await.unwrap().is_empty());
    assert_eq!(backend.product_rows("old-2").await, 0, "its products too");
    assert_eq!(store.prune_finished(cutoff, 5).await.unwrap(), 2);
    assert_eq!(store.prune_finished(cutoff, 5).await.unwrap(), 0);
    for gone in ["old-1", "old-3"] {
        assert!(store.load(gone).await.unwrap().is_none(), "{gone}");
        assert!(store.journal(gone).await.unwrap().is_empty(), "{gone}");
    }
    for kept in ["recent", "attention", "active"] {
        assert!(store.load(kept).await.unwrap().is_some(), "{kept}");
        assert_eq!(store.journal(kept).await.unwrap().len(), 1, "{kept}");
        assert_eq!(backend.product_rows(kept).await, 1, "{kept}");
    }
    // Even a cutoff in the future leaves what has no finish alone.
    assert_eq!(store.prune_finished(now + 60.0, 10).await.unwrap(), 1);
    let left: Vec<String> = store
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.saga_id)
        .collect();
    assert_eq!(left, ["attention", "active"]);
    // The pruned saga's key is free again; a kept one's still replays.
    let (again, created) = store
        .create(&new_saga("new-1", Some("k1")), "r1", TTL)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(again.saga_id, "new-1");
}

/// PostgreSQL: a replica pruning skips the rows another is deleting
/// instead of waiting for them.
#[tokio::test]
async fn on_postgres_pruning_skips_rows_another_replica_holds() {
    let backend = postgres().await;
    let store = &backend.store;
    for id in ["a", "b", "c"] {
        saga_in(store, id, None, Phase::Completed).await;
        backend.age_finish(id, 100.0).await;
    }
    let db = backend._db.as_ref().unwrap();
    let other = sqlx::PgPool::connect(db.url()).await.unwrap();
    let mut holding = other.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagas WHERE saga_id = 'b' FOR UPDATE")
        .execute(&mut *holding)
        .await
        .unwrap();
    let cutoff = orchestrator::executor::now_epoch() - 10.0;
    let pruned = tokio::time::timeout(Duration::from_secs(10), store.prune_finished(cutoff, 10))
        .await
        .expect("pruning waited for a row another transaction holds")
        .unwrap();
    assert_eq!(pruned, 2);
    assert!(store.load("b").await.unwrap().is_some());
    holding.rollback().await.unwrap();
    assert_eq!(store.prune_finished(cutoff, 10).await.unwrap(), 1);
    other.close().await;
}
