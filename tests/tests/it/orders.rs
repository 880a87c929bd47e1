//! The orchestrator end to end: real participants, real PostgreSQL, faults
//! injected through fault.v1.

use std::time::Duration;

use harness::{expect_code, fault, place_request, spawn_system};
use proto::saga::v1::{OrderStatus, StepKind, StepOutcome};
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
