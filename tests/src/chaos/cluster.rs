//! The system under test as real processes: the built `orchestrator`,
//! `participant` and `sagactl` binaries, each service a child process that
//! can be SIGKILLed and started again on the same port, the participants
//! behind fault proxies, the orchestrator on a PostgreSQL instance of its
//! own and the participants on databases of their own on the machine's
//! server.
//!
//! Everything is torn down on drop, in order: processes, proxies, then the
//! databases.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use participants::Participant;
use proto::fault::v1::fault_injection_client::FaultInjectionClient;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::saga::v1::order_service_client::OrderServiceClient;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::postgres::{Instance, MachineDatabases, PgTools, temp_dir};
use super::proxy::FaultProxy;

/// The three binaries the suite runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Where they are.
    pub dir: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, or by default in the target directory of the
    /// running build profile (beside this executable, or one level up from
    /// a test's `deps/`); `$CHAOS_BIN_DIR` overrides the default.
    pub fn find(dir: Option<&Path>) -> Result<Self> {
        let dir = match dir {
            Some(dir) => dir.to_owned(),
            None => match std::env::var_os("CHAOS_BIN_DIR") {
                Some(dir) => PathBuf::from(dir),
                None => {
                    let exe = std::env::current_exe().context("locating this executable")?;
                    let mut dir = exe
                        .parent()
                        .context("this executable has no directory")?
                        .to_owned();
                    if dir.file_name().is_some_and(|name| name == "deps") {
                        dir.pop();
                    }
                    dir
                }
            },
        };
        let binaries = Self { dir };
        let missing: Vec<&str> = ["orchestrator", "participant", "sagactl"]
            .into_iter()
            .filter(|name| !binaries.path(name).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} not found in {}: build them first with `cargo build --workspace --bins` \
                 (for release binaries `cargo build --workspace --release --bins` and \
                 --bin-dir target/release), or point --bin-dir / CHAOS_BIN_DIR at them",
                missing.join(", "),
                binaries.dir.display()
            );
        }
        Ok(binaries)
    }

    /// The path of binary `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One service as a child process, restartable with the same arguments.
/// Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Service {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    rust_log: String,
    child: Option<Child>,
    endpoint: String,
    health_name: &'static str,
}

impl Service {
    /// Its name, e.g. `orchestrator-a` or `payment`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its gRPC URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Starts the process (output appended to its log file).
    pub fn spawn(&mut self) -> Result<()> {
        self.kill();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its exit status, if it ran and exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether it runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The last lines of its log, on one line.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }

