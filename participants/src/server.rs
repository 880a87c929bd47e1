//! Starting a participant: connect and migrate its database, then serve its
//! gRPC service with health, reflection and (optionally) fault injection on
//! a listener the caller bound, until the caller's shutdown future fires.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use proto::fault::v1::fault_injection_server::FaultInjectionServer;
use proto::fulfillment::v1::fulfillment_service_server::FulfillmentServiceServer;
use proto::inventory::v1::inventory_service_server::InventoryServiceServer;
use proto::payment::v1::payment_service_server::PaymentServiceServer;
use sqlx::Connection;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::error::Error;
use crate::fault::{FaultControl, FaultLayer, FaultRegistry};
use crate::fulfillment::{FulfillmentGrpc, FulfillmentStore};
use crate::inventory::{InventoryGrpc, InventoryStore};
use crate::payment::{PaymentGrpc, PaymentStore};

static INVENTORY_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/inventory");
static PAYMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/payment");
static FULFILLMENT_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres/fulfillment");

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
            ],
            Self::Payment => &[
                "Charge",
                "Refund",
                "GetAccount",
                "UpsertAccount",
                "GetCharge",
            ],
            Self::Fulfillment => &["Ship", "CancelShipment", "GetShipment"],
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

/// Connects to the participant's database with a pool of up to
/// `max_connections` and applies its migrations.
///
/// Fails within `connect_timeout` when the server is unreachable.
pub async fn connect(
    participant: Participant,
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, Error> {
    let pool = connect_pool(database_url, max_connections, connect_timeout).await?;
    participant.migrator().run(&pool).await?;
    Ok(pool)
}

/// Opens a pool of up to `max_connections` on `database_url`.
///
/// One connection is made first, so that an unreachable server or a missing
/// database reports its real cause ("connection refused", "database does not
/// exist") instead of a pool timeout.
pub async fn connect_pool(
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, Error> {
    let options = PgConnectOptions::from_str(database_url)?;
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let probe = tokio::time::timeout(connect_timeout, PgConnection::connect_with(&options))
        .await
        .map_err(|_| {
            Error::Database(sqlx::Error::Protocol(format!(
                "no answer from {server} within {connect_timeout:?}"
            )))
        })??;
    probe.close().await?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_lazy_with(options))
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
    pool: PgPool,
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

    let router = Server::builder()
        .layer(FaultLayer::new(registry.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(registry.map(|r| FaultInjectionServer::new(FaultControl::new(r))));
    let router = match participant {
        Participant::Inventory => router.add_service(InventoryServiceServer::new(
            InventoryGrpc::new(InventoryStore::new(pool)),
        )),
        Participant::Payment => router.add_service(PaymentServiceServer::new(PaymentGrpc::new(
            PaymentStore::new(pool),
        ))),
        Participant::Fulfillment => router.add_service(FulfillmentServiceServer::new(
            FulfillmentGrpc::new(FulfillmentStore::new(pool)),
        )),
    };

    let shutdown = async move {
        shutdown.await;
        health
            .set_service_status(service_name, ServingStatus::NotServing)
            .await;
    };
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
