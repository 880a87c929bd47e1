//! The orchestrator's ports under descriptor exhaustion and idle sockets,
//! as a process: with few file descriptors and idle connections piling up,
//! the accept loop neither spins nor floods the log, and serves again once
//! they are closed; a connection that never sends a byte is closed by the
//! server after the idle timeout, on both ports.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::TestDb;
use harness::process::{Running, free_port, terminate, wait_until_serving};

/// `orchestrator serve` with `args`, its file descriptors limited to `nofile`.
fn orchestrator_limited(nofile: u32, args: &[&str]) -> Command {
    let script = format!("ulimit -n {nofile} && exec \"$0\" \"$@\"");
    let mut all = vec![
        "-c",
        script.as_str(),
        env!("CARGO_BIN_EXE_orchestrator"),
        "serve",
    ];
    all.extend_from_slice(args);
    let mut command = harness::process::command(
        "sh",
        &all,
        &[
            "DATABASE_URL",
            "ORCHESTRATOR_LISTEN",
            "ORCHESTRATOR_HTTP_LISTEN",
        ],
    );
    command.env("RUST_LOG", "info");
    command
}

/// `GET /healthz` on the HTTP port; the status line, if any.
fn healthz(address: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    reply.lines().next().map(str::to_owned)
}

fn common_args<'a>(
    db: &'a TestDb,
    listen: &'a str,
    http: &'a str,
    nowhere: &'a str,
) -> Vec<&'a str> {
    vec![
        "--listen",
        listen,
        "--http-listen",
        http,
        "--database-url",
        db.url(),
        "--inventory-url",
        nowhere,
        "--payment-url",
        nowhere,
        "--fulfillment-url",
        nowhere,
        "--max-connections",
        "4",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_ports_back_off_log_little_and_recover() {
    let db = TestDb::create("ports_emfile").await.expect("test database");
    let listen = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut args = common_args(&db, &listen, &http, &nowhere);
    // Longer than the test: the server's own idle timeout is not what
    // frees the descriptors here.
    args.extend(["--connection-idle-timeout", "120s"]);
    let mut process = Running::start(orchestrator_limited(64, &args));
    let channel = wait_until_serving(
        &mut process,
        &format!("http://{listen}"),
        "saga.v1.OrderService",
    )
    .await;
    assert_eq!(healthz(&http).as_deref(), Some("HTTP/1.1 200 OK"));

    // Idle connections until the process is out of descriptors; the kernel
    // still completes handshakes into the listen backlog beyond that.
    let mut idle = Vec::new();
    for port in [&http, &listen] {
        for _ in 0..80 {
            if let Ok(stream) =
                TcpStream::connect_timeout(&port.parse().unwrap(), Duration::from_millis(500))
            {
                idle.push(stream);
            }
        }
    }
    assert!(idle.len() > 64, "opened {} connections", idle.len());
    // The accept loops fail meanwhile; a spinning loop would log
    // thousands of lines in this time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(idle);

    // Served again, on both ports.
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthz(&http).as_deref() != Some("HTTP/1.1 200 OK") {
        assert!(
            Instant::now() < deadline,
            "the HTTP port does not answer again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(channel);
    wait_until_serving(
        &mut process,
        &format!("http://{listen}"),
        "saga.v1.OrderService",
    )
    .await;

    terminate(process.pid());
    let (_status, _stdout, stderr) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .expect("waiting for the process");
    let accept_lines = stderr
        .lines()
        .filter(|line| line.contains("cannot accept connections"))
        .count();
    assert!(
        accept_lines >= 1,
        "the accept failures are logged: {stderr}"
    );
    let lines = stderr.lines().count();
    assert!(
        lines < 100 && accept_lines <= 20,
        "{lines} log lines, {accept_lines} about accepts, in a few seconds: {}",
        stderr.lines().take(30).collect::<Vec<_>>().join("\n")
    );
}

/// Whether the server closes `stream` (EOF or reset) within `within`.
fn closed_by_server(mut stream: TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1024];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            // The HTTP/2 server speaks first (its SETTINGS frame).
            Ok(_) => continue,
            Err(error) => {
                return !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_byte_is_closed_after_the_idle_timeout() {
    let db = TestDb::create("ports_idle").await.expect("test database");
    let listen = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut args = common_args(&db, &listen, &http, &nowhere);
    args.extend(["--connection-idle-timeout", "1s"]);
    let mut process = Running::start(orchestrator_limited(1024, &args));
    let channel = wait_until_serving(
        &mut process,
        &format!("http://{listen}"),
        "saga.v1.OrderService",
    )
    .await;

    let silent_http = TcpStream::connect(&http).expect("connect to the HTTP port");
    let silent_grpc = TcpStream::connect(&listen).expect("connect to the gRPC port");
    let (http_closed, grpc_closed) = tokio::task::spawn_blocking(move || {
        let grpc =
            std::thread::spawn(move || closed_by_server(silent_grpc, Duration::from_secs(15)));
        let http = closed_by_server(silent_http, Duration::from_secs(15));
        (http, grpc.join().unwrap())
    })
    .await
    .unwrap();
    assert!(http_closed, "the HTTP port kept a silent connection open");
    assert!(grpc_closed, "the gRPC port kept a silent connection open");

    // A live client is pinged, answers, and keeps its connection: calls
    // after several idle timeouts still go through on the same channel.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reply = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.OrderService".into(),
        })
        .await;
    assert!(reply.is_ok(), "{reply:?}");

    terminate(process.pid());
    let (status, _stdout, stderr) = tokio::task::spawn_blocking(move || process.finish())
        .await
        .expect("waiting for the process");
    assert!(status.success(), "{status:?}: {stderr}");
}
