//! The inventory participant: products, stock, and per-saga reservations.
//!
//! [`InventoryStore`] is the persistence interface, implemented on
//! PostgreSQL ([`PgInventory`]) and SQLite ([`SqliteInventory`]) with the
//! same observable behaviour; [`InventoryGrpc`] parses requests into domain
//! types, calls the store and maps the results to protobuf.

mod postgres;
mod sqlite;

use std::sync::Arc;

use common::domain::{Cents, Id, Items, MAX_NAME_BYTES, MAX_PRICE_OR_STOCK, Page, bounded_text};
use common::error::Error;
use proto::inventory::v1 as pb;
use tonic::{Request, Response, Status};

use crate::record::timestamp;

pub use postgres::PgInventory;
pub use sqlite::SqliteInventory;

/// A product row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Product {
    /// The product.
    pub product_id: String,
    /// Display name.
    pub name: String,
    /// Price of one unit in cents.
    pub price_cents: i64,
    /// Units available for new reservations.
    pub stock: i64,
    /// Units held by active reservations.
    pub reserved: i64,
}

/// A successful reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Its identifier.
    pub reservation_id: String,
    /// Its price in cents.
    pub total_amount_cents: i64,
}

/// What a Release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// This call put the units back.
    Released,
    /// They had been put back before.
    AlreadyReleased,
    /// There was no reservation; a tombstone was written.
    Tombstoned,
}

/// A saga's reservation record, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    /// None for a tombstone.
    pub reservation_id: Option<String>,
    /// `ACTIVE`, `RELEASED` or `TOMBSTONE`.
    pub state: String,
    /// Product ids and quantities, sorted by product id.
    pub items: (Vec<String>, Vec<i64>),
    /// Price at reservation time.
    pub total_amount_cents: i64,
}

impl ReservationRecord {
    /// The answer a Reserve replay gets from this record.
    fn replay(self, saga_id: &Id, items: &Items) -> Result<Reserved, Error> {
        match self.state.as_str() {
            "ACTIVE" if self.items == items.sorted_columns() => Ok(Reserved {
                reservation_id: self.reservation_id.unwrap_or_default(),
                total_amount_cents: self.total_amount_cents,
            }),
            "ACTIVE" => Err(Error::invalid(format!(
                "saga {saga_id} already holds a reservation for other items; a saga_id reserves once"
            ))),
            "RELEASED" => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated: its reservation was released and cannot be made again"
            ))),
            _ => Err(Error::FailedPrecondition(format!(
                "saga {saga_id} was compensated before its Reserve arrived (tombstone); nothing reserved"
            ))),
        }
    }
}

/// A saga's reservation record as a listing returns it: the record, the
/// saga it belongs to and its times (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedReservation {
    /// The saga.
    pub saga_id: String,
    /// The record.
    pub record: ReservationRecord,
    /// When the record (reservation or tombstone) was written.
    pub created_at: f64,
    /// When the units were put back; None unless `RELEASED`.
    pub released_at: Option<f64>,
}

/// Inventory persistence: what the gRPC face needs.
///
/// Every implementation keeps the same contract: Reserve is idempotent per
/// saga (a replay returns the first result, a replay with other items is
/// `INVALID_ARGUMENT`), all or nothing, never oversells under concurrency,
/// and refuses a saga whose Release came first (tombstone) or has run.
#[tonic::async_trait]
pub trait InventoryStore: std::fmt::Debug + Send + Sync + 'static {
    /// Creates the product or replaces its name, price and available stock.
    async fn upsert_product(
        &self,
        product_id: &Id,
        name: &str,
        price: Cents,
        stock: Cents,
    ) -> Result<Product, Error>;

    /// Reads one product; `NOT_FOUND` if unknown.
    async fn product(&self, product_id: &Id) -> Result<Product, Error>;

    /// Up to `limit` products with ids after `after`, in id order.
    async fn products(&self, after: &str, limit: i64) -> Result<Vec<Product>, Error>;

    /// Reads a saga's reservation record, if any.
    async fn reservation(&self, saga_id: &Id) -> Result<Option<ReservationRecord>, Error>;

    /// Takes `items` out of available stock for the saga, all or nothing.
    async fn reserve(&self, saga_id: &Id, items: &Items) -> Result<Reserved, Error>;

    /// Puts the saga's reserved units back, or writes a tombstone.
    async fn release(&self, saga_id: &Id) -> Result<ReleaseOutcome, Error>;

    /// Up to `limit` reservation records (tombstones included) of sagas
    /// with ids after `after` (empty: from the start), in saga-id order.
    async fn list_reservations(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ListedReservation>, Error>;
}

