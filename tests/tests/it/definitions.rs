//! Saga definitions as data, with versions: sagas in flight finish under
//! the version they started with when a deploy adds one; a saga whose
//! version this replica does not know is set aside as NEEDS_ATTENTION and
//! resumes where it was on a replica that knows it; and a definition with
//! a fourth participant (served by an in-process adapter that records its
//! calls) runs end to end on PostgreSQL and on SQLite, cancellation and
//! crash recovery included. The fourth step follows ARCHITECTURE.md's "How
//! to add a step": a new version of the definition and one adapter,
//! nothing else.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use harness::{
    System, compensations, spawn_orchestrator, spawn_orchestrator_with_adapters, spawn_system,
    test_settings,
};
use orchestrator::clients::{StepAdapter, StepCall};
use orchestrator::saga::{Definition, ORDER_SAGA, Registry, Status, StepDef};
use proto::fault::v1::SetFaultRequest;
use proto::saga::v1::admin_service_client::AdminServiceClient;
use proto::saga::v1::{
    CancelOrderRequest, GetOrderStatusResponse, OrderStatus, RetrySagaRequest, StepKind,
    StepOutcome,
};
use tokio::sync::watch;

/// The order saga's steps, as v1 has them.
const RESERVE: StepDef = StepDef {
    name: "reserve_inventory",
    status: Status::ReservingInventory,
    participant: "inventory",
    action: "inventory.v1.InventoryService/Reserve",
    compensation: "inventory.v1.InventoryService/Release",
};
const CHARGE: StepDef = StepDef {
    name: "charge_payment",
    status: Status::ChargingPayment,
    participant: "payment",
    action: "payment.v1.PaymentService/Charge",
    compensation: "payment.v1.PaymentService/Refund",
};
const SHIP: StepDef = StepDef {
    name: "ship_order",
    status: Status::Shipping,
    participant: "fulfillment",
    action: "fulfillment.v1.FulfillmentService/Ship",
    compensation: "fulfillment.v1.FulfillmentService/CancelShipment",
};

/// The test-only fourth step, before the pivot. It shows a contract status
/// while it runs (a new label would be a contract change).
const AUDIT: StepDef = StepDef {
    name: "audit_order",
    status: Status::ChargingPayment,
    participant: "auditor",
    action: "audit.v1.AuditService/Audit",
    compensation: "audit.v1.AuditService/Unaudit",
};

/// Order v2: the audit between the charge and the shipment; Ship is still
/// the pivot (now the fourth step).
static ORDER_V2: Definition = Definition {
    name: "order",
    version: 2,
    steps: &[RESERVE, CHARGE, AUDIT, SHIP],
    pivot: 3,
};

/// Order v3: v1's steps again, only so that a replica can know a version
/// another one does not.
static ORDER_V3: Definition = Definition {
    name: "order",
    version: 3,
    steps: &[RESERVE, CHARGE, SHIP],
    pivot: 2,
};

/// The auditor participant, in-process: records every act and
/// compensation by saga id; while held, acts wait (in flight).
struct Auditor {
    acts: Mutex<Vec<String>>,
    compensations: Mutex<Vec<String>>,
    held: watch::Sender<bool>,
}

