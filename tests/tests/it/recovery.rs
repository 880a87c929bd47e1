//! Recovery: a crashed replica's sagas are finished by another one, a
//! restarted replica resumes its own at once, a graceful stop hands leases
//! back, and two replicas on one database never drive a saga together.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use harness::{System, delay, spawn_orchestrator, spawn_system, spawn_system_with, test_settings};
use proto::fault::v1::SetFaultRequest;
use proto::saga::v1::{CancelOrderRequest, OrderStatus, PlaceOrderRequest};

/// Long enough that a test finishing "well before" it proves the leases
/// were handed back rather than left to expire.
const LONG_LEASE: Duration = Duration::from_secs(60);

async fn seed(system: &System) {
    system.seed_product("widget", 150, 1_000).await.unwrap();
    system.seed_product("gadget", 990, 1_000).await.unwrap();
    system.seed_account("alice", 1_000_000).await.unwrap();
    system.seed_account("bob", 1_000_000).await.unwrap();
}

/// The i-th order of a run: alternating customers and baskets.
fn order(i: usize) -> PlaceOrderRequest {
    let customer = if i.is_multiple_of(2) { "alice" } else { "bob" };
    let quantity = (i % 3 + 1) as i32;
    if i.is_multiple_of(3) {
        harness::place_request(customer, &[("widget", quantity), ("gadget", 1)], "")
    } else {
        harness::place_request(customer, &[("widget", quantity)], "")
    }
}

async fn count(system: &System, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(bind)
        .fetch_one(&system.pool)
        .await
        .unwrap()
}

/// Polls until at least `n` sagas are in one of the comma-separated
/// `statuses` (e.g. `'CHARGING_PAYMENT','SHIPPING'`).
async fn wait_for_status(system: &System, statuses: &str, n: i64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let in_status: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM sagas WHERE status IN ({statuses})"
        )))
        .fetch_one(&system.pool)
        .await?;
        if in_status >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {in_status} sagas in {statuses} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unsettled sagas whose lease `owner` holds.
async fn leased_by(system: &System, owner: &str) -> i64 {
    count(
        system,
        "SELECT count(*) FROM sagas WHERE lease_owner = $1
         AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')",
        owner,
    )
    .await
}

async fn statuses(system: &System) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status ORDER BY status")
        .fetch_all(&system.pool)
        .await
        .unwrap()
}

async fn assert_all_completed(system: &System, placed: usize) {
    let audit = system.audit().await.unwrap();
    assert_eq!(
        audit.count("COMPLETED"),
        placed,
        "every order completes: {:?}",
        audit.by_status
    );
}

/// Places orders `0..n` on the system's orchestrator, one after the other.
async fn place_all(system: &System, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut orders = system.orders();
    for i in 0..n {
        ids.push(
            orders
                .place_order(order(i))
                .await
                .unwrap()
                .into_inner()
                .order_id,
        );
    }
    ids
}

