//! The client side of a run: the catalog (plenty of stock and money, and
//! some that runs out, so some orders are rejected), the seeded order plan,
//! and a client that behaves as a careful user would: it retries PlaceOrder
//! with the same idempotency key (possibly on the other replica) while a
//! replica or the database is down, and records every order id it got.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::inventory::v1::UpsertProductRequest;
use proto::payment::v1::UpsertAccountRequest;
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{
    CancelOrderRequest, GetOrderStatusRequest, OrderItem, OrderStatus, PlaceOrderRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use super::Rng;
use super::cluster::Cluster;
use super::timeline::Timeline;

/// Plenty of stock and money, and some that runs out.
pub const PLENTIFUL: &[(&str, i64)] = &[
    ("apple", 120),
    ("bread", 349),
    ("chair", 4_500),
    ("drill", 8_999),
    ("eraser", 99),
    ("fork", 250),
    ("glove", 1_275),
    ("hammer", 2_199),
];
/// Products of which little is in stock.
pub const SCARCE: &[(&str, i64)] = &[("ivory", 15_000), ("jade", 22_500)];
/// Stock of a scarce product.
pub const SCARCE_STOCK: i64 = 12;
/// Stock of a plentiful product.
pub const PLENTIFUL_STOCK: i64 = 10_000_000;
/// Customers who can afford anything.
pub const RICH: usize = 17;
/// Customers who run out of money.
pub const POOR: usize = 3;
/// The canary's customer and product, used only by recovery probes.
pub const CANARY: &str = "canary";

/// Share of orders cancelled by the client (percent).
pub const CANCEL_PERCENT: u64 = 5;
/// Share of orders aborted by an operator with `sagactl abort` (percent).
pub const ABORT_PERCENT: u64 = 1;

/// What the catalog held before the run, for the audit.
#[derive(Debug, Clone, Default)]
pub struct Initial {
    /// Stock per product.
    pub stock: BTreeMap<String, i64>,
    /// Balance per customer.
    pub balance: BTreeMap<String, i64>,
}

/// Creates the products and accounts (directly on the participants).
pub async fn seed_catalog(cluster: &Cluster) -> Result<Initial> {
    let mut initial = Initial::default();
    let mut inventory = cluster.inventory()?;
    let products = PLENTIFUL
        .iter()
        .map(|(p, price)| (*p, *price, PLENTIFUL_STOCK))
        .chain(SCARCE.iter().map(|(p, price)| (*p, *price, SCARCE_STOCK)))
        .chain([(CANARY, 100, PLENTIFUL_STOCK)]);
    for (product, price, stock) in products {
        inventory
            .upsert_product(UpsertProductRequest {
                product_id: product.into(),
                name: format!("Product {product}"),
                price_cents: price,
                stock,
            })
            .await
            .with_context(|| format!("seeding product {product}"))?;
        initial.stock.insert(product.into(), stock);
    }
    let mut payment = cluster.payment()?;
    let accounts = (0..RICH + POOR)
        .map(|c| {
            let balance = if c < RICH { 1_000_000_000 } else { 60_000 };
            (customer(c), balance)
        })
        .chain([(CANARY.to_owned(), 1_000_000_000_000)]);
    for (customer, balance) in accounts {
        payment
            .upsert_account(UpsertAccountRequest {
                customer_id: customer.clone(),
                balance_cents: balance,
            })
            .await
            .with_context(|| format!("seeding account {customer}"))?;
        initial.balance.insert(customer, balance);
    }
    Ok(initial)
}

fn customer(index: usize) -> String {
    format!("cust{index:02}")
}

/// What the client does with an order after placing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing: wait for it.
    None,
    /// CancelOrder right after PlaceOrder answers.
    CancelAtOnce,
    /// CancelOrder once the saga is past the reservation.
    CancelLater,
    /// `sagactl abort` right after PlaceOrder answers.
    Abort,
}

