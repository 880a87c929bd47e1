//! Saga persistence: the saga rows (the order, its state machine, its
//! lease and retry deadline) and their append-only journal, behind the
//! [`SagaStore`] trait. [`PgStore`] is the PostgreSQL implementation.
//!
//! Every state change is one atomic write of the saga row, checked against
//! the version the writer read (optimistic concurrency), together with its
//! journal rows. Timestamps cross this boundary as seconds since the Unix
//! epoch (`f64`), taken from the database clock where the database decides
//! (leases, deadlines) and from the caller's where the caller measured
//! (journal start and finish of a call).

/// A statement built once from constants, kept for the life of the process:
/// the hot path neither formats nor allocates its SQL again.
macro_rules! sql {
    ($($format:tt)*) => {{
        static SQL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
        *SQL.get_or_init(|| format!($($format)*).leak())
    }};
}

mod postgres;
mod sqlite;

use std::time::Duration;

pub use postgres::{PgStore, WRITER_CONNECTIONS, stats_sql};
pub use sqlite::{SqliteStore, stats_sql as sqlite_stats_sql};
use sqlx::types::Json;
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::error::Error;
use crate::saga::{Definition, Kind, Outcome, Registry, SagaState, Status, StepDef};

/// A product and a quantity of it, as stored with the order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderItem {
    /// The product.
    pub product_id: String,
    /// Units.
    pub quantity: i32,
}

/// A saga to record.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// Its id (the order id).
    pub saga_id: String,
    /// The client's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The paying customer.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<OrderItem>,
    /// The definition it starts under (its name and version are recorded).
    pub definition: &'static Definition,
    /// The initial state.
    pub state: SagaState,
    /// The W3C `traceparent` of the trace it belongs to, if any.
    pub trace_parent: Option<String>,
}

/// A saga as stored.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    /// Its id.
    pub saga_id: String,
    /// The client's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The paying customer.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<OrderItem>,
    /// The name of the definition it started under, e.g. `order`.
    pub definition_name: String,
    /// That definition's version; the saga runs by it to the end.
    pub definition_version: u32,
    /// The state machine.
    pub state: SagaState,
    /// The status derived from the state when it was written.
    pub status: Status,
    /// The row's version, for optimistic concurrency: 1 when created, then
    /// the larger of the previous version + 1 and the database clock in
    /// microseconds. A database that loses its unflushed tail forgets the
    /// versions it wrote there, and a counter would issue them again; a
    /// writer still holding one of them would then overwrite a state it
    /// never read. Clock-based versions are never reissued.
    pub version: i64,
    /// When the next attempt is due.
    pub next_attempt_at: Option<f64>,
    /// The replica driving it.
    pub lease_owner: Option<String>,
    /// Until when.
    pub lease_expires_at: Option<f64>,
    /// When the order was placed.
    pub created_at: f64,
    /// When the row last changed.
    pub updated_at: f64,
    /// When the status or the current step last changed (retries do not
    /// count).
    pub progress_at: f64,
    /// When it reached a terminal status.
    pub finished_at: Option<f64>,
    /// The W3C `traceparent` it was created under, if any: every driver of
    /// the saga continues that trace.
    pub trace_parent: Option<String>,
}

impl SagaRecord {
    /// The trace id of the trace it belongs to; empty when none.
    pub fn trace_id(&self) -> String {
        self.trace_parent
            .as_deref()
            .and_then(common::telemetry::trace_id_of)
            .unwrap_or_default()
            .to_owned()
    }

    /// The definition the saga runs by, as `registry` knows it: the one it
    /// started under, if this replica knows it and the stored state fits
    /// it. The error says why not.
    pub fn definition(&self, registry: &Registry) -> Result<&'static Definition, String> {
        let definition = registry.resolve(&self.definition_name, self.definition_version)?;
        self.state.fits(definition)?;
        Ok(definition)
    }

    /// The step being run or compensated (None when settled, or when the
    /// definition is not known here).
    pub fn current_step(&self, registry: &Registry) -> Option<(&'static StepDef, Kind)> {
        let (step, kind) = self.state.current()?;
        Some((self.definition(registry).ok()?.step(step)?, kind))
    }

    /// The order total, known once the reservation succeeded.
    pub fn total_amount_cents(&self) -> i64 {
        total_amount_cents(&self.state)
    }
}

