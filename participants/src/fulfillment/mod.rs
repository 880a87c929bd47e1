//! The fulfillment participant: one shipment per saga. Ship is the saga's
//! pivot; CancelShipment exists for sagas cancelled while Ship was in flight
//! (its reply lost), which must be undone like any attempted step.
//!
//! [`FulfillmentStore`] is the persistence interface, implemented on
//! PostgreSQL ([`PgFulfillment`]) and SQLite ([`SqliteFulfillment`]) with the
//! same observable behaviour; [`FulfillmentGrpc`] is its gRPC face.

mod postgres;
mod sqlite;

use std::sync::Arc;

use common::domain::{Id, Items, Page};
use common::error::Error;
use proto::fulfillment::v1 as pb;
use tonic::{Request, Response, Status};

use crate::record::timestamp;

pub use postgres::PgFulfillment;
pub use sqlite::SqliteFulfillment;

/// What a CancelShipment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// This call cancelled the shipment.
    Cancelled,
    /// It had been cancelled before.
    AlreadyCancelled,
    /// There was no shipment; a tombstone was written.
    Tombstoned,
}

/// A saga's shipment record, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipmentRecord {
    /// None for a tombstone.
    pub shipment_id: Option<String>,
    /// `SHIPPED`, `CANCELLED` or `TOMBSTONE`.
    pub state: String,
    /// Product ids and quantities, sorted by product id.
    pub items: (Vec<String>, Vec<i64>),
}

impl ShipmentRecord {
    /// The answer a Ship replay gets from this record.
    fn replay(self, saga_id: &Id, items: &Items) -> Result<String, Error> {
        match self.state.as_str() {
            "SHIPPED" if self.items == items.sorted_columns() => {
                Ok(self.shipment_id.unwrap_or_default())
            }
            "SHIPPED" => Err(Error::invalid(format!(
                "saga {saga_id} already shipped other items; a saga_id ships once"
            ))),
            "CANCELLED" => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated: its shipment was cancelled and cannot be made again"
            ))),
            _ => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated before its Ship arrived (tombstone); nothing shipped"
            ))),
        }
    }
}

/// A saga's shipment record as a listing returns it: the record, the saga
/// it belongs to and its times (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedShipment {
    /// The saga.
    pub saga_id: String,
    /// The record.
    pub record: ShipmentRecord,
    /// When the record (shipment or tombstone) was written.
    pub created_at: f64,
    /// When the shipment was cancelled; None unless `CANCELLED`.
    pub cancelled_at: Option<f64>,
}

/// A listed shipment row, in the column order of the listing queries.
type ShipmentRow = (String, Option<String>, String, f64, Option<f64>);

/// Listed rows with their items (see `record::items_by_saga`).
fn listed_shipments(
    rows: Vec<ShipmentRow>,
    mut items: std::collections::HashMap<String, (Vec<String>, Vec<i64>)>,
) -> Vec<ListedShipment> {
    rows.into_iter()
        .map(
            |(saga_id, shipment_id, state, created_at, cancelled_at)| ListedShipment {
                record: ShipmentRecord {
                    shipment_id,
                    state,
                    items: items.remove(&saga_id).unwrap_or_default(),
                },
                saga_id,
                created_at,
                cancelled_at,
            },
        )
        .collect()
}

/// Fulfillment persistence: what the gRPC face needs.
///
/// Every implementation keeps the same contract: Ship is idempotent per
/// saga (a replay returns the first shipment id, a replay with other items
/// is `INVALID_ARGUMENT`) and refuses a saga whose CancelShipment came first
/// (tombstone) or has run.
#[tonic::async_trait]
pub trait FulfillmentStore: std::fmt::Debug + Send + Sync + 'static {
    /// Reads a saga's shipment record, if any.
    async fn shipment(&self, saga_id: &Id) -> Result<Option<ShipmentRecord>, Error>;

    /// Creates the saga's shipment; returns its id.
    async fn ship(&self, saga_id: &Id, items: &Items) -> Result<String, Error>;

    /// Cancels the saga's shipment, or writes a tombstone.
    async fn cancel(&self, saga_id: &Id) -> Result<CancelOutcome, Error>;

    /// Up to `limit` shipment records (tombstones included) of sagas with
    /// ids after `after` (empty: from the start), in saga-id order.
    async fn list_shipments(&self, after: &str, limit: i64) -> Result<Vec<ListedShipment>, Error>;
}

