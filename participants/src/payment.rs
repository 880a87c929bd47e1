//! The payment participant: accounts and per-saga charges.
//!
//! Like the inventory, Charge writes the saga's charge row first so that a
//! concurrent replay waits and then answers the first result; the debit is a
//! single conditional UPDATE, so concurrent charges can never overdraw.

use proto::payment::v1 as pb;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::domain::{Cents, Id, MAX_MONEY_CENTS, new_id};
use crate::error::Error;
use crate::record::{Locked, RecordTable, lock_or_tombstone};

/// What a Refund did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    /// This call credited the amount back.
    Refunded,
    /// It had been credited back before.
    AlreadyRefunded,
    /// There was no charge; a tombstone was written.
    Tombstoned,
}

/// A saga's charge record, as read back.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChargeRecord {
    /// None for a tombstone.
    pub charge_id: Option<String>,
    /// None for a tombstone.
    pub customer_id: Option<String>,
    /// 0 for a tombstone.
    pub amount_cents: i64,
    /// `CHARGED`, `REFUNDED` or `TOMBSTONE`.
    pub state: String,
}

impl ChargeRecord {
    /// The answer a Charge replay gets from this record.
    fn replay(self, saga_id: &Id, customer_id: &Id, amount: Cents) -> Result<String, Error> {
        match self.state.as_str() {
            "CHARGED"
                if self.customer_id.as_deref() == Some(customer_id.as_str())
                    && self.amount_cents == amount.get() =>
            {
                Ok(self.charge_id.unwrap_or_default())
            }
            "CHARGED" => Err(Error::invalid(format!(
                "saga {saga_id} already charged another customer or amount; a saga_id charges once"
            ))),
            "REFUNDED" => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated: its charge was refunded and cannot be made again"
            ))),
            _ => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated before its Charge arrived (tombstone); nothing charged"
            ))),
        }
    }
}

/// Payment persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PaymentStore {
    pool: PgPool,
}

impl PaymentStore {
    /// A store on an already migrated pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates the account or sets its balance.
    pub async fn upsert_account(&self, customer_id: &Id, balance: Cents) -> Result<i64, Error> {
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

    /// Reads an account's balance.
    pub async fn balance(&self, customer_id: &Id) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(customer_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))
    }

    /// Reads a saga's charge record, if any.
    pub async fn charge_record(&self, saga_id: &Id) -> Result<Option<ChargeRecord>, Error> {
        Ok(sqlx::query_as(
            "SELECT charge_id, customer_id, amount_cents, state FROM charges WHERE saga_id = $1",
        )
        .bind(saga_id.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Debits the account for the saga; returns the charge id.
    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    pub async fn charge(
        &self,
        saga_id: &Id,
        customer_id: &Id,
        amount: Cents,
    ) -> Result<String, Error> {
        if let Some(record) = self.charge_record(saga_id).await? {
            return record.replay(saga_id, customer_id, amount);
        }
        let charge_id = new_id("chg");
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO charges (saga_id, charge_id, customer_id, amount_cents, state)
             VALUES ($1, $2, $3, $4, 'CHARGED') ON CONFLICT (saga_id) DO NOTHING",
        )
        .bind(saga_id.as_str())
        .bind(&charge_id)
        .bind(customer_id.as_str())
        .bind(amount.get())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            let record = self
                .charge_record(saga_id)
                .await?
                .ok_or_else(|| Error::Database(sqlx::Error::Protocol("charge vanished".into())))?;
            return record.replay(saga_id, customer_id, amount);
        }
        let debited: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET balance_cents = balance_cents - $2, updated_at = now()
             WHERE customer_id = $1 AND balance_cents >= $2 RETURNING balance_cents",
        )
        .bind(customer_id.as_str())
        .bind(amount.get())
        .fetch_optional(&mut *tx)
        .await?;
        if debited.is_none() {
            let balance: Option<i64> =
                sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
                    .bind(customer_id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            let balance =
                balance.ok_or_else(|| Error::NotFound(format!("unknown account {customer_id}")))?;
            return Err(Error::FailedPrecondition(format!(
                "insufficient funds: account {customer_id} has {balance} cents, the charge needs {} (short by {})",
                amount.get(),
                amount.get() - balance
            )));
        }
        tx.commit().await?;
        tracing::info!(%charge_id, amount_cents = amount.get(), "charged");
        Ok(charge_id)
    }

    /// Credits the saga's charge back, or writes a tombstone.
    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    pub async fn refund(&self, saga_id: &Id) -> Result<RefundOutcome, Error> {
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

/// The gRPC face of [`PaymentStore`].
#[derive(Debug, Clone)]
pub struct PaymentGrpc {
    store: PaymentStore,
}

impl PaymentGrpc {
    /// Serves `store`.
    pub fn new(store: PaymentStore) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl pb::payment_service_server::PaymentService for PaymentGrpc {
    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        let request = request.into_inner();
        let saga_id = Id::parse("saga_id", request.saga_id)?;
        let customer_id = Id::parse("customer_id", request.customer_id)?;
        let amount = Cents::parse("amount_cents", request.amount_cents, MAX_MONEY_CENTS)?;
        let charge_id = self.store.charge(&saga_id, &customer_id, amount).await?;
        Ok(Response::new(pb::ChargeResponse { charge_id }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let outcome = match self.store.refund(&saga_id).await? {
            RefundOutcome::Refunded => pb::RefundOutcome::Refunded,
            RefundOutcome::AlreadyRefunded => pb::RefundOutcome::AlreadyRefunded,
            RefundOutcome::Tombstoned => pb::RefundOutcome::Tombstoned,
        };
        Ok(Response::new(pb::RefundResponse {
            saga_id: saga_id.into_inner(),
            outcome: outcome.into(),
        }))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let customer_id = Id::parse("customer_id", request.into_inner().customer_id)?;
        let balance_cents = self.store.balance(&customer_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            customer_id: customer_id.into_inner(),
            balance_cents,
        }))
    }

    async fn upsert_account(
        &self,
        request: Request<pb::UpsertAccountRequest>,
    ) -> Result<Response<pb::UpsertAccountResponse>, Status> {
        let request = request.into_inner();
        let customer_id = Id::parse("customer_id", request.customer_id)?;
        let balance = Cents::parse("balance_cents", request.balance_cents, MAX_MONEY_CENTS)?;
        let balance_cents = self.store.upsert_account(&customer_id, balance).await?;
        Ok(Response::new(pb::UpsertAccountResponse {
            customer_id: customer_id.into_inner(),
            balance_cents,
        }))
    }

    async fn get_charge(
        &self,
        request: Request<pb::GetChargeRequest>,
    ) -> Result<Response<pb::GetChargeResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let record = self
            .store
            .charge_record(&saga_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("saga {saga_id} has no charge")))?;
        let state = match record.state.as_str() {
            "CHARGED" => pb::ChargeState::Charged,
            "REFUNDED" => pb::ChargeState::Refunded,
            _ => pb::ChargeState::Tombstone,
        };
        Ok(Response::new(pb::GetChargeResponse {
            saga_id: saga_id.into_inner(),
            charge_id: record.charge_id.unwrap_or_default(),
            state: state.into(),
            customer_id: record.customer_id.unwrap_or_default(),
            amount_cents: record.amount_cents,
        }))
    }
}