    /// Starts it (again) and waits until its health service says SERVING;
    /// a start that exits early (its database restarting) is retried.
    pub async fn start_until_serving(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.spawn()?;
            match self.wait_serving(deadline).await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() < deadline && self.exited().is_some() => {
                    debug_note(&format!("{} exited at start, retrying: {error}", self.name));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn wait_serving(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited before serving ({status}); its log ends with: {}",
                    self.name,
                    self.log_tail(5)
                );
            }
            if is_serving(&self.endpoint, self.health_name).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not serving at {} in time; its log ends with: {}",
                    self.name,
                    self.endpoint,
                    self.log_tail(5)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Notes that matter only when things go wrong go to stderr when
/// `CHAOS_DEBUG` is set.
fn debug_note(message: &str) {
    if std::env::var_os("CHAOS_DEBUG").is_some() {
        eprintln!("chaos: {message}");
    }
}

/// Whether `service` on `endpoint` answers SERVING within a second.
pub async fn is_serving(endpoint: &str, service: &str) -> bool {
    let Ok(endpoint) = Endpoint::from_shared(endpoint.to_owned()) else {
        return false;
    };
    let check = async {
        let channel = endpoint
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(reply.get_ref().status() == ServingStatus::Serving)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
}

/// How the orchestrator replicas run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many `orchestrator serve` replicas (named chaos-a, chaos-b, ...).
    pub replicas: usize,
    /// `--step-timeout`.
    pub step_timeout: Duration,
    /// `--step-attempts`.
    pub step_attempts: u32,
    /// `--compensation-attempts`.
    pub compensation_attempts: u32,
    /// `--lease-ttl`.
    pub lease_ttl: Duration,
    /// `--backoff-base`.
    pub backoff_base: Duration,
    /// `--backoff-cap`.
    pub backoff_cap: Duration,
    /// `--poll-interval`.
    pub poll_interval: Duration,
    /// RUST_LOG of every service.
    pub service_log: String,
    /// Keep the temp dirs and databases.
    pub keep: bool,
}

impl ClusterOptions {
    /// The random run's settings: short leases and deadlines so that
    /// takeovers and timeouts happen within a run, and compensations that
    /// outlast any fault of the run.
    pub fn chaos(replicas: usize, service_log: &str, keep: bool) -> Self {
        Self {
            replicas,
            step_timeout: Duration::from_secs(1),
            step_attempts: 8,
            compensation_attempts: 1000,
            lease_ttl: Duration::from_secs(2),
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_secs(1),
            poll_interval: Duration::from_millis(200),
            service_log: service_log.to_owned(),
            keep,
        }
    }
}

fn ms(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// Replica names: chaos-a, chaos-b, ...
pub fn replica_id(index: usize) -> String {
    format!("chaos-{}", (b'a' + index as u8) as char)
}

/// The whole system, as processes.
#[derive(Debug)]
pub struct Cluster {
    // Declared first: dropped (killed) before the proxies and databases.
    /// The orchestrator replicas.
    pub orchestrators: Vec<Service>,
    /// The participants, in `Participant::ALL` order.
    pub participants: Vec<Service>,
    /// One proxy per participant, in the same order; the orchestrators call
    /// the participants only through them.
    pub proxies: Vec<Arc<FaultProxy>>,
    /// A pool on the orchestrator's database (lazy: survives its crashes).
    pub orchestrator_pool: PgPool,
    /// Pools on the participants' databases, in `Participant::ALL` order.
    pub participant_pools: Vec<PgPool>,
    /// The orchestrator's PostgreSQL.
    pub orchestrator_db: Instance,
    /// The participants' databases.
    pub participant_dbs: MachineDatabases,
    /// The binaries.
    pub binaries: Binaries,
    logs: PathBuf,
    keep_logs: bool,
}

/// The database name of the orchestrator on its instance.
pub const ORCHESTRATOR_DB: &str = "orchestrator";

impl Cluster {
    /// Creates the databases, starts the participants, proxies and replicas,
    /// and waits until every one serves.
    pub async fn start(
        binaries: &Binaries,
        tools: &PgTools,
        options: &ClusterOptions,
    ) -> Result<Self> {
        let logs = temp_dir("chaos-logs")?;
        let participant_dbs =
            MachineDatabases::create(&Participant::ALL.map(Participant::name), options.keep)
                .await?;
        let orchestrator_db = Instance::create(tools, options.keep)?;
        orchestrator_db
            .wait_ready("postgres", Duration::from_secs(60))
            .await?;
        {
            use sqlx::Connection;
            let mut admin = sqlx::PgConnection::connect(&orchestrator_db.url("postgres")).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {ORCHESTRATOR_DB}"
            )))
            .execute(&mut admin)
            .await
            .context("creating the orchestrator's database")?;
            let _ = admin.close().await;
        }

        let mut participants = Vec::new();
        let mut proxies = Vec::new();
        let mut participant_pools = Vec::new();
        for participant in Participant::ALL {
            let port = crate::process::free_port();
            let url = participant_dbs.url(participant.name())?;
            participants.push(Service {
                name: participant.name().to_owned(),
                program: binaries.path("participant"),
                args: vec![
                    participant.name().to_owned(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--database-url".into(),
                    url.clone(),
                    "--fault-injection".into(),
                    "--max-connections".into(),
                    "6".into(),
                    "--connect-timeout".into(),
                    "60s".into(),
                ],
                log: logs.join(format!("{}.log", participant.name())),
                rust_log: options.service_log.clone(),
                child: None,
                endpoint: format!("http://127.0.0.1:{port}"),
                health_name: participant.service_name(),
            });
            let upstream: SocketAddr = ([127, 0, 0, 1], port).into();
            proxies.push(Arc::new(
                FaultProxy::start(([127, 0, 0, 1], 0).into(), upstream)
                    .await
                    .context("starting a fault proxy")?,
            ));
            participant_pools.push(lazy_pool(&url)?);
        }
        let database_url = orchestrator_db.url(ORCHESTRATOR_DB);
        let mut orchestrators = Vec::new();
        for index in 0..options.replicas {
            let port = crate::process::free_port();
            let replica = replica_id(index);
            let mut args = vec![
                "serve".to_owned(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--database-url".into(),
                database_url.clone(),
                "--replica-id".into(),
                replica.clone(),
                "--lease-ttl".into(),
                ms(options.lease_ttl),
                "--step-timeout".into(),
                ms(options.step_timeout),
                "--step-attempts".into(),
                options.step_attempts.to_string(),
                "--compensation-attempts".into(),
                options.compensation_attempts.to_string(),
                "--backoff-base".into(),
                ms(options.backoff_base),
                "--backoff-cap".into(),
                ms(options.backoff_cap),
                "--poll-interval".into(),
                ms(options.poll_interval),
                "--max-connections".into(),
                "8".into(),
                "--connect-timeout".into(),
                "60s".into(),
                "--shutdown-grace".into(),
                "1s".into(),
            ];
            for (participant, proxy) in Participant::ALL.iter().zip(&proxies) {
                args.push(format!("--{}-url", participant.name()));
                args.push(format!("http://{}", proxy.addr()));
            }
            orchestrators.push(Service {
                name: format!("orchestrator-{}", &replica["chaos-".len()..]),
                program: binaries.path("orchestrator"),
                args,
                log: logs.join(format!("{replica}.log")),
                rust_log: options.service_log.clone(),
                child: None,
                endpoint: format!("http://127.0.0.1:{port}"),
                health_name: "saga.v1.OrderService",
            });
        }
        let mut cluster = Self {
            orchestrators,
            participants,
            proxies,
            orchestrator_pool: lazy_pool(&database_url)?,
            participant_pools,
            orchestrator_db,
            participant_dbs,
            binaries: binaries.clone(),
            logs,
            keep_logs: options.keep,
        };
        for service in cluster.participants.iter_mut() {
            service.start_until_serving(Duration::from_secs(60)).await?;
        }
        // The first replica migrates the database alone; then the others.
        for service in cluster.orchestrators.iter_mut() {
            service.start_until_serving(Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    /// Where the services' logs are.
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// Keeps the logs after the run (it failed, or --keep).
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }

    /// An OrderService client on replica `index` (lazy: reconnects after a
    /// restart).
    pub fn orders(&self, index: usize) -> Result<OrderServiceClient<Channel>> {
        Ok(OrderServiceClient::new(lazy_channel(
            self.orchestrators[index].endpoint(),
        )?))
    }

    /// The participant service of `participant`.
    pub fn participant(&self, participant: Participant) -> &Service {
        &self.participants[index_of(participant)]
    }

    /// The proxy in front of `participant`.
    pub fn proxy(&self, participant: Participant) -> &Arc<FaultProxy> {
        &self.proxies[index_of(participant)]
    }

    /// The pool on `participant`'s database.
    pub fn pool(&self, participant: Participant) -> &PgPool {
        &self.participant_pools[index_of(participant)]
    }

    /// A fault-injection client on `participant` (direct, not proxied).
    pub fn faults(&self, participant: Participant) -> Result<FaultInjectionClient<Channel>> {
        Ok(FaultInjectionClient::new(lazy_channel(
            self.participant(participant).endpoint(),
        )?))
    }

    /// An inventory client (direct).
    pub fn inventory(&self) -> Result<InventoryServiceClient<Channel>> {
        Ok(InventoryServiceClient::new(lazy_channel(
            self.participant(Participant::Inventory).endpoint(),
        )?))
    }

    /// A payment client (direct).
    pub fn payment(&self) -> Result<PaymentServiceClient<Channel>> {
        Ok(PaymentServiceClient::new(lazy_channel(
            self.participant(Participant::Payment).endpoint(),
        )?))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for service in self
            .orchestrators
            .iter_mut()
            .chain(self.participants.iter_mut())
        {
            service.kill();
        }
        if self.keep_logs {
            eprintln!("chaos: the services' logs are in {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

/// Position of `participant` in `Participant::ALL`.
pub fn index_of(participant: Participant) -> usize {
    Participant::ALL
        .iter()
        .position(|p| *p == participant)
        .unwrap_or(0)
}

fn lazy_pool(url: &str) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(url)?)
}

/// A channel that connects on first use and reconnects after failures.
pub fn lazy_channel(endpoint: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy())
}