/// The order total recorded in a state's outputs (0 until reserved).
pub fn total_amount_cents(state: &SagaState) -> i64 {
    state
        .outputs
        .get("total_amount_cents")
        .and_then(|total| total.parse().ok())
        .unwrap_or(0)
}

/// A set of statuses, written into SQL as a list of literals, e.g.
/// `('COMPLETED', 'FAILED', 'CANCELLED')`: the stores' queries take their
/// sets from [`Status`], never from retyped text.
#[derive(Clone, Copy)]
pub(crate) struct StatusSet(fn(Status) -> bool);

/// Statuses with no more work for the executor (terminal, or waiting for an
/// operator).
pub(crate) const SETTLED: StatusSet = StatusSet(Status::is_settled);
/// Statuses in which nothing will ever happen again.
pub(crate) const TERMINAL: StatusSet = StatusSet(Status::is_terminal);
/// NEEDS_ATTENTION alone.
pub(crate) const NEEDS_ATTENTION: StatusSet = StatusSet(|s| s == Status::NeedsAttention);

impl StatusSet {
    /// The statuses of the set, in lifecycle order.
    pub(crate) fn statuses(self) -> impl Iterator<Item = Status> {
        Status::ALL.into_iter().filter(move |s| (self.0)(*s))
    }
}

impl std::fmt::Display for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.statuses().map(|s| format!("'{s}'")).collect();
        write!(f, "({})", names.join(", "))
    }
}

/// The claim rule, the one statement of it that both backends' claims use:
/// a saga with work left whose lease is free or expired at `.0`, an SQL
/// expression of the backend's clock (`now()`, or a bound parameter).
pub(crate) struct Claimable(pub(crate) &'static str);

impl std::fmt::Display for Claimable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.0;
        write!(
            f,
            "status NOT IN {SETTLED} AND (lease_owner IS NULL OR lease_expires_at < {now})"
        )
    }
}

/// A saga whose next attempt is due at `.0` (as in [`Claimable`]): the
/// sweeper claims only those.
pub(crate) struct Due(pub(crate) &'static str);

impl std::fmt::Display for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.0;
        write!(f, "(next_attempt_at IS NULL OR next_attempt_at <= {now})")
    }
}

/// The columns stored beside the state for queries, derived from it.
pub(crate) struct Derived {
    pub(crate) status: Status,
    pub(crate) current_step: Option<&'static str>,
    pub(crate) attempts: i32,
    pub(crate) total_amount_cents: i64,
    pub(crate) cancel_requested: bool,
}

impl Derived {
    pub(crate) fn of(state: &SagaState, definition: &Definition) -> Self {
        let status = state.status(definition);
        let (current_step, attempts) = match state.current() {
            Some((step, _)) if !status.is_terminal() => (
                definition.step(step).map(|s| s.name),
                state.current_attempts() as i32,
            ),
            _ => (None, 0),
        };
        Self {
            status,
            current_step,
            attempts,
            total_amount_cents: total_amount_cents(state),
            cancel_requested: state.cancel_requested(),
        }
    }
}

/// A transition as every backend writes it, planned once: a [`Commit`]
/// with its derived columns, owned (it waits in a batch queue). The modes
/// are the statements' protocol: `next_mode` is `keep`, `clear` or `in`
/// (`next_secs` from now), `lease_mode` is `keep`, `extend` (by `ttl`
/// seconds, checked against `owner`) or `release` (checked against
/// `owner`). Delays are relative: each backend adds its own clock.
#[derive(Debug)]
pub(crate) struct CommitPlan {
    pub(crate) saga_id: String,
    pub(crate) expected_version: i64,
    pub(crate) state: String,
    pub(crate) status: &'static str,
    pub(crate) total_amount_cents: i64,
    pub(crate) failure_reason: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) current_step: Option<&'static str>,
    pub(crate) attempts: i32,
    pub(crate) cancel_requested: bool,
    pub(crate) next_mode: &'static str,
    pub(crate) next_secs: f64,
    pub(crate) lease_mode: &'static str,
    pub(crate) owner: Option<String>,
    pub(crate) ttl: f64,
    pub(crate) journal: Vec<JournalEntry>,
    pub(crate) durable: bool,
    pub(crate) wake: bool,
}