/// One planned order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Its idempotency key (unique per run and order).
    pub key: String,
    /// Who pays.
    pub customer: String,
    /// What.
    pub items: Vec<(&'static str, i32)>,
    /// What happens to it after placing.
    pub action: Action,
    /// The replica it is placed on first.
    pub replica: usize,
}

/// The orders of a run, from its seed.
pub fn plans(rng: &mut Rng, orders: usize, replicas: usize, seed: u64) -> Vec<Plan> {
    (0..orders)
        .map(|index| {
            let customer = customer(rng.below(RICH + POOR));
            let lines = 1 + rng.below(3);
            let mut items: Vec<(&'static str, i32)> = Vec::with_capacity(lines);
            while items.len() < lines {
                // One item in ten is a scarce product.
                let product = if rng.below(10) == 0 {
                    SCARCE[rng.below(SCARCE.len())].0
                } else {
                    PLENTIFUL[rng.below(PLENTIFUL.len())].0
                };
                if items.iter().all(|(p, _)| *p != product) {
                    items.push((product, 1 + rng.below(5) as i32));
                }
            }
            let roll = rng.next_u64() % 100;
            let action = if roll < CANCEL_PERCENT {
                if rng.below(2) == 0 {
                    Action::CancelAtOnce
                } else {
                    Action::CancelLater
                }
            } else if roll < CANCEL_PERCENT + ABORT_PERCENT {
                Action::Abort
            } else {
                Action::None
            };
            Plan {
                key: format!("chaos-{seed}-{index}"),
                customer,
                items,
                action,
                replica: rng.below(replicas),
            }
        })
        .collect()
}

/// What became of one planned order (or canary) on the client's side.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    /// Its idempotency key.
    pub key: String,
    /// The id PlaceOrder answered, if it ever did.
    pub order_id: Option<String>,
    /// A recovery probe rather than a planned order.
    pub canary: bool,
    /// PlaceOrder calls made.
    pub place_attempts: u32,
    /// CancelOrder's answer, if cancelled.
    pub cancel: Option<String>,
    /// `sagactl abort`'s answer, if aborted.
    pub abort: Option<String>,
}

/// Codes on which a careful client tries again (the same request, with the
/// same idempotency key): the server or its database is away.
pub fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
    )
}

/// Terminal or NEEDS_ATTENTION.
pub fn settled(status: OrderStatus) -> bool {
    crate::settled(status)
}

/// The design's name of a status (`COMPLETED`, ...).
pub fn status_name(status: OrderStatus) -> &'static str {
    status
        .as_str_name()
        .strip_prefix("ORDER_STATUS_")
        .unwrap_or("UNSPECIFIED")
}

/// A request with a deadline, so that a black-holed replica cannot hang
/// the client.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    request
}

/// The client: OrderService on every replica, and sagactl.
#[derive(Debug, Clone)]
pub struct Client {
    replicas: Vec<OrderServiceClient<Channel>>,
    endpoints: Vec<String>,
    sagactl: std::path::PathBuf,
    timeline: Arc<Timeline>,
    records: Arc<Mutex<Vec<OrderRecord>>>,
    canaries: Arc<std::sync::atomic::AtomicU64>,
}

impl Client {
    /// A client of `cluster`'s replicas, recording into `timeline`.
    pub fn new(cluster: &Cluster, timeline: Arc<Timeline>) -> Result<Self> {
        Ok(Self {
            replicas: (0..cluster.orchestrators.len())
                .map(|i| cluster.orders(i))
                .collect::<Result<_>>()?,
            endpoints: cluster
                .orchestrators
                .iter()
                .map(|s| s.endpoint().to_owned())
                .collect(),
            sagactl: cluster.binaries.path("sagactl"),
            timeline,
            records: Arc::default(),
            canaries: Arc::default(),
        })
    }

