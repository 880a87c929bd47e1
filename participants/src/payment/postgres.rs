//! The payment store on PostgreSQL.
//!
//! Charge writes the saga's charge row first so that a concurrent replay
//! waits and then answers the first result; the debit is a single
//! conditional UPDATE, so concurrent charges can never overdraw.

use sqlx::PgPool;

use super::{ChargeRecord, PaymentStore, RefundOutcome, insufficient_funds};
use crate::domain::{Cents, Id, new_id};
use crate::error::Error;
use crate::record::{Locked, RecordTable, lock_or_tombstone};

/// Payment persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgPayment {
    pool: PgPool,
}

impl PgPayment {
    /// A store on an already migrated pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl PaymentStore for PgPayment {
    async fn upsert_account(&self, customer_id: &Id, balance: Cents) -> Result<i64, Error> {
        Ok(sqlx::query_scalar(
            "INSERT INTO accounts (customer_id, balance_cents) VALUES ($1, $2)
             ON CONFLICT (customer_id) DO UPDATE
                SET balance_cents = EXCLUDED.balance_cents, updated_at = now()
             RETURNING balance_cents",
        )
        .bind(customer_id.as_str())
        .bind(balance.get())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn balance(&self, customer_id: &Id) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(customer_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))
    }

    async fn charge_record(&self, saga_id: &Id) -> Result<Option<ChargeRecord>, Error> {
        Ok(sqlx::query_as(
            "SELECT charge_id, customer_id, amount_cents, state FROM charges WHERE saga_id = $1",
        )
        .bind(saga_id.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn charge(&self, saga_id: &Id, customer_id: &Id, amount: Cents) -> Result<String, Error> {
        // Three round trips: BEGIN, claim-and-debit, COMMIT. The claim comes
        // first so a concurrent replay waits on it; the debit only happens
        // if the claim did, and only if the balance covers it.
        let charge_id = new_id("chg");
        let mut tx = self.pool.begin().await?;
        let (claimed, debited): (i64, Option<i64>) = sqlx::query_as(
            "WITH claim AS (
                 INSERT INTO charges (saga_id, charge_id, customer_id, amount_cents, state)
                 VALUES ($1, $2, $3, $4, 'CHARGED') ON CONFLICT (saga_id) DO NOTHING
                 RETURNING saga_id
             ), debit AS (
                 UPDATE accounts SET balance_cents = balance_cents - $4, updated_at = now()
                 WHERE customer_id = $3 AND balance_cents >= $4 AND EXISTS (SELECT 1 FROM claim)
                 RETURNING balance_cents
             )
             SELECT (SELECT count(*) FROM claim), (SELECT balance_cents FROM debit)",
        )
        .bind(saga_id.as_str())
        .bind(&charge_id)
        .bind(customer_id.as_str())
        .bind(amount.get())
        .fetch_one(&mut *tx)
        .await?;
        if claimed == 0 {
            tx.rollback().await?;
            let record = self
                .charge_record(saga_id)
                .await?
                .ok_or_else(|| Error::Database(sqlx::Error::Protocol("charge vanished".into())))?;
            return record.replay(saga_id, customer_id, amount);
        }
        if debited.is_none() {
            let balance: Option<i64> =
                sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
                    .bind(customer_id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            let balance =
                balance.ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))?;
            return Err(insufficient_funds(customer_id, balance, amount));
        }
        tx.commit().await?;
        tracing::debug!(%charge_id, amount_cents = amount.get(), "charged");
        Ok(charge_id)
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn refund(&self, saga_id: &Id) -> Result<RefundOutcome, Error> {
        let mut tx = self.pool.begin().await?;
        let outcome = match lock_or_tombstone(&mut tx, RecordTable::Charges, saga_id).await? {
            Locked::Tombstoned => RefundOutcome::Tombstoned,
            Locked::Existing(state) if state == "CHARGED" => {
                sqlx::query(
                    "UPDATE accounts a SET balance_cents = a.balance_cents + c.amount_cents,
                            updated_at = now()
                     FROM charges c WHERE c.saga_id = $1 AND a.customer_id = c.customer_id",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE charges SET state = 'REFUNDED', refunded_at = now() WHERE saga_id = $1",
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
}
