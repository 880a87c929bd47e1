//! The deterministic snapshot scenario: progress the orchestrator committed
//! asynchronously (`synchronous_commit = off`) is lost, as after a power
//! loss, and the saga is then cancelled. Every step the lost progress had
//! attempted must still be compensated.
//!
//! 1. One replica, nothing else in flight; Reserve is delayed 5 s; one
//!    order is placed.
//! 2. While Reserve is delayed (the saga's start is on disk), a base backup
//!    of the orchestrator's PostgreSQL is taken.
//! 3. Charge succeeds; Ship is delayed beyond the step deadline.
//! 4. While the saga is SHIPPING, the instance is crashed, its data
//!    directory replaced by the backup, and started again: a legal state
//!    after a power loss, the progress writes were never flushed.
//! 5. Reserve fails from now on, so the resumed saga cannot replay past it.
//! 6. The client cancels (retrying while the orchestrator reconnects).
//! 7. Once settled: CANCELLED, the balance and the stock back to their
//!    initial values, no active shipment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use participants::Participant;
use proto::fault::v1::{FaultMode, SetFaultRequest};
use proto::inventory::v1::UpsertProductRequest;
use proto::payment::v1::UpsertAccountRequest;
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{
    CancelOrderRequest, GetOrderStatusRequest, OrderItem, OrderStatus, PlaceOrderRequest,
};
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

use super::Binaries;
use super::audit::{self, Databases};
use super::cluster::{Cluster, ClusterOptions, ORCHESTRATOR_DB};
use super::postgres::PgTools;
use super::timeline::{Event, Timeline};
use super::workload::{Initial, OrderRecord, status_name, transient};

/// How the scenario runs.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// The binaries.
    pub binaries: Binaries,
    /// Keep the temp dirs and databases.
    pub keep: bool,
    /// RUST_LOG of the services.
    pub service_log: String,
    /// Print each step as it happens.
    pub echo: bool,
}

/// What the scenario ended with.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotOutcome {
    /// The order.
    pub order_id: String,
    /// Its final status.
    pub status: String,
    /// The customer's balance before and after.
    pub initial_balance: i64,
    /// After.
    pub balance: i64,
    /// The product's stock before.
    pub initial_stock: i64,
    /// Available after.
    pub stock: i64,
    /// Reserved after.
    pub reserved: i64,
    /// The inventory's record of the saga.
    pub reservation: Option<String>,
    /// The payment's record of the saga: state and amount.
    pub charge: Option<(String, i64)>,
    /// The fulfillment's record of the saga.
    pub shipment: Option<String>,
    /// What the chaos suite's audit of invariants 1-5 says of the end state.
    pub audit: Vec<String>,
    /// The steps as they happened.
    pub timeline: Vec<Event>,
}

impl SnapshotOutcome {
    /// What is wrong with the end state, one line each; empty when the
    /// lost progress was compensated.
    pub fn violations(&self) -> Vec<String> {
        let mut violations = Vec::new();
        let id = &self.order_id;
        if self.status != "CANCELLED" {
            violations.push(format!("order {id} ended {}, not CANCELLED", self.status));
        }
        if let Some((state, amount)) = &self.charge
            && state == "CHARGED"
        {
            violations.push(format!(
                "order {id} is {} but the customer is still charged: {amount} cents CHARGED at \
                 the payment service, balance {} instead of {} (the charge made by the progress \
                 lost in the crash was never refunded)",
                self.status, self.balance, self.initial_balance
            ));
        } else if self.balance != self.initial_balance {
            violations.push(format!(
                "the customer's balance is {}, not the initial {}",
                self.balance, self.initial_balance
            ));
        }
        if self.stock != self.initial_stock || self.reserved != 0 {
            violations.push(format!(
                "stock not back: {} available + {} reserved, initially {}",
                self.stock, self.reserved, self.initial_stock
            ));
        }
        if self.shipment.as_deref() == Some("SHIPPED") {
            violations.push(format!("order {id} still has an active shipment"));
        }
        violations.extend(self.audit.iter().map(|v| format!("audit: {v}")));
        violations
    }
}

const PRODUCT: &str = "snapshot-widget";
const PRICE: i64 = 2_500;
const STOCK: i64 = 10;
const CUSTOMER: &str = "snapshot-customer";
const BALANCE: i64 = 100_000;
/// The window for the base backup: wide enough for a loaded 2-core machine.
const RESERVE_DELAY_MS: u32 = 5_000;
const SHIP_DELAY_MS: u32 = 60_000;

fn fault(rpc: &str, mode: FaultMode, code: Code, count: u32, latency_ms: u32) -> SetFaultRequest {
    SetFaultRequest {
        rpc: rpc.into(),
        mode: mode.into(),
        code: code as i32,
        count,
        percent: 0,
        latency_ms,
    }
}