    /// Every order and canary so far.
    pub fn records(&self) -> Vec<OrderRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn keep(&self, record: OrderRecord) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    /// Places `items` for `customer` with `key`, first on `replica`; on a
    /// transient error tries again with the same key, on the other replica
    /// if `switch`, until `patience` is spent.
    async fn place(
        &self,
        key: &str,
        customer: &str,
        items: &[(&str, i32)],
        replica: usize,
        switch: bool,
        patience: Duration,
    ) -> (Option<String>, u32) {
        let deadline = Instant::now() + patience;
        let mut replica = replica;
        let mut attempts = 0;
        let mut pause = Duration::from_millis(20);
        loop {
            attempts += 1;
            let placed = self.replicas[replica]
                .clone()
                .place_order(request(PlaceOrderRequest {
                    customer_id: customer.into(),
                    items: items
                        .iter()
                        .map(|(product_id, quantity)| OrderItem {
                            product_id: (*product_id).into(),
                            quantity: *quantity,
                        })
                        .collect(),
                    idempotency_key: key.into(),
                }))
                .await;
            match placed {
                Ok(reply) => return (Some(reply.into_inner().order_id), attempts),
                Err(status) if transient(status.code()) && Instant::now() < deadline => {
                    if switch {
                        replica = (replica + 1) % self.replicas.len();
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(status) => {
                    self.timeline.record(
                        "place-gave-up",
                        key,
                        format!("{:?}: {}", status.code(), status.message()),
                    );
                    return (None, attempts);
                }
            }
        }
    }

    /// The order's status, from any replica that answers.
    pub async fn status(&self, order_id: &str, prefer: usize) -> Option<OrderStatus> {
        for offset in 0..self.replicas.len() {
            let replica = (prefer + offset) % self.replicas.len();
            let reply = self.replicas[replica]
                .clone()
                .get_order_status(request(GetOrderStatusRequest {
                    order_id: order_id.into(),
                }))
                .await;
            if let Ok(reply) = reply {
                return Some(reply.into_inner().status());
            }
        }
        None
    }

    /// Polls until the order is settled (its status) or `patience` passes.
    pub async fn wait_settled(
        &self,
        order_id: &str,
        prefer: usize,
        patience: Duration,
    ) -> Option<OrderStatus> {
        self.wait_for(order_id, prefer, patience, settled).await
    }

    async fn wait_for(
        &self,
        order_id: &str,
        prefer: usize,
        patience: Duration,
        done: impl Fn(OrderStatus) -> bool,
    ) -> Option<OrderStatus> {
        let deadline = Instant::now() + patience;
        let mut pause = Duration::from_millis(25);
        loop {
            if let Some(status) = self.status(order_id, prefer).await
                && done(status)
            {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// CancelOrder, retried on transient errors; the answer as text.
    pub async fn cancel(&self, order_id: &str, replica: usize, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        let mut replica = replica;
        loop {
            let reply = self.replicas[replica]
                .clone()
                .cancel_order(request(CancelOrderRequest {
                    order_id: order_id.into(),
                    reason: "chaos: client cancel".into(),
                }))
                .await;
            match reply {
                Ok(reply) => return status_name(reply.into_inner().status()).to_owned(),
                Err(status) if transient(status.code()) && Instant::now() < deadline => {
                    replica = (replica + 1) % self.replicas.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) if status.code() == Code::FailedPrecondition => {
                    return format!("refused: {}", status.message());
                }
                Err(status) => {
                    return format!("error {:?}: {}", status.code(), status.message());
                }
            }
        }
    }

    /// `sagactl abort` (the real binary), retried while no replica answers;
    /// the answer as text.
    pub async fn abort(&self, order_id: &str, replica: usize, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        let mut replica = replica;
        loop {
            let mut command = std::process::Command::new(&self.sagactl);
            command
                .args(["--endpoint", &self.endpoints[replica], "--output", "json"])
                .args(["abort", order_id, "--reason", "chaos: operator abort"])
                .args(["--operator", "chaos"])
                .env_remove("SAGACTL_TOKEN")
                .stdin(std::process::Stdio::null());
            let output = tokio::task::spawn_blocking(move || command.output()).await;
            let output = match output {
                Ok(Ok(output)) => output,
                Ok(Err(error)) => return format!("error: cannot run sagactl: {error}"),
                Err(error) => return format!("error: {error}"),
            };
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            if output.status.success() {
                let status = serde_json::from_str::<serde_json::Value>(&stdout)
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| stdout.trim().to_owned());
                return status;
            }
            let message = stderr.trim().trim_start_matches("sagactl: ").to_owned();
            let retry = [
                "UNAVAILABLE",
                "INTERNAL",
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "cannot reach",
            ]
            .iter()
            .any(|prefix| message.starts_with(prefix));
            if retry && Instant::now() < deadline {
                replica = (replica + 1) % self.replicas.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if message.starts_with("FAILED_PRECONDITION") {
                return format!("refused: {message}");
            }
            return format!("error (exit {}): {message}", output.status);
        }
    }

    /// Runs one planned order: place, maybe cancel or abort, then wait for
    /// it to settle (closed loop), at most `patience`.
    pub async fn run(&self, plan: &Plan, patience: Duration) {
        let (order_id, place_attempts) = self
            .place(
                &plan.key,
                &plan.customer,
                &plan.items,
                plan.replica,
                true,
                Duration::from_secs(120),
            )
            .await;
        let mut record = OrderRecord {
            key: plan.key.clone(),
            order_id: order_id.clone(),
            canary: false,
            place_attempts,
            cancel: None,
            abort: None,
        };
        let Some(order_id) = order_id else {
            self.keep(record);
            return;
        };
        let past_reservation =
            |s: OrderStatus| !matches!(s, OrderStatus::Pending | OrderStatus::ReservingInventory);
        match plan.action {
            Action::None => {}
            Action::CancelAtOnce | Action::CancelLater => {
                if plan.action == Action::CancelLater {
                    self.wait_for(
                        &order_id,
                        plan.replica,
                        Duration::from_secs(10),
                        past_reservation,
                    )
                    .await;
                }
                let answer = self
                    .cancel(&order_id, plan.replica, Duration::from_secs(60))
                    .await;
                self.timeline.record("cancel", &order_id, &answer);
                record.cancel = Some(answer);
            }
            Action::Abort => {
                // At once: starting sagactl takes about as long as a saga
                // without faults, so many aborts still come too late.
                let answer = self
                    .abort(&order_id, plan.replica, Duration::from_secs(60))
                    .await;
                self.timeline.record("abort", &order_id, &answer);
                record.abort = Some(answer);
            }
        }
        self.keep(record);
        self.wait_settled(&order_id, plan.replica, patience).await;
    }

    /// A recovery probe: canary orders through `replica` until one
    /// COMPLETES (others may fail on a fault still armed); the time it took,
    /// or None after `patience`.
    pub async fn canary(&self, replica: usize, patience: Duration) -> Option<Duration> {
        let started = Instant::now();
        let deadline = started + patience;
        while Instant::now() < deadline {
            let n = self
                .canaries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let key = format!("canary-{}-{n}", std::process::id());
            let left = deadline.saturating_duration_since(Instant::now());
            let (order_id, place_attempts) = self
                .place(&key, CANARY, &[(CANARY, 1)], replica, false, left)
                .await;
            self.keep(OrderRecord {
                key,
                order_id: order_id.clone(),
                canary: true,
                place_attempts,
                cancel: None,
                abort: None,
            });
            let order_id = order_id?;
            let left = deadline.saturating_duration_since(Instant::now());
            if self.wait_settled(&order_id, replica, left).await == Some(OrderStatus::Completed) {
                return Some(started.elapsed());
            }
        }
        None
    }
}
