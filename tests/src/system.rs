//! The whole system in one test: the three participants (fault injection
//! on), an orchestrator on a database of its own, helpers to seed, place and
//! wait, and the audit of the design's invariants.
//!
//! Each orchestrator runs on a tokio runtime of its own, so a test can kill
//! one abruptly ([`SpawnedOrchestrator::crash`]): every task of it stops
//! mid-await, no lease is handed back, as after a SIGKILL.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use orchestrator::clients::{GrpcParticipants, ParticipantUrls, StepAdapter};
use orchestrator::config::Settings;
use orchestrator::executor::ExecutorConfig;
use orchestrator::saga::Policy;
use orchestrator::store::SagaStore;
use participants::ServeOptions;
use proto::fault::v1::{ClearFaultsRequest, SetFaultRequest};
use proto::inventory::v1::{GetStockRequest, UpsertProductRequest};
use proto::payment::v1::{GetAccountRequest, UpsertAccountRequest};
use proto::saga::v1::admin_service_client::AdminServiceClient;
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{
    GetOrderStatusRequest, GetOrderStatusResponse, OrderItem, OrderStatus, PlaceOrderRequest,
};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::{Participants, SpawnedParticipant, TestDb, spawn_participants};

/// Orchestrator settings for tests: 2 s call deadline, fast backoff
/// (10 ms doubling to 200 ms), 5 attempts per step and per compensation,
/// 2 s leases, a sweeper every 100 ms.
pub fn test_settings(participants: &Participants) -> Settings {
    static REPLICA: AtomicU32 = AtomicU32::new(0);
    Settings {
        executor: ExecutorConfig {
            replica_id: format!("test-replica-{}", REPLICA.fetch_add(1, Ordering::Relaxed)),
            policy: Policy {
                action_attempts: 5,
                compensation_attempts: 5,
            },
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            max_in_flight: 10_000,
            max_watches: orchestrator::config::DEFAULT_MAX_WATCHES,
            registry: Arc::default(),
        },
        participants: ParticipantUrls {
            inventory: participants.inventory.endpoint().to_owned(),
            payment: participants.payment.endpoint().to_owned(),
            fulfillment: participants.fulfillment.endpoint().to_owned(),
            tls: None,
        },
        step_timeout: Duration::from_secs(2),
        max_participant_calls: orchestrator::clients::DEFAULT_MAX_CALLS,
        admin: orchestrator::auth::AdminTokens::open(),
        limits: common::limits::Limits::default(),
        reconcile_timeout: orchestrator::config::DEFAULT_RECONCILE_TIMEOUT,
        stuck_after: Duration::from_secs(60),
        retention: orchestrator::prune::Retention::default(),
        shutdown_grace: Duration::from_secs(5),
        connection_idle_timeout: common::listen::DEFAULT_IDLE_TIMEOUT,
        tls: None,
    }
}

/// An orchestrator on a runtime of its own.
#[derive(Debug)]
pub struct SpawnedOrchestrator {
    endpoint: String,
    http_address: std::net::SocketAddr,
    channel: Channel,
    replica_id: String,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<Result<(), String>>>,
}

/// Starts an orchestrator with `settings` on the database at `database_url`,
/// on 127.0.0.1:0; returns once its store is migrated and it listens.
pub async fn spawn_orchestrator(
    database_url: &str,
    settings: Settings,
) -> Result<SpawnedOrchestrator> {
    spawn_orchestrator_wrapped(database_url, settings, |store| store).await
}

/// Like [`spawn_orchestrator`], serving with `settings.tls`: its endpoint
/// is `https://` and the test's own channel to it trusts what `client`
/// trusts.
pub async fn spawn_orchestrator_tls(
    database_url: &str,
    settings: Settings,
    client: common::tls::Client,
) -> Result<SpawnedOrchestrator> {
    spawn_orchestrator_full(
        database_url,
        settings,
        |store| store,
        Vec::new(),
        Some(client),
    )
    .await
}

/// Like [`spawn_orchestrator`], with its store wrapped by `wrap` (e.g. a
/// [`crate::LossyStore`]).
pub async fn spawn_orchestrator_wrapped(
    database_url: &str,
    settings: Settings,
    wrap: impl FnOnce(Arc<dyn SagaStore>) -> Arc<dyn SagaStore> + Send + 'static,
) -> Result<SpawnedOrchestrator> {
    spawn_orchestrator_full(database_url, settings, wrap, Vec::new(), None).await
}

