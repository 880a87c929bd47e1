//! Starting the orchestrator: connect and migrate its database, start the
//! executor, and serve the gRPC API (with health and reflection) on a
//! listener the caller bound, until the caller's shutdown future fires.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::limit_messages;
use proto::saga::v1::admin_service_server::AdminServiceServer;
use proto::saga::v1::order_service_server::OrderServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::admin::AdminApi;
use crate::api::OrderApi;
use crate::auth::AdminAuth;
use crate::clients::{Bounded, StepCalls};
use crate::config::Settings;
use crate::error::Error;
use crate::executor::Executor;
use crate::store::{PgStore, SagaStore, SqliteStore};

const SERVICES: &[&str] = &[
    "saga.v1.OrderService",
    "saga.v1.AdminService",
    "grpc.health.v1.Health",
];

/// Connects to the orchestrator's database and applies its migrations:
/// PostgreSQL (`postgres://…`, a pool of up to `max_connections`) or SQLite
/// (`sqlite:PATH`, `sqlite::memory:`; the embedded mode).
pub async fn connect(
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<Arc<dyn SagaStore>, Error> {
    if database_url.starts_with("sqlite:") {
        let pool = common::db::connect_sqlite(database_url).await?;
        return Ok(Arc::new(SqliteStore::migrate(pool).await?));
    }
    let pool = common::db::connect_pool(database_url, max_connections, connect_timeout).await?;
    Ok(Arc::new(PgStore::migrate(pool).await?))
}

/// Serves the orchestrator on `listener` (and probes and metrics on
/// `http_listener`) until `shutdown` completes; then
/// refuses new work, lets calls in progress finish (up to the grace period)
/// and hands its leases back.
pub async fn serve(
    store: Arc<dyn SagaStore>,
    calls: Arc<dyn StepCalls>,
    settings: Settings,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let calls = Arc::new(Bounded::new(
        calls,
        settings.max_participant_calls,
        &settings.executor.registry,
    ));
    let executor = Executor::new(store.clone(), calls, settings.executor.clone());
    executor.start().await?;

    let (health, health_service) = common::grpc::health(SERVICES).await;
    let readiness = common::probe::Readiness::new();
    tokio::spawn(crate::telemetry::watch_readiness(
        executor.clone(),
        settings.participants.clone(),
        readiness.clone(),
        health.clone(),
        SERVICES.to_vec(),
    ));
    if let Some(http) = http_listener {
        let console = crate::console::routes(
            AdminApi::new(executor.clone(), settings.stuck_after),
            AdminAuth::new(settings.admin.clone()),
        );
        tokio::spawn(common::probe::serve_http(
            http,
            crate::telemetry::probes(executor.clone(), readiness, Some(console)),
            settings.limits.http_header_timeout,
            settings.tls.clone(),
        ));
    }
    let reflection_v1 = common::grpc::reflection_v1(SERVICES)?;
    let reflection_v1alpha = common::grpc::reflection_v1alpha(SERVICES)?;

    let stopping = executor.clone();
    let signalled = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let signalled = signalled.clone();
        async move {
            shutdown.await;
            common::grpc::set_health(&health, SERVICES, ServingStatus::NotServing).await;
            // Ends watch streams and refuses new orders, so the server can drain.
            stopping.begin_stop();
            signalled.notify_one();
        }
    };
    let (ping_every, ping_timeout) = common::listen::keepalive(settings.connection_idle_timeout);
    let limits = settings.limits;
    let router = Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .layer(common::telemetry::ServerTraceLayer)
        .layer(limits.call_layer().with_longer(
            "/saga.v1.AdminService/Reconcile",
            settings.reconcile_timeout,
            "--reconcile-timeout",
        ))
        .add_service(limit_messages!(health_service, limits))
        .add_service(limit_messages!(reflection_v1, limits))
        .add_service(limit_messages!(reflection_v1alpha, limits))
        .add_service(limit_messages!(
            OrderServiceServer::new(OrderApi::new(executor.clone())),
            limits
        ))
        .add_service(InterceptedService::new(
            limit_messages!(
                AdminServiceServer::new(AdminApi::new(executor.clone(), settings.stuck_after)),
                limits
            ),
            AdminAuth::new(settings.admin.clone()),
        ));
    let idle = settings.connection_idle_timeout;
    let tls = settings.tls.clone();
    if let Some(tls) = &tls {
        common::tls::reload_on_sighup(tls.clone(), "orchestrator", executor.stopping());
    }
    // Two arms rather than one boxed stream: plaintext connections are
    // served exactly as without TLS.
    let server = async move {
        match tls {
            None => {
                router
                    .serve_with_incoming_shutdown(common::listen::incoming(listener, idle), signal)
                    .await
            }
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        common::tls::incoming(listener, idle, tls),
                        signal,
                    )
                    .await
            }
        }
    };
    crate::prune::describe();
    let pruner = tokio::spawn(crate::prune::run(store, settings.retention));
    // Draining is bounded: clients that keep connections busy past the
    // grace period are cut off rather than holding the shutdown hostage.
    let served = tokio::select! {
        served = server => served,
        _ = async {
            signalled.notified().await;
            tokio::time::sleep(settings.shutdown_grace).await;
        } => {
            tracing::warn!(grace = ?settings.shutdown_grace, "connections still open after the grace period; closing them");
            Ok(())
        }
    };
    pruner.abort();
    executor.shutdown(settings.shutdown_grace).await;
    served?;
    Ok(())
}