impl CommitPlan {
    /// The plan of `commit`.
    pub(crate) fn of(commit: &Commit<'_>) -> Result<Self, Error> {
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
        Ok(Self {
            saga_id: commit.saga_id.to_owned(),
            expected_version: commit.expected_version,
            state: serde_json::to_string(state)
                .map_err(|e| Error::Corrupt(format!("cannot encode the saga state: {e}")))?,
            status: derived.status.as_str(),
            total_amount_cents: derived.total_amount_cents,
            failure_reason: state.failure_reason.clone(),
            last_error: state.last_error.clone(),
            current_step: derived.current_step,
            attempts: derived.attempts,
            cancel_requested: derived.cancel_requested,
            next_mode,
            next_secs,
            lease_mode,
            owner: owner.map(str::to_owned),
            ttl,
            journal: commit.journal.to_vec(),
            durable: commit.durable,
            wake: commit.wake,
        })
    }
}

/// Reads a saga row (the same column names in every backend).
pub(crate) fn record<'r, R>(row: &'r R) -> Result<SagaRecord, Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    Json<Vec<OrderItem>>: Decode<'r, R::Database> + Type<R::Database>,
    Json<SagaState>: Decode<'r, R::Database> + Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let Json(items) = row.try_get("items")?;
    let Json(state) = row.try_get("state")?;
    let definition_version: i64 = row.try_get("definition_version")?;
    Ok(SagaRecord {
        saga_id: row.try_get("saga_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        customer_id: row.try_get("customer_id")?,
        items,
        definition_name: row.try_get("definition_name")?,
        definition_version: u32::try_from(definition_version).map_err(|_| {
            Error::Corrupt(format!(
                "definition version {definition_version} out of range"
            ))
        })?,
        state,
        status: Status::parse(&status)
            .ok_or_else(|| Error::Corrupt(format!("unknown status {status:?}")))?,
        version: row.try_get("version")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        progress_at: row.try_get("progress_at")?,
        finished_at: row.try_get("finished_at")?,
        trace_parent: row.try_get("trace_parent")?,
    })
}

/// Reads a journal row.
pub(crate) fn journal_entry<'r, R>(row: &'r R) -> Result<JournalEntry, Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
{
    let kind: String = row.try_get("kind")?;
    let outcome: String = row.try_get("outcome")?;
    Ok(JournalEntry {
        step: row.try_get("step")?,
        kind: JournalKind::parse(&kind)
            .ok_or_else(|| Error::Corrupt(format!("unknown journal kind {kind:?}")))?,
        attempt: row.try_get("attempt")?,
        outcome: JournalOutcome::parse(&outcome)
            .ok_or_else(|| Error::Corrupt(format!("unknown journal outcome {outcome:?}")))?,
        detail: row.try_get("detail")?,
        rpc: row.try_get("rpc")?,
        actor: row.try_get("actor")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// What a journal row records; stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalKind {
    /// A step's forward action.
    Action,
    /// A step's compensation.
    Compensation,
    /// A client or operator request (cancel, retry, abort, reconcile).
    Control,
}

impl JournalKind {
    /// Every kind.
    pub const ALL: [Self; 3] = [Self::Action, Self::Compensation, Self::Control];

    /// The stored name (also the contract's `StepKind` without its prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "ACTION",
            Self::Compensation => "COMPENSATION",
            Self::Control => "CONTROL",
        }
    }

    /// The kind stored as `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl From<Kind> for JournalKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Action => Self::Action,
            Kind::Compensation => Self::Compensation,
        }
    }
}

/// How the call or request of a journal row ended; stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalOutcome {
    /// The call succeeded.
    Succeeded,
    /// The call failed with a transient code; it is retried.
    RetryableFailure,
    /// The participant refused: the step is not retried.
    Rejected,
    /// A request was accepted.
    Accepted,
}

