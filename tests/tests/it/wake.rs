//! Two replicas on one database, and requests or watches that reach the
//! one that does not drive the saga: WatchOrder ends when the replica it
//! runs on loses the saga's lease, and RetrySaga / AbortSaga sent to the
//! other replica take effect at once although the driver waits out a long
//! backoff. Every accepted request is journalled, even one that finds the
//! saga already as it asks.

use std::time::{Duration, Instant};

use harness::{SpawnedOrchestrator, System, delay, fault, spawn_system_with};
use proto::fault::v1::SetFaultRequest;
use proto::saga::v1::admin_service_client::AdminServiceClient;
use proto::saga::v1::{
    AbortSagaRequest, OrderStatus, RetrySagaRequest, StepKind, StepOutcome, WatchOrderRequest,
};
use tonic::Code;
use tonic::transport::Channel;

/// A backoff far longer than any wait in these tests.
const LONG_BACKOFF: Duration = Duration::from_secs(30);
/// How soon a request sent to the other replica must have taken effect.
const PROMPT: Duration = Duration::from_secs(3);

fn admin(orchestrator: &SpawnedOrchestrator) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(orchestrator.channel())
}

async fn seed(system: &System) {
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
}

/// The saga's lease owner, straight from the table.
async fn lease_owner(system: &System, saga_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT lease_owner FROM sagas WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_one(&system.pool)
        .await
        .unwrap()
}

