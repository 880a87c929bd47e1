//! Starting a participant: connect and migrate its database (PostgreSQL or
//! SQLite, chosen by the URL's scheme), then serve its gRPC service with
//! health, reflection and (optionally) fault injection on a listener the
//! caller bound, until the caller's shutdown future fires.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::db::{connect_pool, connect_sqlite};
use common::error::Error;
use common::grpc::{health, reflection_v1, reflection_v1alpha, set_health};
use common::limit_messages;
use common::limits::Limits;
use common::listen::{DEFAULT_IDLE_TIMEOUT, incoming, keepalive};
use proto::fault::v1::fault_injection_server::FaultInjectionServer;
use proto::fulfillment::v1::fulfillment_service_server::FulfillmentServiceServer;
use proto::inventory::v1::inventory_service_server::InventoryServiceServer;
use proto::payment::v1::payment_service_server::PaymentServiceServer;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, SqlitePool};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::fault::{FaultControl, FaultLayer, FaultRegistry};
use crate::fulfillment::{FulfillmentGrpc, FulfillmentStore, PgFulfillment, SqliteFulfillment};
use crate::inventory::{InventoryGrpc, InventoryStore, PgInventory, SqliteInventory};
use crate::payment::{PaymentGrpc, PaymentStore, PgPayment, SqlitePayment};

static INVENTORY_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/inventory");
static PAYMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/payment");
static FULFILLMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/fulfillment");
static SQLITE_INVENTORY_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite/inventory");
static SQLITE_PAYMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite/payment");
static SQLITE_FULFILLMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite/fulfillment");

/// Which participant a process (or an in-process server) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Participant {
    /// Reserve / Release.
    Inventory,
    /// Charge / Refund.
    Payment,
    /// Ship / CancelShipment.
    Fulfillment,
}

impl Participant {
    /// All three, in saga order.
    pub const ALL: [Participant; 3] = [Self::Inventory, Self::Payment, Self::Fulfillment];

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Fulfillment => "fulfillment",
        }
    }

    /// Fully qualified gRPC service name.
    pub fn service_name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory.v1.InventoryService",
            Self::Payment => "payment.v1.PaymentService",
            Self::Fulfillment => "fulfillment.v1.FulfillmentService",
        }
    }

    /// Method names of the service, which fault injection can target.
    pub fn methods(self) -> &'static [&'static str] {
        match self {
            Self::Inventory => &[
                "Reserve",
                "Release",
                "GetStock",
                "ListProducts",
                "UpsertProduct",
                "GetReservation",
                "ListReservations",
            ],
            Self::Payment => &[
                "Charge",
                "Refund",
                "GetAccount",
                "UpsertAccount",
                "GetCharge",
                "ListCharges",
            ],
            Self::Fulfillment => &["Ship", "CancelShipment", "GetShipment", "ListShipments"],
        }
    }

    /// The address it listens on by default.
    pub fn default_listen(self) -> std::net::SocketAddr {
        let port = match self {
            Self::Inventory => 50061,
            Self::Payment => 50062,
            Self::Fulfillment => 50063,
        };
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Self::Inventory => &INVENTORY_MIGRATIONS,
            Self::Payment => &PAYMENT_MIGRATIONS,
            Self::Fulfillment => &FULFILLMENT_MIGRATIONS,
        }
    }

    fn sqlite_migrator(self) -> &'static Migrator {
        match self {
            Self::Inventory => &SQLITE_INVENTORY_MIGRATIONS,
            Self::Payment => &SQLITE_PAYMENT_MIGRATIONS,
            Self::Fulfillment => &SQLITE_FULFILLMENT_MIGRATIONS,
        }
    }
}

impl FromStr for Participant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown participant {s:?}: inventory, payment or fulfillment"))
    }
}

/// A participant's database: a pool on PostgreSQL or on SQLite.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres(PgPool),
    /// `sqlite:PATH`, `sqlite://PATH` or `sqlite::memory:`; one connection.
    Sqlite(SqlitePool),
}

impl Backend {
    /// The PostgreSQL pool, if this is PostgreSQL.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Self::Postgres(pool) => Some(pool),
            Self::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, if this is SQLite.
    pub fn sqlite(&self) -> Option<&SqlitePool> {
        match self {
            Self::Postgres(_) => None,
            Self::Sqlite(pool) => Some(pool),
        }
    }

