//! AdminService's tokens over real gRPC: the read-only token lists, shows,
//! counts and reconciles, and is refused (PERMISSION_DENIED) every call
//! that changes a saga, which then stays exactly as it was; the operator
//! token does those; a wrong or missing token is UNAUTHENTICATED.

use std::time::Duration;

use harness::{System, delay, expect_code, spawn_system_with};
use orchestrator::auth::AdminTokens;
use proto::saga::v1::{
    AbortSagaRequest, GetSagaRequest, GetSagaResponse, ListSagasRequest, OrderStatus,
    ReconcileRequest, RetrySagaRequest, StatsRequest,
};
use tonic::{Code, Request};

const SETTLE: Duration = Duration::from_secs(30);
const OPERATOR: &str = "op3rator-token";
const READER: &str = "r3ader-token";

/// `message` with `authorization: Bearer <token>`.
fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    request
}

async fn get(system: &System, token: &str, saga_id: &str) -> GetSagaResponse {
    system
        .admin()
        .get_saga(with_token(
            token,
            GetSagaRequest {
                saga_id: saga_id.into(),
            },
        ))
        .await
        .expect("GetSaga")
        .into_inner()
}

fn retry(saga_id: &str) -> RetrySagaRequest {
    RetrySagaRequest {
        saga_id: saga_id.into(),
        operator: "tester".into(),
        reason: "try again".into(),
    }
}

fn abort(saga_id: &str) -> AbortSagaRequest {
    AbortSagaRequest {
        saga_id: saga_id.into(),
        operator: "tester".into(),
        reason: "customer called".into(),
    }
}

fn repair() -> ReconcileRequest {
    ReconcileRequest {
        repair: true,
        ..ReconcileRequest::default()
    }
}

#[tokio::test]
async fn the_read_only_token_reads_and_only_the_operator_token_changes_sagas() {
    let system = spawn_system_with(|s| {
        s.admin = AdminTokens::new(Some(OPERATOR), Some(READER));
        s.executor.policy.compensation_attempts = 2;
    })
    .await
    .unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();

    // A saga an operator must look at: payment refuses, and the release
    // keeps failing past its budget.
    system.fail_compensations().await.unwrap();
    let stuck = system.place("alice", &[("widget", 1)]).await.unwrap();
    let settled = system.wait_settled(&stuck, SETTLE).await.unwrap();
    assert_eq!(settled.status(), OrderStatus::NeedsAttention);
    system.clear_faults().await.unwrap();
    // And one in flight: its Charge never answers within the step
    // deadline, so it stays CHARGING_PAYMENT for the attempt budget.
    system
        .fault("payment", delay("Charge", 10_000))
        .await
        .unwrap();
    let running = system.place("alice", &[("widget", 1)]).await.unwrap();
    system
        .wait_for(&running, SETTLE, |s| {
            s.status() == OrderStatus::ChargingPayment
        })
        .await
        .unwrap();

    // The read-only token reads.
    let listed = system
        .admin()
        .list_sagas(with_token(READER, ListSagasRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.sagas.iter().map(|s| s.saga_id.as_str()).collect();
    assert!(
        ids.contains(&stuck.as_str()) && ids.contains(&running.as_str()),
        "{ids:?}"
    );
    let before = get(&system, READER, &stuck).await;
    system
        .admin()
        .stats(with_token(READER, StatsRequest {}))
        .await
        .unwrap();
    system
        .admin()
        .reconcile(with_token(READER, ReconcileRequest::default()))
        .await
        .unwrap();

    // And is refused whatever changes a saga, naming the RPC.
    let message = expect_code(
        system
            .admin()
            .retry_saga(with_token(READER, retry(&stuck)))
            .await,
        Code::PermissionDenied,
    );
    assert!(
        message.contains("RetrySaga") && message.contains("operator token"),
        "{message}"
    );
    let message = expect_code(
        system
            .admin()
            .abort_saga(with_token(READER, abort(&running)))
            .await,
        Code::PermissionDenied,
    );
    assert!(message.contains("AbortSaga"), "{message}");
    let message = expect_code(
        system.admin().reconcile(with_token(READER, repair())).await,
        Code::PermissionDenied,
    );
    assert!(message.contains("Reconcile with repair"), "{message}");
    // A wrong token or none is not a role at all.
    for request in [
        with_token("guess", retry(&stuck)),
        Request::new(retry(&stuck)),
    ] {
        expect_code(
            system.admin().retry_saga(request).await,
            Code::Unauthenticated,
        );
    }
    expect_code(
        system
            .admin()
            .list_sagas(with_token("r3ader-toke", ListSagasRequest::default()))
            .await,
        Code::Unauthenticated,
    );

    // Nothing changed: same version, status and journal.
    let after = get(&system, READER, &stuck).await;
    assert_eq!(after.version, before.version);
    assert_eq!(after.saga, before.saga);
    assert_eq!(after.journal, before.journal);
    let running_now = get(&system, READER, &running).await;
    assert!(
        !running_now.cancel_requested,
        "the refused abort was not recorded"
    );
    assert!(
        running_now.journal.iter().all(|e| e.step != "abort"),
        "{:?}",
        running_now.journal
    );

    // The operator token does all of it.
    let retried = system
        .admin()
        .retry_saga(with_token(OPERATOR, retry(&stuck)))
        .await
        .unwrap()
        .into_inner();
    assert!(!retried.message.is_empty());
    system
        .admin()
        .abort_saga(with_token(OPERATOR, abort(&running)))
        .await
        .unwrap();
    let stuck_end = system.wait_settled(&stuck, SETTLE).await.unwrap();
    assert_eq!(stuck_end.status(), OrderStatus::Failed);
    let running_end = system.wait_settled(&running, SETTLE).await.unwrap();
    assert_eq!(running_end.status(), OrderStatus::Failed);
    assert!(
        running_end.failure_reason.contains("customer called"),
        "ended by the abort: {}",
        running_end.failure_reason
    );
    let report = system
        .admin()
        .reconcile(with_token(OPERATOR, repair()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.discrepancies_found, 0, "{report:?}");
    system.clear_faults().await.unwrap();
    system.audit().await.unwrap();
}

#[tokio::test]
async fn with_only_a_read_only_token_nobody_may_change_a_saga() {
    let system = spawn_system_with(|s| s.admin = AdminTokens::new(None, Some(READER)))
        .await
        .unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system.wait_settled(&id, SETTLE).await.unwrap();

    let listed = system
        .admin()
        .list_sagas(with_token(READER, ListSagasRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sagas.len(), 1);
    let message = expect_code(
        system
            .admin()
            .retry_saga(with_token(READER, retry(&id)))
            .await,
        Code::PermissionDenied,
    );
    assert!(message.contains("none configured"), "{message}");
    // No other token opens it: there is no operator token to present.
    expect_code(
        system
            .admin()
            .retry_saga(with_token(OPERATOR, retry(&id)))
            .await,
        Code::Unauthenticated,
    );
    expect_code(
        system.admin().stats(Request::new(StatsRequest {})).await,
        Code::Unauthenticated,
    );
}
