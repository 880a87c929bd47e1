//! `sagactl`, the operator's CLI over `saga.v1.AdminService`: find what is
//! stuck, understand why, and resolve it, without touching SQL.
//!
//! Exit status: 0 done (for `stuck`: nothing stuck; for `reconcile`: no
//! discrepancy), 1 `stuck` found stuck sagas or `reconcile` found
//! discrepancies (even repaired ones), 2 bad usage, 3 the request failed (server unreachable, unknown id,
//! refused). JSON output (`--output json`) is one document on stdout, with
//! the schema documented in `sagactl --help` and the README.
//!
//! Layout (`src/main.rs` only parses and prints):
//! - this module: the flags, the admin commands and their JSON.
//! - [`bench`]: the load generator (`sagactl bench`), HDR histogram, progress bar.
//! - [`reconcile`]: `sagactl reconcile [--repair]` and its report.
//! - [`render`]: tables, times and escaping of what is printed.

pub mod bench;
pub mod reconcile;
pub mod render;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use common::cli::{Secret, parse_duration, read_token_file};
use proto::saga::v1 as pb;
use proto::saga::v1::admin_service_client::AdminServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use orchestrator::admin::human_duration;
use orchestrator::api::timestamp;
use orchestrator::clients::code_name;
use orchestrator::executor::now_epoch;
use orchestrator::saga::Status;
use render::{rfc3339, table, truncate};

const EXAMPLES: &str = "\
Examples:
  sagactl stuck                                  what needs a look (exit 1 if anything)
  sagactl list --status NEEDS_ATTENTION
  sagactl list --customer alice --older-than 10m --limit 20
  sagactl show ord_019aa2c4...                   order, outputs and journal timeline
  sagactl retry ord_019aa2c4... --reason 'payment is back'
  sagactl abort ord_019aa2c4... --reason 'customer called, cancel it'
  sagactl stats --output json
  sagactl bench --concurrency 64 --orders 10000  closed-loop load, then one JSON line
  sagactl bench --rate 2000 --duration 10s       open loop: a spike beyond capacity
  sagactl reconcile                              sagas vs participants' records (exit 1 if any differ)
  sagactl reconcile --repair --operator alice    and compensate the orphans
  sagactl export --finished-before 30d > archive.jsonl   finished sagas older than 30 days

Exit status: 0 done (stuck: nothing stuck; reconcile: no discrepancy), 1 stuck
sagas found, or discrepancies found by reconcile (even when repaired), 2 bad
usage, 3 the request failed (orchestrator unreachable, unknown id, refused).

