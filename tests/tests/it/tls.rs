//! TLS and mTLS on every hop, with certificates made here (two unrelated
//! CAs, `harness::tls::TestCerts`): TLS servers refuse plaintext clients,
//! clients refuse servers of a CA they do not trust, mTLS servers refuse
//! clients without a certificate of their CA (an orchestrator without
//! one gets retryable step failures and writes nothing), sagactl with and
//! without the CA, a whole order over mTLS, the HTTP port over TLS, and a
//! SIGHUP reload of a running `orchestrator serve` that open streams ride
//! through.
//!
//! The reload test and the sagactl test run the built binaries: `cargo
//! test --workspace` builds them first; after changing them, a narrower
//! command needs `cargo build --workspace --bins` before it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::tls::{Client, ClientFlags};
use harness::chaos::Binaries;
use harness::process::{Running, command, free_port};
use harness::tls::{TestCerts, https_get};
use harness::{
    TestDb, delay, http_get, place_request, settled, spawn_participants, spawn_tls_system,
};
use participants::ServeOptions;
use proto::inventory::v1::UpsertProductRequest;
use proto::payment::v1::UpsertAccountRequest;
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{OrderStatus, StepOutcome, WatchOrderRequest};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SETTLE: Duration = Duration::from_secs(30);

const FLAGS: ClientFlags = ClientFlags {
    ca: "the test CA",
    cert: "the test certificate",
    key: "the test key",
};

/// Connects to `url` with `tls` and asks for its health: Ok, or the
/// error and its causes on one line.
async fn health(url: &str, tls: Option<&Client>) -> Result<(), String> {
    let channel = common::tls::endpoint(url, tls, FLAGS.ca)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| common::tls::error_chain(&e))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

fn plaintext(url: &str) -> String {
    url.replacen("https://", "http://", 1)
}

#[tokio::test]
async fn tls_servers_refuse_plaintext_clients() {
    let certs = TestCerts::new().unwrap();
    let system = spawn_tls_system(&certs, false, false).await.unwrap();
    let orchestrator = system.orchestrator.as_ref().unwrap().endpoint().to_owned();
    let inventory = system.participants.inventory.endpoint().to_owned();
    assert!(orchestrator.starts_with("https://"), "{orchestrator}");
    let client = certs.client(false).unwrap();
    for url in [&orchestrator, &inventory] {
        health(url, Some(&client))
            .await
            .unwrap_or_else(|e| panic!("a TLS client reaches {url}: {e}"));
        let refused = health(&plaintext(url), None).await;
        assert!(
            refused.is_err(),
            "a plaintext client got an answer from {url}"
        );
    }
}

#[tokio::test]
async fn untrusted_certificates_are_refused_both_ways() {
    let certs = TestCerts::new().unwrap();
    let system = spawn_tls_system(&certs, true, true).await.unwrap();
    let orchestrator = system.orchestrator.as_ref().unwrap().endpoint().to_owned();
    let payment = system.participants.payment.endpoint().to_owned();

    // A client trusting another CA refuses the servers' certificate.
    let stranger = certs.other.client(false).unwrap();
    for url in [&orchestrator, &payment] {
        let error = health(url, Some(&stranger)).await.unwrap_err();
        assert!(
            error.contains("certificate") && error.contains("UnknownIssuer"),
            "{url}: {error}"
        );
    }

    // The mTLS participant: its own CA's client certificate is let in,
    // one from another CA and none at all are refused.
    health(&payment, Some(&certs.client(true).unwrap()))
        .await
        .expect("the CA's client certificate is accepted");
    let foreign = Client::load(
        &certs.ca.ca_cert,
        Some((&certs.other.client_cert, &certs.other.client_key)),
        FLAGS,
    )
    .unwrap();
    assert!(
        health(&payment, Some(&foreign)).await.is_err(),
        "a client certificate from another CA got in"
    );
    assert!(
        health(&payment, Some(&certs.client(false).unwrap()))
            .await
            .is_err(),
        "a client without a certificate got in"
    );
    // The orchestrator's own port asks for no client certificate.
    health(&orchestrator, Some(&certs.client(false).unwrap()))
        .await
        .unwrap();
}

/// A system over mTLS (the orchestrator presenting its client certificate
/// when `client_certificate`), 10 widgets at 2.50 and alice with 100.00,
/// and one order of `quantity` widgets followed until it settles.
async fn one_order(
    certs: &TestCerts,
    client_certificate: bool,
    quantity: i32,
) -> Result<(harness::System, proto::saga::v1::GetOrderStatusResponse)> {
    let system = spawn_tls_system(certs, true, client_certificate).await?;
    system.seed_product("widget", 250, 10).await?;
    system.seed_account("alice", 10_000).await?;
    let id = system.place("alice", &[("widget", quantity)]).await?;
    let order = system.wait_settled(&id, SETTLE).await?;
    Ok((system, order))
}