    /// The inventory store on this database.
    pub fn inventory(&self) -> Arc<dyn InventoryStore> {
        match self {
            Self::Postgres(pool) => Arc::new(PgInventory::new(pool.clone())),
            Self::Sqlite(pool) => Arc::new(SqliteInventory::new(pool.clone())),
        }
    }

    /// The payment store on this database.
    pub fn payment(&self) -> Arc<dyn PaymentStore> {
        match self {
            Self::Postgres(pool) => Arc::new(PgPayment::new(pool.clone())),
            Self::Sqlite(pool) => Arc::new(SqlitePayment::new(pool.clone())),
        }
    }

    /// The fulfillment store on this database.
    pub fn fulfillment(&self) -> Arc<dyn FulfillmentStore> {
        match self {
            Self::Postgres(pool) => Arc::new(PgFulfillment::new(pool.clone())),
            Self::Sqlite(pool) => Arc::new(SqliteFulfillment::new(pool.clone())),
        }
    }

    /// Readiness: the database answers and is migrated as far as this
    /// build expects for `participant`; one indexed read.
    pub async fn ready(&self, participant: Participant) -> Result<String, String> {
        let (applied, migrator) = match self {
            Self::Postgres(pool) => (
                sqlx::query_scalar(common::probe::MIGRATED_SQL)
                    .fetch_one(pool)
                    .await,
                participant.migrator(),
            ),
            Self::Sqlite(pool) => (
                sqlx::query_scalar(common::probe::MIGRATED_SQL)
                    .fetch_one(pool)
                    .await,
                participant.sqlite_migrator(),
            ),
        };
        let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        common::probe::migrated(applied, latest)
    }