type Orders = OrderServiceClient<Channel>;

async fn status(orders: &Orders, order_id: &str) -> Result<OrderStatus, tonic::Status> {
    let mut request = tonic::Request::new(GetOrderStatusRequest {
        order_id: order_id.into(),
    });
    request.set_timeout(Duration::from_secs(5));
    let reply = orders.clone().get_order_status(request).await?;
    Ok(reply.into_inner().status())
}

async fn wait_for(
    orders: &Orders,
    order_id: &str,
    wanted: &[OrderStatus],
    patience: Duration,
) -> Result<OrderStatus> {
    let deadline = Instant::now() + patience;
    loop {
        let now = status(orders, order_id).await;
        if let Ok(s) = now
            && wanted.contains(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let names: Vec<&str> = wanted.iter().map(|s| status_name(*s)).collect();
            bail!(
                "order {order_id} not {} within {patience:?}: {now:?}",
                names.join(" or ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the scenario (on a multi-thread runtime: the PostgreSQL tools run
/// in `block_in_place`); an error means it could not be carried out (not that
/// the end state is wrong: see [`SnapshotOutcome::violations`]).
pub async fn run(options: &SnapshotOptions) -> Result<SnapshotOutcome> {
    let tools = PgTools::find()?;
    let cluster_options = ClusterOptions {
        replicas: 1,
        // Longer than Reserve's delay, shorter than Ship's.
        step_timeout: Duration::from_secs(8),
        // The saga must neither give up on Ship before the crash nor on
        // Reserve before the cancel.
        step_attempts: 1000,
        compensation_attempts: 1000,
        lease_ttl: Duration::from_secs(2),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        poll_interval: Duration::from_millis(200),
        service_log: options.service_log.clone(),
        keep: options.keep,
    };
    let mut cluster = Cluster::start(&options.binaries, &tools, &cluster_options).await?;
    let timeline = Arc::new(Timeline::new(options.echo));
    let outcome = scenario(&mut cluster, &timeline).await;
    if outcome
        .as_ref()
        .map_or(true, |o| !o.violations().is_empty())
    {
        cluster.keep_logs();
    }
    outcome
}

async fn scenario(cluster: &mut Cluster, timeline: &Timeline) -> Result<SnapshotOutcome> {
    let mut orders = cluster.orders(0)?;
    cluster
        .inventory()?
        .upsert_product(UpsertProductRequest {
            product_id: PRODUCT.into(),
            name: "Snapshot widget".into(),
            price_cents: PRICE,
            stock: STOCK,
        })
        .await
        .context("seeding the product")?;
    cluster
        .payment()?
        .upsert_account(UpsertAccountRequest {
            customer_id: CUSTOMER.into(),
            balance_cents: BALANCE,
        })
        .await
        .context("seeding the account")?;
    let mut inventory_faults = cluster.faults(Participant::Inventory)?;
    let mut fulfillment_faults = cluster.faults(Participant::Fulfillment)?;
    inventory_faults
        .set_fault(fault(
            "Reserve",
            FaultMode::Delay,
            Code::Ok,
            1,
            RESERVE_DELAY_MS,
        ))
        .await?;
    fulfillment_faults
        .set_fault(fault("Ship", FaultMode::Delay, Code::Ok, 0, SHIP_DELAY_MS))
        .await?;
    timeline.record(
        "faults",
        "participants",
        format!(
            "Reserve delayed {RESERVE_DELAY_MS} ms once; every Ship delayed {SHIP_DELAY_MS} ms"
        ),
    );

    // 1. One order.
    let order_id = orders
        .place_order(PlaceOrderRequest {
            customer_id: CUSTOMER.into(),
            items: vec![OrderItem {
                product_id: PRODUCT.into(),
                quantity: 2,
            }],
            idempotency_key: format!("snapshot-{}", std::process::id()),
        })
        .await
        .context("placing the order")?
        .into_inner()
        .order_id;
    timeline.record("place", &order_id, "2 x snapshot-widget");
    // The saga's start is durable; Reserve is in flight (PENDING until its
    // first outcome is written).
    let before = wait_for(
        &orders,
        &order_id,
        &[OrderStatus::Pending, OrderStatus::ReservingInventory],
        Duration::from_secs(10),
    )
    .await?;

    // 2. The snapshot, while Reserve is delayed.
    let db = &cluster.orchestrator_db;
    let snapshot = tokio::task::block_in_place(|| db.snapshot("snapshot"))?;
    let after = status(&orders, &order_id).await;
    timeline.record(
        "pg_basebackup",
        "orchestrator-db",
        format!(
            "taken while the order was {}; now {}",
            status_name(before),
            after.map_or("?", status_name)
        ),
    );

    // 3. Charge succeeds, Ship hangs.
    wait_for(
        &orders,
        &order_id,
        &[OrderStatus::Shipping],
        Duration::from_secs(30),
    )
    .await?;
    let charged: Option<String> =
        sqlx::query_scalar("SELECT state FROM charges WHERE saga_id = $1")
            .bind(&order_id)
            .fetch_optional(cluster.pool(Participant::Payment))
            .await?;
    ensure!(
        charged.as_deref() == Some("CHARGED"),
        "the order is SHIPPING but its charge is {charged:?}"
    );
    timeline.record("shipping", &order_id, "charged; Ship in flight");

    // 4. Power loss: crash, back to the snapshot, start.
    let db = &mut cluster.orchestrator_db;
    tokio::task::block_in_place(|| -> Result<()> {
        db.crash()?;
        db.restore(&snapshot)?;
        db.start()
    })?;
    cluster
        .orchestrator_db
        .wait_ready(ORCHESTRATOR_DB, Duration::from_secs(60))
        .await?;
    let restored: String = sqlx::query_scalar("SELECT status FROM sagas WHERE saga_id = $1")
        .bind(&order_id)
        .fetch_one(&cluster.orchestrator_pool)
        .await
        .context("reading the restored saga")?;
    timeline.record(
        "crash+restore",
        "orchestrator-db",
        format!("pg_ctl stop -m immediate, data dir replaced by the snapshot; the saga reads {restored} there"),
    );
    ensure!(
        matches!(restored.as_str(), "PENDING" | "RESERVING_INVENTORY"),
        "the snapshot already holds the saga's progress ({restored}): it was taken too late \
         (the machine is too slow for the {RESERVE_DELAY_MS} ms window); nothing was lost"
    );

    // 5. Reserve fails from now on.
    inventory_faults
        .set_fault(fault(
            "Reserve",
            FaultMode::FailBefore,
            Code::Unavailable,
            1_000_000,
            0,
        ))
        .await?;
    timeline.record(
        "faults",
        "inventory",
        "Reserve FAIL_BEFORE UNAVAILABLE from now on",
    );

    // 6. Cancel, retrying while the orchestrator reconnects.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let mut request = tonic::Request::new(CancelOrderRequest {
            order_id: order_id.clone(),
            reason: "snapshot scenario: client cancel".into(),
        });
        request.set_timeout(Duration::from_secs(5));
        match orders.cancel_order(request).await {
            Ok(reply) => break status_name(reply.into_inner().status()).to_owned(),
            Err(s) if transient(s.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("CancelOrder failed: {:?}: {}", s.code(), s.message()),
        }
    };
    timeline.record("cancel", &order_id, answer);

    // 7. Settled: read the end state from the databases.
    let deadline = Instant::now() + Duration::from_secs(120);
    let final_status = loop {
        let now = status(&orders, &order_id).await;
        if let Ok(s) = now
            && crate::settled(s)
        {
            break status_name(s).to_owned();
        }
        if Instant::now() > deadline {
            bail!("order {order_id} not settled within 120 s after the cancel: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    timeline.record("settled", &order_id, &final_status);

    let payment = cluster.pool(Participant::Payment);
    let balance: i64 =
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(CUSTOMER)
            .fetch_one(payment)
            .await?;
    let charge: Option<(String, i64)> =
        sqlx::query_as("SELECT state, amount_cents FROM charges WHERE saga_id = $1")
            .bind(&order_id)
            .fetch_optional(payment)
            .await?;
    let inventory = cluster.pool(Participant::Inventory);
    let (stock, reserved): (i64, i64) =
        sqlx::query_as("SELECT stock, reserved FROM products WHERE product_id = $1")
            .bind(PRODUCT)
            .fetch_one(inventory)
            .await?;
    let reservation: Option<String> =
        sqlx::query_scalar("SELECT state FROM reservations WHERE saga_id = $1")
            .bind(&order_id)
            .fetch_optional(inventory)
            .await?;
    let shipment: Option<String> =
        sqlx::query_scalar("SELECT state FROM shipments WHERE saga_id = $1")
            .bind(&order_id)
            .fetch_optional(cluster.pool(Participant::Fulfillment))
            .await?;
    let initial = Initial {
        stock: [(PRODUCT.to_owned(), STOCK)].into(),
        balance: [(CUSTOMER.to_owned(), BALANCE)].into(),
    };
    let records = [OrderRecord {
        key: String::new(),
        order_id: Some(order_id.clone()),
        canary: false,
        place_attempts: 1,
        cancel: None,
        abort: None,
    }];
    let audit = audit::audit(Databases::of(cluster), &initial, &records)
        .await?
        .violations;
    Ok(SnapshotOutcome {
        audit,
        order_id,
        status: final_status,
        initial_balance: BALANCE,
        balance,
        initial_stock: STOCK,
        stock,
        reserved,
        reservation,
        charge,
        shipment,
        timeline: timeline.events(),
    })
}