#[tokio::test]
async fn an_orchestrator_without_a_client_certificate_is_refused_by_mtls_participants() {
    let certs = TestCerts::new().unwrap();
    let (system, order) = one_order(&certs, false, 1).await.unwrap();

    // Every attempt, forward and back, failed retryably: the budget of 5
    // each was spent, and the saga waits for an operator.
    assert_eq!(order.status(), OrderStatus::NeedsAttention, "{order:?}");
    let reserves: Vec<_> = order
        .history
        .iter()
        .filter(|entry| entry.step == "reserve_inventory")
        .collect();
    assert!(reserves.len() >= 5, "{:?}", order.history);
    assert!(
        reserves
            .iter()
            .all(|entry| entry.outcome() == StepOutcome::RetryableFailure),
        "{:?}",
        order.history
    );
    // The participant saw nothing: no reservation, not even a tombstone.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(system.participants.inventory.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(system.stock("widget").await.unwrap(), (10, 0));
}

#[tokio::test]
async fn an_order_completes_over_mtls_on_every_hop() {
    let certs = TestCerts::new().unwrap();
    let (system, order) = one_order(&certs, true, 2).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed, "{order:?}");
    assert_eq!(system.balance("alice").await.unwrap(), 9_500);
    let audit = system.audit().await.unwrap();
    assert_eq!(audit.count("COMPLETED"), 1);
}

#[tokio::test]
async fn the_http_port_answers_over_tls_only() {
    let certs = TestCerts::new().unwrap();
    let system = spawn_tls_system(&certs, true, true).await.unwrap();
    let address = system.orchestrator.as_ref().unwrap().http_address();
    let (code, body) = https_get(address, "/healthz", &certs.ca.ca_cert)
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = https_get(address, "/readyz", &certs.ca.ca_cert)
        .await
        .unwrap();
    assert!(code == 200 || code == 503, "{code}: {body}");
    assert!(body.contains("participant:inventory"), "{body}");
    // Plaintext, or a client trusting another CA: no answer.
    assert_eq!(http_get(address, "/healthz").await.0, 0);
    let (code, _) = https_get(address, "/healthz", &certs.other.ca_cert)
        .await
        .unwrap();
    assert_eq!(code, 0);
}

/// Runs the built sagactl with `args`: (exit code, stdout, stderr).
async fn sagactl(args: Vec<String>) -> (i32, String, String) {
    let binaries = Binaries::find(None).expect("the binaries are built");
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let program = binaries.path("sagactl");
        let process = Running::start(command(
            program.to_str().expect("a UTF-8 path"),
            &args,
            &[
                "SAGACTL_ENDPOINT",
                "SAGACTL_TOKEN",
                "SAGACTL_CA_CERT",
                "SAGACTL_CERT",
                "SAGACTL_KEY",
            ],
        ));
        let (status, stdout, stderr) = process.finish();
        (status.code().unwrap_or(-1), stdout, stderr)
    })
    .await
    .expect("sagactl ran")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn sagactl_talks_tls_with_the_ca_and_says_what_is_missing_without() {
    let certs = TestCerts::new().unwrap();
    let system = spawn_tls_system(&certs, false, false).await.unwrap();
    let endpoint = system.orchestrator.as_ref().unwrap().endpoint().to_owned();
    let ca = certs.ca.ca_cert.to_str().unwrap().to_owned();
    let other = certs.other.ca_cert.to_str().unwrap().to_owned();

    let (code, stdout, stderr) = sagactl(strings(&[
        "--endpoint",
        &endpoint,
        "--ca-cert",
        &ca,
        "stats",
    ]))
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("in flight on this replica"), "{stdout}");

    let (code, _, stderr) = sagactl(strings(&["--endpoint", &endpoint, "stats"])).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("is https:// and needs --ca-cert"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (code, _, stderr) = sagactl(strings(&[
        "--endpoint",
        &endpoint,
        "--ca-cert",
        &other,
        "stats",
    ]))
    .await;
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains("check --ca-cert"),
        "{stderr}"
    );

    let (code, _, stderr) = sagactl(strings(&["--endpoint", &plaintext(&endpoint), "stats"])).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("use an https:// URL"), "{stderr}");
}

