//! The `orchestrator` binary as a process: one-line errors and non-zero
//! exits for bad flags, bad values and an unreachable database, `--help`,
//! and SIGTERM handing the leases of sagas in flight back.

use std::process::Command;

use harness::TestDb;
use harness::process::{Running, free_port, terminate, wait_until_serving};
use proto::saga::v1::order_service_client::OrderServiceClient;

fn orchestrator(args: &[&str]) -> Command {
    harness::process::command(
        env!("CARGO_BIN_EXE_orchestrator"),
        args,
        &[
            "DATABASE_URL",
            "ORCHESTRATOR_LISTEN",
            "ORCHESTRATOR_STEP_ATTEMPTS",
            "ORCHESTRATOR_BACKOFF_BASE",
            "ORCHESTRATOR_BACKOFF_CAP",
            "ORCHESTRATOR_REPLICA_ID",
            "ADMIN_TOKEN",
            "ADMIN_TOKEN_FILE",
            "READ_ONLY_TOKEN_FILE",
            "REQUEST_TIMEOUT",
            "MAX_MESSAGE_BYTES",
        ],
    )
}

#[track_caller]
fn assert_one_line_failure(args: &[&str]) -> String {
    harness::process::assert_one_line_failure(orchestrator(args), args)
}

#[test]
fn bad_flags_and_values_are_one_line_and_a_non_zero_exit() {
    let line = assert_one_line_failure(&["serve", "--bogus"]);
    assert!(line.contains("--bogus"), "{line}");
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--step-timeout",
        "soon",
    ]);
    assert!(line.contains("soon"), "{line}");
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--step-attempts",
        "0",
    ]);
    assert!(line.contains("--step-attempts"), "{line}");
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--backoff-base",
        "2s",
        "--backoff-cap",
        "1s",
    ]);
    assert!(line.contains("--backoff-base"), "{line}");
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--inventory-url",
        "not a url",
    ]);
    assert!(line.contains("inventory"), "{line}");
    assert_one_line_failure(&["launch"]);
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--admin-token-file",
        "/nonexistent/token",
    ]);
    assert!(line.contains("cannot read --admin-token-file"), "{line}");
    let line = assert_one_line_failure(&[
        "serve",
        "--database-url",
        "postgres://x/y",
        "--request-timeout",
        "0s",
    ]);
    assert!(line.contains("--request-timeout"), "{line}");
    for (flag, value) in [
        ("--retention", "30s"),
        ("--retention", "forever"),
        ("--prune-batch", "0"),
        ("--prune-interval", "0s"),
    ] {
        let line =
            assert_one_line_failure(&["serve", "--database-url", "postgres://x/y", flag, value]);
        assert!(
            line.contains(flag) || line.contains(value),
            "{flag} {value}: {line}"
        );
    }
}

#[test]
fn an_unreachable_database_is_one_line_and_a_non_zero_exit() {
    let line = assert_one_line_failure(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x",
        "--connect-timeout",
        "2s",
    ]);
    assert!(line.contains("database"), "{line}");
}

#[test]
fn an_admin_token_on_the_command_line_is_warned_about_and_never_shown() {
    // Started against a database that is not there: the tokens are read
    // first, then the start fails.
    let start = |args: &[&str], env: Option<(&str, &str)>| {
        let mut full = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/x",
            "--connect-timeout",
            "1s",
        ];
        full.extend_from_slice(args);
        let mut command = orchestrator(&full);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let (status, _, stderr) = Running::start(command).finish();
        assert!(!status.success(), "{stderr}");
        assert!(
            !stderr.contains("s3cret-t0ken"),
            "the token shows: {stderr}"
        );
        stderr
    };
    let stderr = start(&["--admin-token", "s3cret-t0ken"], None);
    assert!(stderr.contains("came on the command line"), "{stderr}");
    let stderr = start(&[], Some(("ADMIN_TOKEN", "s3cret-t0ken")));
    assert!(!stderr.contains("came on the command line"), "{stderr}");
    let file = std::env::temp_dir().join(format!("cli-admin-token-{}", std::process::id()));
    std::fs::write(&file, "s3cret-t0ken\n").unwrap();
    let stderr = start(&["--admin-token-file", file.to_str().unwrap()], None);
    assert!(!stderr.contains("came on the command line"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn help_documents_every_flag_of_the_design() {
    let (status, stdout, stderr) = Running::start(orchestrator(&["serve", "--help"])).finish();
    assert!(status.success(), "{stderr}");
    for flag in [
        "--listen",
        "--database-url",
        "--inventory-url",
        "--payment-url",
        "--fulfillment-url",
        "--http-listen",
        "--admin-token",
        "--admin-token-file",
        "--read-only-token-file",
        "--max-message-bytes",
        "--max-concurrent-streams",
        "--request-timeout",
        "--http-header-timeout",
        "--max-watches",
        "--step-timeout",
        "--step-attempts",
        "--compensation-attempts",
        "--backoff-base",
        "--backoff-cap",
        "--max-in-flight",
        "--stuck-after",
        "--retention",
        "--prune-batch",
        "--prune-interval",
    ] {
        assert!(stdout.contains(flag), "--help mentions {flag}");
    }
}

#[tokio::test]
async fn sigterm_hands_the_leases_of_sagas_in_flight_back() {
    let db = TestDb::create("cli_orchestrator")
        .await
        .expect("test database");
    let listen = format!("127.0.0.1:{}", free_port());
    // No participant listens there: the saga keeps retrying Reserve.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut command = orchestrator(&[
        "serve",
        "--listen",
        &listen,
        "--database-url",
        db.url(),
        "--inventory-url",
        &nowhere,
        "--payment-url",
        &nowhere,
        "--fulfillment-url",
        &nowhere,
        "--replica-id",
        "cli-test-replica",
        "--backoff-cap",
        "200ms",
        "--step-attempts",
        "1000",
    ]);
    command.env("RUST_LOG", "info");
    let mut process = Running::start(command);
    let channel = wait_until_serving(
        &mut process,
        &format!("http://{listen}"),
        "saga.v1.OrderService",
    )
    .await;
    let order = OrderServiceClient::new(channel.clone())
        .place_order(harness::place_request("alice", &[("widget", 1)], ""))
        .await
        .expect("place order")
        .into_inner();

    let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");
    let owner = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT lease_owner FROM sagas WHERE saga_id = $1")
            .bind(&order.order_id)
            .fetch_one(&pool)
            .await
            .expect("saga row")
    };
    assert_eq!(owner().await.as_deref(), Some("cli-test-replica"));

    terminate(process.pid());
    let (status, _stdout, stderr) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .expect("waiting for the process");
    drop(channel);
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("orchestrator listening"), "{stderr}");
    assert!(stderr.contains("leases handed back"), "{stderr}");
    assert_eq!(owner().await, None, "the lease was handed back");
    let status: String = sqlx::query_scalar("SELECT status FROM sagas WHERE saga_id = $1")
        .bind(&order.order_id)
        .fetch_one(&pool)
        .await
        .expect("saga row");
    assert_eq!(
        status, "RESERVING_INVENTORY",
        "still retrying its reservation"
    );
    pool.close().await;
}
