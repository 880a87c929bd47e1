//! CancelOrder in every status (DESIGN.md "Cancellation"): before COMPLETED
//! the request is recorded, the call in flight finishes, and every attempted
//! step is undone; a shipment in flight wins; settled orders are left as
//! they are.

use std::time::Duration;

use harness::{System, compensations, delay, expect_code, fault, spawn_system, spawn_system_with};
use proto::saga::v1::{
    CancelOrderRequest, CancelOrderResponse, GetOrderStatusResponse, OrderStatus, StepKind,
    StepOutcome,
};
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(20);

async fn cancel(
    system: &System,
    order_id: &str,
    reason: &str,
) -> Result<CancelOrderResponse, tonic::Status> {
    system
        .orders()
        .cancel_order(CancelOrderRequest {
            order_id: order_id.into(),
            reason: reason.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The CONTROL entries of an order: (step, outcome, detail).
fn controls(order: &GetOrderStatusResponse) -> Vec<(String, StepOutcome, String)> {
    order
        .history
        .iter()
        .filter(|e| e.kind() == StepKind::Control)
        .map(|e| (e.step.clone(), e.outcome(), e.detail.clone()))
        .collect()
}

/// Journalled action attempts of `step` (the synthetic IN_FLIGHT entry
/// excluded).
fn actions(order: &GetOrderStatusResponse, step: &str) -> Vec<StepOutcome> {
    order
        .history
        .iter()
        .filter(|e| e.step == step && e.kind() == StepKind::Action)
        .map(|e| e.outcome())
        .filter(|o| *o != StepOutcome::InFlight)
        .collect()
}

async fn seeded(system: &System) {
    system.seed_product("widget", 500, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();
}

#[tokio::test]
async fn cancel_while_reserving_releases_and_charges_nothing() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    system
        .fault("inventory", delay("Reserve", 1000))
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    let reply = cancel(&system, &id, "changed my mind").await.unwrap();
    assert_eq!(reply.order_id, id);
    assert_eq!(reply.status(), OrderStatus::Cancelling);
    let cancelling = system.status(&id).await.unwrap();
    assert!(cancelling.cancel_requested);

    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert!(
        order.failure_reason.contains("changed my mind"),
        "{}",
        order.failure_reason
    );
    assert_eq!(
        controls(&order),
        [(
            "cancel".to_owned(),
            StepOutcome::Accepted,
            "cancel requested: changed my mind".to_owned()
        )]
    );
    assert_eq!(
        actions(&order, "reserve_inventory"),
        [StepOutcome::Succeeded],
        "the reservation in flight was allowed to finish"
    );
    assert!(actions(&order, "charge_payment").is_empty(), "no charge");
    // The cancel was decided on the state read back from the database,
    // which cannot prove that later steps were never sent (their progress
    // is committed without a flush): their compensations run too, and
    // leave tombstones that fence off any late action.
    assert_eq!(
        compensations(&order),
        ["ship_order", "charge_payment", "reserve_inventory"]
    );
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    assert_eq!(system.balance("alice").await.unwrap(), 10_000);
    assert_eq!(
        system.charge_state(&id).await.unwrap().as_deref(),
        Some("TOMBSTONE")
    );
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("CANCELLED"), 1);
}

#[tokio::test]
async fn cancel_while_charging_refunds_and_releases() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    system
        .fault("payment", delay("Charge", 1000))
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    system
        .wait_for(&id, SETTLE, |o| o.status() == OrderStatus::ChargingPayment)
        .await
        .unwrap();
    let reply = cancel(&system, &id, "").await.unwrap();
    assert_eq!(reply.status(), OrderStatus::Cancelling);

    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert_eq!(order.failure_reason, "cancelled by the client");
    assert_eq!(
        actions(&order, "charge_payment"),
        [StepOutcome::Succeeded],
        "the charge in flight was allowed to finish"
    );
    // Ship is fenced off too: see cancel_while_reserving_releases_and_charges_nothing.
    assert_eq!(
        compensations(&order),
        ["ship_order", "charge_payment", "reserve_inventory"]
    );
    assert!(actions(&order, "ship_order").is_empty(), "never shipped");
    assert_eq!(
        system.charge_state(&id).await.unwrap().as_deref(),
        Some("REFUNDED")
    );
    assert_eq!(system.balance("alice").await.unwrap(), 10_000);
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("CANCELLED"), 1);
}

