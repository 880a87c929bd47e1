//! The input contract of the requests that start work, restated as plain
//! predicates over the raw protobuf messages, apart from the parsers in
//! `common::domain` that enforce it: the fuzz targets ([`crate::fuzz`]) and
//! the property tests check that each server accepts a request exactly
//! when its predicate holds.
//!
//! As the proto files and `common::domain` state it:
//! - an id (customer, saga, product) is 1..=128 bytes, with no control or
//!   invisible format character and no white space at either end;
//! - an order or a reservation or a shipment has 1..=100 items, each
//!   product at most once, each quantity 1..=10,000;
//! - an idempotency key is empty (none) or at most 128 bytes of text that
//!   may hold tabs and line breaks but no other control or invisible
//!   format character;
//! - a charge is 0..=10^15 cents;
//! - a `traceparent` is the W3C form `00-<32 hex>-<16 hex>-<2 hex>`, lower
//!   case, neither id all zeros (a later version may add fields after the
//!   fourth; version `ff` is invalid).

use common::domain::is_invisible_format;
use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;

/// Whether `value` is a valid id.
pub fn id(value: &str) -> bool {
    let bytes = value.len();
    let clean = value
        .chars()
        .all(|c| !c.is_control() && !is_invisible_format(c));
    let padded = value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace);
    (1..=128).contains(&bytes) && clean && !padded
}

/// Whether `items` (product, quantity) are a valid list of items.
pub fn items<'a>(items: impl IntoIterator<Item = (&'a str, i32)>) -> bool {
    let items: Vec<(&str, i32)> = items.into_iter().collect();
    let mut products: Vec<&str> = items.iter().map(|(product, _)| *product).collect();
    products.sort_unstable();
    products.dedup();
    (1..=100).contains(&items.len())
        && products.len() == items.len()
        && items
            .iter()
            .all(|&(product, quantity)| id(product) && (1..=10_000).contains(&quantity))
}

/// Whether `key` is a valid idempotency key (empty: none).
pub fn idempotency_key(key: &str) -> bool {
    key.len() <= 128
        && key
            .chars()
            .all(|c| c == '\n' || c == '\t' || (!c.is_control() && !is_invisible_format(c)))
}

/// Whether the orchestrator must accept this PlaceOrder.
pub fn place_order(request: &saga::PlaceOrderRequest) -> bool {
    id(&request.customer_id)
        && items(
            request
                .items
                .iter()
                .map(|i| (i.product_id.as_str(), i.quantity)),
        )
        && idempotency_key(&request.idempotency_key)
}

/// Whether inventory must accept this Reserve.
pub fn reserve(request: &inventory::ReserveRequest) -> bool {
    let items = request.items.iter();
    id(&request.saga_id) && self::items(items.map(|i| (i.product_id.as_str(), i.quantity)))
}

/// Whether payment must accept this Charge.
pub fn charge(request: &payment::ChargeRequest) -> bool {
    id(&request.saga_id)
        && id(&request.customer_id)
        && (0..=1_000_000_000_000_000).contains(&request.amount_cents)
}

/// Whether fulfillment must accept this Ship.
pub fn ship(request: &fulfillment::ShipRequest) -> bool {
    let items = request.items.iter();
    id(&request.saga_id) && self::items(items.map(|i| (i.product_id.as_str(), i.quantity)))
}

/// The trace id of a valid `traceparent` (surrounding white space
/// allowed), else None.
pub fn traceparent(value: &str) -> Option<&str> {
    let fields: Vec<&str> = value.trim().split('-').collect();
    let lower_hex = |field: &str, digits: usize| {
        field.len() == digits
            && field
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    };
    let not_zero = |field: &str| field.chars().any(|c| c != '0');
    let version = *fields.first()?;
    let known_length = if version == "00" {
        fields.len() == 4
    } else {
        fields.len() >= 4
    };
    (known_length
        && lower_hex(version, 2)
        && version != "ff"
        && lower_hex(fields[1], 32)
        && not_zero(fields[1])
        && lower_hex(fields[2], 16)
        && not_zero(fields[2])
        && lower_hex(fields[3], 2))
    .then(|| fields[1])
}
