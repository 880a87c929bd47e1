//! Settings of `orchestrator serve`: every flag with an environment variable
//! and a sane default, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::cli::parse_duration;
use common::limits::Limits;

use crate::auth::{AdminTokenArgs, AdminTokens};
use crate::clients::ParticipantUrls;
use crate::error::Error;
use crate::executor::ExecutorConfig;
use crate::saga::Policy;

/// Default `--step-attempts`; see its help, and the test below that the
/// waits add up to more than [`RIDE_OUT`].
pub const DEFAULT_STEP_ATTEMPTS: u32 = 20;
/// Default `--compensation-attempts`.
pub const DEFAULT_COMPENSATION_ATTEMPTS: u32 = 20;
/// Default `--backoff-base`.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Default `--backoff-cap`.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How long a participant may be away without failing orders, with the
/// default retry settings.
pub const RIDE_OUT: Duration = Duration::from_secs(30);

/// Default `--max-connections`: two replicas at 24 + 3 writer connections
/// each, and three participants at 10 + 1, fit a default PostgreSQL server
/// with room for an operator (the table is at
/// `common::db::PARTICIPANT_MAX_CONNECTIONS`, the sum in a test
/// below).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 24;

/// Default `--max-watches`.
pub const DEFAULT_MAX_WATCHES: usize = 10_000;

/// Default `--reconcile-timeout`, as long as `sagactl reconcile` waits by
/// default.
pub const DEFAULT_RECONCILE_TIMEOUT: Duration = Duration::from_secs(600);

/// The default retry policy (`serve` and `dev`).
pub fn default_policy() -> Policy {
    Policy {
        action_attempts: DEFAULT_STEP_ATTEMPTS,
        compensation_attempts: DEFAULT_COMPENSATION_ATTEMPTS,
    }
}