/// Like [`spawn_orchestrator`], with more participants: each adapter
/// serves the steps of the participant it is named for (in-process, for
/// definitions with participants beyond the order saga's three).
pub async fn spawn_orchestrator_with_adapters(
    database_url: &str,
    settings: Settings,
    adapters: Vec<(&'static str, Arc<dyn StepAdapter>)>,
) -> Result<SpawnedOrchestrator> {
    spawn_orchestrator_full(database_url, settings, |store| store, adapters, None).await
}

async fn spawn_orchestrator_full(
    database_url: &str,
    settings: Settings,
    wrap: impl FnOnce(Arc<dyn SagaStore>) -> Arc<dyn SagaStore> + Send + 'static,
    adapters: Vec<(&'static str, Arc<dyn StepAdapter>)>,
    client: Option<common::tls::Client>,
) -> Result<SpawnedOrchestrator> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let endpoint = format!("{scheme}://{}", listener.local_addr()?);
    // The probes and metrics port, as `--http-listen` gives one.
    let http = std::net::TcpListener::bind("127.0.0.1:0")?;
    http.set_nonblocking(true)?;
    let http_address = http.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel();
    let url = database_url.to_owned();
    let replica_id = settings.executor.replica_id.clone();
    runtime.spawn(async move {
        let result = async {
            let store = orchestrator::server::connect(
                &url,
                crate::ORCHESTRATOR_CONNECTIONS,
                Duration::from_secs(10),
            )
            .await?;
            let store = wrap(store);
            let calls = adapters.into_iter().fold(
                GrpcParticipants::new(&settings.participants, settings.step_timeout)?,
                |calls, (name, adapter)| calls.with_adapter(name, adapter),
            );
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| orchestrator::Error::invalid(e.to_string()))?;
            let http = tokio::net::TcpListener::from_std(http)
                .map_err(|e| orchestrator::Error::invalid(e.to_string()))?;
            let _ = ready_tx.send(());
            orchestrator::server::serve(
                store,
                Arc::new(calls),
                settings,
                listener,
                Some(http),
                async {
                    let _ = shutdown_rx.await;
                },
            )
            .await
        }
        .await;
        let _ = done_tx.send(result.map_err(|e| e.to_string()));
    });
    let mut done = done_rx;
    if ready_rx.await.is_err() {
        let error = (&mut done)
            .await
            .unwrap_or_else(|_| Err("no result".into()));
        runtime.shutdown_background();
        bail!("orchestrator failed to start: {error:?}");
    }
    let channel = common::tls::endpoint(&endpoint, client.as_ref(), "a test CA")
        .map_err(anyhow::Error::msg)?
        .connect()
        .await?;
    Ok(SpawnedOrchestrator {
        endpoint,
        http_address,
        channel,
        replica_id,
        runtime: Some(runtime),
        shutdown: Some(shutdown_tx),
        done: Some(done),
    })
}

impl SpawnedOrchestrator {
    /// Its URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Its HTTP port (/healthz, /readyz, /metrics).
    pub fn http_address(&self) -> std::net::SocketAddr {
        self.http_address
    }

