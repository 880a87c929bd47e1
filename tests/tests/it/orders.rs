//! The orchestrator end to end: real participants, real PostgreSQL, faults
//! injected through fault.v1.

use std::time::{Duration, Instant};

use harness::{
    System, compensations, delay, expect_code, fault, place_request, spawn_system,
    spawn_system_with,
};
use proto::saga::v1::{
    CancelOrderRequest, GetOrderStatusRequest, GetOrderStatusResponse, ListOrdersRequest,
    OrderStatus, StepKind, StepOutcome, WatchOrderRequest,
};
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn happy_path_completes_and_charges_the_inventory_price() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();

    let reply = system
        .orders()
        .place_order(place_request("alice", &[("widget", 3)], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.order_id.starts_with("ord_"));
    let order = system.wait_settled(&reply.order_id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.total_amount_cents, 750);
    assert_eq!(order.failure_reason, "");
    let steps: Vec<(&str, StepKind, StepOutcome)> = order
        .history
        .iter()
        .map(|e| (e.step.as_str(), e.kind(), e.outcome()))
        .collect();
    assert_eq!(
        steps,
        [
            (
                "reserve_inventory",
                StepKind::Action,
                StepOutcome::Succeeded
            ),
            ("charge_payment", StepKind::Action, StepOutcome::Succeeded),
            ("ship_order", StepKind::Action, StepOutcome::Succeeded),
        ]
    );
    assert_eq!(system.balance("alice").await.unwrap(), 10_000 - 750);
    assert_eq!(system.stock("widget").await.unwrap(), (7, 3));
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 1);
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_order_completes() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 1_000).await.unwrap();
    system
        .fault(
            "payment",
            fault("Charge", "FAIL_BEFORE", Code::Unavailable, 3),
        )
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Completed);
    let charges: Vec<StepOutcome> = order
        .history
        .iter()
        .filter(|e| e.step == "charge_payment")
        .map(|e| e.outcome())
        .collect();
    assert_eq!(
        charges,
        [
            StepOutcome::RetryableFailure,
            StepOutcome::RetryableFailure,
            StepOutcome::RetryableFailure,
            StepOutcome::Succeeded
        ]
    );
    assert_eq!(system.balance("alice").await.unwrap(), 900);
    system.audit().await.unwrap();
}

#[tokio::test]
async fn bad_orders_are_rejected_and_nothing_is_recorded() {
    let system = spawn_system().await.unwrap();
    let long = "x".repeat(129);
    let cases = [
        place_request("", &[("widget", 1)], ""),
        place_request("alice", &[], ""),
        place_request("alice", &[("widget", 0)], ""),
        place_request("alice", &[("widget", 10_001)], ""),
        place_request("alice", &[("widget", 1), ("widget", 2)], ""),
        place_request(&long, &[("widget", 1)], ""),
        place_request("alice", &[(&long, 1)], ""),
        place_request("alice", &[("widget", 1)], &long),
    ];
    for request in cases {
        expect_code(
            system.orders().place_order(request).await,
            Code::InvalidArgument,
        );
    }
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0);
}

/// Rows in the orchestrator's sagas table.
async fn saga_rows(system: &System) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sagas")
        .fetch_one(&system.pool)
        .await
        .unwrap()
}

/// The (step, kind, outcome) of every journalled entry.
fn steps(order: &GetOrderStatusResponse) -> Vec<(String, StepKind, StepOutcome)> {
    order
        .history
        .iter()
        .map(|e| (e.step.clone(), e.kind(), e.outcome()))
        .collect()
}

#[tokio::test]
async fn out_of_stock_fails_without_charging_or_moving_stock() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 2).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();

    let id = system.place("alice", &[("widget", 5)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Failed);
    let reason = &order.failure_reason;
    assert!(reason.contains("widget"), "{reason}");
    assert!(reason.contains("short by 3"), "{reason}");
    assert_eq!(order.total_amount_cents, 0);
    assert_eq!(
        steps(&order),
        [
            (
                "reserve_inventory".to_owned(),
                StepKind::Action,
                StepOutcome::Rejected
            ),
            (
                "reserve_inventory".to_owned(),
                StepKind::Compensation,
                StepOutcome::Succeeded
            ),
        ],
        "the charge is never attempted"
    );
    assert_eq!(system.balance("alice").await.unwrap(), 10_000);
    assert_eq!(system.stock("widget").await.unwrap(), (2, 0));
    assert_eq!(system.charge_state(&id).await.unwrap(), None);
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("FAILED"), 1);
}