/// Flags of `orchestrator serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the gRPC API (saga.v1.OrderService, AdminService).
    #[arg(long, env = "ORCHESTRATOR_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// PostgreSQL URL of the orchestrator's own database; its tables are
    /// created at start.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// URL of the inventory participant.
    #[arg(long, env = "INVENTORY_URL", default_value = "http://127.0.0.1:50061")]
    pub inventory_url: String,

    /// URL of the payment participant.
    #[arg(long, env = "PAYMENT_URL", default_value = "http://127.0.0.1:50062")]
    pub payment_url: String,

    /// URL of the fulfillment participant.
    #[arg(
        long,
        env = "FULFILLMENT_URL",
        default_value = "http://127.0.0.1:50063"
    )]
    pub fulfillment_url: String,

    /// Address of the HTTP port: the web console (/ui), probes and metrics
    /// (/healthz, /readyz, /metrics); off unless set.
    #[arg(long, env = "ORCHESTRATOR_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// AdminService's tokens (--admin-token-file, --read-only-token-file).
    #[command(flatten)]
    pub tokens: AdminTokenArgs,

    /// Deadline of one call to a participant.
    #[arg(long, env = "ORCHESTRATOR_STEP_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub step_timeout: Duration,

    /// Attempts per forward step before the saga compensates.
    ///
    /// The default rides out a participant that is away for 30 s (a
    /// restart, a deploy) instead of failing its orders: with the default
    /// backoff (50ms doubling to 10s, full jitter) the waits between 20
    /// attempts add up to 66 s on average, and to less than 30 s about
    /// once in several thousand sagas. A participant that stays down that
    /// long has its sagas compensated after about a minute.
    #[arg(long, env = "ORCHESTRATOR_STEP_ATTEMPTS", default_value_t = DEFAULT_STEP_ATTEMPTS)]
    pub step_attempts: u32,

    /// Attempts per compensation before the saga needs an operator.
    #[arg(long, env = "ORCHESTRATOR_COMPENSATION_ATTEMPTS",
          default_value_t = DEFAULT_COMPENSATION_ATTEMPTS)]
    pub compensation_attempts: u32,

    /// First retry delay; it doubles per attempt, with full jitter (each
    /// wait is drawn uniformly below its ceiling).
    #[arg(long, env = "ORCHESTRATOR_BACKOFF_BASE", default_value = "50ms", value_parser = parse_duration)]
    pub backoff_base: Duration,

    /// Longest retry delay.
    #[arg(long, env = "ORCHESTRATOR_BACKOFF_CAP", default_value = "10s", value_parser = parse_duration)]
    pub backoff_cap: Duration,

    /// Most sagas in flight on this replica; beyond it PlaceOrder answers
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "ORCHESTRATOR_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Most WatchOrder streams open at once on this replica; beyond it
    /// WatchOrder answers RESOURCE_EXHAUSTED at once. A stream that ends
    /// frees its slot.
    #[arg(long, env = "ORCHESTRATOR_MAX_WATCHES", default_value_t = DEFAULT_MAX_WATCHES)]
    pub max_watches: usize,

    /// Server-side limit of one Reconcile call, which reads every saga and
    /// every participant record (every other call has --request-timeout).
    #[arg(long, env = "ORCHESTRATOR_RECONCILE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub reconcile_timeout: Duration,

    #[command(flatten)]
    pub retention: crate::prune::RetentionArgs,

    /// A non-terminal saga with no progress for this long counts as stuck.
    #[arg(long, env = "ORCHESTRATOR_STUCK_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub stuck_after: Duration,

    /// How long a replica's claim on a saga lasts without renewal; a crashed
    /// replica's sagas are taken over after it.
    #[arg(long, env = "ORCHESTRATOR_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// How often to look for sagas with work due and no live lease, and
    /// for requests another replica took for a saga driven here (how soon
    /// a retry or abort sent to another replica wakes the driver).
    #[arg(long, env = "ORCHESTRATOR_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// This replica's name in leases and the journal [default: host name and
    /// port]. A restarted replica with the same name resumes its sagas at
    /// once; two live replicas must never share one.
    #[arg(long, env = "ORCHESTRATOR_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// How long to let sagas in flight finish their call on shutdown.
    #[arg(long, env = "ORCHESTRATOR_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Most calls in progress to each participant; sagas beyond it wait
    /// their turn (their step deadline starts when their call does).
    #[arg(long, env = "ORCHESTRATOR_MAX_PARTICIPANT_CALLS",
          default_value_t = crate::clients::DEFAULT_MAX_CALLS)]
    pub max_participant_calls: usize,

    /// Most connections to the database, besides three for the batch
    /// writers. The default leaves room on a default PostgreSQL server (100
    /// connections) for two replicas, the three participants and an
    /// operator; connections idle for 30 s are closed.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A gRPC connection from which nothing arrives for this long is
    /// closed, so sockets that never send a byte or whose peer vanished do
    /// not use up the file descriptors. gRPC clients are pinged every third
    /// of it and must answer within a third, so a live connection always
    /// counts as talking. (The HTTP port has --http-header-timeout.)
    #[arg(long, env = "ORCHESTRATOR_CONNECTION_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub connection_idle_timeout: Duration,

    /// How long to keep trying to reach the database at start (refused,
    /// starting up or too many clients are tried again). At run time a
    /// statement waits at most 2 s for a connection, then the call answers
    /// UNAVAILABLE ("database unavailable, try again").
    #[arg(long, env = "ORCHESTRATOR_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Limits on what clients send (--max-message-bytes,
    /// --max-concurrent-streams, --request-timeout, --http-header-timeout).
    #[command(flatten)]
    pub limits: Limits,

    /// Logs and traces (--log-format, --otlp-endpoint).
    #[command(flatten)]
    pub telemetry: common::telemetry::TelemetryArgs,

    /// TLS on both ports (--tls-cert, --tls-key, --tls-client-ca).
    #[command(flatten)]
    pub tls: common::tls::ServerArgs,

    /// PEM CA certificate(s) the participants' certificates must chain to;
    /// required for https:// participant URLs (the system's roots are not
    /// used).
    #[arg(long, env = "ORCHESTRATOR_PARTICIPANT_CA")]
    pub participant_ca: Option<PathBuf>,

    /// PEM certificate the orchestrator presents to participants that
    /// require client certificates (mTLS); needs --client-key.
    #[arg(long, env = "ORCHESTRATOR_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(long, env = "ORCHESTRATOR_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
}