/// Polls the health of `url` with `tls` until it answers (or fails
/// after `SETTLE` with the last error).
async fn wait_healthy(url: &str, tls: &Client) -> Result<()> {
    let started = Instant::now();
    loop {
        match health(url, Some(tls)).await {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() > SETTLE => bail!("{url}: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls the log file until it holds `line` `count` times.
async fn wait_logged(log: &Path, line: &str, count: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(line).count() >= count {
            return Ok(());
        }
        if started.elapsed() > SETTLE {
            bail!("{line:?} not logged {count} times; the log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies a CA's server certificate and key over the files a server reads.
fn install(from: &common::tls::dev::PkiFiles, cert: &Path, key: &Path) -> Result<()> {
    for (source, target) in [(&from.server_cert, cert), (&from.server_key, key)] {
        let partial = target.with_extension("partial");
        std::fs::copy(source, &partial)?;
        std::fs::rename(&partial, target)?;
    }
    Ok(())
}

fn hangup(pid: u32) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -HUP {pid}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_streams_ride_through() {
    let certs = TestCerts::new().unwrap();
    let participants = spawn_participants(ServeOptions {
        fault_injection: true,
        ..ServeOptions::default()
    })
    .await
    .unwrap();
    let db = TestDb::create("orchestrator").await.unwrap();
    let cert = certs.dir().join("live.pem");
    let key = certs.dir().join("live-key.pem");
    install(&certs.ca, &cert, &key).unwrap();
    let log = certs.dir().join("orchestrator.log");
    let address = format!("127.0.0.1:{}", free_port());
    let binaries = Binaries::find(None).unwrap();
    let args = [
        "serve",
        "--listen",
        &address,
        "--database-url",
        db.url(),
        "--inventory-url",
        participants.inventory.endpoint(),
        "--payment-url",
        participants.payment.endpoint(),
        "--fulfillment-url",
        participants.fulfillment.endpoint(),
        "--step-timeout",
        "20s",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let mut cmd = command(
        binaries.path("orchestrator").to_str().unwrap(),
        &args,
        &[
            "DATABASE_URL",
            "TLS_CERT",
            "TLS_KEY",
            "TLS_CLIENT_CA",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "LOG_FORMAT",
        ],
    );
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let mut process = Running::start(cmd);
    let url = format!("https://{address}");
    let first = certs.client(false).unwrap();
    let second = certs.other.client(false).unwrap();
    if let Err(error) = wait_healthy(&url, &first).await {
        let exited = process.exited();
        panic!(
            "{error}; exited: {exited:?}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    participants
        .inventory
        .inventory()
        .upsert_product(UpsertProductRequest {
            product_id: "widget".into(),
            name: "Widget".into(),
            price_cents: 250,
            stock: 10,
        })
        .await
        .unwrap();
    participants
        .payment
        .payment()
        .upsert_account(UpsertAccountRequest {
            customer_id: "alice".into(),
            balance_cents: 10_000,
        })
        .await
        .unwrap();
    // Ship takes 4 s: the saga is in flight across the reload.
    participants
        .fulfillment
        .faults()
        .set_fault(delay("Ship", 4_000))
        .await
        .unwrap();

    // Before the reload: an order and a stream following it, on a
    // connection made under the first certificate.
    let channel: Channel = common::tls::endpoint(&url, Some(&first), FLAGS.ca)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut orders = OrderServiceClient::new(channel);
    let id = orders
        .place_order(place_request("alice", &[("widget", 1)], ""))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let mut stream = orders
        .watch_order(WatchOrderRequest {
            order_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let update = stream.message().await.unwrap().expect("a first update");
    assert!(!settled(update.status()), "{update:?}");

    // A certificate of another CA, then SIGHUP: new clients trusting only
    // that CA get in, clients trusting only the first one no longer do.
    install(&certs.other, &cert, &key).unwrap();
    hangup(process.pid());
    wait_logged(&log, "SIGHUP: reloaded TLS", 1).await.unwrap();
    wait_healthy(&url, &second).await.unwrap();
    let refused = health(&url, Some(&first)).await.unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    // The saga was still shipping when the new certificate took over...
    let mut after = OrderServiceClient::new(
        common::tls::endpoint(&url, Some(&second), FLAGS.ca)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = after
        .get_order_status(proto::saga::v1::GetOrderStatusRequest {
            order_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !settled(status.status()),
        "the saga settled before the reload: {status:?}"
    );
    // ...and the stream opened before it follows the saga to its end.
    let mut last = update.status();
    let ended = tokio::time::timeout(SETTLE, async {
        while let Some(update) = stream.message().await? {
            last = update.status();
        }
        Ok::<_, tonic::Status>(())
    })
    .await;
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    assert_eq!(last, OrderStatus::Completed);

    // A file that does not load: logged, and the certificate in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    hangup(process.pid());
    wait_logged(&log, "SIGHUP: TLS reload failed", 1)
        .await
        .unwrap();
    health(&url, Some(&second)).await.unwrap();

    harness::process::terminate(process.pid());
    let (status, _, _) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}: {text}");
    let reloaded: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("SIGHUP: reloaded TLS"))
        .collect();
    assert_eq!(reloaded.len(), 1, "{text}");
    assert!(
        reloaded[0].contains(cert.to_str().unwrap()),
        "{}",
        reloaded[0]
    );
}