impl JournalOutcome {
    /// Every outcome.
    pub const ALL: [Self; 4] = [
        Self::Succeeded,
        Self::RetryableFailure,
        Self::Rejected,
        Self::Accepted,
    ];

    /// The stored name (also the contract's `StepOutcome` without its prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "SUCCEEDED",
            Self::RetryableFailure => "RETRYABLE_FAILURE",
            Self::Rejected => "REJECTED",
            Self::Accepted => "ACCEPTED",
        }
    }

    /// The outcome stored as `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// How a participant call that ended with `outcome` is journalled.
    pub fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Succeeded(_) => Self::Succeeded,
            Outcome::Retryable(_) => Self::RetryableFailure,
            Outcome::Rejected(_) => Self::Rejected,
        }
    }
}

/// One journal row: an attempt of a step, or a client or operator request.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// Step name, or `cancel` / `retry` / `abort` for requests.
    pub step: String,
    /// A call's kind, or a request.
    pub kind: JournalKind,
    /// Attempt number (0 for requests).
    pub attempt: i32,
    /// How the call ended, or `Accepted` for requests.
    pub outcome: JournalOutcome,
    /// The participant's message, or who asked and why.
    pub detail: String,
    /// The RPC called; empty for requests.
    pub rpc: String,
    /// The replica that made the call, or the requester.
    pub actor: String,
    /// When it started.
    pub started_at: f64,
    /// When it ended.
    pub finished_at: Option<f64>,
}

/// When the saga's next attempt is due, as written by a commit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextAttempt {
    /// Leave the stored deadline as it is.
    Keep,
    /// No deadline: the next call (if any) is due now.
    Clear,
    /// Due this long from now (database clock).
    In(Duration),
}

/// What a commit does to the lease.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeaseChange<'a> {
    /// Leave it; no owner check (client and operator requests).
    Keep,
    /// Only if `owner` holds the lease; extend it by `ttl`.
    Extend { owner: &'a str, ttl: Duration },
    /// Only if `owner` holds the lease; give it up (the saga is settled or
    /// the replica is stopping).
    Release { owner: &'a str },
}

/// One state change.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// The saga.
    pub saga_id: &'a str,
    /// The version the writer read; the write fails if it changed.
    pub expected_version: i64,
    /// The new state.
    pub state: &'a SagaState,
    /// The definition the state belongs to (to derive its status).
    pub definition: &'a Definition,
    /// Journal rows written with it.
    pub journal: &'a [JournalEntry],
    /// The retry deadline.
    pub next_attempt: NextAttempt,
    /// The lease.
    pub lease: LeaseChange<'a>,
    /// Whether the write must be on disk before the call returns. Only a
    /// forward step's success may be written without waiting for the flush
    /// (PostgreSQL `synchronous_commit = off` for that transaction): if it
    /// is lost in a database crash, the saga resumes one step back and the
    /// participant answers the replayed call with its first result. Any
    /// later durable commit flushes it anyway.
    pub durable: bool,
    /// Marks the saga as woken, for the replica driving it (a request
    /// written by whichever replica received it); without, the mark is
    /// cleared (the driver's own writes: it has seen every version before
    /// the one it wrote). See [`SagaStore::take_wakes`].
    pub wake: bool,
}

/// Filters of ListOrders / ListSagas; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Only orders containing this product.
    pub product_id: Option<String>,
    /// Only sagas placed longer ago than this.
    pub older_than: Option<Duration>,
    /// Only stuck sagas: NEEDS_ATTENTION, or non-terminal with no progress
    /// (status or step change) for `stuck_after`.
    pub stuck_after: Option<Duration>,
    /// Only sagas with ids below this one (pagination, newest first).
    pub before_id: Option<String>,
    /// At most this many.
    pub limit: i64,
}

/// The SQL of a [`ListFilter`] in one dialect: only the filters that are
/// set become conditions, so that each combination is a statement of its
/// own, planned for the index that serves it (a filter written `($1 IS
/// NULL OR ...)` gets one generic plan, which walks the primary key
/// backwards through all of history when matches are rare). The stuck
/// filter reads the live sagas only (`status NOT IN TERMINAL`, the partial
/// index `sagas_stuck`, in a materialised CTE), so `sagactl stuck` does not
/// read the settled history either.
pub(crate) struct ListQuery<'a> {
    /// The whole statement.
    pub(crate) sql: String,
    /// What to bind, in order.
    pub(crate) binds: Vec<ListBind<'a>>,
}

