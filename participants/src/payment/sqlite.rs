//! The payment store on SQLite, for the embedded mode.
//!
//! One connection, so calls run one at a time; a Charge is one
//! `BEGIN IMMEDIATE` transaction that reads the saga's record, then debits
//! with the same conditional UPDATE as on PostgreSQL and writes the record.

use common::domain::{Cents, Id, new_id};
use common::error::Error;
use sqlx::{SqliteConnection, SqlitePool};

use super::{ChargeRecord, ListedCharge, PaymentStore, RefundOutcome, insufficient_funds};
use crate::record::{Locked, RecordTable, sqlite_take_or_tombstone};

/// Payment persistence on SQLite.
#[derive(Debug, Clone)]
pub struct SqlitePayment {
    pool: SqlitePool,
}

impl SqlitePayment {
    /// A store on an already migrated pool (of one connection).
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

/// Reads a saga's charge record on `conn`, if any.
async fn read_charge(
    conn: &mut SqliteConnection,
    saga_id: &Id,
) -> Result<Option<ChargeRecord>, Error> {
    Ok(sqlx::query_as(
        "SELECT charge_id, customer_id, amount_cents, state FROM charges WHERE saga_id = ?1",
    )
    .bind(saga_id.as_str())
    .fetch_optional(&mut *conn)
    .await?)
}

#[tonic::async_trait]
impl PaymentStore for SqlitePayment {
    async fn upsert_account(&self, customer_id: &Id, balance: Cents) -> Result<i64, Error> {
        Ok(sqlx::query_scalar(
            "INSERT INTO accounts (customer_id, balance_cents) VALUES (?1, ?2)
             ON CONFLICT (customer_id) DO UPDATE
                SET balance_cents = excluded.balance_cents,
                    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             RETURNING balance_cents",
        )
        .bind(customer_id.as_str())
        .bind(balance.get())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn balance(&self, customer_id: &Id) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = ?1")
            .bind(customer_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))
    }

    async fn charge_record(&self, saga_id: &Id) -> Result<Option<ChargeRecord>, Error> {
        let mut conn = self.pool.acquire().await?;
        read_charge(&mut conn, saga_id).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn charge(&self, saga_id: &Id, customer_id: &Id, amount: Cents) -> Result<String, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(record) = read_charge(&mut tx, saga_id).await? {
            tx.rollback().await?;
            return record.replay(saga_id, customer_id, amount);
        }
        let debited: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET balance_cents = balance_cents - ?2,
                    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE customer_id = ?1 AND balance_cents >= ?2 RETURNING balance_cents",
        )
        .bind(customer_id.as_str())
        .bind(amount.get())
        .fetch_optional(&mut *tx)
        .await?;
        if debited.is_none() {
            let balance: Option<i64> =
                sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = ?1")
                    .bind(customer_id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            let balance =
                balance.ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))?;
            return Err(insufficient_funds(customer_id, balance, amount));
        }
        let charge_id = new_id("chg");
        sqlx::query(
            "INSERT INTO charges (saga_id, charge_id, customer_id, amount_cents, state)
             VALUES (?1, ?2, ?3, ?4, 'CHARGED')",
        )
        .bind(saga_id.as_str())
        .bind(&charge_id)
        .bind(customer_id.as_str())
        .bind(amount.get())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%charge_id, amount_cents = amount.get(), "charged");
        Ok(charge_id)
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn refund(&self, saga_id: &Id) -> Result<RefundOutcome, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = match sqlite_take_or_tombstone(&mut tx, RecordTable::Charges, saga_id).await?
        {
            Locked::Tombstoned => RefundOutcome::Tombstoned,
            Locked::Existing(state) if state == "CHARGED" => {
                sqlx::query(
                    "UPDATE accounts SET balance_cents = balance_cents + c.amount_cents,
                            updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     FROM charges AS c
                     WHERE c.saga_id = ?1 AND accounts.customer_id = c.customer_id",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE charges SET state = 'REFUNDED',
                            refunded_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE saga_id = ?1",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                RefundOutcome::Refunded
            }
            Locked::Existing(state) if state == "REFUNDED" => RefundOutcome::AlreadyRefunded,
            Locked::Existing(_) => RefundOutcome::Tombstoned,
        };
        tx.commit().await?;
        tracing::info!(?outcome, "refund");
        Ok(outcome)
    }

    async fn list_charges(&self, after: &str, limit: i64) -> Result<Vec<ListedCharge>, Error> {
        let rows = sqlx::query_as(
            "SELECT saga_id, charge_id, customer_id, amount_cents, state,
                    (julianday(created_at) - 2440587.5) * 86400.0,
                    (julianday(refunded_at) - 2440587.5) * 86400.0
             FROM charges WHERE saga_id > ?1 ORDER BY saga_id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ListedCharge::from_row).collect())
    }
}