fn shipment_state_pb(state: &str) -> pb::ShipmentState {
    match state {
        "SHIPPED" => pb::ShipmentState::Shipped,
        "CANCELLED" => pb::ShipmentState::Cancelled,
        _ => pb::ShipmentState::Tombstone,
    }
}

fn listed_shipment_pb(listed: ListedShipment) -> pb::ShipmentRecord {
    let (product_ids, quantities) = listed.record.items;
    pb::ShipmentRecord {
        saga_id: listed.saga_id,
        shipment_id: listed.record.shipment_id.unwrap_or_default(),
        state: shipment_state_pb(&listed.record.state).into(),
        items: product_ids
            .into_iter()
            .zip(quantities)
            .map(|(product_id, quantity)| pb::Item {
                product_id,
                quantity: i32::try_from(quantity).unwrap_or(i32::MAX),
            })
            .collect(),
        created_at: Some(timestamp(listed.created_at)),
        cancelled_at: listed.cancelled_at.map(timestamp),
    }
}

/// The gRPC face of a [`FulfillmentStore`].
#[derive(Debug, Clone)]
pub struct FulfillmentGrpc {
    store: Arc<dyn FulfillmentStore>,
}

impl FulfillmentGrpc {
    /// Serves `store`.
    pub fn new(store: Arc<dyn FulfillmentStore>) -> Self {
        Self { store }
    }
}

/// Checks a Ship request against the input contract (`common::domain`):
/// its saga and its items, or INVALID_ARGUMENT naming the first field out
/// of it. Pure: Ship calls it before the store.
pub fn validate_ship(request: pb::ShipRequest) -> Result<(Id, Items), Error> {
    Ok((
        Id::parse("saga_id", request.saga_id)?,
        Items::parse(
            request
                .items
                .into_iter()
                .map(|i| (i.product_id, i.quantity)),
        )?,
    ))
}

#[tonic::async_trait]
impl pb::fulfillment_service_server::FulfillmentService for FulfillmentGrpc {
    async fn ship(
        &self,
        request: Request<pb::ShipRequest>,
    ) -> Result<Response<pb::ShipResponse>, Status> {
        let (saga_id, items) = validate_ship(request.into_inner())?;
        let shipment_id = self.store.ship(&saga_id, &items).await?;
        Ok(Response::new(pb::ShipResponse { shipment_id }))
    }

    async fn cancel_shipment(
        &self,
        request: Request<pb::CancelShipmentRequest>,
    ) -> Result<Response<pb::CancelShipmentResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let outcome = match self.store.cancel(&saga_id).await? {
            CancelOutcome::Cancelled => pb::CancelOutcome::Cancelled,
            CancelOutcome::AlreadyCancelled => pb::CancelOutcome::AlreadyCancelled,
            CancelOutcome::Tombstoned => pb::CancelOutcome::Tombstoned,
        };
        Ok(Response::new(pb::CancelShipmentResponse {
            saga_id: saga_id.into_inner(),
            outcome: outcome.into(),
        }))
    }

    async fn get_shipment(
        &self,
        request: Request<pb::GetShipmentRequest>,
    ) -> Result<Response<pb::GetShipmentResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let record = self
            .store
            .shipment(&saga_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("saga {saga_id} has no shipment")))?;
        let state = match record.state.as_str() {
            "SHIPPED" => pb::ShipmentState::Shipped,
            "CANCELLED" => pb::ShipmentState::Cancelled,
            _ => pb::ShipmentState::Tombstone,
        };
        let (product_ids, quantities) = record.items;
        Ok(Response::new(pb::GetShipmentResponse {
            saga_id: saga_id.into_inner(),
            shipment_id: record.shipment_id.unwrap_or_default(),
            state: state.into(),
            items: product_ids
                .into_iter()
                .zip(quantities)
                .map(|(product_id, quantity)| pb::Item {
                    product_id,
                    quantity: quantity as i32,
                })
                .collect(),
        }))
    }

    async fn list_shipments(
        &self,
        request: Request<pb::ListShipmentsRequest>,
    ) -> Result<Response<pb::ListShipmentsResponse>, Status> {
        let request = request.into_inner();
        let page = Page::parse(request.page_size, request.page_token)?;
        let rows = self
            .store
            .list_shipments(page.after(), page.size() + 1)
            .await?;
        let (rows, next_page_token) = page.finish(rows, |r| r.saga_id.as_str());
        Ok(Response::new(pb::ListShipmentsResponse {
            shipments: rows.into_iter().map(listed_shipment_pb).collect(),
            next_page_token,
        }))
    }
}