JSON (--output json), one document on stdout; times are RFC 3339 UTC:
  list, stuck  {\"sagas\": [SAGA...], \"next_page_token\": \"\"}
  show         {\"saga\": SAGA, \"items\": [{\"product_id\", \"quantity\"}], \"total_amount_cents\",
                \"failure_reason\", \"step_outputs\": {}, \"idempotency_key\", \"version\", \"trace_id\",
                \"journal\": [{\"step\", \"kind\", \"attempt\", \"outcome\", \"detail\", \"rpc\",
                \"actor\", \"started_at\", \"finished_at\", \"duration_ms\"}], \"finished_at\"}
  export       one show document per line (JSON lines), no other output on stdout
  retry, abort {\"saga_id\", \"status\", \"message\"} (message: what the request did)
  stats        {\"counts\": {STATUS: n}, \"oldest_non_terminal_age_seconds\",
                \"started_last_minute\", \"finished_last_minute\", \"in_flight\"}
  reconcile    {\"discrepancies\": [{\"saga_id\", \"participant\", \"kind\", \"saga_status\",
                \"expected\", \"found\", \"detail\", \"repaired\", \"repair\"}],
                \"discrepancies_found\", \"sagas_checked\", \"sagas_skipped\",
                \"reservations_checked\", \"charges_checked\", \"shipments_checked\",
                \"repaired\", \"repair_failed\"}
               participant: inventory|payment|fulfillment; kind: ORPHAN (an active
               record of a FAILED, CANCELLED or unknown saga; saga_status null when
               unknown), MISSING (COMPLETED saga, record absent or not active),
               MISMATCH (COMPLETED saga, values differ)
  SAGA         {\"saga_id\", \"status\", \"customer_id\", \"current_step\", \"attempts\",
                \"age_seconds\", \"created_at\", \"updated_at\", \"progress_at\",
                \"next_attempt_at\", \"lease_owner\", \"last_error\", \"stuck_reason\"}
  Statuses are the design's names (COMPLETED, NEEDS_ATTENTION, ...); absent
  values are null.";

/// Inspect and resolve sagas of a running orchestrator.
#[derive(Debug, Parser)]
#[command(name = "sagactl", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The orchestrator's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "SAGACTL_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,

    /// Admin token, sent as "authorization: Bearer <token>". A flag's value
    /// is visible to every user of the machine (ps): prefer --token-file or
    /// SAGACTL_TOKEN.
    #[arg(long, global = true, env = "SAGACTL_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// File holding the admin token (one line; a trailing newline is
    /// ignored), instead of --token.
    #[arg(long, global = true, env = "SAGACTL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Output format: a table for people, JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: Output,

    /// PEM CA certificate the servers' certificates must chain to; needed
    /// for an https:// --endpoint (and https:// bench participant URLs).
    #[arg(long, global = true, env = "SAGACTL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate to present to servers that require one
    /// (mTLS); needs --key.
    #[arg(long, global = true, env = "SAGACTL_CERT")]
    pub cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, global = true, env = "SAGACTL_KEY")]
    pub key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text.
    Table,
    /// One JSON document.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List sagas, newest first: id, status, current step, attempts, age,
    /// last error.
    List {
        /// Only this status (e.g. NEEDS_ATTENTION, CHARGING_PAYMENT).
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only this customer's sagas.
        #[arg(long)]
        customer: Option<String>,
        /// Only sagas of orders containing this product.
        #[arg(long)]
        product: Option<String>,
        /// Only sagas placed longer ago than this (e.g. 10m).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Sagas per page (1..1000).
        #[arg(long, default_value_t = 50)]
        limit: i32,
        /// Continue after a previous page (printed at its end).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show one saga: its order, status, failure reason, step outputs and
    /// its journal as a timeline.
    Show {
        /// The saga (order) id.
        id: String,
    },
    /// List every saga that needs attention or made no progress for longer
    /// than the threshold, with why. Exit 1 if there is any, 0 if none.
    Stuck {
        /// No progress for this long counts as stuck.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        threshold: Duration,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: i32,
    },
    /// Resume a saga now with a fresh attempt budget (a NEEDS_ATTENTION saga
    /// resumes its compensation). Refused for finished sagas.
    Retry {
        /// The saga (order) id.
        id: String,
        /// Why (journalled).
        #[arg(long, default_value = "")]
        reason: String,
        /// Who asks (journalled).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
    },
    /// Force a running saga to compensate and end FAILED. Refused once it
    /// shipped (the pivot) or when it already compensates.
    Abort {
        /// The saga (order) id.
        id: String,
        /// Why (required; journalled and kept as the failure reason).
        #[arg(long)]
        reason: String,
        /// Who asks (journalled).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
    },
    /// Counts per status, the oldest unfinished saga, sagas started and
    /// finished in the last minute. Unfinished statuses (and
    /// NEEDS_ATTENTION) count every replica's sagas now; COMPLETED, FAILED
    /// and CANCELLED count what the answering replica settled since it
    /// started.
    Stats,
    /// Load generator: place orders (closed loop: --concurrency/--orders;
    /// open loop: --rate/--duration), follow each saga to its end, report
    /// sagas/s and latency percentiles, then one JSON line.
    Bench(Box<bench::BenchArgs>),
    /// Check every finished saga against the participants' own records
    /// and list the discrepancies: ORPHAN (a reservation, charge or
    /// shipment still active for a FAILED, CANCELLED or unknown saga),
    /// MISSING (a COMPLETED saga lacks one), MISMATCH (an amount, customer
    /// or quantity differs). Sagas in flight or NEEDS_ATTENTION are
    /// skipped (see `stuck`). With --repair, orphans are compensated and
    /// the repair journalled on the saga; the rest is only reported. Exit
    /// 1 if anything was found (even when repaired), 0 if nothing.
    Reconcile(reconcile::ReconcileArgs),
    /// Write the finished sagas (COMPLETED, FAILED, CANCELLED) that
    /// finished before a time as JSON lines on stdout, one saga with its
    /// journal per line (the document `show --output json` prints, on one
    /// line, with "finished_at"): an archive to keep before the
    /// orchestrator's --retention prunes them. Prints how many to stderr.
    Export {
        /// Only sagas finished before this: an RFC 3339 UTC time
        /// (2026-11-01T00:00:00Z) or an age (30d: finished more than 30
        /// days ago).
        #[arg(long, value_parser = parse_before)]
        finished_before: Before,
        /// Sagas per request (1..1000).
        #[arg(long, default_value_t = 500)]
        page_size: i32,
    },
}

/// `--finished-before`: a time, or an age before now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Before {
    /// Seconds since the epoch.
    At(f64),
    /// This long before now.
    Ago(Duration),
}

fn parse_before(text: &str) -> Result<Before, String> {
    if let Some(at) = render::parse_rfc3339(text) {
        return Ok(Before::At(at));
    }
    parse_duration(text).map(Before::Ago).map_err(|_| {
        format!("{text:?} is neither an RFC 3339 UTC time (2026-11-01T00:00:00Z) nor an age (30d)")
    })
}

impl Cli {
    /// The admin token from --token (SAGACTL_TOKEN) or --token-file
    /// (SAGACTL_TOKEN_FILE), if any; both, or an unreadable or empty file,
    /// is bad usage.
    pub fn token(&self) -> Result<Option<Secret>, Failure> {
        let usage = |message: String| Failure { message, code: 2 };
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err(usage(
                "give the token once: --token (SAGACTL_TOKEN) or --token-file \
                 (SAGACTL_TOKEN_FILE), not both"
                    .to_owned(),
            )),
            (Some(token), None) => Ok(Some(token.clone())),
            (None, Some(path)) => read_token_file("--token-file", path)
                .map(Some)
                .map_err(usage),
            (None, None) => Ok(None),
        }
    }
}

fn parse_status(text: &str) -> Result<Status, String> {
    Status::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {text:?}; one of {}", names.join(", "))
    })
}