#[tokio::test]
async fn insufficient_funds_fails_and_releases_the_stock() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 400, 10).await.unwrap();
    system.seed_account("alice", 1_000).await.unwrap();

    let id = system.place("alice", &[("widget", 3)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains("insufficient funds"),
        "{}",
        order.failure_reason
    );
    assert_eq!(order.total_amount_cents, 1_200);
    assert_eq!(
        compensations(&order),
        ["charge_payment", "reserve_inventory"]
    );
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    assert_eq!(system.balance("alice").await.unwrap(), 1_000);
    assert_ne!(
        system.charge_state(&id).await.unwrap().as_deref(),
        Some("CHARGED")
    );
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("FAILED"), 1);
}

#[tokio::test]
async fn a_rejected_shipment_refunds_and_releases_in_reverse_order() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();
    system
        .fault(
            "fulfillment",
            fault("Ship", "FAIL_BEFORE", Code::FailedPrecondition, 0),
        )
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains("ship_order"),
        "{}",
        order.failure_reason
    );
    let ships: Vec<StepOutcome> = order
        .history
        .iter()
        .filter(|e| e.step == "ship_order" && e.kind() == StepKind::Action)
        .map(|e| e.outcome())
        .collect();
    assert_eq!(ships, [StepOutcome::Rejected], "a rejection is not retried");
    let undone: Vec<(String, StepOutcome)> = order
        .history
        .iter()
        .filter(|e| e.kind() == StepKind::Compensation)
        .map(|e| (e.step.clone(), e.outcome()))
        .collect();
    assert_eq!(
        undone,
        [
            ("ship_order".to_owned(), StepOutcome::Succeeded),
            ("charge_payment".to_owned(), StepOutcome::Succeeded),
            ("reserve_inventory".to_owned(), StepOutcome::Succeeded),
        ]
    );
    assert_eq!(system.balance("alice").await.unwrap(), 10_000);
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    assert_eq!(
        system.charge_state(&id).await.unwrap().as_deref(),
        Some("REFUNDED")
    );
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_lost_charge_reply_is_retried_and_charges_once() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 300, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system
        .fault(
            "payment",
            fault("Charge", "FAIL_AFTER_COMMIT", Code::Unavailable, 1),
        )
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Completed);
    let charges: Vec<StepOutcome> = order
        .history
        .iter()
        .filter(|e| e.step == "charge_payment")
        .map(|e| e.outcome())
        .collect();
    assert_eq!(
        charges,
        [StepOutcome::RetryableFailure, StepOutcome::Succeeded]
    );
    assert_eq!(system.balance("alice").await.unwrap(), 5_000 - 600);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(system.participants.payment.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "exactly one charge");
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 1);
}

