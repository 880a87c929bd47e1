//! Health, readiness and metrics on the HTTP port of every service:
//! `/readyz` names each dependency and follows it (a participant that stops
//! and returns, a database that stops answering and comes back), the gRPC
//! health of the whole server follows the same readiness (a service's own
//! health, what it needs to take calls), and `/metrics` shows what
//! happened.

use std::net::SocketAddr;
use std::time::Duration;

use harness::chaos::proxy::{AfterBlackhole, FaultProxy};
use harness::{TestDb, http_get, place_request, spawn_system_with, wait_http};
use participants::{Backend, Participant, ServeOptions};
use proto::inventory::v1::GetStockRequest;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WAIT: Duration = Duration::from_secs(15);

/// A participant served on `listener` until the sender fires.
fn serve(
    participant: Participant,
    backend: Backend,
    listener: TcpListener,
    http: Option<TcpListener>,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), common::Error>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(participants::serve_with_http(
        participant,
        backend,
        listener,
        http,
        ServeOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    (stop, task)
}

/// The `ok` of the check named `name` in a `/readyz` body.
fn check_ok(body: &str, name: &str) -> Option<bool> {
    let json: Value = serde_json::from_str(body).ok()?;
    json["checks"]
        .as_array()?
        .iter()
        .find(|check| check["name"] == name)?["ok"]
        .as_bool()
}

async fn grpc_status(channel: Channel, service: &str) -> Option<ServingStatus> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status())
}