/// Checks every requested product against the locked rows and prices the
/// reservation. All shortfalls are reported at once.
fn price(
    product_ids: &[String],
    quantities: &[i64],
    locked: &[(String, i64, i64)],
) -> Result<i64, Error> {
    let mut total: i64 = 0;
    let mut short = Vec::new();
    for (product_id, &quantity) in product_ids.iter().zip(quantities) {
        let Some((_, stock, price_cents)) = locked.iter().find(|(id, _, _)| id == product_id)
        else {
            return Err(Error::NotFound(format!("unknown product {product_id}")));
        };
        if *stock < quantity {
            short.push(format!(
                "product {product_id}: {quantity} requested, {stock} available (short by {})",
                quantity - stock
            ));
        }
        total = quantity
            .checked_mul(*price_cents)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| Error::invalid("order total overflows 64-bit cents"))?;
    }
    if short.is_empty() {
        Ok(total)
    } else {
        Err(Error::FailedPrecondition(format!(
            "out of stock: {}",
            short.join("; ")
        )))
    }
}

/// The gRPC face of an [`InventoryStore`].
#[derive(Debug, Clone)]
pub struct InventoryGrpc {
    store: Arc<dyn InventoryStore>,
}

impl InventoryGrpc {
    /// Serves `store`.
    pub fn new(store: Arc<dyn InventoryStore>) -> Self {
        Self { store }
    }
}

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

fn product_pb(p: Product) -> pb::Product {
    pb::Product {
        product_id: p.product_id,
        name: p.name,
        price_cents: p.price_cents,
        stock: p.stock,
        reserved: p.reserved,
    }
}

fn reservation_state_pb(state: &str) -> pb::ReservationState {
    match state {
        "ACTIVE" => pb::ReservationState::Active,
        "RELEASED" => pb::ReservationState::Released,
        _ => pb::ReservationState::Tombstone,
    }
}

fn listed_reservation_pb(listed: ListedReservation) -> pb::ReservationRecord {
    let (product_ids, quantities) = listed.record.items;
    pb::ReservationRecord {
        saga_id: listed.saga_id,
        reservation_id: listed.record.reservation_id.unwrap_or_default(),
        state: reservation_state_pb(&listed.record.state).into(),
        items: product_ids
            .into_iter()
            .zip(quantities)
            .map(|(product_id, quantity)| pb::Item {
                product_id,
                quantity: i32::try_from(quantity).unwrap_or(i32::MAX),
            })
            .collect(),
        total_amount_cents: listed.record.total_amount_cents,
        created_at: Some(timestamp(listed.created_at)),
        released_at: listed.released_at.map(timestamp),
    }
}

fn parse_items(items: Vec<pb::Item>) -> Result<Items, Error> {
    Items::parse(items.into_iter().map(|i| (i.product_id, i.quantity)))
}

/// Checks a Reserve request against the input contract
/// (`common::domain`): its saga and its items, or INVALID_ARGUMENT naming
/// the first field out of it. Pure: Reserve calls it before the store.
pub fn validate_reserve(request: pb::ReserveRequest) -> Result<(Id, Items), Error> {
    Ok((
        Id::parse("saga_id", request.saga_id)?,
        parse_items(request.items)?,
    ))
}