#[tokio::test]
async fn reservations_whose_replies_are_always_lost_are_still_released() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system
        .fault(
            "inventory",
            fault("Reserve", "FAIL_AFTER_COMMIT", Code::Unavailable, 0),
        )
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 4)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::Failed);
    let reserves = order
        .history
        .iter()
        .filter(|e| e.step == "reserve_inventory" && e.kind() == StepKind::Action)
        .inspect(|e| assert_eq!(e.outcome(), StepOutcome::RetryableFailure))
        .count();
    assert_eq!(reserves, 5, "the whole attempt budget");
    assert!(
        order.failure_reason.contains("reserve_inventory"),
        "{}",
        order.failure_reason
    );
    assert_eq!(compensations(&order), ["reserve_inventory"]);
    assert_eq!(
        system.stock("widget").await.unwrap(),
        (10, 0),
        "the reservation that committed was released"
    );
    assert_eq!(system.balance("alice").await.unwrap(), 5_000);
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_compensation_out_of_budget_needs_attention_and_stays_so() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system.fail_compensations().await.unwrap();

    let id = system.place("alice", &[("widget", 3)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();

    assert_eq!(order.status(), OrderStatus::NeedsAttention);
    let reason = &order.failure_reason;
    assert!(reason.contains("compensation"), "{reason}");
    assert!(reason.contains("reserve_inventory"), "{reason}");
    let releases = order
        .history
        .iter()
        .filter(|e| e.step == "reserve_inventory" && e.kind() == StepKind::Compensation)
        .count();
    assert_eq!(releases, 5, "the whole compensation budget");
    let journalled = system.journal_rows(&id).await.unwrap();

    // With the fault gone, nothing resumes it without an operator: another
    // order goes through meanwhile, and this one has not moved.
    system.clear_faults().await.unwrap();
    let other = system.place("alice", &[("widget", 1)]).await.unwrap();
    let other = system.wait_settled(&other, SETTLE).await.unwrap();
    assert_eq!(other.status(), OrderStatus::Completed);
    system.wait_all_settled(SETTLE).await.unwrap();

    let order = system.status(&id).await.unwrap();
    assert_eq!(order.status(), OrderStatus::NeedsAttention);
    assert_eq!(system.journal_rows(&id).await.unwrap(), journalled);
    assert_eq!(
        system.stock("widget").await.unwrap(),
        (6, 4),
        "the stuck reservation is still held, next to the completed one"
    );
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.needs_attention, [id]);
    assert_eq!(audit.count("COMPLETED"), 1);
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_order() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();

    let place = |key: &'static str| {
        let mut orders = system.orders();
        async move {
            orders
                .place_order(place_request("alice", &[("widget", 1)], key))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = place("key-1").await;
    let again = place("key-1").await;
    assert_eq!(again.order_id, first.order_id);
    assert_eq!(saga_rows(&system).await, 1);

    let other = place("key-2").await;
    assert_ne!(other.order_id, first.order_id);
    assert_eq!(saga_rows(&system).await, 2);

    for id in [&first.order_id, &other.order_id] {
        let order = system.wait_settled(id, SETTLE).await.unwrap();
        assert_eq!(order.status(), OrderStatus::Completed);
    }
    // Replaying the key after the order settled still starts nothing.
    let late = place("key-1").await;
    assert_eq!(late.order_id, first.order_id);
    assert_eq!(late.status(), OrderStatus::Completed);
    assert_eq!(saga_rows(&system).await, 2);
    assert_eq!(system.balance("alice").await.unwrap(), 5_000 - 200);
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 2);
}

