//! The per-saga idempotency record every participant keeps: one row per
//! saga_id with a state column. A compensation locks it, or, when the action
//! never arrived, writes a TOMBSTONE row that makes the late action fail.
//! One function per backend: PostgreSQL must cope with a concurrent action,
//! SQLite runs the compensation alone.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, PgConnection, SqliteConnection};

use common::domain::Id;
use common::error::Error;

/// A table holding one idempotency record per saga.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordTable {
    Reservations,
    Charges,
    Shipments,
}

impl RecordTable {
    fn name(self) -> &'static str {
        match self {
            Self::Reservations => "reservations",
            Self::Charges => "charges",
            Self::Shipments => "shipments",
        }
    }
}

/// What a compensation found when it took the saga's record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Locked {
    /// A record existed and is now locked until the transaction ends; the
    /// string is its state.
    Existing(String),
    /// There was no record: this call wrote a tombstone.
    Tombstoned,
}

/// Locks the saga's record in `table` for the rest of the transaction, or
/// writes a tombstone if there is none.
///
/// An action for the same saga may commit between our SELECT and our INSERT;
/// the INSERT then conflicts, and the next SELECT (a new snapshot under READ
/// COMMITTED) finds and locks that record. Two rounds are always enough.
pub(crate) async fn lock_or_tombstone(
    tx: &mut PgConnection,
    table: RecordTable,
    saga_id: &Id,
) -> Result<Locked, Error> {
    let select = format!(
        "SELECT state FROM {} WHERE saga_id = $1 FOR UPDATE",
        table.name()
    );
    let insert = format!(
        "INSERT INTO {} (saga_id, state) VALUES ($1, 'TOMBSTONE') ON CONFLICT (saga_id) DO NOTHING",
        table.name()
    );
    for _ in 0..2 {
        let state: Option<String> = sqlx::query_scalar(AssertSqlSafe(select.as_str()))
            .bind(saga_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(state) = state {
            return Ok(Locked::Existing(state));
        }
        let inserted = sqlx::query(AssertSqlSafe(insert.as_str()))
            .bind(saga_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if inserted == 1 {
            return Ok(Locked::Tombstoned);
        }
    }
    // Unreachable in practice: a row that made our INSERT conflict is visible
    // to the next SELECT. Answer a retryable conflict rather than panic.
    Err(Error::Database(sqlx::Error::Protocol(format!(
        "record for saga {saga_id} in {} neither visible nor insertable",
        table.name()
    ))))
}

/// The SQLite twin of [`lock_or_tombstone`]: reads the saga's record in
/// `table`, or writes a tombstone if there is none.
///
/// The caller's transaction began with `BEGIN IMMEDIATE`, so it holds the
/// database's write lock: no action can commit between the read and the
/// insert, and one round is enough.
pub(crate) async fn sqlite_take_or_tombstone(
    tx: &mut SqliteConnection,
    table: RecordTable,
    saga_id: &Id,
) -> Result<Locked, Error> {
    let select = format!("SELECT state FROM {} WHERE saga_id = ?1", table.name());
    let state: Option<String> = sqlx::query_scalar(AssertSqlSafe(select))
        .bind(saga_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(state) = state {
        return Ok(Locked::Existing(state));
    }
    let insert = format!(
        "INSERT INTO {} (saga_id, state) VALUES (?1, 'TOMBSTONE')",
        table.name()
    );
    sqlx::query(AssertSqlSafe(insert))
        .bind(saga_id.as_str())
        .execute(&mut *tx)
        .await?;
    Ok(Locked::Tombstoned)
}

/// Groups the item rows `(saga_id, product_id, quantity)` of a listed page
/// per saga, as the two columns (product ids and quantities, in the rows'
/// order) that the records carry. Rows must come ordered by saga id, then
/// product id.
pub(crate) fn items_by_saga(
    rows: Vec<(String, String, i64)>,
) -> HashMap<String, (Vec<String>, Vec<i64>)> {
    let mut grouped: HashMap<String, (Vec<String>, Vec<i64>)> = HashMap::new();
    for (saga_id, product_id, quantity) in rows {
        let (products, quantities) = grouped.entry(saga_id).or_default();
        products.push(product_id);
        quantities.push(quantity);
    }
    grouped
}

/// Seconds since the Unix epoch as a protobuf timestamp.
pub(crate) fn timestamp(seconds: f64) -> prost_types::Timestamp {
    let whole = seconds.floor();
    prost_types::Timestamp {
        seconds: whole as i64,
        nanos: ((seconds - whole) * 1e9) as i32,
    }
}
