//! The fulfillment participant: shipments, idempotency, tombstones,
//! concurrency and input validation.

use std::time::Duration;

use harness::{SpawnedParticipant, expect_code, join_all, spawn_participant};
use participants::{Participant, ServeOptions};
use proto::fulfillment::v1::{
    CancelOutcome, CancelShipmentRequest, GetShipmentRequest, GetShipmentResponse, Item,
    ShipRequest, ShipmentState,
};
use tonic::Code;

async fn fulfillment() -> SpawnedParticipant {
    spawn_participant(Participant::Fulfillment, ServeOptions::default())
        .await
        .expect("fulfillment starts")
}

fn ship(saga_id: &str, items: &[(&str, i32)]) -> ShipRequest {
    ShipRequest {
        saga_id: saga_id.into(),
        items: items
            .iter()
            .map(|(product_id, quantity)| Item {
                product_id: (*product_id).into(),
                quantity: *quantity,
            })
            .collect(),
    }
}

fn cancel(saga_id: &str) -> CancelShipmentRequest {
    CancelShipmentRequest {
        saga_id: saga_id.into(),
    }
}

async fn shipment(svc: &SpawnedParticipant, saga_id: &str) -> GetShipmentResponse {
    svc.fulfillment()
        .get_shipment(GetShipmentRequest {
            saga_id: saga_id.into(),
        })
        .await
        .expect("get shipment")
        .into_inner()
}

/// A shipment's items as (product_id, quantity), sorted by product.
fn items_of(record: &GetShipmentResponse) -> Vec<(String, i32)> {
    let mut items: Vec<(String, i32)> = record
        .items
        .iter()
        .map(|i| (i.product_id.clone(), i.quantity))
        .collect();
    items.sort();
    items
}

fn owned(items: &[(&str, i32)]) -> Vec<(String, i32)> {
    items.iter().map(|(p, q)| ((*p).to_owned(), *q)).collect()
}

/// (shipments, shipment_items) row counts.
async fn rows(svc: &SpawnedParticipant) -> (i64, i64) {
    let shipments: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM shipment_items")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    (shipments, items)
}

#[tokio::test]
async fn ship_creates_a_shipment_of_the_items() {
    let svc = fulfillment().await;
    let reply = svc
        .fulfillment()
        .ship(ship("saga-1", &[("pear", 2), ("apple", 3)]))
        .await
        .unwrap()
        .into_inner();

    assert!(
        reply.shipment_id.starts_with("shp_"),
        "{}",
        reply.shipment_id
    );
    let record = shipment(&svc, "saga-1").await;
    assert_eq!(record.state(), ShipmentState::Shipped);
    assert_eq!(record.saga_id, "saga-1");
    assert_eq!(record.shipment_id, reply.shipment_id);
    assert_eq!(items_of(&record), owned(&[("apple", 3), ("pear", 2)]));
    assert_eq!(rows(&svc).await, (1, 2));
}

#[tokio::test]
async fn a_replayed_ship_returns_the_first_shipment_and_writes_once() {
    let svc = fulfillment().await;
    let first = svc
        .fulfillment()
        .ship(ship("saga-1", &[("apple", 3), ("pear", 2)]))
        .await
        .unwrap()
        .into_inner();
    // The same items in another order are the same shipment.
    let second = svc
        .fulfillment()
        .ship(ship("saga-1", &[("pear", 2), ("apple", 3)]))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(first, second);
    assert_eq!(rows(&svc).await, (1, 2));
}