/// One value a [`ListQuery`] binds.
pub(crate) enum ListBind<'a> {
    Text(&'a str),
    Seconds(f64),
    Limit(i64),
}

/// How a dialect writes the conditions that differ.
pub(crate) struct ListDialect {
    /// `$` (PostgreSQL) or `?` (SQLite), followed by the bind's number.
    pub(crate) placeholder: char,
    /// The join of `saga_products` to `sagas` that reads the products
    /// table first (SQLite's `CROSS JOIN` fixes the order; PostgreSQL's
    /// planner chooses).
    pub(crate) product_join: &'static str,
    /// Rows whose `{column}` is older than `{}` seconds.
    pub(crate) older: fn(column: &str, seconds: &str) -> String,
}

impl<'a> ListQuery<'a> {
    pub(crate) fn new(filter: &'a ListFilter, columns: &str, dialect: &ListDialect) -> Self {
        let mut conditions: Vec<String> = Vec::new();
        let mut binds = Vec::new();
        let next = |bind: ListBind<'a>, binds: &mut Vec<ListBind<'a>>| {
            binds.push(bind);
            format!("{}{}", dialect.placeholder, binds.len())
        };
        if let Some(status) = filter.status {
            let p = next(ListBind::Text(status.as_str()), &mut binds);
            conditions.push(format!("status = {p}"));
        }
        if let Some(customer) = &filter.customer_id {
            let p = next(ListBind::Text(customer), &mut binds);
            conditions.push(format!("customer_id = {p}"));
        }
        // The product filter reads saga_products, (product_id, saga_id)
        // backwards from the page's start: a page costs a page, however
        // many orders the product has had. Among the live sagas (stuck) it
        // is a semi-join instead.
        if let Some(product) = &filter.product_id {
            let p = next(ListBind::Text(product), &mut binds);
            conditions.push(if filter.stuck_after.is_some() {
                format!("saga_id IN (SELECT saga_id FROM saga_products WHERE product_id = {p})")
            } else {
                format!("product_id = {p}")
            });
        }
        if let Some(age) = filter.older_than {
            let p = next(ListBind::Seconds(age.as_secs_f64()), &mut binds);
            conditions.push((dialect.older)("created_at", &p));
        }
        if let Some(stuck) = filter.stuck_after {
            let p = next(ListBind::Seconds(stuck.as_secs_f64()), &mut binds);
            conditions.push(format!(
                "(status IN {NEEDS_ATTENTION} OR (status NOT IN {SETTLED} AND {}))",
                (dialect.older)("progress_at", &p)
            ));
        }
        if let Some(before) = &filter.before_id {
            let p = next(ListBind::Text(before), &mut binds);
            conditions.push(format!("saga_id < {p}"));
        }
        let limit = next(ListBind::Limit(filter.limit), &mut binds);
        let conditions = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        // Stuck sagas are among the live ones: read those first, apart (a
        // materialised CTE is planned on its own, over the partial index of
        // live sagas), so the planner cannot walk the primary key backwards
        // through the settled history looking for a page of them.
        let from = if filter.stuck_after.is_some() {
            format!(
                "WITH live AS MATERIALIZED (SELECT * FROM sagas WHERE status NOT IN {TERMINAL}) \
                 SELECT {columns} FROM live AS sagas"
            )
        } else if filter.product_id.is_some() {
            format!(
                "SELECT {columns} FROM saga_products {} sagas USING (saga_id)",
                dialect.product_join
            )
        } else {
            format!("SELECT {columns} FROM sagas")
        };
        Self {
            sql: format!("{from}{conditions} ORDER BY saga_id DESC LIMIT {limit}"),
            binds,
        }
    }
}

