//! The inventory participant: reservations, idempotency, tombstones,
//! concurrency and input validation.

use harness::{SpawnedParticipant, expect_code, join_all, spawn_participant};
use participants::{Participant, ServeOptions};
use proto::inventory::v1::{
    GetReservationRequest, GetStockRequest, Item, ListProductsRequest, ReleaseOutcome,
    ReleaseRequest, ReservationState, ReserveRequest, UpsertProductRequest,
};
use tonic::Code;

async fn inventory() -> SpawnedParticipant {
    spawn_participant(Participant::Inventory, ServeOptions::default())
        .await
        .expect("inventory starts")
}

async fn upsert(svc: &SpawnedParticipant, product_id: &str, price_cents: i64, stock: i64) {
    svc.inventory()
        .upsert_product(UpsertProductRequest {
            product_id: product_id.into(),
            name: format!("Product {product_id}"),
            price_cents,
            stock,
        })
        .await
        .expect("upsert product");
}

fn reserve(saga_id: &str, items: &[(&str, i32)]) -> ReserveRequest {
    ReserveRequest {
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

/// (stock, reserved) of a product.
async fn stock(svc: &SpawnedParticipant, product_id: &str) -> (i64, i64) {
    let s = svc
        .inventory()
        .get_stock(GetStockRequest {
            product_id: product_id.into(),
        })
        .await
        .expect("get stock")
        .into_inner();
    (s.stock, s.reserved)
}

async fn reservation_rows(svc: &SpawnedParticipant) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(svc.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn reserve_prices_the_items_and_moves_stock_to_reserved() {
    let svc = inventory().await;
    upsert(&svc, "apple", 120, 10).await;
    upsert(&svc, "pear", 75, 5).await;

    let reply = svc
        .inventory()
        .reserve(reserve("saga-1", &[("pear", 2), ("apple", 3)]))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(reply.total_amount_cents, 3 * 120 + 2 * 75);
    assert!(reply.reservation_id.starts_with("rsv_"));
    assert_eq!(stock(&svc, "apple").await, (7, 3));
    assert_eq!(stock(&svc, "pear").await, (3, 2));
    let record = svc
        .inventory()
        .get_reservation(GetReservationRequest {
            saga_id: "saga-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state(), ReservationState::Active);
    assert_eq!(record.reservation_id, reply.reservation_id);
    assert_eq!(record.items.len(), 2);
}

#[tokio::test]
async fn a_replayed_reserve_returns_the_first_result_and_takes_stock_once() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    let first = svc
        .inventory()
        .reserve(reserve("saga-1", &[("apple", 4)]))
        .await
        .unwrap()
        .into_inner();
    // The price changes between the calls: the replay still answers the first total.
    upsert(&svc, "apple", 999, 6).await;
    let second = svc
        .inventory()
        .reserve(reserve("saga-1", &[("apple", 4)]))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(first, second);
    assert_eq!(stock(&svc, "apple").await, (6, 4));
    assert_eq!(reservation_rows(&svc).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_of_one_saga_reserve_once() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 100).await;
    let calls = (0..16).map(|_| {
        let mut client = svc.inventory();
        async move { client.reserve(reserve("saga-1", &[("apple", 5)])).await }
    });
    let replies = join_all(calls).await;
    let ids: std::collections::HashSet<String> = replies
        .into_iter()
        .map(|r| {
            r.expect("every replay succeeds")
                .into_inner()
                .reservation_id
        })
        .collect();
    assert_eq!(ids.len(), 1, "one reservation id for one saga");
    assert_eq!(stock(&svc, "apple").await, (95, 5));
}

#[tokio::test]
async fn reusing_a_saga_id_for_other_items_is_refused() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    svc.inventory()
        .reserve(reserve("saga-1", &[("apple", 1)]))
        .await
        .unwrap();
    let message = expect_code(
        svc.inventory()
            .reserve(reserve("saga-1", &[("apple", 2)]))
            .await,
        Code::InvalidArgument,
    );
    assert!(message.contains("saga-1"), "{message}");
    assert_eq!(stock(&svc, "apple").await, (9, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_reserves_never_oversell() {
    let svc = inventory().await;
    upsert(&svc, "hot", 100, 10).await;
    let calls = (0..64).map(|i| {
        let mut client = svc.inventory();
        async move {
            client
                .reserve(reserve(&format!("saga-{i}"), &[("hot", 1)]))
                .await
        }
    });
    let replies = join_all(calls).await;

    let succeeded = replies.iter().filter(|r| r.is_ok()).count();
    let out_of_stock = replies
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition))
        .count();
    assert_eq!(succeeded, 10);
    assert_eq!(out_of_stock, 54, "every other call is a business rejection");
    assert_eq!(stock(&svc, "hot").await, (0, 10));
    assert_eq!(
        reservation_rows(&svc).await,
        10,
        "rejected calls write nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_multi_item_reserves_in_opposite_orders_do_not_deadlock() {
    let svc = inventory().await;
    upsert(&svc, "a", 1, 1000).await;
    upsert(&svc, "b", 1, 1000).await;
    let calls = (0..40).map(|i| {
        let mut client = svc.inventory();
        let items: &[(&str, i32)] = if i % 2 == 0 {
            &[("a", 1), ("b", 1)]
        } else {
            &[("b", 1), ("a", 1)]
        };
        let request = reserve(&format!("saga-{i}"), items);
        async move { client.reserve(request).await }
    });
    for reply in join_all(calls).await {
        reply.expect("no call fails");
    }
    assert_eq!(stock(&svc, "a").await, (960, 40));
    assert_eq!(stock(&svc, "b").await, (960, 40));
}

#[tokio::test]
async fn out_of_stock_says_which_product_and_by_how_much_and_reserves_nothing() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    upsert(&svc, "pear", 100, 2).await;
    let message = expect_code(
        svc.inventory()
            .reserve(reserve("saga-1", &[("apple", 5), ("pear", 7)]))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("pear"), "{message}");
    assert!(message.contains("short by 5"), "{message}");
    assert!(
        !message.contains("apple"),
        "only the short product: {message}"
    );
    assert_eq!(stock(&svc, "apple").await, (10, 0), "all or nothing");
    assert_eq!(reservation_rows(&svc).await, 0);
}

#[tokio::test]
async fn unknown_product_is_not_found_and_reserves_nothing() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    let message = expect_code(
        svc.inventory()
            .reserve(reserve("saga-1", &[("apple", 1), ("ghost", 1)]))
            .await,
        Code::NotFound,
    );
    assert!(message.contains("ghost"), "{message}");
    assert_eq!(stock(&svc, "apple").await, (10, 0));
    assert_eq!(reservation_rows(&svc).await, 0);
    expect_code(
        svc.inventory()
            .get_stock(GetStockRequest {
                product_id: "ghost".into(),
            })
            .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn release_restores_stock_once() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    svc.inventory()
        .reserve(reserve("saga-1", &[("apple", 4)]))
        .await
        .unwrap();
    let release = || {
        let mut client = svc.inventory();
        async move {
            client
                .release(ReleaseRequest {
                    saga_id: "saga-1".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .outcome()
        }
    };
    assert_eq!(release().await, ReleaseOutcome::Released);
    assert_eq!(stock(&svc, "apple").await, (10, 0));
    assert_eq!(release().await, ReleaseOutcome::AlreadyReleased);
    assert_eq!(stock(&svc, "apple").await, (10, 0));

    // The saga is compensated: Reserve cannot bring it back.
    let message = expect_code(
        svc.inventory()
            .reserve(reserve("saga-1", &[("apple", 4)]))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("compensated"), "{message}");
    assert_eq!(stock(&svc, "apple").await, (10, 0));
}

#[tokio::test]
async fn release_before_reserve_leaves_a_tombstone_that_refuses_the_late_reserve() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    let outcome = svc
        .inventory()
        .release(ReleaseRequest {
            saga_id: "saga-late".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .outcome();
    assert_eq!(outcome, ReleaseOutcome::Tombstoned);

    let message = expect_code(
        svc.inventory()
            .reserve(reserve("saga-late", &[("apple", 3)]))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("tombstone"), "{message}");
    assert_eq!(
        stock(&svc, "apple").await,
        (10, 0),
        "the late Reserve wrote nothing"
    );
    let record = svc
        .inventory()
        .get_reservation(GetReservationRequest {
            saga_id: "saga-late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state(), ReservationState::Tombstone);
    assert!(record.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_racing_reserve_never_leaks_stock() {
    let svc = inventory().await;
    upsert(&svc, "apple", 1, 1000).await;
    // Each saga's Reserve and Release race; whichever wins, no unit may stay
    // reserved once both have answered.
    let races = (0..30).map(|i| {
        let mut reserver = svc.inventory();
        let mut releaser = svc.inventory();
        let saga_id = format!("saga-{i}");
        async move {
            let reserve_call = reserver.reserve(reserve(&saga_id, &[("apple", 2)]));
            // Stagger the Releases so that some arrive before, some during
            // and some after their Reserve.
            let delay = std::time::Duration::from_millis(2 * i);
            let release_request = ReleaseRequest {
                saga_id: saga_id.clone(),
            };
            let release_call = async move {
                tokio::time::sleep(delay).await;
                releaser.release(release_request).await
            };
            let (reserved, released) = tokio::join!(reserve_call, release_call);
            let outcome = released
                .expect("release always succeeds")
                .into_inner()
                .outcome();
            // A Reserve that succeeded was released; one that a tombstone
            // beat was refused.
            match (&reserved, outcome) {
                (Ok(_), ReleaseOutcome::Released) => {}
                (Err(status), ReleaseOutcome::Tombstoned) => {
                    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                }
                other => panic!("inconsistent race outcome: {other:?}"),
            }
        }
    });
    join_all(races).await;
    assert_eq!(stock(&svc, "apple").await, (1000, 0));
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let svc = inventory().await;
    upsert(&svc, "apple", 100, 10).await;
    let long_id = "x".repeat(129);
    let too_many: Vec<(String, i32)> = (0..101).map(|i| (format!("p{i}"), 1)).collect();
    let too_many: Vec<(&str, i32)> = too_many.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    let cases: Vec<(&str, ReserveRequest)> = vec![
        ("no items", reserve("s", &[])),
        ("quantity 0", reserve("s", &[("apple", 0)])),
        ("negative quantity", reserve("s", &[("apple", -3)])),
        ("quantity above 10000", reserve("s", &[("apple", 10_001)])),
        ("101 items", reserve("s", &too_many)),
        (
            "duplicate product",
            reserve("s", &[("apple", 1), ("apple", 1)]),
        ),
        ("missing saga_id", reserve("", &[("apple", 1)])),
        ("saga_id over 128 bytes", reserve(&long_id, &[("apple", 1)])),
        ("product_id over 128 bytes", reserve("s", &[(&long_id, 1)])),
        ("missing product_id", reserve("s", &[("", 1)])),
    ];
    for (case, request) in cases {
        let message = expect_code(
            svc.inventory().reserve(request).await,
            Code::InvalidArgument,
        );
        assert!(!message.is_empty(), "{case}: a message says what is wrong");
    }
    let bad_products = [
        ("negative price", "p", -1, 1),
        ("negative stock", "p", 1, -1),
        ("missing id", "", 1, 1),
        ("id over 128 bytes", long_id.as_str(), 1, 1),
    ];
    for (case, product_id, price_cents, stock) in bad_products {
        let result = svc
            .inventory()
            .upsert_product(UpsertProductRequest {
                product_id: product_id.into(),
                name: case.into(),
                price_cents,
                stock,
            })
            .await;
        expect_code(result, Code::InvalidArgument);
    }
    expect_code(
        svc.inventory()
            .release(ReleaseRequest {
                saga_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(reservation_rows(&svc).await, 0);
    assert_eq!(stock(&svc, "apple").await, (10, 0));
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    assert_eq!(products, 1);
}

#[tokio::test]
async fn list_products_pages_through_everything_in_order() {
    let svc = inventory().await;
    for i in 0..7 {
        upsert(&svc, &format!("p{i}"), 10, 1).await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = svc
            .inventory()
            .list_products(ListProductsRequest {
                page_size: 3,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.products.len() <= 3);
        seen.extend(page.products.into_iter().map(|p| p.product_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..7).map(|i| format!("p{i}")).collect();
    assert_eq!(seen, expected);
    expect_code(
        svc.inventory()
            .list_products(ListProductsRequest {
                page_size: 5000,
                page_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
}
