//! The fulfillment store on SQLite, for the embedded mode: one connection,
//! and a Ship is one `BEGIN IMMEDIATE` transaction that reads the saga's
//! record and writes the shipment and its items.

use common::domain::{Id, Items, new_id};
use common::error::Error;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{CancelOutcome, FulfillmentStore, ListedShipment, ShipmentRecord, listed_shipments};
use crate::record::{Locked, RecordTable, items_by_saga, sqlite_take_or_tombstone};

/// Fulfillment persistence on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteFulfillment {
    pool: SqlitePool,
}

impl SqliteFulfillment {
    /// A store on an already migrated pool (of one connection).
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

/// Reads a saga's shipment record on `conn`, if any.
async fn read_shipment(
    conn: &mut SqliteConnection,
    saga_id: &Id,
) -> Result<Option<ShipmentRecord>, Error> {
    let Some(row) = sqlx::query("SELECT shipment_id, state FROM shipments WHERE saga_id = ?1")
        .bind(saga_id.as_str())
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let items: Vec<(String, i64)> = sqlx::query_as(
        "SELECT product_id, quantity FROM shipment_items WHERE saga_id = ?1 ORDER BY product_id",
    )
    .bind(saga_id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(ShipmentRecord {
        shipment_id: row.try_get("shipment_id")?,
        state: row.try_get("state")?,
        items: items.into_iter().unzip(),
    }))
}

#[tonic::async_trait]
impl FulfillmentStore for SqliteFulfillment {
    async fn shipment(&self, saga_id: &Id) -> Result<Option<ShipmentRecord>, Error> {
        let mut conn = self.pool.acquire().await?;
        read_shipment(&mut conn, saga_id).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn ship(&self, saga_id: &Id, items: &Items) -> Result<String, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(record) = read_shipment(&mut tx, saga_id).await? {
            tx.rollback().await?;
            return record.replay(saga_id, items);
        }
        let (product_ids, quantities) = items.sorted_columns();
        let shipment_id = new_id("shp");
        sqlx::query(
            "INSERT INTO shipments (saga_id, shipment_id, state) VALUES (?1, ?2, 'SHIPPED')",
        )
        .bind(saga_id.as_str())
        .bind(&shipment_id)
        .execute(&mut *tx)
        .await?;
        for (product_id, quantity) in product_ids.iter().zip(&quantities) {
            sqlx::query(
                "INSERT INTO shipment_items (saga_id, product_id, quantity) VALUES (?1, ?2, ?3)",
            )
            .bind(saga_id.as_str())
            .bind(product_id)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(%shipment_id, "shipped");
        Ok(shipment_id)
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn cancel(&self, saga_id: &Id) -> Result<CancelOutcome, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome =
            match sqlite_take_or_tombstone(&mut tx, RecordTable::Shipments, saga_id).await? {
                Locked::Tombstoned => CancelOutcome::Tombstoned,
                Locked::Existing(state) if state == "SHIPPED" => {
                    sqlx::query(
                        "UPDATE shipments SET state = 'CANCELLED',
                                cancelled_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         WHERE saga_id = ?1",
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

    async fn list_shipments(&self, after: &str, limit: i64) -> Result<Vec<ListedShipment>, Error> {
        // One read transaction, so the items match the records read.
        let mut tx = self.pool.begin().await?;
        let rows: Vec<super::ShipmentRow> = sqlx::query_as(
            "SELECT saga_id, shipment_id, state,
                    (julianday(created_at) - 2440587.5) * 86400.0,
                    (julianday(cancelled_at) - 2440587.5) * 86400.0
             FROM shipments WHERE saga_id > ?1 ORDER BY saga_id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|row| row.0.clone()) else {
            return Ok(Vec::new());
        };
        let items: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT saga_id, product_id, quantity FROM shipment_items
             WHERE saga_id > ?1 AND saga_id <= ?2 ORDER BY saga_id, product_id",
        )
        .bind(after)
        .bind(&last)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(listed_shipments(rows, items_by_saga(items)))
    }
}