/// A failed command: the message for stderr and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, one line.
    pub message: String,
    /// The exit status.
    pub code: u8,
}

/// What a command printed and the exit status it asks for.
#[derive(Debug)]
pub struct Done {
    /// Text for stdout.
    pub stdout: String,
    /// 0, or 1 for stuck sagas found.
    pub code: u8,
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: 3,
    }
}

fn request_failed(
    endpoint: &str,
    tls: Option<&common::tls::Client>,
    status: tonic::Status,
) -> Failure {
    let hint = match status.code() {
        // The connection was dropped under the request: what a TLS server
        // does to a plaintext client, and an mTLS server (in TLS 1.3, after
        // the handshake) to a client without a certificate.
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
            if connection_dropped_hint(endpoint, tls).is_some() =>
        {
            connection_dropped_hint(endpoint, tls).unwrap_or_default()
        }
        // HTTP/2 spoken to a port that answers TLS.
        tonic::Code::Internal if status.message().contains("h2 protocol error") => {
            connection_dropped_hint(endpoint, tls).unwrap_or_default()
        }
        tonic::Code::Unavailable => {
            " (is the orchestrator running? set --endpoint or SAGACTL_ENDPOINT)"
        }
        tonic::Code::Unauthenticated => {
            " (set --token-file or SAGACTL_TOKEN_FILE, or --token or SAGACTL_TOKEN)"
        }
        tonic::Code::PermissionDenied => " (use the operator token)",
        _ => "",
    };
    failed(format!(
        "{} from {endpoint}: {}{hint}",
        code_name(status.code()),
        status.message()
    ))
}

/// Why a server may have dropped the connection under a request, given
/// how it was reached.
fn connection_dropped_hint(url: &str, tls: Option<&common::tls::Client>) -> Option<&'static str> {
    match (url.starts_with("https://"), tls) {
        (false, _) => Some(
            " (if the server speaks TLS, use an https:// URL with --ca-cert or SAGACTL_CA_CERT)",
        ),
        (true, Some(tls)) if !tls.has_identity() => Some(
            " (if the server requires client certificates, set --cert and --key, or SAGACTL_CERT and SAGACTL_KEY)",
        ),
        _ => None,
    }
}

/// The names of sagactl's TLS flags.
const TLS_FLAGS: common::tls::ClientFlags = common::tls::ClientFlags {
    ca: "--ca-cert",
    cert: "--cert",
    key: "--key",
};

impl Cli {
    /// The TLS of `--ca-cert`, `--cert` and `--key`; None when none is given.
    pub fn tls(&self) -> Result<Option<common::tls::Client>, Failure> {
        common::tls::Client::from_flags(
            self.ca_cert.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            TLS_FLAGS,
        )
        .map_err(|e| Failure {
            message: e.to_string(),
            code: 2,
        })
    }
}