impl Auditor {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            acts: Mutex::default(),
            compensations: Mutex::default(),
            held: watch::channel(false).0,
        })
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    fn acts_for(&self, saga_id: &str) -> usize {
        self.acts
            .lock()
            .unwrap()
            .iter()
            .filter(|id| *id == saga_id)
            .count()
    }

    fn compensations_for(&self, saga_id: &str) -> usize {
        let compensations = self.compensations.lock().unwrap();
        compensations.iter().filter(|id| *id == saga_id).count()
    }

    /// Polls until an act for `saga_id` arrived.
    async fn wait_act(&self, saga_id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.acts_for(saga_id) == 0 {
            if Instant::now() > deadline {
                bail!("no audit of {saga_id} arrived");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl StepAdapter for Auditor {
    async fn act(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, tonic::Status> {
        self.acts.lock().unwrap().push(call.saga_id.to_owned());
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|held| !*held).await;
        Ok(vec![("audit_id".into(), format!("audit-{}", call.saga_id))])
    }

    async fn compensate(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, tonic::Status> {
        self.compensations
            .lock()
            .unwrap()
            .push(call.saga_id.to_owned());
        Ok(vec![("unaudit".into(), "UNAUDITED".into())])
    }
}

async fn seed(system: &System) {
    system.seed_product("widget", 150, 1_000).await.unwrap();
    system.seed_account("alice", 1_000_000).await.unwrap();
}

/// The names of the actions that succeeded, in journal order.
fn actions(order: &GetOrderStatusResponse) -> Vec<String> {
    order
        .history
        .iter()
        .filter(|e| e.kind() == StepKind::Action && e.outcome() == StepOutcome::Succeeded)
        .map(|e| e.step.clone())
        .collect()
}

async fn definition_of(system: &System, saga_id: &str) -> (String, i64) {
    sqlx::query_as("SELECT definition_name, definition_version FROM sagas WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_one(&system.pool)
        .await
        .unwrap()
}

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sagas_in_flight_finish_under_their_version_when_a_deploy_adds_one() {
    let system = &mut spawn_system().await.unwrap();
    seed(system).await;
    // The first three shipments wait: their sagas are in flight under v1
    // when the new version is deployed.
    system
        .fault(
            "fulfillment",
            SetFaultRequest {
                latency_ms: 3_000,
                ..harness::fault("Ship", "DELAY", tonic::Code::Ok, 3)
            },
        )
        .await
        .unwrap();
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(system.place("alice", &[("widget", 1)]).await.unwrap());
    }
    for id in &old {
        system
            .wait_for(id, SETTLE, |o| o.status() == OrderStatus::Shipping)
            .await
            .unwrap();
    }
    // The deploy: the replica stops hard and comes back (same replica id,
    // so it takes its sagas back at once) knowing v1 and v2.
    system.orchestrator.take().unwrap().crash();
    let auditor = Auditor::new();
    let mut settings = system.settings.clone();
    settings.executor.registry = Arc::new(Registry::new([&ORDER_SAGA, &ORDER_V2]).unwrap());
    system.orchestrator = Some(
        spawn_orchestrator_with_adapters(
            system.database_url(),
            settings,
            vec![("auditor", auditor.clone())],
        )
        .await
        .unwrap(),
    );
    for id in &old {
        let order = system.wait_settled(id, SETTLE).await.unwrap();
        assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
        assert_eq!(
            actions(&order),
            ["reserve_inventory", "charge_payment", "ship_order"],
            "v1: three steps"
        );
        assert_eq!(definition_of(system, id).await, ("order".to_owned(), 1));
        assert_eq!(auditor.acts_for(id), 0, "no v1 saga is audited");
    }
    // New sagas start under v2 and run its four steps.
    let new = system.place("alice", &[("widget", 2)]).await.unwrap();
    let order = system.wait_settled(&new, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
    assert_eq!(
        actions(&order),
        [
            "reserve_inventory",
            "charge_payment",
            "audit_order",
            "ship_order"
        ]
    );
    assert_eq!(definition_of(system, &new).await, ("order".to_owned(), 2));
    assert_eq!(auditor.acts_for(&new), 1);
    assert_eq!(auditor.compensations_for(&new), 0);
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 4, "{audit:?}");
}

#[tokio::test]
async fn a_saga_of_an_unknown_version_needs_attention_and_resumes_where_it_was_on_a_replica_that_knows_it()
 {
    let system = &mut spawn_system().await.unwrap();
    seed(system).await;
    system
        .fault(
            "payment",
            SetFaultRequest {
                latency_ms: 2_000,
                ..harness::fault("Charge", "DELAY", tonic::Code::Ok, 1)
            },
        )
        .await
        .unwrap();
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system
        .wait_for(&id, SETTLE, |o| o.status() == OrderStatus::ChargingPayment)
        .await
        .unwrap();
    // The saga was started by a newer binary (v3) than the one that runs
    // next: the row says so.
    system.orchestrator.take().unwrap().crash();
    sqlx::query("UPDATE sagas SET definition_version = 3 WHERE saga_id = $1")
        .bind(&id)
        .execute(&system.pool)
        .await
        .unwrap();
    system.orchestrator = Some(
        spawn_orchestrator(system.database_url(), system.settings.clone())
            .await
            .unwrap(),
    );
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::NeedsAttention, "{order:?}");
    let message = "saga definition order v3 is not known to this replica (it knows v1)";
    assert_eq!(order.failure_reason, message);
    let set_aside = |order: &GetOrderStatusResponse| {
        order
            .history
            .iter()
            .filter(|e| e.step == "definition" && e.detail == message)
            .count()
    };
    assert_eq!(set_aside(&order), 1, "journalled: {:?}", order.history);
    // The replica keeps serving.
    let other = system.place("alice", &[("widget", 1)]).await.unwrap();
    let done = system.wait_settled(&other, SETTLE).await.unwrap();
    assert_eq!(done.status(), OrderStatus::Completed, "{done:?}");
    // Written once: the sweeper's ticks meanwhile did not set it aside again.
    let order = system.status(&id).await.unwrap();
    assert_eq!(set_aside(&order), 1, "{:?}", order.history);
    // A retry here cannot resume it, and says why.
    let retry = RetrySagaRequest {
        saga_id: id.clone(),
        operator: "ops".into(),
        reason: "deployed v3".into(),
    };
    let channel = system.orchestrator.as_ref().unwrap().channel();
    let refused = AdminServiceClient::new(channel)
        .retry_saga(retry.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("order v3"), "{refused:?}");
    // A replica that knows v3: the retry resumes the saga at its charge,
    // where it was, and it completes.
    system.orchestrator.take().unwrap().stop().await.unwrap();
    let mut settings = system.settings.clone();
    settings.executor.registry = Arc::new(Registry::new([&ORDER_SAGA, &ORDER_V3]).unwrap());
    system.orchestrator = Some(
        spawn_orchestrator(system.database_url(), settings)
            .await
            .unwrap(),
    );
    let channel = system.orchestrator.as_ref().unwrap().channel();
    AdminServiceClient::new(channel)
        .retry_saga(retry)
        .await
        .unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
    assert_eq!(order.failure_reason, "");
    let reserves = order
        .history
        .iter()
        .filter(|e| e.step == "reserve_inventory" && e.kind() == StepKind::Action)
        .count();
    assert_eq!(reserves, 1, "resumed, not restarted: {:?}", order.history);
    assert_eq!(
        actions(&order),
        ["reserve_inventory", "charge_payment", "ship_order"]
    );
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 2, "{audit:?}");
}

/// A SQLite file removed when dropped.
struct SqliteFile(std::path::PathBuf);

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// Order v2 with its fourth participant through the real executor and
/// store on `database_url` (the system's own orchestrator stopped): a
/// completed saga, a cancelled one (the in-flight audit, then every
/// attempted step compensated, newest first) and a replica crashed
/// mid-audit whose saga another replica finishes.
async fn four_steps_end_to_end(system: &mut System, database_url: &str) {
    seed(system).await;
    system.orchestrator.take().unwrap().stop().await.unwrap();
    let auditor = Auditor::new();
    let settings = || {
        let mut settings = test_settings(&system.participants);
        settings.executor.registry = Arc::new(Registry::new([&ORDER_SAGA, &ORDER_V2]).unwrap());
        settings
    };
    let adapters = || vec![("auditor", auditor.clone() as Arc<dyn StepAdapter>)];
    system.orchestrator = Some(
        spawn_orchestrator_with_adapters(database_url, settings(), adapters())
            .await
            .unwrap(),
    );

    let completed = system.place("alice", &[("widget", 1)]).await.unwrap();
    let order = system.wait_settled(&completed, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
    assert_eq!(
        actions(&order),
        [
            "reserve_inventory",
            "charge_payment",
            "audit_order",
            "ship_order"
        ]
    );
    assert_eq!(auditor.acts_for(&completed), 1);

    // Cancelled while the audit is in flight.
    auditor.hold(true);
    let cancelled = system.place("alice", &[("widget", 1)]).await.unwrap();
    auditor.wait_act(&cancelled).await.unwrap();
    system
        .orders()
        .cancel_order(CancelOrderRequest {
            order_id: cancelled.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();
    auditor.hold(false);
    let order = system.wait_settled(&cancelled, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Cancelled, "{order:?}");
    // Newest first; the shipment (possibly attempted as far as a state
    // read back knows) gets its tombstone too.
    assert_eq!(
        compensations(&order),
        [
            "ship_order",
            "audit_order",
            "charge_payment",
            "reserve_inventory"
        ]
    );
    assert_eq!(auditor.compensations_for(&cancelled), 1);
    assert!(!actions(&order).contains(&"ship_order".to_owned()));

    // A replica crashed mid-audit; another one finishes the saga.
    auditor.hold(true);
    let recovered = system.place("alice", &[("widget", 1)]).await.unwrap();
    auditor.wait_act(&recovered).await.unwrap();
    system.orchestrator.take().unwrap().crash();
    auditor.hold(false);
    let replica = spawn_orchestrator_with_adapters(database_url, settings(), adapters())
        .await
        .unwrap();
    let replica_id = replica.replica_id().to_owned();
    system.orchestrator = Some(replica);
    let order = system.wait_settled(&recovered, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
    assert_eq!(
        actions(&order),
        [
            "reserve_inventory",
            "charge_payment",
            "audit_order",
            "ship_order"
        ]
    );
    let audit_entry = order
        .history
        .iter()
        .find(|e| e.step == "audit_order" && e.kind() == StepKind::Action)
        .unwrap();
    assert_eq!(audit_entry.actor, replica_id, "the other replica audited");
    assert_eq!(
        auditor.acts_for(&recovered),
        2,
        "sent again after the crash"
    );
    assert_eq!(auditor.compensations_for(&recovered), 0);
}

#[tokio::test]
async fn a_fourth_participant_runs_end_to_end_on_postgres() {
    let system = &mut spawn_system().await.unwrap();
    let url = system.database_url().to_owned();
    four_steps_end_to_end(system, &url).await;
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 2, "{audit:?}");
    assert_eq!(audit.count("CANCELLED"), 1, "{audit:?}");
}

#[tokio::test]
async fn a_fourth_participant_runs_end_to_end_on_sqlite() {
    let system = &mut spawn_system().await.unwrap();
    let file = SqliteFile(std::env::temp_dir().join(format!(
        "saga-definitions-{}-{}.db",
        std::process::id(),
        common::domain::new_id("t")
    )));
    let url = format!("sqlite://{}", file.0.display());
    four_steps_end_to_end(system, &url).await;
    // Stopped before the file goes.
    if let Some(orchestrator) = system.orchestrator.take() {
        orchestrator.stop().await.unwrap();
    }
}