    /// The pool now: (connections in use, idle).
    pub fn pool_state(&self) -> (u32, u32) {
        let (size, idle) = match self {
            Self::Postgres(pool) => (pool.size(), pool.num_idle()),
            Self::Sqlite(pool) => (pool.size(), pool.num_idle()),
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX);
        (size.saturating_sub(idle), idle)
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

/// Connects to the participant's database and applies its migrations.
///
/// The URL's scheme chooses the backend: `postgres://` or `postgresql://`
/// opens a pool of up to `max_connections` and fails within
/// `connect_timeout` when the server is unreachable; `sqlite:PATH`,
/// `sqlite://PATH` or `sqlite::memory:` opens the file (creating it if
/// missing) with one connection, see [`common::db::connect_sqlite`].
pub async fn connect(
    participant: Participant,
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<Backend, Error> {
    let scheme = database_url
        .split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("postgres" | "postgresql") => {
            let pool = connect_pool(database_url, max_connections, connect_timeout).await?;
            participant.migrator().run(&pool).await?;
            Ok(Backend::Postgres(pool))
        }
        Some("sqlite") => {
            let pool = connect_sqlite(database_url).await?;
            participant.sqlite_migrator().run(&pool).await?;
            Ok(Backend::Sqlite(pool))
        }
        // The URL itself is not echoed: it may hold a password.
        other => Err(Error::invalid(format!(
            "{}: use postgres://, postgresql:// (PostgreSQL) or sqlite:PATH, sqlite://PATH, \
             sqlite::memory: (SQLite)",
            match other {
                Some(scheme) => format!("unsupported database URL scheme {scheme:?}"),
                None => "the database URL has no scheme".to_owned(),
            }
        ))),
    }
}

/// How to serve.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Register `fault.v1.FaultInjection` and apply the faults it arms.
    pub fault_injection: bool,
    /// TLS on both ports (mTLS when it has a client CA), reloaded on
    /// SIGHUP; None: plaintext.
    pub tls: Option<Arc<common::tls::Server>>,
    /// Limits on what clients send (both ports).
    pub limits: Limits,
}

/// Serves `participant` on `listener` until `shutdown` completes, then stops
/// taking calls and lets the calls in progress finish.
pub async fn serve(
    participant: Participant,
    backend: Backend,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_with_http(participant, backend, listener, None, options, shutdown).await
}

/// How often a participant checks its readiness (its database).
pub const READINESS_EVERY: Duration = Duration::from_secs(1);

/// [`serve`], and `/healthz`, `/readyz` and `/metrics` on `http_listener`
/// if given. Readiness (the database answers and is migrated) is checked
/// every [`READINESS_EVERY`] whether or not there is an HTTP port: the gRPC
/// health service follows it (NOT_SERVING while the database is not
/// ready).
pub async fn serve_with_http(
    participant: Participant,
    backend: Backend,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let service_name = participant.service_name();
    let (reporter, health_service) = health(&[service_name]).await;
    crate::rpc_metrics::describe();
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let readiness = common::probe::Readiness::new();
    tokio::spawn({
        let backend = backend.clone();
        common::probe::watch_readiness(
            readiness.clone(),
            reporter.clone(),
            vec![service_name],
            READINESS_EVERY,
            stopping.clone(),
            |_| true,
            move || {
                let backend = backend.clone();
                async move {
                    let ready =
                        tokio::time::timeout(Duration::from_secs(1), backend.ready(participant))
                            .await
                            .unwrap_or_else(|_| Err("no answer within 1s".to_owned()));
                    vec![common::probe::Check::of("database", ready)]
                }
            },
        )
    });
    if let Some(http) = http_listener {
        let backend = backend.clone();
        let probes = common::probe::Probes {
            readiness,
            stopping: stopping.clone(),
            metrics: Arc::new(move || {
                let (in_use, idle) = backend.pool_state();
                Box::pin(async move {
                    let pool = "participant_db_pool_connections";
                    common::metrics::set(pool, &[("state", "in_use")], f64::from(in_use));
                    common::metrics::set(pool, &[("state", "idle")], f64::from(idle));
                    common::metrics::render()
                })
            }),
            routes: None,
        };
        tokio::spawn(common::probe::serve_http(
            http,
            probes,
            options.limits.http_header_timeout,
            options.tls.clone(),
        ));
    }
    let registry = options
        .fault_injection
        .then(|| Arc::new(FaultRegistry::new(service_name, participant.methods())));

    let mut advertised = vec![service_name, "grpc.health.v1.Health"];
    if registry.is_some() {
        advertised.push("fault.v1.FaultInjection");
    }
    let reflection_v1 = reflection_v1(&advertised)?;
    let reflection_v1alpha = reflection_v1alpha(&advertised)?;

    let (ping_every, ping_timeout) = keepalive(DEFAULT_IDLE_TIMEOUT);
    let limits = options.limits;
    // The deadline sits inside the metrics and the trace, which record the
    // DEADLINE_EXCEEDED it answers, and outside fault injection, whose
    // delays it bounds.
    let router = Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .layer(crate::rpc_metrics::RpcMetricsLayer)
        .layer(common::telemetry::ServerTraceLayer)
        .layer(limits.call_layer())
        .layer(FaultLayer::new(registry.clone()))
        .add_service(limit_messages!(health_service, limits))
        .add_service(limit_messages!(reflection_v1, limits))
        .add_service(limit_messages!(reflection_v1alpha, limits))
        .add_optional_service(
            registry
                .map(|r| limit_messages!(FaultInjectionServer::new(FaultControl::new(r)), limits)),
        );
    let router = match participant {
        Participant::Inventory => router.add_service(limit_messages!(
            InventoryServiceServer::new(InventoryGrpc::new(backend.inventory())),
            limits
        )),
        Participant::Payment => router.add_service(limit_messages!(
            PaymentServiceServer::new(PaymentGrpc::new(backend.payment())),
            limits
        )),
        Participant::Fulfillment => router.add_service(limit_messages!(
            FulfillmentServiceServer::new(FulfillmentGrpc::new(backend.fulfillment())),
            limits
        )),
    };

    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        set_health(&reporter, &[service_name], ServingStatus::NotServing).await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    match options.tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener, DEFAULT_IDLE_TIMEOUT), shutdown)
                .await?
        }
        Some(tls) => {
            common::tls::reload_on_sighup(tls.clone(), participant.name(), stopping);
            router
                .serve_with_incoming_shutdown(
                    common::tls::incoming(listener, DEFAULT_IDLE_TIMEOUT, tls),
                    shutdown,
                )
                .await?
        }
    }
    Ok(())
}