/// A connected channel to `url` (`what`, and the `flag` naming the URL, in
/// the messages): plaintext for http://, TLS for https://, which needs
/// --ca-cert.
async fn connect_channel(
    url: &str,
    flag: &str,
    what: &str,
    tls: Option<&common::tls::Client>,
    configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<Channel, Failure> {
    let endpoint = common::tls::endpoint(url, tls, "--ca-cert (or SAGACTL_CA_CERT)")
        .map_err(|e| Failure {
            message: format!("{flag}: {e}"),
            code: 2,
        })?
        .connect_timeout(Duration::from_secs(3));
    configure(endpoint).connect().await.map_err(|e| {
        let mut message = format!(
            "cannot reach the {what} at {url}: {}",
            common::tls::error_chain(&e)
        );
        if message.contains("certificate") || message.contains("handshake") {
            message.push_str(&format!(
                " (check {} and, for servers requiring client certificates, {} and {})",
                TLS_FLAGS.ca, TLS_FLAGS.cert, TLS_FLAGS.key
            ));
        } else {
            message.push_str(&format!(" (is it running? set {flag})"));
        }
        failed(message)
    })
}

struct Client {
    endpoint: String,
    token: Option<Secret>,
    tls: Option<common::tls::Client>,
    admin: AdminServiceClient<Channel>,
}

impl Client {
    async fn connect(
        endpoint: &str,
        token: Option<Secret>,
        tls: Option<&common::tls::Client>,
    ) -> Result<Self, Failure> {
        Self::connect_with_timeout(endpoint, token, tls, Duration::from_secs(30)).await
    }

    /// Like `connect`, with `timeout` for each request.
    async fn connect_with_timeout(
        endpoint: &str,
        token: Option<Secret>,
        tls: Option<&common::tls::Client>,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        let channel = connect_channel(
            endpoint,
            "--endpoint or SAGACTL_ENDPOINT",
            "orchestrator",
            tls,
            |endpoint| endpoint.timeout(timeout),
        )
        .await?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            token,
            tls: tls.cloned(),
            admin: AdminServiceClient::new(channel),
        })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Failure> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let value = format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| failed("the token contains characters not allowed in a header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    fn fail(&self, status: tonic::Status) -> Failure {
        request_failed(&self.endpoint, self.tls.as_ref(), status)
    }
}

