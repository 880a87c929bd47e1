//! The fulfillment participant: one shipment per saga. Ship is the saga's
//! pivot; CancelShipment exists for sagas cancelled while Ship was in flight
//! (its reply lost), which must be undone like any attempted step.

use proto::fulfillment::v1 as pb;
use sqlx::{PgPool, Row};
use tonic::{Request, Response, Status};

use crate::domain::{Id, Items, new_id};
use crate::error::Error;
use crate::record::{Locked, RecordTable, lock_or_tombstone};

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

/// Fulfillment persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct FulfillmentStore {
    pool: PgPool,
}

impl FulfillmentStore {
    /// A store on an already migrated pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Reads a saga's shipment record, if any.
    pub async fn shipment(&self, saga_id: &Id) -> Result<Option<ShipmentRecord>, Error> {
        let Some(row) = sqlx::query("SELECT shipment_id, state FROM shipments WHERE saga_id = $1")
            .bind(saga_id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let items: Vec<(String, i64)> = sqlx::query_as(
            "SELECT product_id, quantity FROM shipment_items WHERE saga_id = $1 ORDER BY product_id",
        )
        .bind(saga_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(ShipmentRecord {
            shipment_id: row.try_get("shipment_id")?,
            state: row.try_get("state")?,
            items: items.into_iter().unzip(),
        }))
    }

    /// Creates the saga's shipment; returns its id.
    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    pub async fn ship(&self, saga_id: &Id, items: &Items) -> Result<String, Error> {
        if let Some(record) = self.shipment(saga_id).await? {
            return record.replay(saga_id, items);
        }
        let (product_ids, quantities) = items.sorted_columns();
        let shipment_id = new_id("shp");
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO shipments (saga_id, shipment_id, state) VALUES ($1, $2, 'SHIPPED')
             ON CONFLICT (saga_id) DO NOTHING",
        )
        .bind(saga_id.as_str())
        .bind(&shipment_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            let record = self.shipment(saga_id).await?.ok_or_else(|| {
                Error::Database(sqlx::Error::Protocol("shipment vanished".into()))
            })?;
            return record.replay(saga_id, items);
        }
        sqlx::query(
            "INSERT INTO shipment_items (saga_id, product_id, quantity)
             SELECT $1, product_id, quantity FROM unnest($2::text[], $3::bigint[]) AS r(product_id, quantity)",
        )
        .bind(saga_id.as_str())
        .bind(&product_ids)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%shipment_id, "shipped");
        Ok(shipment_id)
    }

    /// Cancels the saga's shipment, or writes a tombstone.
    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    pub async fn cancel(&self, saga_id: &Id) -> Result<CancelOutcome, Error> {
        let mut tx = self.pool.begin().await?;
        let outcome = match lock_or_tombstone(&mut tx, RecordTable::Shipments, saga_id).await? {
            Locked::Tombstoned => CancelOutcome::Tombstoned,
            Locked::Existing(state) if state == "SHIPPED" => {
                sqlx::query(
                    "UPDATE shipments SET state = 'CANCELLED', cancelled_at = now() WHERE saga_id = $1",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                CancelOutcome::Cancelled
            }
            Locked::Existing(state) if state == "CANCELLED" => CancelOutcome::AlreadyCancelled,
            Locked::Existing(_) => CancelOutcome::Tombstoned,
        };
        tx.commit().await?;
        tracing::info!(?outcome, "cancel shipment");
        Ok(outcome)
    }
}

/// The gRPC face of [`FulfillmentStore`].
#[derive(Debug, Clone)]
pub struct FulfillmentGrpc {
    store: FulfillmentStore,
}

impl FulfillmentGrpc {
    /// Serves `store`.
    pub fn new(store: FulfillmentStore) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl pb::fulfillment_service_server::FulfillmentService for FulfillmentGrpc {
    async fn ship(
        &self,
        request: Request<pb::ShipRequest>,
    ) -> Result<Response<pb::ShipResponse>, Status> {
        let request = request.into_inner();
        let saga_id = Id::parse("saga_id", request.saga_id)?;
        let items = Items::parse(
            request
                .items
                .into_iter()
                .map(|i| (i.product_id, i.quantity)),
        )?;
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
}