#[tokio::test]
async fn reusing_a_saga_id_for_other_items_is_refused() {
    let svc = fulfillment().await;
    let first = svc
        .fulfillment()
        .ship(ship("saga-1", &[("apple", 1)]))
        .await
        .unwrap()
        .into_inner();
    let cases: [(&str, &[(&str, i32)]); 3] = [
        ("other quantity", &[("apple", 2)]),
        ("other product", &[("pear", 1)]),
        ("an extra product", &[("apple", 1), ("pear", 1)]),
    ];
    for (case, items) in cases {
        let message = expect_code(
            svc.fulfillment().ship(ship("saga-1", items)).await,
            Code::InvalidArgument,
        );
        assert!(message.contains("saga-1"), "{case}: {message}");
    }
    let record = shipment(&svc, "saga-1").await;
    assert_eq!(record.state(), ShipmentState::Shipped);
    assert_eq!(record.shipment_id, first.shipment_id);
    assert_eq!(items_of(&record), owned(&[("apple", 1)]));
    assert_eq!(rows(&svc).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_of_one_saga_ship_once() {
    let svc = fulfillment().await;
    let calls = (0..16).map(|_| {
        let mut client = svc.fulfillment();
        async move {
            client
                .ship(ship("saga-1", &[("apple", 5), ("pear", 1)]))
                .await
        }
    });
    let replies = join_all(calls).await;
    let ids: std::collections::HashSet<String> = replies
        .into_iter()
        .map(|r| r.expect("every replay succeeds").into_inner().shipment_id)
        .collect();
    assert_eq!(ids.len(), 1, "one shipment id for one saga");
    assert_eq!(rows(&svc).await, (1, 2));
}

#[tokio::test]
async fn cancel_shipment_cancels_once() {
    let svc = fulfillment().await;
    let shipped = svc
        .fulfillment()
        .ship(ship("saga-1", &[("apple", 4)]))
        .await
        .unwrap()
        .into_inner();
    let cancel_once = || {
        let mut client = svc.fulfillment();
        async move {
            client
                .cancel_shipment(cancel("saga-1"))
                .await
                .unwrap()
                .into_inner()
                .outcome()
        }
    };
    assert_eq!(cancel_once().await, CancelOutcome::Cancelled);
    assert_eq!(cancel_once().await, CancelOutcome::AlreadyCancelled);
    let record = shipment(&svc, "saga-1").await;
    assert_eq!(record.state(), ShipmentState::Cancelled);
    assert_eq!(record.shipment_id, shipped.shipment_id);

    // The saga is compensated: Ship cannot bring it back.
    let message = expect_code(
        svc.fulfillment()
            .ship(ship("saga-1", &[("apple", 4)]))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("compensated"), "{message}");
    assert_eq!(
        shipment(&svc, "saga-1").await.state(),
        ShipmentState::Cancelled
    );
    assert_eq!(rows(&svc).await, (1, 1));
}

#[tokio::test]
async fn cancel_before_ship_leaves_a_tombstone_that_refuses_the_late_ship() {
    let svc = fulfillment().await;
    let outcome = svc
        .fulfillment()
        .cancel_shipment(cancel("saga-late"))
        .await
        .unwrap()
        .into_inner()
        .outcome();
    assert_eq!(outcome, CancelOutcome::Tombstoned);

    let message = expect_code(
        svc.fulfillment()
            .ship(ship("saga-late", &[("apple", 3)]))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("tombstone"), "{message}");
    assert_eq!(rows(&svc).await, (1, 0), "the late Ship wrote no items");
    let record = shipment(&svc, "saga-late").await;
    assert_eq!(record.state(), ShipmentState::Tombstone);
    assert!(record.shipment_id.is_empty());
    assert!(record.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_ship_never_leaves_a_shipment() {
    let svc = fulfillment().await;
    // Each saga's Ship and CancelShipment race; whichever wins, no shipment
    // may stay SHIPPED once both have answered.
    let races = (0..30).map(|i| {
        let mut shipper = svc.fulfillment();
        let mut canceller = svc.fulfillment();
        let saga_id = format!("saga-{i}");
        async move {
            let ship_call = shipper.ship(ship(&saga_id, &[("apple", 2)]));
            // Stagger the cancels so that some arrive before, some during and
            // some after their Ship.
            let delay = Duration::from_millis(2 * i);
            let cancel_request = cancel(&saga_id);
            let cancel_call = async move {
                tokio::time::sleep(delay).await;
                canceller.cancel_shipment(cancel_request).await
            };
            let (shipped, cancelled) = tokio::join!(ship_call, cancel_call);
            let outcome = cancelled
                .expect("cancel always succeeds")
                .into_inner()
                .outcome();
            // A Ship that succeeded was cancelled; one that a tombstone beat
            // was refused.
            match (&shipped, outcome) {
                (Ok(_), CancelOutcome::Cancelled) => {}
                (Err(status), CancelOutcome::Tombstoned) => {
                    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                }
                other => panic!("inconsistent race outcome: {other:?}"),
            }
        }
    });
    join_all(races).await;
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments WHERE state = 'SHIPPED'")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    assert_eq!(shipped, 0, "every saga ends cancelled or tombstoned");
    assert_eq!(rows(&svc).await.0, 30);
}

#[tokio::test]
async fn unknown_saga_has_no_shipment() {
    let svc = fulfillment().await;
    let message = expect_code(
        svc.fulfillment()
            .get_shipment(GetShipmentRequest {
                saga_id: "ghost".into(),
            })
            .await,
        Code::NotFound,
    );
    assert!(message.contains("ghost"), "{message}");
    assert_eq!(rows(&svc).await, (0, 0), "a read writes nothing");
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let svc = fulfillment().await;
    let long_id = "x".repeat(129);
    let too_many: Vec<(String, i32)> = (0..101).map(|i| (format!("p{i}"), 1)).collect();
    let too_many: Vec<(&str, i32)> = too_many.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    let cases: Vec<(&str, ShipRequest)> = vec![
        ("no items", ship("s", &[])),
        ("quantity 0", ship("s", &[("apple", 0)])),
        ("negative quantity", ship("s", &[("apple", -3)])),
        ("quantity above 10000", ship("s", &[("apple", 10_001)])),
        ("101 items", ship("s", &too_many)),
        (
            "duplicate product",
            ship("s", &[("apple", 1), ("apple", 1)]),
        ),
        ("missing saga_id", ship("", &[("apple", 1)])),
        ("saga_id over 128 bytes", ship(&long_id, &[("apple", 1)])),
        ("product_id over 128 bytes", ship("s", &[(&long_id, 1)])),
        ("missing product_id", ship("s", &[("", 1)])),
    ];
    for (case, request) in cases {
        let message = expect_code(svc.fulfillment().ship(request).await, Code::InvalidArgument);
        assert!(!message.is_empty(), "{case}: a message says what is wrong");
    }
    for saga_id in ["", long_id.as_str()] {
        expect_code(
            svc.fulfillment().cancel_shipment(cancel(saga_id)).await,
            Code::InvalidArgument,
        );
    }
    assert_eq!(rows(&svc).await, (0, 0));
}