#[tokio::test]
async fn cancel_while_waiting_for_a_retry_compensates_at_once() {
    let system = spawn_system_with(|s| {
        s.executor.backoff_base = Duration::from_secs(2);
        s.executor.backoff_cap = Duration::from_secs(2);
    })
    .await
    .unwrap();
    seeded(&system).await;
    system
        .fault(
            "payment",
            fault("Charge", "FAIL_BEFORE", Code::Unavailable, 0),
        )
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let before = system
        .wait_for(&id, SETTLE, |o| {
            actions(o, "charge_payment").contains(&StepOutcome::RetryableFailure)
        })
        .await
        .unwrap();
    let failed_before = actions(&before, "charge_payment").len();
    let reply = cancel(&system, &id, "too slow").await.unwrap();
    assert!(
        matches!(
            reply.status(),
            OrderStatus::Cancelling | OrderStatus::Cancelled
        ),
        "{:?}",
        reply.status()
    );

    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(
        order.status(),
        OrderStatus::Cancelled,
        "{}",
        order.failure_reason
    );
    let charges = actions(&order, "charge_payment");
    assert!(
        charges.iter().all(|o| *o == StepOutcome::RetryableFailure),
        "{charges:?}"
    );
    // At most the attempt that may have been on the wire when the cancel
    // landed; never the rest of the budget of 5.
    assert!(
        charges.len() <= failed_before + 1 && charges.len() < 5,
        "{} charge attempts before the cancel, {} in all",
        failed_before,
        charges.len()
    );
    assert_eq!(
        compensations(&order),
        ["ship_order", "charge_payment", "reserve_inventory"]
    );
    assert_eq!(system.balance("alice").await.unwrap(), 10_000);
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    system.audit().await.unwrap();
}

#[tokio::test]
async fn cancel_while_shipping_loses_to_the_shipment() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    system
        .fault("fulfillment", delay("Ship", 1000))
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    system
        .wait_for(&id, SETTLE, |o| o.status() == OrderStatus::Shipping)
        .await
        .unwrap();
    let reply = cancel(&system, &id, "too late").await.unwrap();
    assert_eq!(reply.status(), OrderStatus::Cancelling);

    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "the pivot won");
    assert_eq!(
        order.failure_reason, "",
        "a completed order has no failure reason"
    );
    assert!(!order.cancel_requested);
    assert!(compensations(&order).is_empty());
    assert_eq!(controls(&order).len(), 1, "the cancel is still on record");
    assert_eq!(system.balance("alice").await.unwrap(), 10_000 - 1_000);
    assert_eq!(system.stock("widget").await.unwrap(), (8, 2));
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 1);
}

#[tokio::test]
async fn cancel_after_completed_is_refused_and_changes_nothing() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    let journalled = system.journal_rows(&id).await.unwrap();

    let message = expect_code(cancel(&system, &id, "").await, Code::FailedPrecondition);
    assert!(message.contains("COMPLETED"), "{message}");

    let after = system.status(&id).await.unwrap();
    assert_eq!(after.status(), OrderStatus::Completed);
    assert_eq!(after.failure_reason, "");
    assert_eq!(system.journal_rows(&id).await.unwrap(), journalled);
    assert_eq!(system.balance("alice").await.unwrap(), 10_000 - 500);
    system.audit().await.unwrap();
}

#[tokio::test]
async fn cancel_after_failed_answers_failed_and_changes_nothing() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    let id = system.place("alice", &[("widget", 11)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Failed);
    let journalled = system.journal_rows(&id).await.unwrap();

    let reply = cancel(&system, &id, "never mind").await.unwrap();
    assert_eq!(reply.status(), OrderStatus::Failed);

    let after = system.status(&id).await.unwrap();
    assert_eq!(after.status(), OrderStatus::Failed);
    assert_eq!(after.failure_reason, order.failure_reason);
    assert!(controls(&after).is_empty());
    assert_eq!(system.journal_rows(&id).await.unwrap(), journalled);
    system.audit().await.unwrap();
}

#[tokio::test]
async fn cancel_is_recorded_once_and_cancelled_orders_stay_cancelled() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    system
        .fault("inventory", delay("Reserve", 1000))
        .await
        .unwrap();

    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let first = cancel(&system, &id, "first").await.unwrap();
    assert_eq!(first.status(), OrderStatus::Cancelling);
    let second = cancel(&system, &id, "second").await.unwrap();
    assert_eq!(second.status(), OrderStatus::Cancelling);
    let cancelling = system.status(&id).await.unwrap();
    assert_eq!(cancelling.status(), OrderStatus::Cancelling);
    assert_eq!(controls(&cancelling).len(), 1, "the repeat is not written");

    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Cancelled);
    assert!(
        order.failure_reason.contains("first"),
        "the first request's reason stays: {}",
        order.failure_reason
    );
    let journalled = system.journal_rows(&id).await.unwrap();

    let again = cancel(&system, &id, "third").await.unwrap();
    assert_eq!(again.status(), OrderStatus::Cancelled);
    let after = system.status(&id).await.unwrap();
    assert_eq!(after.status(), OrderStatus::Cancelled);
    assert_eq!(after.failure_reason, order.failure_reason);
    assert_eq!(controls(&after).len(), 1);
    assert_eq!(system.journal_rows(&id).await.unwrap(), journalled);
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_cancel_reason_over_512_bytes_is_invalid() {
    let system = spawn_system().await.unwrap();
    seeded(&system).await;
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    let journalled = system.journal_rows(&id).await.unwrap();

    let message = expect_code(
        cancel(&system, &id, &"x".repeat(513)).await,
        Code::InvalidArgument,
    );
    assert!(message.contains("512"), "{message}");
    // 512 bytes pass validation and reach the status check.
    expect_code(
        cancel(&system, &id, &"x".repeat(512)).await,
        Code::FailedPrecondition,
    );
    assert_eq!(system.journal_rows(&id).await.unwrap(), journalled);
    assert_eq!(
        system.status(&id).await.unwrap().status(),
        OrderStatus::Completed
    );
}