/// Counts for the admin Stats call, read from live work only: the cost
/// does not grow with the number of settled sagas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Sagas per status, for the statuses that are not terminal (in flight
    /// and NEEDS_ATTENTION), on every replica. Terminal statuses are not
    /// counted here: counting them would read all of history (the admin
    /// call adds this replica's own counts since it started).
    pub counts: Vec<(Status, i64)>,
    /// Age of the oldest non-terminal saga, in seconds.
    pub oldest_active_age: Option<f64>,
    /// Sagas created in the last minute.
    pub started_last_minute: i64,
    /// Sagas finished in the last minute.
    pub finished_last_minute: i64,
}

impl Stats {
    /// Stats from the two reads: per non-terminal status (its stored
    /// name, how many, the oldest one's age, how many started in the last
    /// minute), and the last minute's finishes (how many, and how many of
    /// them started in the last minute too).
    pub(crate) fn from_open(
        open: Vec<(String, i64, Option<f64>, i64)>,
        finished: i64,
        finished_started: i64,
    ) -> Self {
        let oldest = open
            .iter()
            .filter_map(|(_, _, age, _)| *age)
            .reduce(f64::max);
        let started = finished_started + open.iter().map(|(_, _, _, s)| s).sum::<i64>();
        let mut counts: Vec<(Status, i64)> = open
            .into_iter()
            .filter_map(|(status, count, _, _)| Some((Status::parse(&status)?, count)))
            .collect();
        counts.sort_by_key(|(status, _)| Status::ALL.iter().position(|s| s == status));
        Self {
            counts,
            oldest_active_age: oldest,
            started_last_minute: started,
            finished_last_minute: finished,
        }
    }
}

/// What Reconcile compares of a saga with the participants' records.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaBrief {
    /// Its id.
    pub saga_id: String,
    /// Where it stands.
    pub status: Status,
    /// The paying customer.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<OrderItem>,
    /// The total the inventory priced (0 until reserved).
    pub total_amount_cents: i64,
}

impl From<&SagaRecord> for SagaBrief {
    fn from(saga: &SagaRecord) -> Self {
        Self {
            saga_id: saga.saga_id.clone(),
            status: saga.status,
            customer_id: saga.customer_id.clone(),
            items: saga.items.clone(),
            total_amount_cents: saga.total_amount_cents(),
        }
    }
}

/// Reads a [`SagaBrief`] row (the same column names in every backend).
pub(crate) fn brief<'r, R>(row: &'r R) -> Result<SagaBrief, Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Json<Vec<OrderItem>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let Json(items) = row.try_get("items")?;
    Ok(SagaBrief {
        saga_id: row.try_get("saga_id")?,
        status: Status::parse(&status)
            .ok_or_else(|| Error::Corrupt(format!("unknown status {status:?}")))?,
        customer_id: row.try_get("customer_id")?,
        items,
        total_amount_cents: row.try_get("total_amount_cents")?,
    })
}