fn status_name(value: i32) -> String {
    pb::OrderStatus::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ORDER_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn seconds(ts: &Option<prost_types::Timestamp>) -> Option<f64> {
    ts.as_ref()
        .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

fn time_json(ts: &Option<prost_types::Timestamp>) -> Value {
    seconds(ts).map_or(Value::Null, |s| Value::String(rfc3339(s)))
}

fn text_or_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

fn saga_json(saga: &pb::SagaSummary, now: f64) -> Value {
    json!({
        "saga_id": saga.saga_id,
        "status": status_name(saga.status),
        "customer_id": saga.customer_id,
        "current_step": text_or_null(&saga.current_step),
        "attempts": saga.attempts,
        "age_seconds": seconds(&saga.created_at).map(|c| ((now - c) * 1000.0).round() / 1000.0),
        "created_at": time_json(&saga.created_at),
        "updated_at": time_json(&saga.updated_at),
        "progress_at": time_json(&saga.progress_at),
        "next_attempt_at": time_json(&saga.next_attempt_at),
        "lease_owner": text_or_null(&saga.lease_owner),
        "last_error": text_or_null(&saga.last_error),
        "stuck_reason": text_or_null(&saga.stuck_reason),
    })
}

fn saga_rows(sagas: &[pb::SagaSummary], now: f64, why: bool) -> String {
    let rows: Vec<Vec<String>> = sagas
        .iter()
        .map(|s| {
            let mut row = vec![
                s.saga_id.clone(),
                status_name(s.status),
                if s.current_step.is_empty() {
                    "-".into()
                } else {
                    s.current_step.clone()
                },
                s.attempts.to_string(),
                seconds(&s.created_at).map_or("-".into(), |c| human_duration(now - c)),
            ];
            if why {
                row.push(s.stuck_reason.clone());
            } else {
                row.push(truncate(&s.last_error, 80));
            }
            row
        })
        .collect();
    let last = if why { "WHY" } else { "LAST ERROR" };
    table(&["ID", "STATUS", "STEP", "ATTEMPTS", "AGE", last], &rows)
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Runs the command; the caller prints and exits.
pub async fn run(cli: Cli) -> Result<Done, Failure> {
    let tls = cli.tls()?;
    if let Command::Bench(args) = cli.command {
        return bench::run(
            &cli.endpoint,
            tls.as_ref(),
            *args,
            cli.output == Output::Json,
        )
        .await;
    }
    let token = cli.token()?;
    if let Command::Reconcile(args) = cli.command {
        return reconcile::run(
            &cli.endpoint,
            token,
            tls.as_ref(),
            args,
            cli.output == Output::Json,
        )
        .await;
    }
    let client = Client::connect(&cli.endpoint, token, tls.as_ref()).await?;
    let json_out = cli.output == Output::Json;
    let now = now_epoch();
    let done = |stdout: String| Done { stdout, code: 0 };
    match cli.command {
        Command::List {
            status,
            customer,
            product,
            older_than,
            limit,
            page_token,
        } => {
            let reply = client
                .admin
                .clone()
                .list_sagas(client.request(pb::ListSagasRequest {
                    status: status.map_or(0, |s| orchestrator::api::status_pb(s).into()),
                    stuck_only: false,
                    older_than: older_than.and_then(|d| prost_types::Duration::try_from(d).ok()),
                    limit,
                    page_token: page_token.unwrap_or_default(),
                    customer_id: customer.unwrap_or_default(),
                    stuck_after: None,
                    product_id: product.unwrap_or_default(),
                })?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            if json_out {
                return Ok(done(pretty(&json!({
                    "sagas": reply.sagas.iter().map(|s| saga_json(s, now)).collect::<Vec<_>>(),
                    "next_page_token": reply.next_page_token,
                }))));
            }
            let mut text = if reply.sagas.is_empty() {
                "no sagas match\n".to_owned()
            } else {
                saga_rows(&reply.sagas, now, false)
            };
            if !reply.next_page_token.is_empty() {
                text.push_str(&format!(
                    "more: sagactl list --page-token {} (same filters)\n",
                    reply.next_page_token
                ));
            }
            Ok(done(text))
        }
        Command::Stuck { threshold, limit } => {
            let reply = client
                .admin
                .clone()
                .list_sagas(client.request(pb::ListSagasRequest {
                    stuck_only: true,
                    stuck_after: prost_types::Duration::try_from(threshold).ok(),
                    limit,
                    ..Default::default()
                })?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            let code = u8::from(!reply.sagas.is_empty());
            let stdout = if json_out {
                pretty(&json!({
                    "sagas": reply.sagas.iter().map(|s| saga_json(s, now)).collect::<Vec<_>>(),
                    "next_page_token": reply.next_page_token,
                }))
            } else if reply.sagas.is_empty() {
                format!(
                    "nothing stuck (threshold {})\n",
                    human_duration(threshold.as_secs_f64())
                )
            } else {
                format!(
                    "{}{} stuck saga(s); resolve with: sagactl show ID, sagactl retry ID, sagactl abort ID --reason R\n",
                    saga_rows(&reply.sagas, now, true),
                    reply.sagas.len()
                )
            };
            Ok(Done { stdout, code })
        }
        Command::Export {
            finished_before,
            page_size,
        } => {
            let before = match finished_before {
                Before::At(at) => at,
                Before::Ago(age) => now - age.as_secs_f64(),
            };
            let mut stdout = std::io::stdout().lock();
            let mut page_token = String::new();
            let mut exported = 0u64;
            loop {
                let reply = client
                    .admin
                    .clone()
                    .export_sagas(client.request(pb::ExportSagasRequest {
                        finished_before: Some(timestamp(before)),
                        page_size,
                        page_token,
                    })?)
                    .await
                    .map_err(|s| client.fail(s))?
                    .into_inner();
                for saga in &reply.sagas {
                    let line = saga_document(saga, now).to_string();
                    writeln!(stdout, "{line}").map_err(|error| Failure {
                        message: format!("cannot write the export: {error}"),
                        code: 3,
                    })?;
                }
                exported += reply.sagas.len() as u64;
                if reply.next_page_token.is_empty() {
                    break;
                }
                page_token = reply.next_page_token;
            }
            stdout.flush().map_err(|error| Failure {
                message: format!("cannot write the export: {error}"),
                code: 3,
            })?;
            eprintln!(
                "exported {exported} saga(s) finished before {}",
                rfc3339(before)
            );
            Ok(done(String::new()))
        }
        Command::Show { id } => {
            let reply = client
                .admin
                .clone()
                .get_saga(client.request(pb::GetSagaRequest { saga_id: id })?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            Ok(done(if json_out {
                show_json(&reply, now)
            } else {
                show_text(&reply, now)
            }))
        }
        Command::Retry {
            id,
            reason,
            operator,
        } => {
            let reply = client
                .admin
                .clone()
                .retry_saga(client.request(pb::RetrySagaRequest {
                    saga_id: id,
                    operator,
                    reason,
                })?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            Ok(done(outcome(
                json_out,
                message_or(&reply.message, "retrying"),
                &reply.saga_id,
                reply.status,
            )))
        }
        Command::Abort {
            id,
            reason,
            operator,
        } => {
            let reply = client
                .admin
                .clone()
                .abort_saga(client.request(pb::AbortSagaRequest {
                    saga_id: id,
                    reason,
                    operator,
                })?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            Ok(done(outcome(
                json_out,
                message_or(&reply.message, "aborting"),
                &reply.saga_id,
                reply.status,
            )))
        }
        Command::Bench(_) | Command::Reconcile(_) => unreachable!("handled above"),
        Command::Stats => {
            let reply = client
                .admin
                .clone()
                .stats(client.request(pb::StatsRequest {})?)
                .await
                .map_err(|s| client.fail(s))?
                .into_inner();
            Ok(done(stats_text(&reply, json_out)))
        }
    }
}

/// The server's account of what a request did, or `verb` from a server
/// that gives none.
fn message_or<'a>(message: &'a str, verb: &'a str) -> &'a str {
    if message.is_empty() { verb } else { message }
}

fn outcome(json_out: bool, verb: &str, saga_id: &str, status: i32) -> String {
    if json_out {
        pretty(&json!({ "saga_id": saga_id, "status": status_name(status), "message": verb }))
    } else {
        format!("{saga_id}: {verb}; status now {}\n", status_name(status))
    }
}

fn stats_text(reply: &pb::StatsResponse, json_out: bool) -> String {
    let oldest = reply
        .oldest_non_terminal_age
        .as_ref()
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
    if json_out {
        let counts: serde_json::Map<String, Value> = reply
            .counts
            .iter()
            .map(|c| (status_name(c.status), json!(c.count)))
            .collect();
        return pretty(&json!({
            "counts": counts,
            "oldest_non_terminal_age_seconds": oldest,
            "started_last_minute": reply.started_last_minute,
            "finished_last_minute": reply.finished_last_minute,
            "in_flight": reply.in_flight,
        }));
    }
    let rows: Vec<Vec<String>> = reply
        .counts
        .iter()
        .map(|c| vec![status_name(c.status), c.count.to_string()])
        .collect();
    let mut text = if rows.is_empty() {
        "no sagas yet\n".to_owned()
    } else {
        table(&["STATUS", "SAGAS"], &rows)
    };
    text.push_str(&format!(
        "\noldest unfinished saga: {}\nstarted in the last minute: {}\nfinished in the last minute: {}\nin flight on this replica: {}\n",
        oldest.map_or("none".to_owned(), human_duration),
        reply.started_last_minute,
        reply.finished_last_minute,
        reply.in_flight
    ));
    text
}

fn kind_name(value: i32) -> String {
    pb::StepKind::try_from(value)
        .map(|k| k.as_str_name().trim_start_matches("STEP_KIND_").to_owned())
        .unwrap_or_default()
}

fn outcome_name(value: i32) -> String {
    pb::StepOutcome::try_from(value)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("STEP_OUTCOME_")
                .to_owned()
        })
        .unwrap_or_default()
}

fn duration_ms(entry: &pb::JournalEntry) -> Option<f64> {
    Some(((seconds(&entry.finished_at)? - seconds(&entry.started_at)?) * 1000.0).max(0.0))
}

fn show_json(reply: &pb::GetSagaResponse, now: f64) -> String {
    pretty(&saga_document(reply, now))
}

/// A saga with its journal, as `show` and `export` print it.
fn saga_document(reply: &pb::GetSagaResponse, now: f64) -> Value {
    let saga = reply.saga.clone().unwrap_or_default();
    json!({
        "saga": saga_json(&saga, now),
        "items": reply.items.iter().map(|i| json!({"product_id": i.product_id, "quantity": i.quantity})).collect::<Vec<_>>(),
        "total_amount_cents": reply.total_amount_cents,
        "failure_reason": text_or_null(&reply.failure_reason),
        "step_outputs": reply.step_outputs,
        "idempotency_key": text_or_null(&reply.idempotency_key),
        "version": reply.version,
        "trace_id": text_or_null(&reply.trace_id),
        "finished_at": time_json(&reply.finished_at),
        "journal": reply.journal.iter().map(|e| json!({
            "step": e.step,
            "kind": kind_name(e.kind),
            "attempt": e.attempt,
            "outcome": outcome_name(e.outcome),
            "detail": text_or_null(&e.detail),
            "rpc": text_or_null(&e.rpc),
            "actor": text_or_null(&e.actor),
            "started_at": time_json(&e.started_at),
            "finished_at": time_json(&e.finished_at),
            "duration_ms": duration_ms(e).map(|d| d.round()),
        })).collect::<Vec<_>>(),
    })
}

fn show_text(reply: &pb::GetSagaResponse, now: f64) -> String {
    let saga = reply.saga.clone().unwrap_or_default();
    let created = seconds(&saga.created_at).unwrap_or(now);
    let items: Vec<String> = reply
        .items
        .iter()
        .map(|i| format!("{} x{}", i.product_id, i.quantity))
        .collect();
    let outputs: Vec<String> = reply
        .step_outputs
        .iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut text = String::new();
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            text.push_str(&format!("{name:<11}{value}\n"));
        }
    };
    field("Saga", saga.saga_id.clone());
    field("Status", status_name(saga.status));
    field("Customer", saga.customer_id.clone());
    field("Items", items.join(", "));
    field(
        "Total",
        if reply.total_amount_cents > 0 {
            format!("{} cents", reply.total_amount_cents)
        } else {
            String::new()
        },
    );
    field("Reason", reply.failure_reason.clone());
    field("Stuck", saga.stuck_reason.clone());
    field("Step", saga.current_step.clone());
    field("Last error", saga.last_error.clone());
    field(
        "Next try",
        seconds(&saga.next_attempt_at)
            .map(|at| format!("{} (in {})", rfc3339(at), human_duration(at - now)))
            .unwrap_or_default(),
    );
    field("Driven by", saga.lease_owner.clone());
    field("Outputs", outputs.join(", "));
    field("Key", reply.idempotency_key.clone());
    // The journal's calls are spans of this trace (find it in the tracing
    // backend by this id).
    field("Trace", reply.trace_id.clone());
    field(
        "Placed",
        format!(
            "{} ({} ago)",
            rfc3339(created),
            human_duration(now - created)
        ),
    );
    let rows: Vec<Vec<String>> = reply
        .journal
        .iter()
        .map(|e| {
            let started = seconds(&e.started_at).unwrap_or(created);
            vec![
                format!("+{}", human_duration(started - created)),
                e.step.clone(),
                kind_name(e.kind).to_lowercase(),
                if e.attempt == 0 {
                    "-".into()
                } else {
                    e.attempt.to_string()
                },
                outcome_name(e.outcome),
                duration_ms(e).map_or("-".into(), |ms| human_duration(ms / 1000.0)),
                truncate(&e.detail, 100),
            ]
        })
        .collect();
    text.push_str("\nJournal\n");
    text.push_str(&table(
        &["AT", "STEP", "KIND", "ATTEMPT", "OUTCOME", "TOOK", "DETAIL"],
        &rows,
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_prints_the_trace_id_when_there_is_one() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let reply = pb::GetSagaResponse {
            trace_id: trace.into(),
            ..Default::default()
        };
        let text = show_text(&reply, 0.0);
        assert!(
            text.lines()
                .any(|line| line.starts_with("Trace") && line.ends_with(trace)),
            "{text}"
        );
        let json: Value = serde_json::from_str(&show_json(&reply, 0.0)).unwrap();
        assert_eq!(json["trace_id"], trace);

        let untraced = pb::GetSagaResponse::default();
        assert!(!show_text(&untraced, 0.0).contains("Trace"));
        let json: Value = serde_json::from_str(&show_json(&untraced, 0.0)).unwrap();
        assert_eq!(json["trace_id"], Value::Null);
    }
}
