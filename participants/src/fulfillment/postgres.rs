//! The fulfillment store on PostgreSQL. Ship writes the saga's shipment row
//! first, so a concurrent replay waits on its unique key and then answers
//! the first result.

use sqlx::{PgPool, Row};

use super::{CancelOutcome, FulfillmentStore, ShipmentRecord};
use crate::domain::{Id, Items, new_id};
use crate::error::Error;
use crate::record::{Locked, RecordTable, lock_or_tombstone};

/// Fulfillment persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgFulfillment {
    pool: PgPool,
}

impl PgFulfillment {
    /// A store on an already migrated pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl FulfillmentStore for PgFulfillment {
    async fn shipment(&self, saga_id: &Id) -> Result<Option<ShipmentRecord>, Error> {
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

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn ship(&self, saga_id: &Id, items: &Items) -> Result<String, Error> {
        // One round trip: the record and its items in one atomic statement,
        // the items only if the record was claimed.
        let (product_ids, quantities) = items.sorted_columns();
        let shipment_id = new_id("shp");
        let claimed: i64 = sqlx::query_scalar(
            "WITH claim AS (
                 INSERT INTO shipments (saga_id, shipment_id, state) VALUES ($1, $2, 'SHIPPED')
                 ON CONFLICT (saga_id) DO NOTHING
                 RETURNING saga_id
             ), items AS (
                 INSERT INTO shipment_items (saga_id, product_id, quantity)
                 SELECT claim.saga_id, r.product_id, r.quantity
                 FROM claim, unnest($3::text[], $4::bigint[]) AS r(product_id, quantity)
             )
             SELECT count(*) FROM claim",
        )
        .bind(saga_id.as_str())
        .bind(&shipment_id)
        .bind(&product_ids)
        .bind(&quantities)
        .fetch_one(&self.pool)
        .await?;
        if claimed == 0 {
            // A replay, a tombstone, or a concurrent call that committed first.
            let record = self.shipment(saga_id).await?.ok_or_else(|| {
                Error::Database(sqlx::Error::Protocol("shipment vanished".into()))
            })?;
            return record.replay(saga_id, items);
        }
        tracing::debug!(%shipment_id, "shipped");
        Ok(shipment_id)
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn cancel(&self, saga_id: &Id) -> Result<CancelOutcome, Error> {
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
