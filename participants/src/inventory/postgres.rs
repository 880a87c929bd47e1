//! The inventory store on PostgreSQL.
//!
//! Reserve writes the saga's reservation row *first*: a second Reserve for
//! the same saga waits on that row's unique key and then replays the first
//! result, instead of racing for stock. Product rows are then locked in
//! product-id order, so multi-item reservations never deadlock each other.

use sqlx::{PgPool, Row};

use super::{InventoryStore, Product, ReleaseOutcome, ReservationRecord, Reserved, price};
use crate::domain::{Cents, Id, Items, new_id};
use crate::error::Error;
use crate::record::{Locked, RecordTable, lock_or_tombstone};

/// Inventory persistence on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgInventory {
    pool: PgPool,
}

impl PgInventory {
    /// A store on an already migrated pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl InventoryStore for PgInventory {
    async fn upsert_product(
        &self,
        product_id: &Id,
        name: &str,
        price: Cents,
        stock: Cents,
    ) -> Result<Product, Error> {
        Ok(sqlx::query_as(
            "INSERT INTO products (product_id, name, price_cents, stock) VALUES ($1, $2, $3, $4)
             ON CONFLICT (product_id) DO UPDATE
                SET name = EXCLUDED.name, price_cents = EXCLUDED.price_cents,
                    stock = EXCLUDED.stock, updated_at = now()
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
            "SELECT product_id, name, price_cents, stock, reserved FROM products WHERE product_id = $1",
        )
        .bind(product_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("unknown product {product_id}")))
    }

    async fn products(&self, after: &str, limit: i64) -> Result<Vec<Product>, Error> {
        Ok(sqlx::query_as(
            "SELECT product_id, name, price_cents, stock, reserved FROM products
             WHERE product_id > $1 ORDER BY product_id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn reservation(&self, saga_id: &Id) -> Result<Option<ReservationRecord>, Error> {
        let Some(row) = sqlx::query(
            "SELECT reservation_id, state, total_amount_cents FROM reservations WHERE saga_id = $1",
        )
        .bind(saga_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let items: Vec<(String, i64)> = sqlx::query_as(
            "SELECT product_id, quantity FROM reservation_items WHERE saga_id = $1 ORDER BY product_id",
        )
        .bind(saga_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(ReservationRecord {
            reservation_id: row.try_get("reservation_id")?,
            state: row.try_get("state")?,
            items: items.into_iter().unzip(),
            total_amount_cents: row.try_get("total_amount_cents")?,
        }))
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn reserve(&self, saga_id: &Id, items: &Items) -> Result<Reserved, Error> {
        // Five round trips: BEGIN, claim, lock, write, COMMIT. No read first:
        // a replay or a tombstone makes the claim conflict, and only then is
        // the record read back.
        let (product_ids, quantities) = items.sorted_columns();
        let reservation_id = new_id("rsv");
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO reservations (saga_id, reservation_id, state) VALUES ($1, $2, 'ACTIVE')
             ON CONFLICT (saga_id) DO NOTHING",
        )
        .bind(saga_id.as_str())
        .bind(&reservation_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            // A replay, a tombstone, or a concurrent call that committed first.
            tx.rollback().await?;
            let record = self.reservation(saga_id).await?.ok_or_else(|| {
                Error::Database(sqlx::Error::Protocol("reservation vanished".into()))
            })?;
            return record.replay(saga_id, items);
        }

        let products: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT product_id, stock, price_cents FROM products
             WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
        )
        .bind(&product_ids)
        .fetch_all(&mut *tx)
        .await?;
        let total = price(&product_ids, &quantities, &products)?;

        // Stock, the reservation's items and its total in one statement.
        sqlx::query(
            "WITH moved AS (
                 UPDATE products p SET stock = p.stock - r.quantity,
                        reserved = p.reserved + r.quantity, updated_at = now()
                 FROM unnest($2::text[], $3::bigint[]) AS r(product_id, quantity)
                 WHERE p.product_id = r.product_id
                 RETURNING p.product_id, r.quantity, p.price_cents
             ), items AS (
                 INSERT INTO reservation_items (saga_id, product_id, quantity, price_cents)
                 SELECT $1, product_id, quantity, price_cents FROM moved
             )
             UPDATE reservations SET total_amount_cents = $4 WHERE saga_id = $1",
        )
        .bind(saga_id.as_str())
        .bind(&product_ids)
        .bind(&quantities)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::debug!(%reservation_id, total_amount_cents = total, "reserved");
        Ok(Reserved {
            reservation_id,
            total_amount_cents: total,
        })
    }

    #[tracing::instrument(skip_all, fields(saga_id = %saga_id))]
    async fn release(&self, saga_id: &Id) -> Result<ReleaseOutcome, Error> {
        let mut tx = self.pool.begin().await?;
        let outcome = match lock_or_tombstone(&mut tx, RecordTable::Reservations, saga_id).await? {
            Locked::Tombstoned => ReleaseOutcome::Tombstoned,
            Locked::Existing(state) if state == "ACTIVE" => {
                sqlx::query(
                    "SELECT 1 FROM products WHERE product_id IN
                         (SELECT product_id FROM reservation_items WHERE saga_id = $1)
                     ORDER BY product_id FOR UPDATE",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE products p SET stock = p.stock + ri.quantity,
                            reserved = p.reserved - ri.quantity, updated_at = now()
                     FROM reservation_items ri
                     WHERE ri.saga_id = $1 AND p.product_id = ri.product_id",
                )
                .bind(saga_id.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE reservations SET state = 'RELEASED', released_at = now() WHERE saga_id = $1",
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
}