/// Polls the gRPC health of `service` until it is `want`.
async fn wait_grpc(channel: Channel, service: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = grpc_status(channel.clone(), service).await;
        if status == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gRPC health of {service:?} is {status:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_every_dependency_and_follows_a_participant_that_stops_and_returns() {
    // A payment participant this test stops and starts again on its port.
    let payment_db = TestDb::create("payment").await.unwrap();
    let backend = participants::connect(
        Participant::Payment,
        payment_db.url(),
        4,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let payment_address = listener.local_addr().unwrap();
    let (stop, task) = serve(Participant::Payment, backend.clone(), listener, None);
    let system = spawn_system_with(|settings| {
        settings.participants.payment = format!("http://{payment_address}");
    })
    .await
    .unwrap();
    let orchestrator = system.orchestrator.as_ref().unwrap();
    let http = orchestrator.http_address();

    let (_, body) = wait_http(http, "/readyz", WAIT, |code, _| code == 200)
        .await
        .unwrap();
    for name in [
        "database",
        "participant:inventory",
        "participant:payment",
        "participant:fulfillment",
    ] {
        assert_eq!(check_ok(&body, name), Some(true), "{name} in {body}");
    }
    assert_eq!(http_get(http, "/healthz").await.0, 200);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let (_, body) = wait_http(http, "/readyz", WAIT, |code, body| {
        code == 503 && check_ok(body, "participant:payment") == Some(false)
    })
    .await
    .unwrap();
    assert_eq!(check_ok(&body, "database"), Some(true), "{body}");
    assert_eq!(
        check_ok(&body, "participant:inventory"),
        Some(true),
        "{body}"
    );
    // The server as a whole is not ready, as /readyz says; but it still
    // takes orders (they wait for the participant durably): its own
    // services' gRPC health follows its database only.
    wait_grpc(orchestrator.channel(), "", ServingStatus::NotServing).await;
    assert_eq!(
        grpc_status(orchestrator.channel(), "saga.v1.OrderService").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(http_get(http, "/healthz").await.0, 200);

    let listener = TcpListener::bind(payment_address).await.unwrap();
    let (stop, task) = serve(Participant::Payment, backend.clone(), listener, None);
    wait_http(http, "/readyz", WAIT, |code, body| {
        code == 200 && check_ok(body, "participant:payment") == Some(true)
    })
    .await
    .unwrap();
    wait_grpc(orchestrator.channel(), "", ServingStatus::Serving).await;
    drop(system);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    backend.close().await;
}

/// Where the PostgreSQL server of `url` listens, and `url` with that
/// replaced by `through`.
async fn proxied(url: &str, through: SocketAddr) -> (SocketAddr, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let upstream = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
    (upstream, format!("{scheme}://{user}{through}/{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participants_readyz_and_grpc_health_follow_its_database() {
    let db = TestDb::create("inventory").await.unwrap();
    let (upstream, _) = proxied(db.url(), "127.0.0.1:1".parse().unwrap()).await;
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let (_, url) = proxied(db.url(), proxy.addr()).await;
    let backend = participants::connect(Participant::Inventory, &url, 2, Duration::from_secs(10))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_listener.local_addr().unwrap();
    let (stop, task) = serve(
        Participant::Inventory,
        backend.clone(),
        listener,
        Some(http_listener),
    );
    let channel = Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let service = Participant::Inventory.service_name();

    let (_, body) = wait_http(http, "/readyz", WAIT, |code, _| code == 200)
        .await
        .unwrap();
    assert_eq!(check_ok(&body, "database"), Some(true), "{body}");
    wait_grpc(channel.clone(), service, ServingStatus::Serving).await;
    wait_grpc(channel.clone(), "", ServingStatus::Serving).await;

    // Every RPC is counted by method and code.
    let missing = InventoryServiceClient::new(channel.clone())
        .get_stock(GetStockRequest {
            product_id: "no-such-product".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    let (code, metrics) = http_get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(
            "participant_rpc_total{service=\"inventory.v1.InventoryService\",method=\"GetStock\",code=\"NOT_FOUND\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("participant_rpc_duration_seconds_bucket{service=\"inventory.v1.InventoryService\",method=\"GetStock\",code=\"NOT_FOUND\",le=\"+Inf\"}"),
        "{metrics}"
    );

    // The database stops answering.
    proxy.start_blackhole();
    let (_, body) = wait_http(http, "/readyz", WAIT, |code, _| code == 503)
        .await
        .unwrap();
    assert_eq!(check_ok(&body, "database"), Some(false), "{body}");
    wait_grpc(channel.clone(), service, ServingStatus::NotServing).await;
    assert_eq!(
        http_get(http, "/healthz").await.0,
        200,
        "alive all the same"
    );

    // And comes back.
    proxy.end_blackhole(AfterBlackhole::Reset);
    wait_http(http, "/readyz", WAIT, |code, _| code == 200)
        .await
        .unwrap();
    wait_grpc(channel.clone(), service, ServingStatus::Serving).await;

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    backend.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_sagas_their_steps_and_their_failures() {
    let system = spawn_system_with(|_| {}).await.unwrap();
    system
        .seed_product("metrics-widget", 100, 10)
        .await
        .unwrap();
    system.seed_account("metrics-alice", 10_000).await.unwrap();
    let mut orders = system.orders();
    let placed = orders
        .place_order(place_request("metrics-alice", &[("metrics-widget", 1)], ""))
        .await
        .unwrap()
        .into_inner();
    // Out of stock: rejected, then FAILED.
    let rejected = orders
        .place_order(place_request(
            "metrics-alice",
            &[("metrics-widget", 50)],
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    for id in [&placed.order_id, &rejected.order_id] {
        system.wait_settled(id, WAIT).await.unwrap();
    }
    let http = system.orchestrator.as_ref().unwrap().http_address();
    let (code, metrics) = http_get(http, "/metrics").await;
    assert_eq!(code, 200);
    // Other tests of this binary share the process's metrics: at least
    // what this test did is counted.
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(value("saga_started_total{definition=\"order\"}") >= 2.0);
    assert!(value("saga_finished_total{outcome=\"COMPLETED\"}") >= 1.0);
    assert!(value("saga_finished_total{outcome=\"FAILED\"}") >= 1.0);
    assert!(
        value(
            "saga_step_attempts_total{step=\"reserve_inventory\",kind=\"ACTION\",code=\"FAILED_PRECONDITION\"}"
        ) >= 1.0
    );
    assert!(
        value(
            "saga_step_duration_seconds_count{step=\"ship_order\",kind=\"ACTION\",outcome=\"SUCCEEDED\"}"
        ) >= 1.0
    );
    for name in [
        "saga_in_flight ",
        "saga_db_pool_connections{state=\"idle\"}",
        "saga_db_pool_waiting 0\n",
        "saga_sagas{status=\"NEEDS_ATTENTION\"}",
        "saga_batch_size_bucket{writer=\"create\"",
        "# TYPE saga_step_retries_total counter",
    ] {
        assert!(metrics.contains(name), "no {name} in\n{metrics}");
    }
}
