//! `sagactl bench`: the load generator. Seeds its own products and accounts
//! through the participants, places orders through OrderService, follows
//! each saga to its end with WatchOrder (one stream per saga, pushed by the
//! orchestrator: cheaper for it than polling), and reports throughput and
//! an HDR histogram of end-to-end latency.
//!
//! Closed loop (`--concurrency C --orders N`): C workers, each placing its
//! next order when the previous one ended. Open loop (`--rate R --duration
//! D`): arrivals at a fixed rate whatever the system does, to show a spike
//! beyond capacity: shed orders answer RESOURCE_EXHAUSTED fast, accepted
//! ones still finish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cli::parse_duration;
use common::domain::random_u64;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use proto::inventory::v1::UpsertProductRequest;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::payment::v1::UpsertAccountRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::saga::v1 as pb;
use proto::saga::v1::order_service_client::OrderServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use super::{Done, Failure, failed, render::table};

/// Flags of `sagactl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Closed loop: workers, each with one order in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Closed loop: orders in all.
    #[arg(long, default_value_t = 1000)]
    pub orders: u64,
    /// Open loop: orders per second (replaces --concurrency/--orders).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: how long to keep placing orders.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Inventory participant, for seeding products.
    #[arg(
        long,
        env = "SAGACTL_INVENTORY_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub inventory_url: String,
    /// Payment participant, for seeding accounts.
    #[arg(
        long,
        env = "SAGACTL_PAYMENT_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub payment_url: String,
    /// Products to spread orders over (fewer means hotter rows).
    #[arg(long, default_value_t = 64)]
    pub products: usize,
    /// Customers to spread orders over.
    #[arg(long, default_value_t = 256)]
    pub customers: usize,
    /// Stock of each product.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub stock: i64,
    /// Balance of each customer, in cents.
    #[arg(long, default_value_t = 1_000_000_000_000)]
    pub balance: i64,
    /// Share of orders (0..100) placed by a customer who cannot pay, so
    /// they fail and compensate.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub fail_percent: u32,
    /// Distinct products per order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub items: u64,
    /// Connections to the orchestrator (streams are spread over them).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Give up on a saga that has not ended after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub saga_timeout: Duration,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Only place orders; do not follow them to their end (for filling the
    /// orchestrator with sagas in flight).
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(Default)]
struct Tally {
    placed: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    other: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    run: String,
    args: BenchArgs,
    clients: Vec<OrderServiceClient<Channel>>,
    tally: Tally,
    /// End-to-end saga latency, microseconds.
    saga: Mutex<Histogram<u64>>,
    /// PlaceOrder latency (accepted and rejected), microseconds.
    place: Mutex<Histogram<u64>>,
    progress: ProgressBar,
    first_error: Mutex<Option<String>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(histogram: &Mutex<Histogram<u64>>, elapsed: Duration) {
    let micros = (elapsed.as_micros() as u64).clamp(1, 3_600_000_000);
    let _ = histogram
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(micros);
}

async fn connect(
    url: &str,
    flag: &str,
    what: &str,
    tls: Option<&common::tls::Client>,
) -> Result<Channel, Failure> {
    crate::connect_channel(url, flag, what, tls, |endpoint| endpoint.tcp_nodelay(true)).await
}

impl Shared {
    fn customer(&self) -> String {
        if self.args.fail_percent > 0 && random_u64() % 100 < u64::from(self.args.fail_percent) {
            format!("{}-broke", self.run)
        } else {
            format!(
                "{}-c{}",
                self.run,
                random_u64() % self.args.customers as u64
            )
        }
    }

    fn items(&self) -> Vec<pb::OrderItem> {
        let products = self.args.products as u64;
        let first = random_u64() % products;
        (0..self.args.items.min(products))
            .map(|i| pb::OrderItem {
                product_id: format!("{}-p{}", self.run, (first + i) % products),
                quantity: 1,
            })
            .collect()
    }

    fn note_error(&self, message: String) {
        self.tally.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(message);
    }

