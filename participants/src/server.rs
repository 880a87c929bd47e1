//! Starting a participant: connect and migrate its database (PostgreSQL or
//! SQLite, chosen by the URL's scheme), then serve its gRPC service with
//! health, reflection and (optionally) fault injection on a listener the
//! caller bound, until the caller's shutdown future fires.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use proto::fault::v1::fault_injection_server::FaultInjectionServer;
use proto::fulfillment::v1::fulfillment_service_server::FulfillmentServiceServer;
use proto::inventory::v1::inventory_service_server::InventoryServiceServer;
use proto::payment::v1::payment_service_server::PaymentServiceServer;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, PgPool, SqlitePool};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::error::Error;
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

/// How long a SQLite connection waits for another process's write lock
/// before answering "database is locked" (mapped to `ABORTED`).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
/// missing) with one connection, see [`connect_sqlite`].
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

/// Opens a SQLite database (`sqlite:PATH`, `sqlite://PATH` or
/// `sqlite::memory:`), creating the file if it is missing, in WAL mode with
/// foreign keys on and a 5 s busy timeout.
///
/// The pool holds exactly one connection, kept open for the pool's life:
/// every statement is serialized, which is what makes the SQLite stores
/// simple and correct, and `sqlite::memory:` stays one database.
pub async fn connect_sqlite(url: &str) -> Result<SqlitePool, Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    Ok(SqlitePoolOptions::new()
        .min_connections(1)
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options)
        .await?)
}

/// The longest a statement waits for a pooled connection (or for a new one
/// to be made) before it fails with `PoolTimedOut`, answered as
/// UNAVAILABLE. Well under the deadlines of the callers (a participant call
/// has 5 s by default, a client of the orchestrator more), so that in a
/// database outage callers hear "database unavailable, try again" instead
/// of waiting out their deadline, and requests do not pile up in memory.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled connection unused for this long is closed; the pool shrinks
/// back after a burst instead of holding its maximum forever (see
/// [`CONNECTION_BUDGET`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled connection unused for this long is pinged before it is handed
/// out: one round trip, paid only after a quiet second, and a connection
/// the server closed meanwhile (restart, `pg_terminate_backend`, an idle
/// timeout of a proxy) is replaced instead of failing the statement. A busy
/// connection is never idle that long, so the hot path pays nothing.
pub const STALE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Default pool maximum of a participant (`--max-connections`).
///
/// The default maxima of every service share one PostgreSQL server: a
/// default server allows `max_connections = 100`, of which
/// `superuser_reserved_connections = 3` are kept for superusers, 97 for
/// everyone else. Two orchestrator replicas and the three participants,
/// all on one server, must fit with room for an operator (psql, a
/// migration, a backup, a replica starting while another stops):
///
/// | who | pool | batch writers | each | count | total |
/// |---|---|---|---|---|---|
/// | orchestrator replica | 24 | 3 | 27 | 2 | 54 |
/// | participant | 10 | 1 | 11 | 3 | 33 |
/// | operator room | | | | | 10 |
///
/// 54 + 33 + 10 = 97 (checked by a test of the orchestrator's `config`).
/// Pools grow to these maxima only under load and shrink back after
/// [`IDLE_TIMEOUT`]; the sizes stay flags for servers configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// Connections of a participant's batch writers, beside its pool (one
/// writer per store, see [`generic_plan_pool`]).
pub const WRITER_CONNECTIONS: u32 = 1;