#[tokio::test]
async fn a_crashed_replicas_sagas_are_finished_by_another_replica() {
    let mut system = spawn_system().await.unwrap();
    seed(&system).await;
    system.fault("payment", delay("Charge", 600)).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 600))
        .await
        .unwrap();

    let placed = place_all(&system, 20).await;
    wait_for_status(
        &system,
        "'CHARGING_PAYMENT', 'SHIPPING'",
        5,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let crashed = system.orchestrator.take().unwrap();
    let crashed_id = crashed.replica_id().to_owned();
    crashed.crash();
    let orphaned = leased_by(&system, &crashed_id).await;
    assert!(
        orphaned > 0,
        "the crash left no saga mid-flight: {:?}",
        statuses(&system).await
    );
    system.clear_faults().await.unwrap();

    let replica = system.spawn_replica().await.unwrap();
    assert_ne!(replica.replica_id(), crashed_id);
    system
        .wait_all_settled(Duration::from_secs(60))
        .await
        .unwrap();

    assert_all_completed(&system, placed.len()).await;
    // (A write the crashed replica had already sent may still land, so
    // not every orphan needs the new replica; most do.)
    let taken_over = count(
        &system,
        "SELECT count(DISTINCT saga_id) FROM saga_journal WHERE actor = $1",
        replica.replica_id(),
    )
    .await;
    assert!(
        taken_over > 0,
        "{orphaned} sagas were orphaned, the new replica drove none"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_restarted_with_the_same_id_resumes_its_sagas_at_once() {
    let mut system = spawn_system_with(|s| s.executor.lease_ttl = LONG_LEASE)
        .await
        .unwrap();
    seed(&system).await;
    system.fault("payment", delay("Charge", 600)).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 600))
        .await
        .unwrap();

    let placed = place_all(&system, 20).await;
    wait_for_status(
        &system,
        "'CHARGING_PAYMENT', 'SHIPPING'",
        5,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let crashed = system.orchestrator.take().unwrap();
    crashed.crash();
    // The leases the crash left behind would hold the sagas for most of a
    // minute if they were not released at start.
    let long_held = count(
        &system,
        "SELECT count(*) FROM sagas WHERE lease_owner = $1
         AND lease_expires_at > now() + interval '40 seconds'
         AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')",
        &system.settings.executor.replica_id,
    )
    .await;
    assert!(
        long_held > 0,
        "the crash left no long lease: {:?}",
        statuses(&system).await
    );
    system.clear_faults().await.unwrap();

    let restarted = spawn_orchestrator(system.database_url(), system.settings.clone())
        .await
        .unwrap();
    assert_eq!(restarted.replica_id(), system.settings.executor.replica_id);
    system
        .wait_all_settled(Duration::from_secs(30))
        .await
        .unwrap();

    assert_all_completed(&system, placed.len()).await;
    restarted.stop().await.unwrap();
}

#[tokio::test]
async fn a_graceful_stop_hands_leases_back_to_other_replicas() {
    let mut system = spawn_system_with(|s| s.executor.lease_ttl = LONG_LEASE)
        .await
        .unwrap();
    seed(&system).await;
    system.fault("payment", delay("Charge", 500)).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 500))
        .await
        .unwrap();

    let placed = place_all(&system, 12).await;
    wait_for_status(
        &system,
        "'CHARGING_PAYMENT', 'SHIPPING'",
        3,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let stopped = system.orchestrator.take().unwrap();
    let stopped_id = stopped.replica_id().to_owned();
    stopped.stop().await.unwrap();

    let still_leased = count(
        &system,
        "SELECT count(*) FROM sagas WHERE lease_owner = $1",
        &stopped_id,
    )
    .await;
    assert_eq!(still_leased, 0, "the stopped replica kept leases");
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sagas
         WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert!(
        unfinished > 0,
        "the stop left nothing to hand over: {:?}",
        statuses(&system).await
    );
    system.clear_faults().await.unwrap();

    let mut settings = test_settings(&system.participants);
    settings.executor.lease_ttl = LONG_LEASE;
    assert_ne!(settings.executor.replica_id, stopped_id);
    let successor = spawn_orchestrator(system.database_url(), settings)
        .await
        .unwrap();
    system
        .wait_all_settled(Duration::from_secs(30))
        .await
        .unwrap();

    assert_all_completed(&system, placed.len()).await;
    successor.stop().await.unwrap();
}

#[tokio::test]
async fn two_replicas_share_a_database_and_the_survivor_finishes_a_killed_ones_sagas() {
    let mut system = spawn_system().await.unwrap();
    seed(&system).await;
    let survivor = system.spawn_replica().await.unwrap();
    system.fault("payment", delay("Charge", 300)).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 300))
        .await
        .unwrap();

    let (mut first, mut second) = (system.orders(), survivor.orders());
    let mut on_killed = Vec::new();
    for i in 0..40_usize {
        let client = if i.is_multiple_of(2) {
            &mut first
        } else {
            &mut second
        };
        let id = client
            .place_order(order(i))
            .await
            .unwrap()
            .into_inner()
            .order_id;
        if i.is_multiple_of(2) {
            on_killed.push(id);
        }
    }
    wait_for_status(
        &system,
        "'CHARGING_PAYMENT', 'SHIPPING'",
        5,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let killed = system.orchestrator.take().unwrap();
    let killed_id = killed.replica_id().to_owned();
    killed.crash();
    let orphaned = leased_by(&system, &killed_id).await;
    assert!(
        orphaned > 0,
        "the crash left no saga mid-flight: {:?}",
        statuses(&system).await
    );

    system
        .wait_all_settled(Duration::from_secs(60))
        .await
        .unwrap();
    assert_all_completed(&system, 40).await;

    // The survivor took over sagas placed on the killed replica (not
    // necessarily all those leased at the crash: a write the killed replica
    // had already sent may still land and finish one).
    let taken_over: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT saga_id) FROM saga_journal
         WHERE actor = $1 AND saga_id = ANY($2)",
    )
    .bind(survivor.replica_id())
    .bind(&on_killed)
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert!(
        taken_over > 0,
        "{orphaned} sagas were orphaned, the survivor drove none of the killed replica's"
    );

    // Invariant 5 beyond the audit's duplicate check: no saga has calls by
    // two replicas overlapping in time.
    let overlapping: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT a.saga_id, a.actor, a.step || '#' || a.attempt, b.actor, b.step || '#' || b.attempt
         FROM saga_journal a JOIN saga_journal b
           ON a.saga_id = b.saga_id AND a.actor < b.actor
          AND a.started_at < b.finished_at AND b.started_at < a.finished_at
         WHERE a.kind IN ('ACTION', 'COMPENSATION') AND b.kind IN ('ACTION', 'COMPENSATION')
         LIMIT 5",
    )
    .fetch_all(&system.pool)
    .await
    .unwrap();
    assert!(
        overlapping.is_empty(),
        "calls by two replicas overlap: {overlapping:?}"
    );
    survivor.stop().await.unwrap();
}

