//! `sagactl` as a process against a real system: stuck sagas made for real
//! (a compensation failing past its budget, a participant that stops
//! answering), found with `stuck`, explained with `show`, resolved with
//! `retry` and `abort`; refusals, the admin token, JSON output, exit codes.

use std::time::Duration;

use harness::process::{Running, command, free_port};
use harness::{System, fault, spawn_system_with};
use orchestrator::auth::AdminTokens;
use proto::fault::v1::SetFaultRequest;
use proto::saga::v1::OrderStatus;
use serde_json::Value;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(30);

/// Runs sagactl against `endpoint`: (exit code, stdout, stderr).
async fn sagactl(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["--endpoint", endpoint];
    full.extend_from_slice(args);
    let owned: Vec<String> = full.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        let process = Running::start(command(
            env!("CARGO_BIN_EXE_sagactl"),
            &args,
            &[
                "SAGACTL_ENDPOINT",
                "SAGACTL_TOKEN",
                "SAGACTL_TOKEN_FILE",
                "USER",
            ],
        ));
        let (status, stdout, stderr) = process.finish();
        (status.code().unwrap_or(-1), stdout, stderr)
    })
    .await
    .expect("sagactl ran")
}

fn endpoint(system: &System) -> String {
    system
        .orchestrator
        .as_ref()
        .expect("orchestrator")
        .endpoint()
        .to_owned()
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn saga_ids(document: &Value) -> Vec<String> {
    document["sagas"]
        .as_array()
        .expect("sagas array")
        .iter()
        .map(|s| s["saga_id"].as_str().expect("saga_id").to_owned())
        .collect()
}

async fn seeded(adjust: impl FnOnce(&mut orchestrator::config::Settings)) -> System {
    let system = spawn_system_with(adjust).await.expect("system");
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    system
}

fn always(rpc: &str, mode: &str, code: Code) -> SetFaultRequest {
    fault(rpc, mode, code, 0)
}

#[tokio::test]
async fn a_saga_whose_compensation_keeps_failing_is_found_and_resumed() {
    let system = seeded(|s| s.executor.policy.compensation_attempts = 2).await;
    let endpoint = endpoint(&system);
    system
        .fault(
            "payment",
            always("Charge", "FAIL_BEFORE", Code::FailedPrecondition),
        )
        .await
        .unwrap();
    system
        .fault(
            "inventory",
            always("Release", "FAIL_BEFORE", Code::Unavailable),
        )
        .await
        .unwrap();
    let id = system.place("alice", &[("widget", 2)]).await.unwrap();
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::NeedsAttention);

    let (code, stdout, stderr) = sagactl(&endpoint, &["stuck"]).await;
    assert_eq!(code, 1, "stuck exits 1 when something is stuck: {stderr}");
    assert!(
        stdout.contains(&id) && stdout.contains("NEEDS_ATTENTION"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reserve_inventory"),
        "names the step: {stdout}"
    );

    let (code, stdout, _) = sagactl(&endpoint, &["stuck", "--output", "json"]).await;
    assert_eq!(code, 1);
    let document = json(&stdout);
    assert_eq!(saga_ids(&document), std::slice::from_ref(&id));
    let saga = &document["sagas"][0];
    assert_eq!(saga["status"], "NEEDS_ATTENTION");
    assert_eq!(saga["current_step"], "reserve_inventory");
    assert_eq!(saga["attempts"], 2);
    let why = saga["stuck_reason"].as_str().unwrap();
    assert!(
        why.contains("compensation reserve_inventory failed 2 times"),
        "{why}"
    );
    assert!(saga["last_error"].as_str().unwrap().contains("UNAVAILABLE"));

    let (code, stdout, _) = sagactl(&endpoint, &["show", &id]).await;
    assert_eq!(code, 0);
    for expected in [
        "NEEDS_ATTENTION",
        "rejected",
        "Journal",
        "compensation",
        "RETRYABLE_FAILURE",
    ] {
        assert!(
            stdout.contains(expected),
            "show mentions {expected}: {stdout}"
        );
    }

    // The fault is fixed; the operator resumes the saga.
    system.clear_faults().await.unwrap();
    let (code, stdout, stderr) = sagactl(
        &endpoint,
        &[
            "retry",
            &id,
            "--reason",
            "inventory is back",
            "--operator",
            "dana",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&id), "{stdout}");
    let order = system.wait_settled(&id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Failed);
    assert_eq!(system.stock("widget").await.unwrap(), (100, 0), "released");

    let (code, stdout, _) = sagactl(&endpoint, &["stuck"]).await;
    assert_eq!(code, 0, "nothing stuck any more: {stdout}");
    assert!(stdout.contains("nothing stuck"));

    let (_, stdout, _) = sagactl(&endpoint, &["show", &id, "--output", "json"]).await;
    let document = json(&stdout);
    let retry = document["journal"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "CONTROL" && e["step"] == "retry")
        .expect("the retry is journalled");
    assert_eq!(retry["actor"], "operator dana");
    assert!(
        retry["detail"]
            .as_str()
            .unwrap()
            .contains("inventory is back")
    );
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_participant_that_stops_answering_shows_as_stuck_and_abort_compensates() {
    let system = seeded(|s| {
        s.step_timeout = Duration::from_millis(300);
        s.executor.policy.action_attempts = 10_000;
    })
    .await;
    let endpoint = endpoint(&system);
    let mut hang = always("Charge", "DELAY", Code::Ok);
    hang.latency_ms = 600_000;
    system.fault("payment", hang).await.unwrap();
    let stuck_id = system.place("alice", &[("widget", 3)]).await.unwrap();
    let resumed_id = system.place("alice", &[("widget", 1)]).await.unwrap();
    for id in [&stuck_id, &resumed_id] {
        system
            .wait_for(id, SETTLE, |o| o.status() == OrderStatus::ChargingPayment)
            .await
            .unwrap();
    }

    // No progress for over a second (retries do not count as progress).
    let deadline = std::time::Instant::now() + SETTLE;
    let document = loop {
        let (code, stdout, _) = sagactl(
            &endpoint,
            &["stuck", "--threshold", "1s", "--output", "json"],
        )
        .await;
        if code == 1 && saga_ids(&json(&stdout)).len() == 2 {
            break json(&stdout);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reported stuck: {stdout}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let saga = document["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["saga_id"] == stuck_id.as_str())
        .unwrap();
    assert_eq!(saga["status"], "CHARGING_PAYMENT");
    assert_eq!(saga["current_step"], "charge_payment");
    let why = saga["stuck_reason"].as_str().unwrap();
    assert!(
        why.contains("no progress") && why.contains("charge_payment"),
        "{why}"
    );
    assert!(
        saga["last_error"]
            .as_str()
            .unwrap()
            .contains("DEADLINE_EXCEEDED"),
        "{saga}"
    );
    assert!(saga["attempts"].as_u64().unwrap() >= 1);

    let (code, stdout, stderr) = sagactl(
        &endpoint,
        &[
            "abort",
            &stuck_id,
            "--reason",
            "payment is down",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&stdout)["saga_id"], stuck_id.as_str());
    let order = system.wait_settled(&stuck_id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Failed);
    assert_eq!(
        order.failure_reason,
        "aborted by an operator: payment is down"
    );

    // The other one: the payment service recovers and the operator resumes it.
    system.clear_faults().await.unwrap();
    let (code, _, stderr) = sagactl(&endpoint, &["retry", &resumed_id]).await;
    assert_eq!(code, 0, "{stderr}");
    let order = system.wait_settled(&resumed_id, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Completed);
    system.audit().await.unwrap();
}

#[tokio::test]
async fn requests_that_make_no_sense_are_refused_with_a_clear_message() {
    let system = seeded(|_| {}).await;
    let endpoint = endpoint(&system);
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system.wait_settled(&id, SETTLE).await.unwrap();

    let (code, _, stderr) = sagactl(&endpoint, &["retry", &id]).await;
    assert_eq!(code, 3);
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("COMPLETED"),
        "{stderr}"
    );
    let (code, _, stderr) = sagactl(&endpoint, &["abort", &id, "--reason", "too late"]).await;
    assert_eq!(code, 3);
    assert!(
        stderr.contains("shipped"),
        "abort after the pivot: {stderr}"
    );
    let (code, _, stderr) = sagactl(&endpoint, &["show", "ord_nope"]).await;
    assert_eq!(code, 3);
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("ord_nope"),
        "{stderr}"
    );
    let (code, _, stderr) = sagactl(&endpoint, &["abort", &id]).await;
    assert_eq!(code, 2, "--reason is required: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, _, stderr) = sagactl(&nowhere, &["stats"]).await;
    assert_eq!(code, 3);
    assert!(stderr.contains("cannot reach the orchestrator"), "{stderr}");
    assert!(!stderr.contains("panicked"));

    // The refused requests changed nothing.
    let (_, stdout, _) = sagactl(&endpoint, &["show", &id, "--output", "json"]).await;
    let document = json(&stdout);
    assert_eq!(document["saga"]["status"], "COMPLETED");
    assert!(
        document["journal"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "CONTROL"),
        "no request was journalled"
    );
}

#[tokio::test]
async fn the_admin_token_guards_admin_service_only() {
    let system = seeded(|s| s.admin = AdminTokens::new(Some("s3cret"), None)).await;
    let endpoint = endpoint(&system);

    let (code, _, stderr) = sagactl(&endpoint, &["stats"]).await;
    assert_eq!(code, 3);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let (code, _, stderr) = sagactl(&endpoint, &["--token", "guess", "stats"]).await;
    assert_eq!(code, 3);
    assert!(stderr.contains("wrong admin token"), "{stderr}");

    // OrderService stays open.
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system.wait_settled(&id, SETTLE).await.unwrap();

    let (code, stdout, stderr) = sagactl(
        &endpoint,
        &["--token", "s3cret", "stats", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let stats = json(&stdout);
    assert_eq!(stats["counts"]["COMPLETED"], 1);
    assert_eq!(stats["started_last_minute"], 1);
    assert_eq!(stats["finished_last_minute"], 1);
    assert!(stats["oldest_non_terminal_age_seconds"].is_null());
}

#[tokio::test]
async fn a_token_file_authenticates_and_a_read_only_token_only_reads() {
    let system = seeded(|s| s.admin = AdminTokens::new(Some("op3rator"), Some("r3ader"))).await;
    let endpoint = endpoint(&system);
    let dir = std::env::temp_dir().join(format!("sagactl-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let operator = dir.join("operator");
    let reader = dir.join("reader");
    std::fs::write(&operator, "op3rator\n").unwrap();
    std::fs::write(&reader, "r3ader\n").unwrap();
    let (operator, reader) = (operator.to_str().unwrap(), reader.to_str().unwrap());
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system.wait_settled(&id, SETTLE).await.unwrap();

    let (code, stdout, stderr) = sagactl(
        &endpoint,
        &["--token-file", operator, "stats", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&stdout)["counts"]["COMPLETED"], 1);

    // The read-only token lists and shows, and may not retry.
    let (code, stdout, stderr) = sagactl(&endpoint, &["--token-file", reader, "list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&id), "{stdout}");
    let (code, _, stderr) = sagactl(&endpoint, &["--token-file", reader, "show", &id]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = sagactl(
        &endpoint,
        &["--token-file", reader, "retry", &id, "--reason", "x"],
    )
    .await;
    assert_eq!(code, 3);
    assert!(
        stderr.contains("PERMISSION_DENIED") && stderr.contains("RetrySaga"),
        "{stderr}"
    );
    let (code, _, stderr) = sagactl(
        &endpoint,
        &["--token-file", reader, "reconcile", "--repair"],
    )
    .await;
    assert_eq!(code, 3);
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");

    // Bad usage: both ways at once, or a file that is not there.
    let (code, _, stderr) = sagactl(
        &endpoint,
        &["--token-file", operator, "--token", "op3rator", "stats"],
    )
    .await;
    assert_eq!(code, 2);
    assert!(stderr.contains("not both"), "{stderr}");
    let missing = dir.join("missing");
    let (code, _, stderr) = sagactl(
        &endpoint,
        &["--token-file", missing.to_str().unwrap(), "stats"],
    )
    .await;
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read --token-file"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn list_pages_newest_first_and_filters() {
    let system = seeded(|_| {}).await;
    system.seed_account("bob", 100).await.unwrap();
    let endpoint = endpoint(&system);
    let mut placed = Vec::new();
    for customer in ["alice", "alice", "bob", "alice", "bob"] {
        let id = system.place(customer, &[("widget", 1)]).await.unwrap();
        system.wait_settled(&id, SETTLE).await.unwrap();
        placed.push(id);
    }
    let newest_first: Vec<String> = placed.iter().rev().cloned().collect();

    let (code, stdout, _) = sagactl(&endpoint, &["list"]).await;
    assert_eq!(code, 0);
    let header = stdout.lines().next().unwrap();
    for column in ["ID", "STATUS", "STEP", "ATTEMPTS", "AGE", "LAST ERROR"] {
        assert!(header.contains(column), "{header}");
    }
    let (_, stdout, _) = sagactl(&endpoint, &["list", "--limit", "2"]).await;
    assert!(
        stdout.contains("--page-token"),
        "says how to get more: {stdout}"
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let mut args = vec!["list", "--limit", "2", "--output", "json"];
        if !token.is_empty() {
            args.extend(["--page-token", token.as_str()]);
        }
        let (code, stdout, _) = sagactl(&endpoint, &args).await;
        assert_eq!(code, 0);
        let page = json(&stdout);
        seen.extend(saga_ids(&page));
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, newest_first);

    let (_, stdout, _) = sagactl(
        &endpoint,
        &["list", "--status", "failed", "--output", "json"],
    )
    .await;
    let failed = saga_ids(&json(&stdout));
    assert_eq!(
        failed,
        [placed[4].clone(), placed[2].clone()],
        "bob cannot pay"
    );
    let (_, stdout, _) = sagactl(
        &endpoint,
        &["list", "--customer", "alice", "--output", "json"],
    )
    .await;
    assert_eq!(saga_ids(&json(&stdout)).len(), 3);
    let (_, stdout, _) = sagactl(
        &endpoint,
        &["list", "--older-than", "1h", "--output", "json"],
    )
    .await;
    assert!(saga_ids(&json(&stdout)).is_empty());
}

#[tokio::test]
async fn help_explains_commands_exit_codes_and_json() {
    let (code, stdout, _) = sagactl("http://127.0.0.1:1", &["--help"]).await;
    assert_eq!(code, 0);
    for expected in [
        "list",
        "show",
        "stuck",
        "retry",
        "abort",
        "stats",
        "Examples",
        "Exit status",
        "JSON",
    ] {
        assert!(stdout.contains(expected), "--help mentions {expected}");
    }
}

#[tokio::test]
async fn reconcile_exits_0_when_clean_and_1_on_discrepancies_even_once_repaired() {
    use proto::fulfillment::v1::{CancelShipmentRequest, Item, ShipRequest};
    use proto::payment::v1::ChargeRequest;

    let system = seeded(|_| {}).await;
    system.seed_account("bob", 100).await.unwrap();
    let endpoint = endpoint(&system);
    let completed = system.place("alice", &[("widget", 1)]).await.unwrap();
    let failed = system.place("bob", &[("widget", 1)]).await.unwrap();
    for id in [&completed, &failed] {
        system.wait_settled(id, SETTLE).await.unwrap();
    }
    assert_eq!(
        system.status(&failed).await.unwrap().status(),
        OrderStatus::Failed
    );

    let (code, stdout, stderr) = sagactl(&endpoint, &["reconcile"]).await;
    assert_eq!(code, 0, "clean: {stdout}{stderr}");
    assert!(stdout.contains("no discrepancies"), "{stdout}");
    assert!(stdout.contains("checked 2 sagas"), "{stdout}");
    let (code, stdout, _) = sagactl(&endpoint, &["reconcile", "--output", "json"]).await;
    assert_eq!(code, 0);
    let document = json(&stdout);
    assert_eq!(document["discrepancies"], serde_json::json!([]));
    assert_eq!(document["discrepancies_found"], 0);
    assert_eq!(document["sagas_checked"], 2);

    // Behind the orchestrator's back: a shipment for the FAILED saga (an
    // orphan), a charge for a saga nobody placed (an orphan), and the
    // COMPLETED saga's shipment cancelled (missing).
    let fulfillment = system.participants.fulfillment.fulfillment();
    fulfillment
        .clone()
        .ship(ShipRequest {
            saga_id: failed.clone(),
            items: vec![Item {
                product_id: "widget".into(),
                quantity: 1,
            }],
        })
        .await
        .unwrap();
    fulfillment
        .clone()
        .cancel_shipment(CancelShipmentRequest {
            saga_id: completed.clone(),
        })
        .await
        .unwrap();
    system
        .participants
        .payment
        .payment()
        .charge(ChargeRequest {
            saga_id: "ghost".into(),
            customer_id: "alice".into(),
            amount_cents: 300,
        })
        .await
        .unwrap();

    let (code, stdout, stderr) = sagactl(&endpoint, &["reconcile"]).await;
    assert_eq!(code, 1, "discrepancies found: {stdout}{stderr}");
    for expected in [
        "ORPHAN",
        "MISSING",
        "ghost",
        "unknown",
        &failed,
        &completed,
        "3 discrepancies",
        "sagactl reconcile --repair",
    ] {
        assert!(stdout.contains(expected), "mentions {expected}: {stdout}");
    }

    let (code, stdout, stderr) =
        sagactl(&endpoint, &["reconcile", "--repair", "--operator", "carol"]).await;
    assert_eq!(code, 1, "found, even if repaired: {stdout}{stderr}");
    assert!(stdout.contains("repaired 2 orphans"), "{stdout}");
    assert!(stdout.contains("CancelShipment"), "says what: {stdout}");
    assert!(stdout.contains("Refund"), "says what: {stdout}");

    // What is left cannot be repaired: the COMPLETED saga's shipment.
    let (code, stdout, _) =
        sagactl(&endpoint, &["reconcile", "--repair", "--output", "json"]).await;
    assert_eq!(code, 1);
    let document = json(&stdout);
    assert_eq!(document["discrepancies_found"], 1, "{document}");
    assert_eq!(document["repaired"], 0);
    let left = &document["discrepancies"][0];
    assert_eq!(left["saga_id"], completed.as_str());
    assert_eq!(left["participant"], "fulfillment");
    assert_eq!(left["kind"], "MISSING");
    assert_eq!(left["saga_status"], "COMPLETED");
    assert_eq!(left["expected"], "SHIPPED");
    assert_eq!(left["repaired"], false);
    assert!(left["repair"].is_null());

    // The repair is in the FAILED saga's journal, by the operator.
    let (_, stdout, _) = sagactl(&endpoint, &["show", &failed, "--output", "json"]).await;
    let journal = json(&stdout)["journal"].as_array().unwrap().clone();
    let control: Vec<_> = journal.iter().filter(|e| e["kind"] == "CONTROL").collect();
    assert_eq!(control.len(), 1, "{journal:?}");
    assert_eq!(control[0]["actor"], "operator carol");
    assert_eq!(control[0]["step"], "reconcile");
    assert_eq!(
        control[0]["rpc"],
        "fulfillment.v1.FulfillmentService/CancelShipment"
    );

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, _, stderr) = sagactl(&nowhere, &["reconcile"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("cannot reach the orchestrator"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (code, stdout, _) = sagactl(&endpoint, &["reconcile", "--help"]).await;
    assert_eq!(code, 0);
    for expected in [
        "ORPHAN",
        "MISSING",
        "MISMATCH",
        "--repair",
        "--operator",
        "Exit 1",
    ] {
        assert!(
            stdout.contains(expected),
            "reconcile --help mentions {expected}: {stdout}"
        );
    }
}

/// The embedded mode (`orchestrator dev`, SQLite, in memory; in this
/// process): reconcile reads the embedded participants and repairs there
/// too.
#[tokio::test]
async fn reconcile_works_on_the_embedded_mode() {
    use orchestrator::dev::DevArgs;
    use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
    use proto::inventory::v1::{Item, ReserveRequest};
    use proto::saga::v1::GetOrderStatusRequest;
    use proto::saga::v1::order_service_client::OrderServiceClient;

    // A base port with the four after it free (the participants' and the
    // HTTP port's).
    let base = (0..100)
        .map(|_| free_port())
        .find(|&base| {
            base < 65_000
                && (0..5).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        })
        .expect("five consecutive free ports");
    let endpoint = format!("http://127.0.0.1:{base}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dev = tokio::spawn(orchestrator::dev::run(
        DevArgs {
            listen: ([127, 0, 0, 1], base).into(),
            data_dir: std::path::PathBuf::new(),
            in_memory: true,
            fault_injection: false,
            step_timeout: Duration::from_secs(5),
            http_listen: None,
            no_http: false,
            tokens: Default::default(),
            retention: Default::default(),
            limits: Default::default(),
            telemetry: Default::default(),
            tls: false,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = harness::process::wait_serving(&endpoint, "saga.v1.AdminService").await;

    let mut orders = OrderServiceClient::new(channel);
    let id = orders
        .place_order(harness::place_request("alice", &[("widget", 2)], ""))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let order = orders
            .get_order_status(GetOrderStatusRequest {
                order_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if order.status() == OrderStatus::Completed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{order:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, stdout, stderr) = sagactl(&endpoint, &["reconcile"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    InventoryServiceClient::connect(format!("http://127.0.0.1:{}", base + 1))
        .await
        .unwrap()
        .reserve(ReserveRequest {
            saga_id: "ord_nobody".into(),
            items: vec![Item {
                product_id: "widget".into(),
                quantity: 1,
            }],
        })
        .await
        .unwrap();
    let (code, stdout, _) =
        sagactl(&endpoint, &["reconcile", "--repair", "--output", "json"]).await;
    assert_eq!(code, 1, "{stdout}");
    let document = json(&stdout);
    assert_eq!(document["repaired"], 1, "{document}");
    assert_eq!(document["discrepancies"][0]["saga_id"], "ord_nobody");
    assert_eq!(document["discrepancies"][0]["kind"], "ORPHAN");
    assert!(document["discrepancies"][0]["saga_status"].is_null());
    let (code, stdout, _) = sagactl(&endpoint, &["reconcile"]).await;
    assert_eq!(code, 0, "repaired: {stdout}");
    assert!(stdout.contains("checked 1 sagas"), "{stdout}");
    assert!(stdout.contains("2 reservations"), "{stdout}");
    // Our connection closes, so the server drains at once.
    drop(orders);
    let _ = stop.send(());
    dev.await
        .unwrap()
        .expect("the embedded system stops cleanly");
}

#[tokio::test]
async fn finished_sagas_are_exported_as_json_lines_and_pruned_past_their_retention() {
    // A minute kept, a round every second, one saga per batch: the test
    // moves finishes two minutes back to make them due.
    let system = seeded(|s| {
        s.executor.policy.compensation_attempts = 1;
        s.retention = orchestrator::prune::Retention {
            keep: Some(Duration::from_secs(60)),
            batch: 1,
            interval: Duration::from_secs(1),
        };
    })
    .await;
    let endpoint = endpoint(&system);
    let settle = |id: String, expected: OrderStatus| {
        let system = &system;
        async move {
            let order = system.wait_settled(&id, SETTLE).await.unwrap();
            assert_eq!(order.status(), expected, "{id}");
            id
        }
    };
    let completed = settle(
        system.place("alice", &[("widget", 1)]).await.unwrap(),
        OrderStatus::Completed,
    )
    .await;
    let rejected = always("Charge", "FAIL_BEFORE", Code::FailedPrecondition);
    system.fault("payment", rejected).await.unwrap();
    let failed = settle(
        system.place("alice", &[("widget", 2)]).await.unwrap(),
        OrderStatus::Failed,
    )
    .await;
    let release_down = always("Release", "FAIL_BEFORE", Code::Unavailable);
    system.fault("inventory", release_down).await.unwrap();
    let attention = settle(
        system.place("alice", &[("widget", 3)]).await.unwrap(),
        OrderStatus::NeedsAttention,
    )
    .await;
    system.clear_faults().await.unwrap();
    let recent = settle(
        system.place("alice", &[("widget", 4)]).await.unwrap(),
        OrderStatus::Completed,
    )
    .await;

    // Export what finished before now: the three finished sagas, with
    // their journals, one JSON document per line; not the one that needs
    // attention.
    let now = orchestrator::executor::now_epoch() + 1.0;
    let before = sagactl::render::rfc3339(now);
    let (code, stdout, stderr) = sagactl(
        &endpoint,
        &["export", "--finished-before", &before, "--page-size", "2"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("exported 3 saga(s)"), "{stderr}");
    let lines: Vec<Value> = stdout.lines().map(json).collect();
    let mut exported: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["saga"]["saga_id"].as_str().unwrap(),
                l["saga"]["status"].as_str().unwrap(),
            )
        })
        .collect();
    exported.sort();
    let mut expected = vec![
        (completed.as_str(), "COMPLETED"),
        (failed.as_str(), "FAILED"),
        (recent.as_str(), "COMPLETED"),
    ];
    expected.sort();
    assert_eq!(exported, expected);
    for line in &lines {
        assert!(line["finished_at"].is_string(), "{line}");
        assert!(!line["journal"].as_array().unwrap().is_empty(), "{line}");
    }
    let (code, _, stderr) = sagactl(&endpoint, &["export", "--finished-before", "soon"]).await;
    assert_eq!(code, 2, "a bad time is bad usage: {stderr}");

    // Two of them finished past the retention: the pruner deletes them and
    // their journals; the recent one and the one that needs attention stay.
    for due in [&completed, &failed] {
        system.age_finish(due, 120.0).await.unwrap();
    }
    let deadline = std::time::Instant::now() + SETTLE;
    while system.saga_count().await.unwrap() > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not pruned in {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for gone in [&completed, &failed] {
        let error = system.status(gone).await.unwrap_err();
        let code = error
            .downcast_ref::<tonic::Status>()
            .map(tonic::Status::code);
        assert_eq!(code, Some(Code::NotFound), "{gone}: {error}");
        assert_eq!(system.journal_rows(gone).await.unwrap(), 0, "{gone}");
    }
    for kept in [&recent, &attention] {
        system.status(kept).await.unwrap();
        assert!(system.journal_rows(kept).await.unwrap() > 0, "{kept}");
    }
    let http = system.orchestrator.as_ref().unwrap().http_address();
    // Counters are per process, and only this test's pruner deletes
    // anything (the other tests keep 30 days). The retention gauge is not
    // checked here: every orchestrator of this test binary sets it.
    let (_, metrics) = harness::http_get(http, "/metrics").await;
    assert!(metrics.contains("saga_pruned_total 2"), "{metrics}");
}
