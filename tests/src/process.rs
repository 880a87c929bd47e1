//! Running the real binaries as processes, for the process-level tests:
//! start with captured output, wait with a deadline, kill on drop, wait for
//! gRPC health, send SIGTERM.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Generous: start-up and shutdown on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// `program` with `args`, output captured, and the environment variables
/// named in `clear` removed so they cannot change its flags.
pub fn command(program: &str, args: &[&str], clear: &[&str]) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in clear {
        command.env_remove(name);
    }
    command
}

/// A running child, killed if the test ends before it exits.
pub struct Running {
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
    /// Starts `command`.
    pub fn start(mut command: Command) -> Self {
        let mut child = command.spawn().expect("the binary starts");
        let stdout = child.stdout.take().map(read_all);
        let stderr = child.stderr.take().map(read_all);
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits until it exits (at most `DEADLINE`); returns the status, stdout
    /// and stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
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

/// Sends SIGTERM to a process.
pub fn terminate(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -TERM {pid}");
}

/// Asserts a failed start: non-zero exit, exactly one line on stderr, no
/// panic. Returns that line.
#[track_caller]
pub fn assert_one_line_failure(command: Command, args: &[&str]) -> String {
    let (status, _stdout, stderr) = Running::start(command).finish();
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

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

/// Polls the health service until `service` is SERVING; fails if the process
/// exits first or `DEADLINE` passes.
pub async fn wait_until_serving(process: &mut Running, endpoint: &str, service: &str) -> Channel {
    serving(endpoint, service, || process.exited()).await
}

/// Polls the health service of a server in this process until `service`
/// is SERVING; fails if `DEADLINE` passes.
pub async fn wait_serving(endpoint: &str, service: &str) -> Channel {
    serving(endpoint, service, || None).await
}

async fn serving(
    endpoint: &str,
    service: &str,
    mut exited: impl FnMut() -> Option<ExitStatus>,
) -> Channel {
    let started = Instant::now();
    loop {
        if let Some(status) = exited() {
            panic!("the process exited before serving: {status:?}");
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