/// Saga persistence. One implementation per database.
#[tonic::async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Records a new saga leased to `owner`, or, when its idempotency key
    /// was used before, returns the first saga. The flag says whether this
    /// call created it.
    async fn create(
        &self,
        saga: &NewSaga,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<(SagaRecord, bool), Error>;

    /// Reads a saga.
    async fn load(&self, saga_id: &str) -> Result<Option<SagaRecord>, Error>;

    /// Applies one state change; returns the new version, or None when the
    /// version (or the lease) no longer matches and nothing was written.
    async fn commit(&self, commit: Commit<'_>) -> Result<Option<i64>, Error>;

    /// Leases to `owner` up to `limit` sagas that have work due and no live
    /// lease (new, crashed, or handed back), skipping rows other replicas
    /// are claiming.
    async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease_ttl: Duration,
    ) -> Result<Vec<SagaRecord>, Error>;

    /// Leases one saga to `owner` if nobody holds a live lease on it.
    async fn claim(
        &self,
        saga_id: &str,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<Option<SagaRecord>, Error>;

    /// Extends `owner`'s leases on `saga_ids`; returns the ids it still holds.
    async fn renew_leases(
        &self,
        owner: &str,
        saga_ids: &[String],
        lease_ttl: Duration,
    ) -> Result<Vec<String>, Error>;

    /// Gives up every lease `owner` holds (shutdown, or a restart of the
    /// same replica); returns how many.
    async fn release_leases(&self, owner: &str) -> Result<u64, Error>;

    /// Clears and returns the marks of the sagas leased to `owner` that a
    /// request woke since their driver last wrote them ([`Commit::wake`]):
    /// one indexed statement, so a replica's sweeper can ask every tick
    /// and wake drivers waiting out a backoff when another replica took
    /// a request for their saga.
    async fn take_wakes(&self, owner: &str) -> Result<Vec<String>, Error>;

    /// A saga's journal, oldest first.
    async fn journal(&self, saga_id: &str) -> Result<Vec<JournalEntry>, Error>;

    /// Appends request rows (cancel, retry, abort) without a state change.
    async fn append_journal(&self, saga_id: &str, entries: &[JournalEntry]) -> Result<(), Error>;

    /// Sagas matching `filter`, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, Error>;

    /// Counts per status and activity of the last minute.
    async fn stats(&self) -> Result<Stats, Error>;

    /// Readiness: the database answers and is migrated as far as this
    /// build expects; one indexed read. `Ok` says how far, `Err` why not.
    async fn ready(&self) -> Result<String, String> {
        Ok("not checked".to_owned())
    }

    /// The connection pool now: (connections in use, idle, bound), if the
    /// store has one.
    fn pool_state(&self) -> Option<(u32, u32, u32)> {
        None
    }

    /// Writes (creations and transitions) queued for a batch writer and
    /// its connection, when the store batches them.
    fn writes_waiting(&self) -> Option<usize> {
        None
    }

    /// Up to `limit` sagas, every status, with ids after `after` (empty:
    /// from the start), in saga-id order: a keyset scan of the primary key,
    /// one page of Reconcile's merge join.
    async fn sagas_by_id(&self, after: &str, limit: i64) -> Result<Vec<SagaBrief>, Error>;

    /// Deletes up to `limit` finished sagas (COMPLETED, FAILED, CANCELLED:
    /// never one in flight or NEEDS_ATTENTION) that finished before
    /// `before` (epoch seconds), oldest first, with their journals, in one
    /// short transaction; rows another replica is deleting are skipped
    /// (PostgreSQL: `FOR UPDATE SKIP LOCKED`). Returns how many sagas.
    /// Reads the index of finished sagas only.
    async fn prune_finished(&self, before: f64, limit: i64) -> Result<u64, Error>;

    /// When the saga that finished longest ago finished (epoch seconds),
    /// if any is kept: the first entry of the index of finished sagas.
    async fn oldest_finished(&self) -> Result<Option<f64>, Error>;

    /// Up to `limit` finished sagas that finished before `before`, with
    /// ids after `after` (empty: from the start), in saga-id order: a page
    /// of an export.
    async fn finished_page(
        &self,
        before: f64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SagaRecord>, Error>;

    /// The saga `customer_id` placed with `idempotency_key`, if any (keys
    /// are scoped to the customer).
    async fn find_by_key(
        &self,
        customer_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<SagaRecord>, Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::saga::v1::{StepKind, StepOutcome};

    #[test]
    fn journal_kinds_and_outcomes_round_trip_and_are_the_contracts_names() {
        for kind in JournalKind::ALL {
            assert_eq!(JournalKind::parse(kind.as_str()), Some(kind));
            let name = format!("STEP_KIND_{}", kind.as_str());
            assert!(StepKind::from_str_name(&name).is_some(), "{name}");
        }
        for outcome in JournalOutcome::ALL {
            assert_eq!(JournalOutcome::parse(outcome.as_str()), Some(outcome));
            let name = format!("STEP_OUTCOME_{}", outcome.as_str());
            assert!(StepOutcome::from_str_name(&name).is_some(), "{name}");
        }
        assert_eq!(JournalKind::parse("action"), None);
        assert_eq!(JournalOutcome::parse(""), None);
    }

    #[test]
    fn status_sets_are_written_as_sql_lists_from_the_status_type() {
        assert_eq!(TERMINAL.to_string(), "('COMPLETED', 'FAILED', 'CANCELLED')");
        assert_eq!(
            SETTLED.to_string(),
            "('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')"
        );
        assert_eq!(NEEDS_ATTENTION.to_string(), "('NEEDS_ATTENTION')");
    }
}