#[tokio::test]
async fn beyond_max_in_flight_place_order_is_resource_exhausted() {
    let system = spawn_system_with(|s| s.executor.max_in_flight = 2)
        .await
        .unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system
        .fault("inventory", delay("Reserve", 1500))
        .await
        .unwrap();

    let first = system.place("alice", &[("widget", 1)]).await.unwrap();
    let second = system.place("alice", &[("widget", 1)]).await.unwrap();
    let message = expect_code(
        system
            .orders()
            .place_order(place_request("alice", &[("widget", 1)], ""))
            .await,
        Code::ResourceExhausted,
    );
    assert!(message.contains("in flight"), "{message}");
    assert_eq!(
        saga_rows(&system).await,
        2,
        "the refused order is not recorded"
    );

    system.clear_faults().await.unwrap();
    for id in [&first, &second] {
        let order = system.wait_settled(id, SETTLE).await.unwrap();
        assert_eq!(order.status(), OrderStatus::Completed);
    }
    // A driver hands its slot back just after its last write: poll.
    let deadline = Instant::now() + SETTLE;
    let third = loop {
        match system
            .orders()
            .place_order(place_request("alice", &[("widget", 1)], ""))
            .await
        {
            Ok(reply) => break reply.into_inner().order_id,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "slots never freed: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let order = system.wait_settled(&third, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 3);
}

#[tokio::test]
async fn list_orders_filters_and_pages_newest_first() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 100).await.unwrap();
    system.seed_product("gadget", 1_000, 10).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    system.seed_account("bob", 100_000).await.unwrap();

    // One at a time, each settled before the next, so creation order is
    // unambiguous.
    let mut ids = Vec::new();
    for (customer, items) in [
        ("alice", vec![("widget", 1)]),
        ("bob", vec![("gadget", 1)]),
        ("alice", vec![("gadget", 1_000)]), // out of stock
        ("bob", vec![("widget", 2)]),
        ("alice", vec![("widget", 2), ("gadget", 1)]),
    ] {
        let id = system.place(customer, &items).await.unwrap();
        system.wait_settled(&id, SETTLE).await.unwrap();
        ids.push(id);
    }
    let [o1, o2, o3, o4, o5] = [0, 1, 2, 3, 4].map(|i| ids[i].as_str());

    let list = |request: ListOrdersRequest| {
        let mut orders = system.orders();
        async move { orders.list_orders(request).await.unwrap().into_inner() }
    };
    let ids_of = |reply: &proto::saga::v1::ListOrdersResponse| -> Vec<String> {
        reply.orders.iter().map(|o| o.order_id.clone()).collect()
    };

    let all = list(ListOrdersRequest::default()).await;
    assert_eq!(ids_of(&all), [o5, o4, o3, o2, o1]);
    assert_eq!(all.next_page_token, "");
    let failed = &all.orders[2];
    assert_eq!(failed.status(), OrderStatus::Failed);
    assert_eq!(failed.customer_id, "alice");
    assert!(failed.failure_reason.contains("gadget"));
    assert_eq!(all.orders[0].total_amount_cents, 1_200);
    assert_eq!(all.orders[0].failure_reason, "");

    let by_status = |status: OrderStatus| ListOrdersRequest {
        status: status.into(),
        ..Default::default()
    };
    assert_eq!(ids_of(&list(by_status(OrderStatus::Failed)).await), [o3]);
    assert_eq!(
        ids_of(&list(by_status(OrderStatus::Completed)).await),
        [o5, o4, o2, o1]
    );
    assert!(
        list(by_status(OrderStatus::Cancelled))
            .await
            .orders
            .is_empty()
    );

    let by_customer = |customer: &str| ListOrdersRequest {
        customer_id: customer.into(),
        ..Default::default()
    };
    assert_eq!(ids_of(&list(by_customer("alice")).await), [o5, o3, o1]);
    assert_eq!(ids_of(&list(by_customer("bob")).await), [o4, o2]);
    assert!(list(by_customer("carol")).await.orders.is_empty());

    let by_product = |product: &str| ListOrdersRequest {
        product_id: product.into(),
        ..Default::default()
    };
    assert_eq!(ids_of(&list(by_product("gadget")).await), [o5, o3, o2]);
    assert_eq!(ids_of(&list(by_product("widget")).await), [o5, o4, o1]);

    let combined = ListOrdersRequest {
        customer_id: "alice".into(),
        product_id: "widget".into(),
        status: OrderStatus::Completed.into(),
        ..Default::default()
    };
    assert_eq!(ids_of(&list(combined).await), [o5, o1]);

    // Pages of two: every order exactly once, newest first.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(ListOrdersRequest {
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        })
        .await;
        assert!(page.orders.len() <= 2);
        pages += 1;
        paged.extend(ids_of(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, [o5, o4, o3, o2, o1]);

    // A page exactly as long as what is left has no next page.
    let exact = list(ListOrdersRequest {
        page_size: 5,
        ..Default::default()
    })
    .await;
    assert_eq!(exact.orders.len(), 5);
    assert_eq!(exact.next_page_token, "");

    for page_size in [5_000, -1] {
        expect_code(
            system
                .orders()
                .list_orders(ListOrdersRequest {
                    page_size,
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
    }
}

/// Collects a WatchOrder stream to its end (20 s at most).
async fn watch(system: &System, order_id: &str) -> Vec<OrderStatus> {
    let mut stream = system
        .orders()
        .watch_order(WatchOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(SETTLE, async {
        let mut seen = Vec::new();
        while let Some(update) = stream.message().await.unwrap() {
            assert_eq!(update.order_id, order_id);
            seen.push(update.status());
        }
        seen
    })
    .await
    .expect("the watch stream did not end")
}

#[tokio::test]
async fn watch_order_streams_the_lifecycle_until_completed() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 800))
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let seen = watch(&system, &id).await;

    assert_eq!(seen.last(), Some(&OrderStatus::Completed), "{seen:?}");
    assert!(
        seen.contains(&OrderStatus::Shipping),
        "the 800 ms shipment is seen: {seen:?}"
    );
    let lifecycle = [
        OrderStatus::Pending,
        OrderStatus::ReservingInventory,
        OrderStatus::ChargingPayment,
        OrderStatus::Shipping,
        OrderStatus::Completed,
    ];
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| {
            lifecycle
                .iter()
                .position(|l| l == s)
                .unwrap_or_else(|| panic!("{s:?} is not a happy-path status: {seen:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "statuses out of order or repeated: {seen:?}"
    );

    // A settled order: its status once, then the end.
    assert_eq!(watch(&system, &id).await, [OrderStatus::Completed]);

    expect_code(
        system
            .orders()
            .watch_order(WatchOrderRequest {
                order_id: "ord_unknown".into(),
            })
            .await,
        Code::NotFound,
    );
    system.audit().await.unwrap();
}

#[tokio::test]
async fn unknown_or_empty_order_ids_are_refused() {
    let system = spawn_system().await.unwrap();
    let mut orders = system.orders();
    for (order_id, code) in [("ord_unknown", Code::NotFound), ("", Code::InvalidArgument)] {
        expect_code(
            orders
                .get_order_status(GetOrderStatusRequest {
                    order_id: order_id.into(),
                })
                .await,
            code,
        );
        expect_code(
            orders
                .cancel_order(CancelOrderRequest {
                    order_id: order_id.into(),
                    reason: String::new(),
                })
                .await,
            code,
        );
    }
    expect_code(
        orders
            .watch_order(WatchOrderRequest {
                order_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(saga_rows(&system).await, 0);
}

/// Keys are the customer's: bob's order with alice's key is bob's own new
/// order, and never shows him hers.
#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_customer() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system.seed_account("bob", 5_000).await.unwrap();
    let mut orders = system.orders();
    let alice = orders
        .place_order(place_request("alice", &[("widget", 1)], "shared-key"))
        .await
        .unwrap()
        .into_inner();
    let bob = orders
        .place_order(place_request("bob", &[("widget", 2)], "shared-key"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(bob.order_id, alice.order_id, "bob got alice's order");
    let bobs = system.wait_settled(&bob.order_id, SETTLE).await.unwrap();
    assert_eq!(bobs.customer_id, "bob");
    assert_eq!(bobs.status(), OrderStatus::Completed);
    assert_eq!(system.balance("bob").await.unwrap(), 5_000 - 200);
    assert_eq!(saga_rows(&system).await, 2);
}

/// The same key with a different request is refused, naming the key, and
/// writes nothing; the same request in another item order is a replay.
#[tokio::test]
async fn the_same_key_with_a_different_request_is_invalid() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_product("gadget", 300, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    let mut orders = system.orders();
    let first = orders
        .place_order(place_request(
            "alice",
            &[("widget", 1), ("gadget", 1)],
            "k-1",
        ))
        .await
        .unwrap()
        .into_inner();
    let message = expect_code(
        orders
            .place_order(place_request(
                "alice",
                &[("widget", 5), ("gadget", 1)],
                "k-1",
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(message.contains("\"k-1\""), "{message}");
    assert!(message.contains(&first.order_id), "{message}");
    let reordered = orders
        .place_order(place_request(
            "alice",
            &[("gadget", 1), ("widget", 1)],
            "k-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reordered.order_id, first.order_id);
    assert_eq!(
        saga_rows(&system).await,
        1,
        "nothing written for the refusal"
    );
    let order = system.wait_settled(&first.order_id, SETTLE).await.unwrap();
    assert_eq!(order.items.iter().map(|i| i.quantity).sum::<i32>(), 2);
}

/// At the in-flight limit a replay is still answered with its order; a new
/// order is refused.
#[tokio::test]
async fn a_replay_is_answered_at_the_in_flight_limit() {
    let system = spawn_system_with(|s| s.executor.max_in_flight = 1)
        .await
        .unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    system
        .fault("inventory", delay("Reserve", 1500))
        .await
        .unwrap();
    let mut orders = system.orders();
    let first = orders
        .place_order(place_request("alice", &[("widget", 1)], "k-full"))
        .await
        .unwrap()
        .into_inner();
    let again = orders
        .place_order(place_request("alice", &[("widget", 1)], "k-full"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.order_id, first.order_id);
    expect_code(
        orders
            .place_order(place_request("alice", &[("widget", 1)], "k-new"))
            .await,
        Code::ResourceExhausted,
    );
    system.clear_faults().await.unwrap();
    let order = system.wait_settled(&first.order_id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
}