/// Waits until the saga waits out a stored backoff with more than `left`
/// to go (full jitter may draw a short one: the next failure draws again).
async fn wait_for_long_backoff(system: &System, saga_id: &str, left: Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT coalesce(next_attempt_at > now() + make_interval(secs => $2), false)
             FROM sagas WHERE saga_id = $1",
        )
        .bind(saga_id)
        .bind(left.as_secs_f64())
        .fetch_one(&system.pool)
        .await
        .unwrap();
        if waiting {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{saga_id} never waited out a long backoff"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CONTROL journal rows of a saga's `step` ("retry", "abort").
async fn requests_journalled(system: &System, saga_id: &str, step: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM saga_journal WHERE saga_id = $1 AND kind = 'CONTROL' AND step = $2",
    )
    .bind(saga_id)
    .bind(step)
    .fetch_one(&system.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_watch_on_a_replica_that_lost_the_lease_ends_with_the_new_drivers_outcome() {
    // The first replica's lease is long, so that its renewer rarely takes
    // back the lease the test expires.
    let system = spawn_system_with(|s| s.executor.lease_ttl = Duration::from_secs(30))
        .await
        .unwrap();
    seed(&system).await;
    let other = system.spawn_replica().await.unwrap();
    // The first Ship (the first replica's) is held past the 2 s call
    // deadline, as if that replica froze mid-call; the next one is not.
    system
        .fault(
            "fulfillment",
            SetFaultRequest {
                latency_ms: 3_000,
                ..fault("Ship", "DELAY", Code::Ok, 1)
            },
        )
        .await
        .unwrap();
    let first_id = system.settings.executor.replica_id.clone();

    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let mut stream = system
        .orders()
        .watch_order(WatchOrderRequest {
            order_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    system
        .wait_for(&id, Duration::from_secs(10), |s| {
            s.status() == OrderStatus::Shipping
        })
        .await
        .unwrap();

    // The lease runs out while the first replica's Ship is held: the other
    // replica claims the saga and completes it.
    let expired = Instant::now();
    let deadline = expired + Duration::from_secs(10);
    while lease_owner(&system, &id).await.as_deref() == Some(first_id.as_str()) {
        assert!(Instant::now() < deadline, "no other replica claimed {id}");
        sqlx::query(
            "UPDATE sagas SET lease_expires_at = now() - interval '1 second'
             WHERE saga_id = $1 AND lease_owner = $2",
        )
        .bind(&id)
        .bind(&first_id)
        .execute(&system.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system
        .wait_settled(&id, Duration::from_secs(10))
        .await
        .unwrap();

    // The stream on the replica that lost the lease ends too, with the
    // outcome the other one wrote (its own call ends at its 2 s deadline).
    let seen = tokio::time::timeout(Duration::from_secs(6), async {
        let mut seen = Vec::new();
        while let Some(update) = stream.message().await.unwrap() {
            seen.push(update.status());
        }
        seen
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the watch on the replica that lost the lease did not end within 6 s of the expiry ({:?} ago)",
            expired.elapsed()
        )
    });
    assert_eq!(seen.last(), Some(&OrderStatus::Completed), "{seen:?}");
    assert!(seen.contains(&OrderStatus::Shipping), "{seen:?}");
    let journal = system.status(&id).await.unwrap().history;
    assert!(
        journal
            .iter()
            .any(|e| e.step == "ship_order" && e.actor == other.replica_id()),
        "the other replica shipped: {journal:?}"
    );
    system.audit().await.unwrap();
    other.stop().await.unwrap();
}

#[tokio::test]
async fn abort_and_retry_sent_to_the_other_replica_take_effect_during_a_long_backoff() {
    let long = |s: &mut orchestrator::config::Settings| {
        s.executor.backoff_base = LONG_BACKOFF;
        s.executor.backoff_cap = LONG_BACKOFF;
        s.executor.policy.action_attempts = 100;
    };
    let system = spawn_system_with(long).await.unwrap();
    seed(&system).await;
    let other = system.spawn_replica_with(long).await.unwrap();
    system
        .fault(
            "payment",
            fault("Charge", "FAIL_BEFORE", Code::Unavailable, 0),
        )
        .await
        .unwrap();
    let aborted = system.place("alice", &[("widget", 1)]).await.unwrap();
    let retried = system.place("alice", &[("widget", 2)]).await.unwrap();
    let driver = system.settings.executor.replica_id.clone();

    // Abort, sent to the replica that does not drive the saga.
    wait_for_long_backoff(&system, &aborted, Duration::from_secs(10)).await;
    assert_eq!(
        lease_owner(&system, &aborted).await.as_deref(),
        Some(driver.as_str())
    );
    let sent = Instant::now();
    let reply = admin(&other)
        .abort_saga(AbortSagaRequest {
            saga_id: aborted.clone(),
            reason: "payment is down".into(),
            operator: "dana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), OrderStatus::Compensating);
    assert!(reply.message.contains("compensating now"), "{reply:?}");
    let order = system.wait_settled(&aborted, PROMPT).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(sent.elapsed() < PROMPT);

    // Retry, sent to the other replica, once the fault is fixed.
    wait_for_long_backoff(&system, &retried, Duration::from_secs(10)).await;
    system.clear_faults().await.unwrap();
    let reply = admin(&other)
        .retry_saga(RetrySagaRequest {
            saga_id: retried.clone(),
            operator: "dana".into(),
            reason: "payment is back".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.message.contains("retrying now"), "{reply:?}");
    let order = system.wait_settled(&retried, PROMPT).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    // Driven where it was all along: the request only woke its driver.
    assert!(
        order
            .history
            .iter()
            .filter(|e| e.kind() == StepKind::Action)
            .all(|e| e.actor == driver),
        "{:?}",
        order.history
    );
    assert_eq!(requests_journalled(&system, &retried, "retry").await, 1);
    system.audit().await.unwrap();
    other.stop().await.unwrap();
}

#[tokio::test]
async fn every_retry_is_journalled_even_when_it_changes_nothing() {
    let system = spawn_system_with(|_| {}).await.unwrap();
    seed(&system).await;
    let other = system.spawn_replica().await.unwrap();
    // The charge stays in flight while the operator retries twice.
    system
        .fault("payment", delay("Charge", 1_500))
        .await
        .unwrap();
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system
        .wait_for(&id, Duration::from_secs(10), |s| {
            s.status() == OrderStatus::ChargingPayment
        })
        .await
        .unwrap();

    let first = system.orchestrator.as_ref().unwrap();
    for (n, replica) in [first, &other].into_iter().enumerate() {
        let reply = admin(replica)
            .retry_saga(RetrySagaRequest {
                saga_id: id.clone(),
                operator: "dana".into(),
                reason: format!("retry {}", n + 1),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), OrderStatus::ChargingPayment);
        assert!(
            reply.message.contains("nothing to reset"),
            "the answer says the retry changed nothing: {reply:?}"
        );
    }
    assert_eq!(requests_journalled(&system, &id, "retry").await, 2);

    let order = system
        .wait_settled(&id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    let retries: Vec<_> = order
        .history
        .iter()
        .filter(|e| e.kind() == StepKind::Control && e.step == "retry")
        .collect();
    assert_eq!(retries.len(), 2, "{:?}", order.history);
    assert!(retries.iter().all(|e| e.outcome() == StepOutcome::Accepted
        && e.actor == "operator dana"
        && e.detail.contains("already")));
    // The charge was sent once: the retries woke the driver, they did not
    // start a second call.
    let charges = order
        .history
        .iter()
        .filter(|e| e.step == "charge_payment" && e.kind() == StepKind::Action)
        .count();
    assert_eq!(charges, 1, "{:?}", order.history);
    system.audit().await.unwrap();
    other.stop().await.unwrap();
}