    /// Its replica id (the lease owner name).
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// An OrderService client.
    pub fn orders(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel.clone())
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Stops it gracefully (SIGTERM semantics) and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let done = self.done.take().context("already stopped")?;
        let result = tokio::time::timeout(Duration::from_secs(30), done)
            .await
            .context("orchestrator did not stop within 30 s")?
            .context("orchestrator task vanished")?;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        result.map_err(anyhow::Error::msg)
    }

    /// Kills it abruptly: every task stops where it is; nothing is handed
    /// back (SIGKILL semantics).
    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for SpawnedOrchestrator {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Participants, orchestrators and what was seeded, for one test.
#[derive(Debug)]
pub struct System {
    /// The participants (fault injection on).
    pub participants: Participants,
    /// The orchestrator this system started with (tests may add more).
    pub orchestrator: Option<SpawnedOrchestrator>,
    /// The orchestrator's settings.
    pub settings: Settings,
    /// A pool on the orchestrator's database, for assertions.
    pub pool: PgPool,
    initial_stock: Mutex<BTreeMap<String, i64>>,
    initial_balance: Mutex<BTreeMap<String, i64>>,
    // Last: dropped after the services.
    db: TestDb,
}

/// Starts the participants and one orchestrator with [`test_settings`].
pub async fn spawn_system() -> Result<System> {
    spawn_system_with(|_| {}).await
}

/// Like [`spawn_system`], with the orchestrator's settings adjusted.
pub async fn spawn_system_with(adjust: impl FnOnce(&mut Settings)) -> Result<System> {
    let participants = spawn_participants(ServeOptions {
        fault_injection: true,
        ..ServeOptions::default()
    })
    .await?;
    assemble(participants, adjust, None).await
}

/// Like [`spawn_system`], every hop over TLS with the first CA of
/// `certs`: the participants (requiring client certificates when `mtls`),
/// the orchestrator's ports, and its calls to the participants (presenting
/// the client certificate when `client_certificate`). The test's own
/// channels present the client certificate to the participants and trust
/// the CA.
pub async fn spawn_tls_system(
    certs: &crate::tls::TestCerts,
    mtls: bool,
    client_certificate: bool,
) -> Result<System> {
    let participants = crate::spawn_participants_tls(
        ServeOptions {
            fault_injection: true,
            tls: Some(certs.server(mtls)?),
            ..ServeOptions::default()
        },
        certs.client(true)?,
    )
    .await?;
    let orchestrator_tls = certs.server(false)?;
    let participant_tls = certs.client(client_certificate)?;
    assemble(
        participants,
        |settings| {
            settings.tls = Some(orchestrator_tls);
            settings.participants.tls = Some(participant_tls);
        },
        Some(certs.client(false)?),
    )
    .await
}

/// A system of `participants` and one orchestrator with [`test_settings`]
/// adjusted, reached with `client` when it serves TLS.
async fn assemble(
    participants: Participants,
    adjust: impl FnOnce(&mut Settings),
    client: Option<common::tls::Client>,
) -> Result<System> {
    let db = TestDb::create("orchestrator").await?;
    let mut settings = test_settings(&participants);
    adjust(&mut settings);
    let orchestrator = spawn_orchestrator_full(
        db.url(),
        settings.clone(),
        |store| store,
        Vec::new(),
        client,
    )
    .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db.url())
        .await?;
    Ok(System {
        participants,
        orchestrator: Some(orchestrator),
        settings,
        pool,
        initial_stock: Mutex::default(),
        initial_balance: Mutex::default(),
        db,
    })
}

impl System {
    /// The orchestrator's database URL (for more replicas).
    pub fn database_url(&self) -> &str {
        self.db.url()
    }

    /// An OrderService client on the first orchestrator.
    pub fn orders(&self) -> OrderServiceClient<Channel> {
        self.orchestrator
            .as_ref()
            .expect("orchestrator running")
            .orders()
    }