/// The database loses the asynchronously committed progress of a saga
/// whose later calls already went out (reserve and charge succeeded, ship
/// was sent), as a power loss with `synchronous_commit = off` does. The
/// saga resumes from its durable start, its replayed Reserve fails, the
/// client cancels: the charge must be refunded and the shipment fenced off,
/// although the state read back never said they were attempted.
#[tokio::test]
async fn a_cancel_after_the_database_lost_progress_undoes_every_step_that_went_out() {
    let mut system = spawn_system_with(|s| {
        s.step_timeout = Duration::from_millis(800);
        // Reserve keeps failing until the client cancels.
        s.executor.policy.action_attempts = 1_000;
    })
    .await
    .unwrap();
    system.seed_product("widget", 250, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();
    // Only the lossy orchestrator drives sagas.
    system.orchestrator.take().unwrap().stop().await.unwrap();
    let lossy = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = lossy.clone();
    let orchestrator = harness::spawn_orchestrator_wrapped(
        system.database_url(),
        system.settings.clone(),
        move |store| {
            let store = harness::LossyStore::new(store);
            *slot.lock().unwrap() = Some(store.clone());
            store
        },
    )
    .await
    .unwrap();
    let lossy = lossy.lock().unwrap().clone().unwrap();
    system.orchestrator = Some(orchestrator);

    // Ship answers after the deadline: the saga's reply to it is a timeout.
    system
        .fault(
            "fulfillment",
            SetFaultRequest {
                count: 1,
                ..delay("Ship", 2_000)
            },
        )
        .await
        .unwrap();
    // Reserve's and Charge's successes are acknowledged and lost.
    lossy.lose_next(2);
    let order = system.place("alice", &[("widget", 2)]).await.unwrap();

    // Charged (the write saying so was lost): from now on Reserve fails,
    // so the resumed saga cannot replay past it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.balance("alice").await.unwrap() != 9_500 {
        assert!(Instant::now() < deadline, "never charged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    system
        .fault(
            "inventory",
            harness::fault("Reserve", "FAIL_BEFORE", tonic::Code::Unavailable, 0),
        )
        .await
        .unwrap();
    assert_eq!(lossy.lost(), 2, "both progress writes were lost");

    // The saga is back at Reserve, retrying; Ship's late timeout is in
    // the journal.
    let retrying = system
        .wait_for(&order, Duration::from_secs(10), |s| {
            s.history.iter().any(|e| {
                e.step == "reserve_inventory"
                    && e.outcome() == proto::saga::v1::StepOutcome::RetryableFailure
            })
        })
        .await
        .unwrap();
    assert!(
        retrying.history.iter().any(|e| e.step == "ship_order"
            && e.kind() == proto::saga::v1::StepKind::Action
            && e.detail.starts_with(orchestrator::executor::LATE_REPLY)),
        "the late reply of Ship is journalled as one: {:?}",
        retrying.history
    );

    system
        .orders()
        .cancel_order(CancelOrderRequest {
            order_id: order.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();
    let done = system
        .wait_settled(&order, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(done.status(), OrderStatus::Cancelled);
    assert_eq!(
        system.balance("alice").await.unwrap(),
        10_000,
        "the charge the lost write recorded was refunded: {:?}",
        harness::compensations(&done)
    );
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
    assert_eq!(
        harness::compensations(&done),
        ["ship_order", "charge_payment", "reserve_inventory"]
    );
    system.clear_faults().await.unwrap();
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("CANCELLED"), 1, "{audit:?}");
}

/// Commits that land while their answers are lost (the link to the
/// database breaks after the commit): the driver finds its own write on
/// the retry and journals each call once.
#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_journalled_once() {
    let mut system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();
    system.orchestrator.take().unwrap().stop().await.unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = slot.clone();
    let orchestrator = harness::spawn_orchestrator_wrapped(
        system.database_url(),
        system.settings.clone(),
        move |store| {
            let store = harness::LossyStore::new(store);
            *keep.lock().unwrap() = Some(store.clone());
            store
        },
    )
    .await
    .unwrap();
    let lossy = slot.lock().unwrap().clone().unwrap();
    system.orchestrator = Some(orchestrator);

    // Every transition of the saga: reserve's, charge's and ship's.
    lossy.break_after_next(3);
    let order = system.place("alice", &[("widget", 1)]).await.unwrap();
    let done = system
        .wait_settled(&order, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(done.status(), OrderStatus::Completed);
    let calls: Vec<(String, u32)> = done
        .history
        .iter()
        .map(|e| (e.step.clone(), e.attempt))
        .collect();
    assert_eq!(
        calls,
        [
            ("reserve_inventory".to_owned(), 1),
            ("charge_payment".to_owned(), 1),
            ("ship_order".to_owned(), 1)
        ],
        "each call journalled once"
    );
    system.audit().await.unwrap();
}
