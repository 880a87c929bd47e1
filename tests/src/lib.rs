//! The integration test harness: a fresh PostgreSQL database per service per
//! test, services started in-process on port 0, and typed gRPC clients.
//!
//! `DATABASE_URL` points at the server (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each database is named
//! after the test, created on demand and dropped (with `FORCE`) when its
//! handle is dropped, after the service using it has been stopped.
//! Set `TEST_LOG=1` to see the services' logs.

pub mod chaos;
pub mod contract;
pub mod fuzz;
mod lossy;
pub mod process;
mod system;
pub mod tls;

pub use lossy::LossyStore;
pub use system::{
    Audit, SpawnedOrchestrator, System, compensations, delay, fault, place_request, settled,
    spawn_orchestrator, spawn_orchestrator_tls, spawn_orchestrator_with_adapters,
    spawn_orchestrator_wrapped, spawn_system, spawn_system_with, spawn_tls_system, test_settings,
};

use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use participants::{Participant, ServeOptions};
use proto::fault::v1::fault_injection_client::FaultInjectionClient;
use proto::fulfillment::v1::fulfillment_service_client::FulfillmentServiceClient;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use sqlx::{Connection, PgConnection};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The server every test database is created on.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Pool size of a participant in tests. Two tests run at once, each with a
/// whole system, on a server that allows 100 connections.
pub const PARTICIPANT_CONNECTIONS: u32 = 4;
/// Pool size of an orchestrator in tests.
pub const ORCHESTRATOR_CONNECTIONS: u32 = 8;

/// Test databases are named `sagatest_<unix seconds>_<label>_<n>`; ones older
/// than this were left by a killed run and are dropped on the next run.
const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

fn init_test_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,sqlx=warn".into()),
                )
                .with_test_writer()
                .try_init();
        }
    });
}

/// A database of its own for one test, dropped when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates an empty database named after the running test and `label`.
    pub async fn create(label: &str) -> Result<Self> {
        init_test_logging();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let test = std::thread::current()
            .name()
            .unwrap_or("test")
            .rsplit("::")
            .next()
            .unwrap_or("test")
            .to_owned();
        let sanitized: String = format!("{test}_{label}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "sagatest_{now}_{sanitized}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = admin_connection().await?;
        drop_stale_databases(&mut admin, now).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating test database {name}"))?;
        admin.close().await?;
        let url = database_url(&name)?;
        Ok(Self { name, url })
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs synchronously, possibly inside a runtime: do the async
        // work on a thread with a runtime of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = admin_connection().await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                admin.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "warning: could not drop test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

async fn admin_connection() -> Result<PgConnection> {
    PgConnection::connect(&server_url()).await.with_context(|| {
        format!(
            "connecting to PostgreSQL at {} (set DATABASE_URL)",
            server_url()
        )
    })
}

/// `server_url()` with its database replaced by `name`.
fn database_url(name: &str) -> Result<String> {
    replace_database(&server_url(), name)
}

/// `server` (a PostgreSQL URL) with its database replaced by `name`.
fn replace_database(server: &str, name: &str) -> Result<String> {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let scheme_end = base.find("://").context("DATABASE_URL has no scheme")? + 3;
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |at| scheme_end + at);
    Ok(format!("{}/{name}{query}", &base[..host_end]))
}

/// Drops test databases left behind by runs that were killed.
async fn drop_stale_databases(admin: &mut PgConnection, now: u64) {
    static ONCE: AtomicU32 = AtomicU32::new(0);
    if ONCE.fetch_add(1, Ordering::Relaxed) != 0 {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'sagatest\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let created = name
            .split('_')
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(now);
        if now.saturating_sub(created) > STALE_AFTER.as_secs() {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut *admin)
            .await;
        }
    }
}

/// A participant served in-process on a port of its own, on a database of
/// its own. Dropping it stops the server, then drops the database.
#[derive(Debug)]
pub struct SpawnedParticipant {
    participant: Participant,
    endpoint: String,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), common::Error>>>,
    pool: sqlx::PgPool,
    // Declared last: dropped after the server is stopped.
    db: TestDb,
}

/// Starts `participant` on 127.0.0.1:0 against a fresh database.
pub async fn spawn_participant(
    participant: Participant,
    options: ServeOptions,
) -> Result<SpawnedParticipant> {
    spawn_participant_with(participant, options, None).await
}

/// Like [`spawn_participant`], serving with `options.tls`: its endpoint is
/// `https://`, and the test's own channel to it trusts and presents what
/// `client` holds.
pub async fn spawn_participant_tls(
    participant: Participant,
    options: ServeOptions,
    client: common::tls::Client,
) -> Result<SpawnedParticipant> {
    spawn_participant_with(participant, options, Some(client)).await
}

