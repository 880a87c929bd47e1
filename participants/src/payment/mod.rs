//! The payment participant: accounts and per-saga charges.
//!
//! [`PaymentStore`] is the persistence interface, implemented on PostgreSQL
//! ([`PgPayment`]) and SQLite ([`SqlitePayment`]) with the same observable
//! behaviour; [`PaymentGrpc`] is its gRPC face.

mod postgres;
mod sqlite;

use std::sync::Arc;

use common::domain::{Cents, Id, MAX_MONEY_CENTS, Page};
use common::error::Error;
use proto::payment::v1 as pb;
use tonic::{Request, Response, Status};

use crate::record::timestamp;

pub use postgres::PgPayment;
pub use sqlite::SqlitePayment;

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

/// A saga's charge record as a listing returns it: the record, the saga it
/// belongs to and its times (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedCharge {
    /// The saga.
    pub saga_id: String,
    /// The record.
    pub record: ChargeRecord,
    /// When the record (charge or tombstone) was written.
    pub created_at: f64,
    /// When the amount was credited back; None unless `REFUNDED`.
    pub refunded_at: Option<f64>,
}

/// A listed charge row, in the column order of the listing queries.
type ChargeRow = (
    String,
    Option<String>,
    Option<String>,
    i64,
    String,
    f64,
    Option<f64>,
);

impl ListedCharge {
    fn from_row(
        (saga_id, charge_id, customer_id, amount_cents, state, created_at, refunded_at): ChargeRow,
    ) -> Self {
        Self {
            saga_id,
            record: ChargeRecord {
                charge_id,
                customer_id,
                amount_cents,
                state,
            },
            created_at,
            refunded_at,
        }
    }
}

/// Payment persistence: what the gRPC face needs.
///
/// Every implementation keeps the same contract: Charge is idempotent per
/// saga (a replay returns the first charge id, a replay for another
/// customer or amount is `INVALID_ARGUMENT`), never overdraws under
/// concurrency, and refuses a saga whose Refund came first (tombstone) or
/// has run.
#[tonic::async_trait]
pub trait PaymentStore: std::fmt::Debug + Send + Sync + 'static {
    /// Creates the account or sets its balance; returns the balance.
    async fn upsert_account(&self, customer_id: &Id, balance: Cents) -> Result<i64, Error>;

    /// Reads an account's balance; `NOT_FOUND` if unknown.
    async fn balance(&self, customer_id: &Id) -> Result<i64, Error>;

    /// Reads a saga's charge record, if any.
    async fn charge_record(&self, saga_id: &Id) -> Result<Option<ChargeRecord>, Error>;

    /// Debits the account for the saga; returns the charge id.
    async fn charge(&self, saga_id: &Id, customer_id: &Id, amount: Cents) -> Result<String, Error>;

    /// Credits the saga's charge back, or writes a tombstone.
    async fn refund(&self, saga_id: &Id) -> Result<RefundOutcome, Error>;

    /// Up to `limit` charge records (tombstones included) of sagas with ids
    /// after `after` (empty: from the start), in saga-id order.
    async fn list_charges(&self, after: &str, limit: i64) -> Result<Vec<ListedCharge>, Error>;
}

/// The rejection of a charge larger than the balance.
fn insufficient_funds(customer_id: &Id, balance: i64, amount: Cents) -> Error {
    Error::FailedPrecondition(format!(
        "insufficient funds: account {customer_id} has {balance} cents, the charge needs {} (short by {})",
        amount.get(),
        amount.get() - balance
    ))
}

fn charge_state_pb(state: &str) -> pb::ChargeState {
    match state {
        "CHARGED" => pb::ChargeState::Charged,
        "REFUNDED" => pb::ChargeState::Refunded,
        _ => pb::ChargeState::Tombstone,
    }
}

fn listed_charge_pb(listed: ListedCharge) -> pb::ChargeRecord {
    pb::ChargeRecord {
        saga_id: listed.saga_id,
        charge_id: listed.record.charge_id.unwrap_or_default(),
        state: charge_state_pb(&listed.record.state).into(),
        customer_id: listed.record.customer_id.unwrap_or_default(),
        amount_cents: listed.record.amount_cents,
        created_at: Some(timestamp(listed.created_at)),
        refunded_at: listed.refunded_at.map(timestamp),
    }
}

/// The gRPC face of a [`PaymentStore`].
#[derive(Debug, Clone)]
pub struct PaymentGrpc {
    store: Arc<dyn PaymentStore>,
}

impl PaymentGrpc {
    /// Serves `store`.
    pub fn new(store: Arc<dyn PaymentStore>) -> Self {
        Self { store }
    }
}

/// Checks a Charge request against the input contract (`common::domain`):
/// its saga, customer and amount, or INVALID_ARGUMENT naming the first
/// field out of it. Pure: Charge calls it before the store.
pub fn validate_charge(request: pb::ChargeRequest) -> Result<(Id, Id, Cents), Error> {
    Ok((
        Id::parse("saga_id", request.saga_id)?,
        Id::parse("customer_id", request.customer_id)?,
        Cents::parse("amount_cents", request.amount_cents, MAX_MONEY_CENTS)?,
    ))
}

#[tonic::async_trait]
impl pb::payment_service_server::PaymentService for PaymentGrpc {
    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        let (saga_id, customer_id, amount) = validate_charge(request.into_inner())?;
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

    async fn list_charges(
        &self,
        request: Request<pb::ListChargesRequest>,
    ) -> Result<Response<pb::ListChargesResponse>, Status> {
        let request = request.into_inner();
        let page = Page::parse(request.page_size, request.page_token)?;
        let rows = self
            .store
            .list_charges(page.after(), page.size() + 1)
            .await?;
        let (rows, next_page_token) = page.finish(rows, |r| r.saga_id.as_str());
        Ok(Response::new(pb::ListChargesResponse {
            charges: rows.into_iter().map(listed_charge_pb).collect(),
            next_page_token,
        }))
    }
}
