//! `participant inventory|payment|fulfillment`: runs one participant as its
//! own process. Parses flags, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use participants::{Participant, ServeOptions};
use tokio::net::TcpListener;

/// Runs one participant of the order saga as a gRPC server on PostgreSQL or
/// SQLite.
///
/// Examples:
///   participant inventory   --listen 127.0.0.1:50061 --database-url postgres://postgres@127.0.0.1/inventory
///   participant payment     --database-url postgres://postgres@127.0.0.1/payment --fault-injection
///   participant fulfillment --database-url sqlite:fulfillment.db
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    participant: Kind,
}

#[derive(Debug, Subcommand)]
enum Kind {
    /// Products, stock and reservations (Reserve / Release).
    Inventory(Args),
    /// Accounts and charges (Charge / Refund).
    Payment(Args),
    /// Shipments (Ship / CancelShipment).
    Fulfillment(Args),
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Address to listen on [default: 127.0.0.1:50061 for inventory, :50062
    /// for payment, :50063 for fulfillment].
    #[arg(long, env = "PARTICIPANT_LISTEN")]
    listen: Option<SocketAddr>,

    /// Address of the HTTP endpoint for probes and metrics (/healthz,
    /// /readyz, /metrics); off unless set.
    #[arg(long, env = "PARTICIPANT_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,

    /// PostgreSQL or SQLite URL of this participant's own database
    /// (postgres://..., sqlite:PATH or sqlite::memory:); its tables are
    /// created at start, and a missing SQLite file too.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// Serve fault.v1.FaultInjection, so tests can make RPCs fail, slow down
    /// or lose their reply. Never in production.
    #[arg(long, env = "PARTICIPANT_FAULT_INJECTION")]
    fault_injection: bool,

    /// Most connections to the database (PostgreSQL; SQLite uses one),
    /// besides one for the batch writer. The default leaves room on a
    /// default PostgreSQL server (100 connections) for two orchestrator
    /// replicas, all three participants and an operator; connections idle
    /// for 30 s are closed.
    #[arg(long, env = "PARTICIPANT_MAX_CONNECTIONS",
          default_value_t = common::db::PARTICIPANT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// How long to keep trying to reach the database at start (refused,
    /// starting up or too many clients are tried again). At run time a
    /// statement waits at most 2 s for a connection, then answers
    /// UNAVAILABLE.
    #[arg(long, env = "PARTICIPANT_CONNECT_TIMEOUT", default_value = "10s", value_parser = common::cli::parse_duration)]
    connect_timeout: Duration,

    /// Limits on what clients send (--max-message-bytes,
    /// --max-concurrent-streams, --request-timeout, --http-header-timeout).
    #[command(flatten)]
    limits: common::limits::Limits,

    /// Logs and traces (--log-format, --otlp-endpoint).
    #[command(flatten)]
    telemetry: common::telemetry::TelemetryArgs,

    /// TLS on both ports (--tls-cert, --tls-key, --tls-client-ca).
    #[command(flatten)]
    tls: common::tls::ServerArgs,
}

fn main() -> ExitCode {
    let cli: Cli = match common::cli::parse_args("participant") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (participant, args) = match cli.participant {
        Kind::Inventory(args) => (Participant::Inventory, args),
        Kind::Payment(args) => (Participant::Payment, args),
        Kind::Fulfillment(args) => (Participant::Fulfillment, args),
    };
    // One thread: a participant spends a few microseconds of CPU around
    // each database round trip, and on one thread the network and database
    // events of a call wake no second thread (measured at one order at a
    // time: lower latency and less CPU per order than two workers).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("participant: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let telemetry = common::telemetry::init(&args.telemetry, participant.name())
            .map_err(|e| e.to_string())?;
        let result = run(participant, args).await;
        telemetry.shutdown().await;
        result
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("participant {}: {message}", participant.name());
            ExitCode::FAILURE
        }
    }
}

async fn run(participant: Participant, args: Args) -> Result<(), String> {
    args.limits.validate()?;
    let listen = args.listen.unwrap_or(participant.default_listen());
    // Before anything starts: a bad TLS flag or file is a one-line error.
    let tls = args.tls.load().map_err(|e| e.to_string())?;
    let backend = participants::connect(
        participant,
        &args.database_url,
        args.max_connections,
        args.connect_timeout,
    )
    .await
    .map_err(|e| format!("cannot use the database: {e}"))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let http = match args.http_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot listen on {address} (--http-listen): {e}"))?,
        ),
        None => None,
    };
    tracing::info!(
        participant = participant.name(),
        %address,
        http = ?args.http_listen,
        fault_injection = args.fault_injection,
        tls = tls.is_some(),
        mtls = tls.as_ref().is_some_and(|tls| tls.requires_client_certificate()),
        "listening"
    );
    let options = ServeOptions {
        fault_injection: args.fault_injection,
        tls,
        limits: args.limits,
    };
    participants::serve_with_http(
        participant,
        backend.clone(),
        listener,
        http,
        options,
        common::cli::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())?;
    backend.close().await;
    tracing::info!(participant = participant.name(), "stopped");
    Ok(())
}