    /// Places one order and follows it to its end.
    async fn one_order(&self, n: u64) {
        let mut client = self.clients[n as usize % self.clients.len()].clone();
        let started = Instant::now();
        let placed = client
            .place_order(pb::PlaceOrderRequest {
                customer_id: self.customer(),
                items: self.items(),
                idempotency_key: String::new(),
            })
            .await;
        record(&self.place, started.elapsed());
        let order_id = match placed {
            Ok(reply) => reply.into_inner().order_id,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                self.tally.rejected.fetch_add(1, Ordering::Relaxed);
                self.progress.inc(1);
                return;
            }
            Err(status) => {
                self.note_error(format!("PlaceOrder: {status}"));
                self.progress.inc(1);
                return;
            }
        };
        self.tally.placed.fetch_add(1, Ordering::Relaxed);
        if self.args.no_follow {
            self.progress.inc(1);
            return;
        }
        let ended = tokio::time::timeout(self.args.saga_timeout, async {
            let mut stream = client
                .watch_order(pb::WatchOrderRequest {
                    order_id: order_id.clone(),
                })
                .await?
                .into_inner();
            let mut last = pb::OrderStatus::Unspecified;
            while let Some(update) = stream.message().await? {
                last = update.status();
            }
            Ok::<_, tonic::Status>(last)
        })
        .await;
        match ended {
            Ok(Ok(pb::OrderStatus::Completed)) => {
                record(&self.saga, started.elapsed());
                self.tally.completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(pb::OrderStatus::Failed)) => {
                record(&self.saga, started.elapsed());
                self.tally.failed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(other)) => {
                self.tally.other.fetch_add(1, Ordering::Relaxed);
                self.note_error(format!("order {order_id} ended {}", other.as_str_name()));
            }
            Ok(Err(status)) => self.note_error(format!("WatchOrder {order_id}: {status}")),
            Err(_) => self.note_error(format!(
                "order {order_id} did not end within {:?}",
                self.args.saga_timeout
            )),
        }
        self.progress.inc(1);
    }
}

/// Seeds products and accounts for this run.
async fn seed(
    args: &BenchArgs,
    run: &str,
    tls: Option<&common::tls::Client>,
) -> Result<(), Failure> {
    let mut inventory = InventoryServiceClient::new(
        connect(&args.inventory_url, "--inventory-url", "inventory", tls).await?,
    );
    let mut payment = PaymentServiceClient::new(
        connect(&args.payment_url, "--payment-url", "payment", tls).await?,
    );
    let seeding = |e: tonic::Status| {
        failed(format!(
            "seeding the participants failed: {}: {}{}",
            orchestrator::clients::code_name(e.code()),
            e.message(),
            crate::connection_dropped_hint(&args.inventory_url, tls).unwrap_or_default()
        ))
    };
    for p in 0..args.products {
        inventory
            .upsert_product(UpsertProductRequest {
                product_id: format!("{run}-p{p}"),
                name: format!("bench product {p}"),
                price_cents: 100 + (p as i64 % 10) * 25,
                stock: args.stock,
            })
            .await
            .map_err(seeding)?;
    }
    for c in 0..args.customers {
        payment
            .upsert_account(UpsertAccountRequest {
                customer_id: format!("{run}-c{c}"),
                balance_cents: args.balance,
            })
            .await
            .map_err(seeding)?;
    }
    payment
        .upsert_account(UpsertAccountRequest {
            customer_id: format!("{run}-broke"),
            balance_cents: 0,
        })
        .await
        .map_err(seeding)?;
    Ok(())
}