/// The names of the orchestrator's client TLS flags.
pub const CLIENT_TLS_FLAGS: common::tls::ClientFlags = common::tls::ClientFlags {
    ca: "--participant-ca",
    cert: "--client-cert",
    key: "--client-key",
};

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The executor's settings.
    pub executor: ExecutorConfig,
    /// Where the participants listen.
    pub participants: ParticipantUrls,
    /// Deadline of one participant call.
    pub step_timeout: Duration,
    /// Most calls in progress to each participant.
    pub max_participant_calls: usize,
    /// The tokens AdminService accepts (open when none).
    pub admin: AdminTokens,
    /// The limits of both ports.
    pub limits: Limits,
    /// Server-side limit of one Reconcile call.
    pub reconcile_timeout: Duration,
    /// Stuck threshold.
    pub stuck_after: Duration,
    /// What the pruner keeps.
    pub retention: crate::prune::Retention,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// A connection silent for this long is closed (both ports).
    pub connection_idle_timeout: Duration,
    /// TLS on both ports, reloaded on SIGHUP; None: plaintext.
    pub tls: Option<Arc<common::tls::Server>>,
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "orchestrator".to_owned())
}

impl ServeArgs {
    /// Checks the flags together; the error says which flag is wrong.
    pub fn settings(&self) -> Result<Settings, Error> {
        let at_least_one = |name: &str, value: u64| {
            if value == 0 {
                Err(Error::invalid(format!("--{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        at_least_one("step-attempts", self.step_attempts.into())?;
        at_least_one("compensation-attempts", self.compensation_attempts.into())?;
        at_least_one("max-in-flight", self.max_in_flight as u64)?;
        at_least_one("max-participant-calls", self.max_participant_calls as u64)?;
        if self.step_timeout.is_zero() {
            return Err(Error::invalid("--step-timeout must be positive"));
        }
        if self.backoff_base > self.backoff_cap {
            return Err(Error::invalid(format!(
                "--backoff-base ({:?}) must not exceed --backoff-cap ({:?})",
                self.backoff_base, self.backoff_cap
            )));
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(Error::invalid("--lease-ttl must be at least 300ms"));
        }
        if self.connection_idle_timeout < Duration::from_millis(300) {
            return Err(Error::invalid(
                "--connection-idle-timeout must be at least 300ms",
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::invalid("--poll-interval must be positive"));
        }
        at_least_one("max-watches", self.max_watches as u64)?;
        if self.reconcile_timeout.is_zero() {
            return Err(Error::invalid("--reconcile-timeout must be positive"));
        }
        self.limits.validate().map_err(Error::invalid)?;
        let retention = self.retention.retention()?;
        let admin = self.tokens.tokens()?;
        // Before anything starts: a bad TLS flag or file is a one-line error.
        let tls = self.tls.load()?;
        let participant_tls = common::tls::Client::from_flags(
            self.participant_ca.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
            CLIENT_TLS_FLAGS,
        )?;
        let replica_id = match &self.replica_id {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            Some(_) => return Err(Error::invalid("--replica-id must not be empty")),
            None => format!("{}-{}", host_name(), self.listen.port()),
        };
        Ok(Settings {
            executor: ExecutorConfig {
                replica_id,
                policy: Policy {
                    action_attempts: self.step_attempts,
                    compensation_attempts: self.compensation_attempts,
                },
                backoff_base: self.backoff_base,
                backoff_cap: self.backoff_cap,
                lease_ttl: self.lease_ttl,
                poll_interval: self.poll_interval,
                max_in_flight: self.max_in_flight,
                max_watches: self.max_watches,
                registry: Arc::default(),
            },
            participants: ParticipantUrls {
                inventory: self.inventory_url.clone(),
                payment: self.payment_url.clone(),
                fulfillment: self.fulfillment_url.clone(),
                tls: participant_tls,
            },
            step_timeout: self.step_timeout,
            max_participant_calls: self.max_participant_calls,
            admin,
            limits: self.limits,
            reconcile_timeout: self.reconcile_timeout,
            stuck_after: self.stuck_after,
            retention,
            shutdown_grace: self.shutdown_grace,
            connection_idle_timeout: self.connection_idle_timeout,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::backoff_delay;

    /// The waits before attempts 2..=attempts, for draws `fraction(k)`.
    fn waits(attempts: u32, mut fraction: impl FnMut(u32) -> f64) -> Duration {
        (2..=attempts)
            .map(|attempt| {
                backoff_delay(
                    DEFAULT_BACKOFF_BASE,
                    DEFAULT_BACKOFF_CAP,
                    attempt,
                    fraction(attempt),
                )
            })
            .sum()
    }

    #[test]
    fn the_default_retries_ride_out_a_thirty_second_outage() {
        // Full jitter draws each wait uniformly below its ceiling: on
        // average half of it.
        let ceilings = waits(DEFAULT_STEP_ATTEMPTS, |_| 1.0);
        let mean = ceilings / 2;
        assert!(
            mean >= 2 * RIDE_OUT,
            "the waits average {mean:?}, want twice {RIDE_OUT:?}"
        );
        // How often the draws add up to less than the outage: deterministic
        // draws (splitmix64), many sagas.
        let mut state = 0x5eed_u64;
        let mut draw = move |_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let sagas = 20_000;
        let short = (0..sagas)
            .filter(|_| waits(DEFAULT_STEP_ATTEMPTS, &mut draw) < RIDE_OUT)
            .count();
        assert!(
            short * 1000 < sagas,
            "{short} of {sagas} sagas would give up within {RIDE_OUT:?}"
        );
        // The old default, 5 attempts, gave up after 1.5 s at the most.
        assert!(waits(5, |_| 1.0) < Duration::from_secs(2));
    }

    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn the_settings_never_show_a_token() {
        use clap::Parser;
        let file = std::env::temp_dir().join(format!("config-token-{}", std::process::id()));
        std::fs::write(&file, "r3ader-t0ken\n").unwrap();
        let parsed = Serve::try_parse_from([
            "serve",
            "--database-url",
            "postgres://x/y",
            "--admin-token",
            "op3rator-t0ken",
            "--read-only-token-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let settings = parsed.args.settings().unwrap();
        assert_eq!(
            settings.admin,
            AdminTokens::new(Some("op3rator-t0ken"), Some("r3ader-t0ken"))
        );
        for shown in [format!("{parsed:?}"), format!("{settings:?}")] {
            assert!(
                !shown.contains("t0ken"),
                "a token shows in the debug output: {shown}"
            );
        }
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn default_pools_of_two_replicas_and_three_participants_fit_a_default_server() {
        let server_max = 100;
        let superuser_reserved = 3;
        let operator_room = 10;
        let replica = DEFAULT_MAX_CONNECTIONS + crate::store::WRITER_CONNECTIONS;
        let participant =
            common::db::PARTICIPANT_MAX_CONNECTIONS + common::db::PARTICIPANT_WRITER_CONNECTIONS;
        let used = 2 * replica + 3 * participant + operator_room;
        assert!(
            used <= server_max - superuser_reserved,
            "2 x {replica} + 3 x {participant} + {operator_room} = {used} connections"
        );
    }
}
