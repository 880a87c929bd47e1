//! The `participant` binary as a process: one-line errors and non-zero exits
//! for bad flags and an unreachable database, `--help`, and a clean exit on
//! SIGTERM while a client still holds a connection.

use std::process::{Command, ExitStatus};

use harness::TestDb;
use harness::process::{Running, free_port, terminate, wait_until_serving};
use proto::payment::v1::UpsertAccountRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;

/// The binary with an environment that cannot change its flags.
fn participant(args: &[&str]) -> Command {
    harness::process::command(
        env!("CARGO_BIN_EXE_participant"),
        args,
        &[
            "DATABASE_URL",
            "PARTICIPANT_LISTEN",
            "PARTICIPANT_FAULT_INJECTION",
            "PARTICIPANT_CONNECT_TIMEOUT",
        ],
    )
}

/// Asserts a one-line failure of the binary with `args`.
#[track_caller]
fn assert_one_line_failure(args: &[&str]) -> String {
    harness::process::assert_one_line_failure(participant(args), args)
}

/// Runs the binary to completion: (status, stdout, stderr).
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    Running::start(participant(args)).finish()
}

#[test]
fn a_bad_flag_is_one_line_and_a_non_zero_exit() {
    let line = assert_one_line_failure(&["inventory", "--bogus"]);
    assert!(line.contains("--bogus"), "{line}");
}

#[test]
fn an_unknown_subcommand_is_one_line_and_a_non_zero_exit() {
    let line = assert_one_line_failure(&["warehouse", "--database-url", "postgres://x/y"]);
    assert!(line.contains("warehouse"), "{line}");
}

#[test]
fn an_unreachable_database_is_one_line_and_a_non_zero_exit() {
    let line = assert_one_line_failure(&[
        "inventory",
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
fn an_unsupported_database_url_is_one_line_naming_the_supported_schemes() {
    let line = assert_one_line_failure(&[
        "inventory",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "mysql://root:secret@127.0.0.1/x",
    ]);
    assert!(
        line.contains("postgres://") && line.contains("sqlite:"),
        "{line}"
    );
    assert!(!line.contains("secret"), "never echo the URL: {line}");
}

#[test]
fn help_exits_zero_and_documents_the_flags() {
    for args in [&["--help"][..], &["payment", "--help"][..]] {
        let (status, stdout, stderr) = run(args);
        assert!(status.success(), "{args:?}: {status:?} {stderr}");
        if args.len() == 2 {
            for flag in [
                "--fault-injection",
                "--database-url",
                "--listen",
                "--max-message-bytes",
                "--max-concurrent-streams",
                "--request-timeout",
                "--http-header-timeout",
            ] {
                assert!(stdout.contains(flag), "{args:?} mentions {flag}: {stdout}");
            }
            assert!(stdout.contains("SQLite"), "{args:?}: {stdout}");
        } else {
            for participant in ["inventory", "payment", "fulfillment"] {
                assert!(stdout.contains(participant), "{args:?}: {stdout}");
            }
            assert!(stdout.contains("--fault-injection"), "{stdout}");
            assert!(stdout.contains("--database-url"), "{stdout}");
        }
    }
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let db = TestDb::create("cli_payment").await.expect("test database");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = participant(&["payment", "--listen", &listen, "--database-url", db.url()]);
    command.env("RUST_LOG", "info");
    let mut process = Running::start(command);

    let endpoint = format!("http://{listen}");
    let channel = wait_until_serving(&mut process, &endpoint, "payment.v1.PaymentService").await;
    let account = PaymentServiceClient::new(channel.clone())
        .upsert_account(UpsertAccountRequest {
            customer_id: "alice".into(),
            balance_cents: 500,
        })
        .await
        .expect("upsert account")
        .into_inner();
    assert_eq!(account.balance_cents, 500);

    // The client keeps its connection open: shutdown must not wait on it.
    terminate(process.pid());
    let (status, _stdout, stderr) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .expect("waiting for the process");
    drop(channel);

    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("listening") && stderr.contains(&listen),
        "logs where it listens: {stderr}"
    );
    assert!(stderr.contains("stopped"), "logs that it stopped: {stderr}");
}

#[tokio::test]
async fn serves_on_a_sqlite_file_it_creates() {
    let path = std::env::temp_dir().join(format!(
        "participants-cli-{}-payment.db",
        std::process::id()
    ));
    let url = format!("sqlite:{}", path.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut process = Running::start(participant(&[
        "payment",
        "--listen",
        &listen,
        "--database-url",
        &url,
    ]));

    let endpoint = format!("http://{listen}");
    let channel = wait_until_serving(&mut process, &endpoint, "payment.v1.PaymentService").await;
    let account = PaymentServiceClient::new(channel.clone())
        .upsert_account(UpsertAccountRequest {
            customer_id: "alice".into(),
            balance_cents: 500,
        })
        .await
        .expect("upsert account")
        .into_inner();
    assert_eq!(account.balance_cents, 500);
    assert!(path.exists(), "the database file was created");

    terminate(process.pid());
    let (status, _stdout, stderr) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .expect("waiting for the process");
    drop(channel);
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
}