/// Opens a pool of up to `max_connections` on `database_url`.
///
/// One connection is made first, so that an unreachable server or a missing
/// database reports its real cause ("connection refused", "database does not
/// exist") instead of a pool timeout. A server that is starting, refuses
/// connections or has too many clients (SQLSTATE 53300) is tried again until
/// `connect_timeout`: a service starting beside a busy one waits its turn.
pub async fn connect_pool(
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, Error> {
    let options = PgConnectOptions::from_str(database_url)?;
    probe(&options, connect_timeout).await?;
    // Every statement of the services looks rows up by key, and the batch
    // statements do it by arrays of keys. PostgreSQL caches a generic plan
    // after five runs, chosen on the statistics of that moment: a fresh
    // table looks empty, a sequential scan looks cheapest, and the plan
    // would keep scanning the whole table long after it has grown (until
    // autovacuum next analyzes it). Without sequential scans the cached plans
    // use the indexes whatever the table's size; a query with no usable
    // index still scans.
    let options = options.options([("enable_seqscan", "off")]);
    Ok(
        pool_options(max_connections, connect_timeout.min(ACQUIRE_TIMEOUT))
            .connect_lazy_with(options),
    )
}

/// Connects once to check the server is there, retrying what passes with
/// time (refused, starting up, too many clients) until `connect_timeout`.
async fn probe(options: &PgConnectOptions, connect_timeout: Duration) -> Result<(), Error> {
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let deadline = tokio::time::Instant::now() + connect_timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(left, PgConnection::connect_with(options)).await {
            Ok(Ok(probe)) => return Ok(probe.close().await?),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(Error::Database(sqlx::Error::Protocol(format!(
                    "no answer from {server} within {connect_timeout:?}"
                ))));
            }
        };
        let passing = matches!(
            crate::error::transient(&error),
            Some(
                crate::error::Transient::Unavailable
                    | crate::error::Transient::TooManyClients
                    | crate::error::Transient::ConnectionLost
            )
        );
        if !passing || tokio::time::Instant::now() + backoff >= deadline {
            return Err(Error::Database(error));
        }
        tracing::debug!(%error, %server, "database not ready; trying again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The pool settings every PostgreSQL pool of the system shares: bounded
/// waits, idle connections closed, stale ones replaced before use.
fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(IDLE_TIMEOUT)
        // No ping before every checkout: it is a round trip per statement.
        // A connection that died while in use is found out by its
        // statement, which fails as UNAVAILABLE; the pool then drops it
        // (sqlx tests each connection as it comes back). One that died
        // while idle is found out by the ping after a quiet second.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= STALE_CHECK_AFTER {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A pool of `connections` on the same database as `pool`, for statements
/// that run many times with the same shape (the batch writers): their plan
/// is made once per connection and reused, instead of being made again for
/// every run's arguments (PostgreSQL keeps re-planning a statement whose
/// generic plan looks costlier than its custom plans, and planning a large
/// batch statement costs more than running it). With sequential scans off
/// (see [`connect_pool`]) the generic plans use the keys' indexes.
pub fn generic_plan_pool(pool: &PgPool, connections: u32) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("plan_cache_mode", "force_generic_plan")]);
    pool_options(connections, pool.options().get_acquire_timeout()).connect_lazy_with(options)
}

/// Connections accepted on `listener`, with Nagle's algorithm off: gRPC
/// messages are small, and Nagle plus delayed ACKs would add 40 ms to a
/// reply that fits in one segment.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// How to serve.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Register `fault.v1.FaultInjection` and apply the faults it arms.
    pub fault_injection: bool,
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
    let service_name = participant.service_name();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    let registry = options
        .fault_injection
        .then(|| Arc::new(FaultRegistry::new(service_name, participant.methods())));

    let mut advertised = vec![service_name, "grpc.health.v1.Health"];
    if registry.is_some() {
        advertised.push("fault.v1.FaultInjection");
    }
    let reflection = || {
        advertised.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let reflection_v1 = reflection()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| Error::invalid(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| Error::invalid(format!("reflection: {e}")))?;

    let (ping_every, ping_timeout) = crate::listen::keepalive(crate::listen::DEFAULT_IDLE_TIMEOUT);
    let router = Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_timeout))
        .layer(FaultLayer::new(registry.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(registry.map(|r| FaultInjectionServer::new(FaultControl::new(r))));
    let router = match participant {
        Participant::Inventory => router.add_service(InventoryServiceServer::new(
            InventoryGrpc::new(backend.inventory()),
        )),
        Participant::Payment => router.add_service(PaymentServiceServer::new(PaymentGrpc::new(
            backend.payment(),
        ))),
        Participant::Fulfillment => router.add_service(FulfillmentServiceServer::new(
            FulfillmentGrpc::new(backend.fulfillment()),
        )),
    };

    let shutdown = async move {
        shutdown.await;
        health
            .set_service_status(service_name, ServingStatus::NotServing)
            .await;
    };
    router
        .serve_with_incoming_shutdown(
            crate::listen::incoming(listener, crate::listen::DEFAULT_IDLE_TIMEOUT),
            shutdown,
        )
        .await?;
    Ok(())
}
