//! The inventory store on SQLite, for the embedded mode.
//!
//! The pool has a single connection (`server::connect_sqlite`), so calls
//! run one at a time, and every write is one `BEGIN IMMEDIATE` transaction
//! that reads the saga's record, decides and writes: a concurrent replay
//! simply finds the first call's record, and stock is checked and taken with
//! nothing in between. Rows are bound one by one (SQLite has no arrays).

use common::domain::{Cents, Id, Items, new_id};
use common::error::Error;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{
    InventoryStore, ListedReservation, Product, ReleaseOutcome, ReservationRecord, Reserved, price,
};
use crate::record::{Locked, RecordTable, items_by_saga, sqlite_take_or_tombstone};

/// Inventory persistence on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteInventory {
    pool: SqlitePool,
}

impl SqliteInventory {
    /// A store on an already migrated pool (of one connection).
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

/// Reads a saga's reservation record on `conn`, if any.
async fn read_reservation(
    conn: &mut SqliteConnection,
    saga_id: &Id,
) -> Result<Option<ReservationRecord>, Error> {
    let Some(row) = sqlx::query(
        "SELECT reservation_id, state, total_amount_cents FROM reservations WHERE saga_id = ?1",
    )
    .bind(saga_id.as_str())
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let items: Vec<(String, i64)> = sqlx::query_as(
        "SELECT product_id, quantity FROM reservation_items WHERE saga_id = ?1 ORDER BY product_id",
    )
    .bind(saga_id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(ReservationRecord {
        reservation_id: row.try_get("reservation_id")?,
        state: row.try_get("state")?,
        items: items.into_iter().unzip(),
        total_amount_cents: row.try_get("total_amount_cents")?,
    }))
}

#[tonic::async_trait]
impl InventoryStore for SqliteInventory {
    async fn upsert_product(
        &self,
        product_id: &Id,
        name: &str,
        price: Cents,
        stock: Cents,
    ) -> Result<Product, Error> {
        Ok(sqlx::query_as(
            "INSERT INTO products (product_id, name, price_cents, stock) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (product_id) DO UPDATE
                SET name = excluded.name, price_cents = excluded.price_cents,
                    stock = excluded.stock,
                    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             RETURNING product_id, name, price_cents, stock, reserved",
        )
        .bind(product_id.as_str())
        .bind(name)
        .bind(price.get())
        .bind(stock.get())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn product(&self, product_id: &Id) -> Result<Product, Error> {
        sqlx::query_as(
            "SELECT product_id, name, price_cents, stock, reserved FROM products WHERE product_id = ?1",
        )
        .bind(product_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("unknown product {product_id}")))
    }

    async fn products(&self, after: &str, limit: i64) -> Result<Vec<Product>, Error> {
        Ok(sqlx::query_as(
            "SELECT product_id, name, price_cents, stock, reserved FROM products
             WHERE product_id > ?1 ORDER BY product_id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn reservation(&self, saga_id: &Id) -> Result<Option<ReservationRecord>, Error> {
        let mut conn = self.pool.acquire().await?;
        read_reservation(&mut conn, saga_id).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn reserve(&self, saga_id: &Id, items: &Items) -> Result<Reserved, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(record) = read_reservation(&mut tx, saga_id).await? {
            tx.rollback().await?;
            return record.replay(saga_id, items);
        }
        let (product_ids, quantities) = items.sorted_columns();
        let mut products = Vec::with_capacity(product_ids.len());
        for product_id in &product_ids {
            let found: Option<(i64, i64)> =
                sqlx::query_as("SELECT stock, price_cents FROM products WHERE product_id = ?1")
                    .bind(product_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((stock, price_cents)) = found {
                products.push((product_id.clone(), stock, price_cents));
            }
        }
        let total = match price(&product_ids, &quantities, &products) {
            Ok(total) => total,
            Err(rejection) => {
                tx.rollback().await?;
                return Err(rejection);
            }
        };

        let reservation_id = new_id("rsv");
        sqlx::query(
            "INSERT INTO reservations (saga_id, reservation_id, state, total_amount_cents)
             VALUES (?1, ?2, 'ACTIVE', ?3)",
        )
        .bind(saga_id.as_str())
        .bind(&reservation_id)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        // price() found every product, so `products` lines up with the items.
        for ((product_id, _, price_cents), quantity) in products.iter().zip(&quantities) {
            sqlx::query(
                "UPDATE products SET stock = stock - ?2, reserved = reserved + ?2,
                        updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 WHERE product_id = ?1",
            )
            .bind(product_id)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO reservation_items (saga_id, product_id, quantity, price_cents)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(saga_id.as_str())
            .bind(product_id)
            .bind(quantity)
            .bind(price_cents)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(%reservation_id, total_amount_cents = total, "reserved");
        Ok(Reserved {
            reservation_id,
            total_amount_cents: total,
        })
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn release(&self, saga_id: &Id) -> Result<ReleaseOutcome, Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome =
            match sqlite_take_or_tombstone(&mut tx, RecordTable::Reservations, saga_id).await? {
                Locked::Tombstoned => ReleaseOutcome::Tombstoned,
                Locked::Existing(state) if state == "ACTIVE" => {
                    sqlx::query(
                        "UPDATE products SET stock = stock + ri.quantity,
                                reserved = reserved - ri.quantity,
                                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         FROM reservation_items AS ri
                         WHERE ri.saga_id = ?1 AND products.product_id = ri.product_id",
                    )
                    .bind(saga_id.as_str())
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE reservations SET state = 'RELEASED',
                                released_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         WHERE saga_id = ?1",
                    )
                    .bind(saga_id.as_str())
                    .execute(&mut *tx)
                    .await?;
                    ReleaseOutcome::Released
                }
                Locked::Existing(state) if state == "RELEASED" => ReleaseOutcome::AlreadyReleased,
                Locked::Existing(_) => ReleaseOutcome::Tombstoned,
            };
        tx.commit().await?;
        tracing::info!(?outcome, "release");
        Ok(outcome)
    }

    async fn list_reservations(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ListedReservation>, Error> {
        // One read transaction, so the items match the records read.
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, Option<String>, String, i64, f64, Option<f64>)> = sqlx::query_as(
            "SELECT saga_id, reservation_id, state, total_amount_cents,
                    (julianday(created_at) - 2440587.5) * 86400.0,
                    (julianday(released_at) - 2440587.5) * 86400.0
             FROM reservations WHERE saga_id > ?1 ORDER BY saga_id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|row| row.0.clone()) else {
            return Ok(Vec::new());
        };
        let items: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT saga_id, product_id, quantity FROM reservation_items
             WHERE saga_id > ?1 AND saga_id <= ?2 ORDER BY saga_id, product_id",
        )
        .bind(after)
        .bind(&last)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut items = items_by_saga(items);
        Ok(rows
            .into_iter()
            .map(
                |(saga_id, reservation_id, state, total_amount_cents, created_at, released_at)| {
                    ListedReservation {
                        record: ReservationRecord {
                            reservation_id,
                            state,
                            items: items.remove(&saga_id).unwrap_or_default(),
                            total_amount_cents,
                        },
                        saga_id,
                        created_at,
                        released_at,
                    }
                },
            )
            .collect())
    }
}
