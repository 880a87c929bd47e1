//! Settings of `orchestrator serve`: every flag with an environment variable
//! and a sane default, validated once at start.

use std::net::SocketAddr;
use std::time::Duration;

use participants::cli::parse_duration;

use crate::clients::ParticipantUrls;
use crate::error::Error;
use crate::executor::ExecutorConfig;
use crate::saga::Policy;

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

    /// Address of the HTTP endpoint for probes and metrics (/healthz,
    /// /metrics); off unless set.
    #[arg(long, env = "ORCHESTRATOR_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Bearer token AdminService requires; AdminService is open without it.
    #[arg(long, env = "ORCHESTRATOR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Deadline of one call to a participant.
    #[arg(long, env = "ORCHESTRATOR_STEP_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub step_timeout: Duration,

    /// Attempts per forward step before the saga compensates.
    #[arg(long, env = "ORCHESTRATOR_STEP_ATTEMPTS", default_value_t = 5)]
    pub step_attempts: u32,

    /// Attempts per compensation before the saga needs an operator.
    #[arg(long, env = "ORCHESTRATOR_COMPENSATION_ATTEMPTS", default_value_t = 20)]
    pub compensation_attempts: u32,

    /// First retry delay; it doubles per attempt, with full jitter.
    #[arg(long, env = "ORCHESTRATOR_BACKOFF_BASE", default_value = "50ms", value_parser = parse_duration)]
    pub backoff_base: Duration,

    /// Longest retry delay.
    #[arg(long, env = "ORCHESTRATOR_BACKOFF_CAP", default_value = "10s", value_parser = parse_duration)]
    pub backoff_cap: Duration,

    /// Most sagas in flight on this replica; beyond it PlaceOrder answers
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "ORCHESTRATOR_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

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

    /// Most connections to the database.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONNECTIONS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// How long to keep trying to reach the database at start.
    #[arg(long, env = "ORCHESTRATOR_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

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
    /// AdminService token, if any.
    pub admin_token: Option<String>,
    /// Stuck threshold.
    pub stuck_after: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
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
        if self.poll_interval.is_zero() {
            return Err(Error::invalid("--poll-interval must be positive"));
        }
        if self.admin_token.as_deref() == Some("") {
            return Err(Error::invalid("--admin-token must not be empty"));
        }
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
            },
            participants: ParticipantUrls {
                inventory: self.inventory_url.clone(),
                payment: self.payment_url.clone(),
                fulfillment: self.fulfillment_url.clone(),
            },
            step_timeout: self.step_timeout,
            max_participant_calls: self.max_participant_calls,
            admin_token: self.admin_token.clone(),
            stuck_after: self.stuck_after,
            shutdown_grace: self.shutdown_grace,
        })
    }
}