#[tonic::async_trait]
impl pb::inventory_service_server::InventoryService for InventoryGrpc {
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let (saga_id, items) = validate_reserve(request.into_inner())?;
        let reserved = self.store.reserve(&saga_id, &items).await?;
        Ok(Response::new(pb::ReserveResponse {
            reservation_id: reserved.reservation_id,
            total_amount_cents: reserved.total_amount_cents,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let outcome = match self.store.release(&saga_id).await? {
            ReleaseOutcome::Released => pb::ReleaseOutcome::Released,
            ReleaseOutcome::AlreadyReleased => pb::ReleaseOutcome::AlreadyReleased,
            ReleaseOutcome::Tombstoned => pb::ReleaseOutcome::Tombstoned,
        };
        Ok(Response::new(pb::ReleaseResponse {
            saga_id: saga_id.into_inner(),
            outcome: outcome.into(),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let product_id = Id::parse("product_id", request.into_inner().product_id)?;
        let p = self.store.product(&product_id).await?;
        Ok(Response::new(pb::GetStockResponse {
            product_id: p.product_id,
            stock: p.stock,
            reserved: p.reserved,
            price_cents: p.price_cents,
            name: p.name,
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n @ 1..=MAX_PAGE_SIZE => n,
            n => {
                return Err(Error::invalid(format!(
                    "page_size is {n}; it must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})"
                ))
                .into());
            }
        };
        // The token is the last product id of the previous page.
        let mut products = self
            .store
            .products(&request.page_token, i64::from(page_size) + 1)
            .await?;
        let next_page_token = if products.len() > page_size as usize {
            products.truncate(page_size as usize);
            products
                .last()
                .map(|p| p.product_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProductsResponse {
            products: products.into_iter().map(product_pb).collect(),
            next_page_token,
        }))
    }

    async fn upsert_product(
        &self,
        request: Request<pb::UpsertProductRequest>,
    ) -> Result<Response<pb::UpsertProductResponse>, Status> {
        let request = request.into_inner();
        let product_id = Id::parse("product_id", request.product_id)?;
        let name = bounded_text("name", request.name, MAX_NAME_BYTES)?;
        let price = Cents::parse("price_cents", request.price_cents, MAX_PRICE_OR_STOCK)?;
        let stock = Cents::parse("stock", request.stock, MAX_PRICE_OR_STOCK)?;
        let product = self
            .store
            .upsert_product(&product_id, &name, price, stock)
            .await?;
        Ok(Response::new(pb::UpsertProductResponse {
            product: Some(product_pb(product)),
        }))
    }

    async fn get_reservation(
        &self,
        request: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::GetReservationResponse>, Status> {
        let saga_id = Id::parse("saga_id", request.into_inner().saga_id)?;
        let record = self
            .store
            .reservation(&saga_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("saga {saga_id} has no reservation")))?;
        let state = match record.state.as_str() {
            "ACTIVE" => pb::ReservationState::Active,
            "RELEASED" => pb::ReservationState::Released,
            _ => pb::ReservationState::Tombstone,
        };
        let (product_ids, quantities) = record.items;
        Ok(Response::new(pb::GetReservationResponse {
            saga_id: saga_id.into_inner(),
            reservation_id: record.reservation_id.unwrap_or_default(),
            state: state.into(),
            items: product_ids
                .into_iter()
                .zip(quantities)
                .map(|(product_id, quantity)| pb::Item {
                    product_id,
                    quantity: quantity as i32,
                })
                .collect(),
            total_amount_cents: record.total_amount_cents,
        }))
    }

    async fn list_reservations(
        &self,
        request: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        let request = request.into_inner();
        let page = Page::parse(request.page_size, request.page_token)?;
        let rows = self
            .store
            .list_reservations(page.after(), page.size() + 1)
            .await?;
        let (rows, next_page_token) = page.finish(rows, |r| r.saga_id.as_str());
        Ok(Response::new(pb::ListReservationsResponse {
            reservations: rows.into_iter().map(listed_reservation_pb).collect(),
            next_page_token,
        }))
    }
}