    /// An AdminService client on the first orchestrator.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(
            self.orchestrator
                .as_ref()
                .expect("orchestrator running")
                .channel(),
        )
    }

    /// Moves a finished saga's finish `seconds` into the past (to make it
    /// due for the pruner).
    pub async fn age_finish(&self, saga_id: &str, seconds: f64) -> Result<()> {
        sqlx::query(
            "UPDATE sagas SET finished_at = finished_at - make_interval(secs => $1)
             WHERE saga_id = $2 AND finished_at IS NOT NULL",
        )
        .bind(seconds)
        .bind(saga_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many sagas the orchestrator's database holds.
    pub async fn saga_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM sagas")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Starts another orchestrator on the same database, with its own
    /// replica id and the same settings otherwise.
    pub async fn spawn_replica(&self) -> Result<SpawnedOrchestrator> {
        let mut settings = test_settings(&self.participants);
        settings.executor.policy = self.settings.executor.policy;
        spawn_orchestrator(self.db.url(), settings).await
    }

    /// Like [`System::spawn_replica`], with the replica's settings adjusted
    /// (e.g. the first orchestrator's backoff).
    pub async fn spawn_replica_with(
        &self,
        adjust: impl FnOnce(&mut Settings),
    ) -> Result<SpawnedOrchestrator> {
        let mut settings = test_settings(&self.participants);
        settings.executor.policy = self.settings.executor.policy;
        adjust(&mut settings);
        spawn_orchestrator(self.db.url(), settings).await
    }

    /// Creates a product (and remembers its stock for the audit).
    pub async fn seed_product(&self, product_id: &str, price_cents: i64, stock: i64) -> Result<()> {
        self.participants
            .inventory
            .inventory()
            .upsert_product(UpsertProductRequest {
                product_id: product_id.into(),
                name: format!("Product {product_id}"),
                price_cents,
                stock,
            })
            .await?;
        self.initial_stock
            .lock()
            .unwrap()
            .insert(product_id.into(), stock);
        Ok(())
    }

    /// Creates an account (and remembers its balance for the audit).
    pub async fn seed_account(&self, customer_id: &str, balance_cents: i64) -> Result<()> {
        self.participants
            .payment
            .payment()
            .upsert_account(UpsertAccountRequest {
                customer_id: customer_id.into(),
                balance_cents,
            })
            .await?;
        self.initial_balance
            .lock()
            .unwrap()
            .insert(customer_id.into(), balance_cents);
        Ok(())
    }

    /// Places an order; returns its id.
    pub async fn place(&self, customer_id: &str, items: &[(&str, i32)]) -> Result<String> {
        Ok(self
            .orders()
            .place_order(place_request(customer_id, items, ""))
            .await?
            .into_inner()
            .order_id)
    }

    /// Reads an order.
    pub async fn status(&self, order_id: &str) -> Result<GetOrderStatusResponse> {
        Ok(self
            .orders()
            .get_order_status(GetOrderStatusRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner())
    }

    /// Polls the order until it is terminal or NEEDS_ATTENTION.
    pub async fn wait_settled(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> Result<GetOrderStatusResponse> {
        self.wait_for(order_id, timeout, |s| settled(s.status()))
            .await
    }

    /// Polls the order until `done` holds for it.
    pub async fn wait_for(
        &self,
        order_id: &str,
        timeout: Duration,
        done: impl Fn(&GetOrderStatusResponse) -> bool,
    ) -> Result<GetOrderStatusResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(order_id).await?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "order {order_id} still {:?} after {timeout:?}",
                    status.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every saga in the database is settled.
    pub async fn wait_all_settled(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let active: Vec<(String, String)> = sqlx::query_as(
                "SELECT saga_id, status FROM sagas
                 WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')
                 LIMIT 5",
            )
            .fetch_all(&self.pool)
            .await?;
            if active.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sagas still active after {timeout:?}, e.g. {active:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The participant serving `name` ("inventory", "payment", "fulfillment").
    pub fn participant(&self, name: &str) -> &SpawnedParticipant {
        match name {
            "inventory" => &self.participants.inventory,
            "payment" => &self.participants.payment,
            "fulfillment" => &self.participants.fulfillment,
            other => panic!("no participant {other}"),
        }
    }

    /// Arms a fault on a participant.
    pub async fn fault(&self, participant: &str, fault: SetFaultRequest) -> Result<()> {
        self.participant(participant)
            .faults()
            .set_fault(fault)
            .await?;
        Ok(())
    }

    /// Makes the next sagas need an operator: payment refuses every Charge
    /// (so the saga compensates) and inventory's Release keeps failing
    /// (so the compensation runs out of budget: NEEDS_ATTENTION).
    pub async fn fail_compensations(&self) -> Result<()> {
        self.fault(
            "payment",
            fault("Charge", "FAIL_BEFORE", tonic::Code::FailedPrecondition, 0),
        )
        .await?;
        self.fault(
            "inventory",
            fault("Release", "FAIL_BEFORE", tonic::Code::Unavailable, 0),
        )
        .await
    }

    /// Clears every fault on every participant.
    pub async fn clear_faults(&self) -> Result<()> {
        for p in [
            &self.participants.inventory,
            &self.participants.payment,
            &self.participants.fulfillment,
        ] {
            p.faults().clear_faults(ClearFaultsRequest {}).await?;
        }
        Ok(())
    }

    /// Available stock of a product.
    pub async fn stock(&self, product_id: &str) -> Result<(i64, i64)> {
        let s = self
            .participants
            .inventory
            .inventory()
            .get_stock(GetStockRequest {
                product_id: product_id.into(),
            })
            .await?
            .into_inner();
        Ok((s.stock, s.reserved))
    }

    /// Balance of an account.
    pub async fn balance(&self, customer_id: &str) -> Result<i64> {
        Ok(self
            .participants
            .payment
            .payment()
            .get_account(GetAccountRequest {
                customer_id: customer_id.into(),
            })
            .await?
            .into_inner()
            .balance_cents)
    }

    /// Journal rows of one saga.
    pub async fn journal_rows(&self, order_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM saga_journal WHERE saga_id = $1")
                .bind(order_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The payment participant's record of the saga (CHARGED, REFUNDED,
    /// TOMBSTONE), if any.
    pub async fn charge_state(&self, order_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT state FROM charges WHERE saga_id = $1")
                .bind(order_id)
                .fetch_optional(self.participants.payment.pool())
                .await?,
        )
    }

    /// Checks the design's invariants over every saga in the database and
    /// every seeded product and account; the error says which one broke.
    pub async fn audit(&self) -> Result<Audit> {
        let sagas: Vec<SagaRow> = sqlx::query_as(
            "SELECT saga_id, customer_id, items, status, total_amount_cents FROM sagas",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut audit = Audit::default();
        let mut reserved_by_product: HashMap<String, i64> = HashMap::new();
        let mut spent_by_customer: HashMap<String, i64> = HashMap::new();

        let reservations = states(self.participants.inventory.pool(), "reservations").await?;
        let charges: HashMap<String, (String, i64)> = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT saga_id, state, amount_cents FROM charges",
        )
        .fetch_all(self.participants.payment.pool())
        .await?
        .into_iter()
        .map(|(saga, state, amount)| (saga, (state, amount)))
        .collect();
        let shipments = states(self.participants.fulfillment.pool(), "shipments").await?;

        for SagaRow {
            saga_id,
            customer_id,
            items,
            status,
            total_amount_cents: total,
        } in &sagas
        {
            *audit.by_status.entry(status.clone()).or_default() += 1;
            let reservation = reservations.get(saga_id).map(String::as_str);
            let charge = charges.get(saga_id);
            let shipment = shipments.get(saga_id).map(String::as_str);
            match status.as_str() {
                "COMPLETED" => {
                    ensure!(
                        reservation == Some("ACTIVE"),
                        "completed {saga_id}: reservation {reservation:?}"
                    );
                    ensure!(
                        matches!(charge, Some((state, amount)) if state == "CHARGED" && amount == total),
                        "completed {saga_id} (total {total}): charge {charge:?}"
                    );
                    ensure!(
                        shipment == Some("SHIPPED"),
                        "completed {saga_id}: shipment {shipment:?}"
                    );
                    for item in &items.0 {
                        *reserved_by_product
                            .entry(item.product_id.clone())
                            .or_default() += i64::from(item.quantity);
                    }
                    *spent_by_customer.entry(customer_id.clone()).or_default() += total;
                }
                "FAILED" | "CANCELLED" => {
                    ensure!(
                        reservation != Some("ACTIVE"),
                        "{status} {saga_id} still holds a reservation"
                    );
                    ensure!(
                        !matches!(charge, Some((state, _)) if state == "CHARGED"),
                        "{status} {saga_id} is still charged"
                    );
                    ensure!(
                        shipment != Some("SHIPPED"),
                        "{status} {saga_id} still has a shipment"
                    );
                }
                "NEEDS_ATTENTION" => audit.needs_attention.push(saga_id.clone()),
                other => bail!("saga {saga_id} is not settled: {other}"),
            }
        }

        if audit.needs_attention.is_empty() {
            let initial_stock = self.initial_stock.lock().unwrap().clone();
            for (product_id, initial) in initial_stock {
                let (stock, reserved) = self.stock(&product_id).await?;
                let sold = reserved_by_product.get(&product_id).copied().unwrap_or(0);
                ensure!(
                    stock + sold == initial && reserved == sold,
                    "stock of {product_id} not conserved: initial {initial}, now {stock} available + {reserved} reserved, completed orders hold {sold}"
                );
            }
            let initial_balance = self.initial_balance.lock().unwrap().clone();
            for (customer_id, initial) in initial_balance {
                let balance = self.balance(&customer_id).await?;
                let spent = spent_by_customer.get(&customer_id).copied().unwrap_or(0);
                ensure!(
                    initial - balance == spent,
                    "money of {customer_id} not conserved: initial {initial}, now {balance}, completed orders total {spent}"
                );
            }
        }

        // Invariant 5: no attempt was made by two drivers.
        let duplicates: Vec<(String, String, String, i32, i64)> = sqlx::query_as(
            "SELECT saga_id, step, kind, attempt, count(*) FROM saga_journal
             WHERE kind IN ('ACTION', 'COMPENSATION')
             GROUP BY saga_id, step, kind, attempt HAVING count(*) > 1 LIMIT 5",
        )
        .fetch_all(&self.pool)
        .await?;
        ensure!(
            duplicates.is_empty(),
            "attempts journalled twice: {duplicates:?}"
        );
        Ok(audit)
    }
}

#[derive(Debug, sqlx::FromRow)]
struct SagaRow {
    saga_id: String,
    customer_id: String,
    items: sqlx::types::Json<Vec<ItemRow>>,
    status: String,
    total_amount_cents: i64,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct ItemRow {
    product_id: String,
    quantity: i32,
}

async fn states(pool: &PgPool, table: &str) -> Result<HashMap<String, String>> {
    Ok(
        sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT saga_id, state FROM {table}"
        )))
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect(),
    )
}

/// What an audit saw.
#[derive(Debug, Default)]
pub struct Audit {
    /// Sagas per status.
    pub by_status: BTreeMap<String, usize>,
    /// Sagas left for an operator (stock and money checks are skipped when
    /// there are any: their compensation is unfinished by definition).
    pub needs_attention: Vec<String>,
}

impl Audit {
    /// Sagas in `status`.
    pub fn count(&self, status: &str) -> usize {
        self.by_status.get(status).copied().unwrap_or(0)
    }
}

/// A PlaceOrder request.
pub fn place_request(
    customer_id: &str,
    items: &[(&str, i32)],
    idempotency_key: &str,
) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: customer_id.into(),
        items: items
            .iter()
            .map(|(product_id, quantity)| OrderItem {
                product_id: (*product_id).into(),
                quantity: *quantity,
            })
            .collect(),
        idempotency_key: idempotency_key.into(),
    }
}

/// A fault request: `mode` ("FAIL_BEFORE", "FAIL_AFTER_COMMIT", "DELAY") on
/// `rpc` with a gRPC `code`, for the next `count` calls (0: all).
pub fn fault(rpc: &str, mode: &str, code: tonic::Code, count: u32) -> SetFaultRequest {
    SetFaultRequest {
        rpc: rpc.into(),
        mode: proto::fault::v1::FaultMode::from_str_name(&format!("FAULT_MODE_{mode}"))
            .unwrap_or_else(|| panic!("no fault mode {mode}"))
            .into(),
        code: code as i32,
        count,
        percent: 0,
        latency_ms: 0,
    }
}

/// A DELAY fault of `latency_ms` on every call of `rpc`.
pub fn delay(rpc: &str, latency_ms: u32) -> SetFaultRequest {
    SetFaultRequest {
        latency_ms,
        ..fault(rpc, "DELAY", tonic::Code::Ok, 0)
    }
}

/// The steps an order compensated, in order (the call in flight excluded).
pub fn compensations(order: &GetOrderStatusResponse) -> Vec<String> {
    use proto::saga::v1::{StepKind, StepOutcome};
    order
        .history
        .iter()
        .filter(|e| e.kind() == StepKind::Compensation && e.outcome() != StepOutcome::InFlight)
        .map(|e| e.step.clone())
        .collect()
}

/// Terminal or NEEDS_ATTENTION.
pub fn settled(status: OrderStatus) -> bool {
    matches!(
        status,
        OrderStatus::Completed
            | OrderStatus::Failed
            | OrderStatus::Cancelled
            | OrderStatus::NeedsAttention
    )
}