/// Runs the benchmark against the orchestrator at `endpoint` (and the
/// participants at `--inventory-url` and `--payment-url`), over TLS with
/// `tls` for https:// URLs.
pub async fn run(
    endpoint: &str,
    tls: Option<&common::tls::Client>,
    args: BenchArgs,
    json_only: bool,
) -> Result<Done, Failure> {
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate.is_finite())
    {
        return Err(Failure {
            message: "--rate must be a positive number of orders per second".into(),
            code: 2,
        });
    }
    if args.concurrency == 0 || args.products == 0 || args.customers == 0 || args.connections == 0 {
        return Err(Failure {
            message: "--concurrency, --products, --customers and --connections must be at least 1"
                .into(),
            code: 2,
        });
    }
    let run = format!("bench{:x}", random_u64() & 0xff_ffff);
    seed(&args, &run, tls).await?;
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(OrderServiceClient::new(
            connect(endpoint, "--endpoint", "orchestrator", tls).await?,
        ));
    }
    let expected = match args.rate {
        Some(rate) => (rate * args.duration.as_secs_f64()).round() as u64,
        None => args.orders,
    };
    let progress = if args.quiet || json_only {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(expected);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} sagas ({per_sec}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let shared = Arc::new(Shared {
        run,
        args: args.clone(),
        clients,
        tally: Tally::default(),
        saga: Mutex::new(histogram()),
        place: Mutex::new(histogram()),
        progress,
        first_error: Mutex::new(None),
    });

    let started = Instant::now();
    let mode = match args.rate {
        None => {
            let next = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..args.concurrency)
                .map(|_| {
                    let shared = shared.clone();
                    let next = next.clone();
                    tokio::spawn(async move {
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= shared.args.orders {
                                return;
                            }
                            shared.one_order(n).await;
                        }
                    })
                })
                .collect();
            for worker in workers {
                let _ = worker.await;
            }
            json!({"mode": "closed", "concurrency": args.concurrency})
        }
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..expected {
                tick.tick().await;
                let shared = shared.clone();
                tasks.spawn(async move { shared.one_order(n).await });
            }
            while tasks.join_next().await.is_some() {}
            json!({"mode": "open", "rate": rate, "duration_seconds": args.duration.as_secs_f64()})
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    shared.progress.finish_and_clear();

    let t = &shared.tally;
    let (completed, failed_count) = (
        t.completed.load(Ordering::Relaxed),
        t.failed.load(Ordering::Relaxed),
    );
    let saga = shared
        .saga
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let place = shared
        .place
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ms = |h: &Histogram<u64>, q: f64| {
        (h.value_at_quantile(q) as f64 / 1000.0 * 100.0).round() / 100.0
    };
    let ended = completed + failed_count;
    let summary = json!({
        "bench": mode,
        "orders": expected,
        "placed": t.placed.load(Ordering::Relaxed),
        "completed": completed,
        "failed": failed_count,
        "rejected": t.rejected.load(Ordering::Relaxed),
        "errors": t.errors.load(Ordering::Relaxed),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "sagas_per_second": ((ended as f64 / seconds) * 10.0).round() / 10.0,
        "latency_ms": {
            "p50": ms(&saga, 0.5), "p90": ms(&saga, 0.9), "p99": ms(&saga, 0.99),
            "max": (saga.max() as f64 / 10.0).round() / 100.0,
        },
        "place_order_ms": { "p50": ms(&place, 0.5), "p99": ms(&place, 0.99) },
    });
    let mut stdout = String::new();
    if !json_only {
        let rows = vec![
            vec!["orders".into(), expected.to_string()],
            vec!["completed".into(), completed.to_string()],
            vec!["failed (compensated)".into(), failed_count.to_string()],
            vec![
                "rejected (RESOURCE_EXHAUSTED)".into(),
                t.rejected.load(Ordering::Relaxed).to_string(),
            ],
            vec![
                "errors".into(),
                t.errors.load(Ordering::Relaxed).to_string(),
            ],
            vec!["seconds".into(), format!("{seconds:.2}")],
            vec!["sagas/s".into(), format!("{:.1}", ended as f64 / seconds)],
            vec![
                "saga latency p50 / p90 / p99 / max".into(),
                format!(
                    "{} / {} / {} / {} ms",
                    ms(&saga, 0.5),
                    ms(&saga, 0.9),
                    ms(&saga, 0.99),
                    saga.max() as f64 / 1000.0
                ),
            ],
            vec![
                "PlaceOrder p50 / p99".into(),
                format!("{} / {} ms", ms(&place, 0.5), ms(&place, 0.99)),
            ],
        ];
        stdout.push_str(&table(&["METRIC", "VALUE"], &rows));
        if let Some(error) = shared
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            stdout.push_str(&format!("first error: {error}\n"));
        }
    }
    stdout.push_str(&summary.to_string());
    stdout.push('\n');
    let code = u8::from(t.errors.load(Ordering::Relaxed) > 0) * 3;
    Ok(Done { stdout, code })
}