async fn spawn_participant_with(
    participant: Participant,
    options: ServeOptions,
    client: Option<common::tls::Client>,
) -> Result<SpawnedParticipant> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let db = TestDb::create(participant.name()).await?;
    let backend = participants::connect(
        participant,
        db.url(),
        PARTICIPANT_CONNECTIONS,
        Duration::from_secs(10),
    )
    .await?;
    let pool = backend
        .postgres()
        .cloned()
        .context("a PostgreSQL test database gave a non-PostgreSQL backend")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("{scheme}://{}", listener.local_addr()?);
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(participants::serve(
        participant,
        backend,
        listener,
        options,
        async {
            let _ = stop.await;
        },
    ));
    // The listener is bound, so connecting succeeds at once.
    let channel = common::tls::endpoint(&endpoint, client.as_ref(), "a test CA")
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(SpawnedParticipant {
        participant,
        endpoint,
        channel,
        shutdown: Some(shutdown),
        task: Some(task),
        pool,
        db,
    })
}

impl SpawnedParticipant {
    /// Which participant this is.
    pub fn participant(&self) -> Participant {
        self.participant
    }

    /// Its URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Direct access to its database, for assertions that nothing was written.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// Its database.
    pub fn db(&self) -> &TestDb {
        &self.db
    }

    /// An inventory client (meaningful on the inventory participant).
    pub fn inventory(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(self.channel())
    }

    /// A payment client (meaningful on the payment participant).
    pub fn payment(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel())
    }

    /// A fulfillment client (meaningful on the fulfillment participant).
    pub fn fulfillment(&self) -> FulfillmentServiceClient<Channel> {
        FulfillmentServiceClient::new(self.channel())
    }

    /// A fault-injection client (answers only with fault injection on).
    pub fn faults(&self) -> FaultInjectionClient<Channel> {
        FaultInjectionClient::new(self.channel())
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        self.pool.close().await;
        Ok(())
    }
}

impl Drop for SpawnedParticipant {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts the three participants, each on its own database.
pub async fn spawn_participants(options: ServeOptions) -> Result<Participants> {
    spawn_participants_with(options, None).await
}

/// Like [`spawn_participants`], serving with `options.tls`; the test's own
/// channels use `client`.
pub async fn spawn_participants_tls(
    options: ServeOptions,
    client: common::tls::Client,
) -> Result<Participants> {
    spawn_participants_with(options, Some(client)).await
}

async fn spawn_participants_with(
    options: ServeOptions,
    client: Option<common::tls::Client>,
) -> Result<Participants> {
    let (inventory, payment, fulfillment) = tokio::try_join!(
        spawn_participant_with(Participant::Inventory, options.clone(), client.clone()),
        spawn_participant_with(Participant::Payment, options.clone(), client.clone()),
        spawn_participant_with(Participant::Fulfillment, options, client),
    )?;
    Ok(Participants {
        inventory,
        payment,
        fulfillment,
    })
}

/// The three participants of one test.
#[derive(Debug)]
pub struct Participants {
    /// Reserve / Release.
    pub inventory: SpawnedParticipant,
    /// Charge / Refund.
    pub payment: SpawnedParticipant,
    /// Ship / CancelShipment.
    pub fulfillment: SpawnedParticipant,
}

/// Runs the futures concurrently (each on its own task) and returns their
/// outputs in order.
pub async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task panicked"));
    }
    outputs
}

/// `GET path` on an HTTP port such as `--http-listen`'s: the status code
/// and the body (code 0 when nothing answered).
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(address).await {
        Ok(stream) => http_exchange(stream, path).await,
        Err(_) => (0, String::new()),
    }
}

/// Sends `request` (a whole HTTP/1.1 request, head and body, as written)
/// to an HTTP port: the status code and the whole answer, head included
/// (code 0 when nothing answered).
pub async fn http_raw(address: std::net::SocketAddr, request: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(address).await {
        Ok(mut stream) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let exchange = async {
                stream.write_all(request.as_bytes()).await?;
                let mut response = String::new();
                stream.read_to_string(&mut response).await?;
                std::io::Result::Ok(response)
            };
            match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                Ok(Ok(response)) => {
                    let code = response
                        .split_whitespace()
                        .nth(1)
                        .and_then(|code| code.parse().ok())
                        .unwrap_or(0);
                    (code, response)
                }
                _ => (0, String::new()),
            }
        }
        Err(_) => (0, String::new()),
    }
}

/// `GET path` on a connected stream (plaintext or TLS): the status code
/// and the body (code 0 when nothing answered within 10 s).
async fn http_exchange<S>(mut stream: S, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(10), exchange).await else {
        return (0, String::new());
    };
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (code, body)
}

/// Polls `GET path` on `address` until `want` holds for the answer (the
/// code and the body), or fails after `timeout` with the last answer.
pub async fn wait_http(
    address: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (code, body) = http_get(address, path).await;
        if want(code, &body) {
            return Ok((code, body));
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("GET {path} on {address} still answers {code}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `result` failed with `code`, and returns its message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: std::result::Result<T, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status.message().to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_database_keeps_host_and_parameters() {
        let url = |server: &str| replace_database(server, "x").unwrap();
        assert_eq!(url("postgres://u@h:5432/postgres"), "postgres://u@h:5432/x");
        assert_eq!(url("postgres://u@h"), "postgres://u@h/x");
        assert_eq!(
            url("postgres://u@h/db?sslmode=disable"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert!(replace_database("nonsense", "x").is_err());
    }
}
