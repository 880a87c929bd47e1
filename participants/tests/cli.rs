//! The `participant` binary as a process: one-line errors and non-zero exits
//! for bad flags and an unreachable database, `--help`, and a clean exit on
//! SIGTERM while a client still holds a connection.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::TestDb;
use proto::payment::v1::UpsertAccountRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Generous: start-up and shutdown on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// The binary with an environment that cannot change its flags.
fn participant(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_participant"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PARTICIPANT_LISTEN")
        .env_remove("PARTICIPANT_FAULT_INJECTION")
        .env_remove("PARTICIPANT_CONNECT_TIMEOUT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running child, killed if the test ends before it exits.
struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn read_all(stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut stream = stream;
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

impl Running {
    fn start(mut command: Command) -> Self {
        let mut child = command.spawn().expect("the binary starts");
        let stdout = child.stdout.take().map(read_all);
        let stderr = child.stderr.take().map(read_all);
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until it exits (at most `DEADLINE`); returns the status, stdout
    /// and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            if started.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default());
                panic!("no exit within {DEADLINE:?}; stderr: {stderr:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.take().map(|t| t.join().unwrap_or_default());
        let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default());
        (
            status,
            stdout.unwrap_or_default(),
            stderr.unwrap_or_default(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion: (status, stdout, stderr).
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    Running::start(participant(args)).finish()
}

/// Asserts a failed start: non-zero exit, exactly one line on stderr, no
/// panic. Returns that line.
#[track_caller]
fn assert_one_line_failure(args: &[&str]) -> String {
    let (status, _stdout, stderr) = run(args);
    assert!(!status.success(), "{args:?} exits non-zero: {status:?}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: one line on stderr, got {stderr:?}"
    );
    lines[0].to_owned()
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
fn help_exits_zero_and_documents_the_flags() {
    for args in [&["--help"][..], &["payment", "--help"][..]] {
        let (status, stdout, stderr) = run(args);
        assert!(status.success(), "{args:?}: {status:?} {stderr}");
        if args.len() == 2 {
            for flag in ["--fault-injection", "--database-url", "--listen"] {
                assert!(stdout.contains(flag), "{args:?} mentions {flag}: {stdout}");
            }
        } else {
            for participant in ["inventory", "payment", "fulfillment"] {
                assert!(stdout.contains(participant), "{args:?}: {stdout}");
            }
            assert!(stdout.contains("--fault-injection"), "{stdout}");
            assert!(stdout.contains("--database-url"), "{stdout}");
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

/// Polls the health service until `service` is SERVING; fails if the process
/// exits first or `DEADLINE` passes.
async fn wait_until_serving(process: &mut Running, endpoint: &str, service: &str) -> Channel {
    let started = Instant::now();
    loop {
        if let Some(status) = process.exited() {
            panic!("the participant exited before serving: {status:?}");
        }
        let connected = Endpoint::from_shared(endpoint.to_owned())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await;
        if let Ok(channel) = connected {
            let reply = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if matches!(&reply, Ok(r) if r.get_ref().status() == ServingStatus::Serving) {
                return channel;
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{endpoint} not serving within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let killed = Command::new("kill")
        .args(["-TERM", &process.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
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
