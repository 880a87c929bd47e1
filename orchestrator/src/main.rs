//! `orchestrator serve`: runs the saga orchestrator. Parses flags, sets up
//! logging, and calls the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use orchestrator::clients::GrpcParticipants;
use orchestrator::config::ServeArgs;
#[cfg(feature = "dev")]
use orchestrator::dev::DevArgs;
use tokio::net::TcpListener;

/// The saga orchestrator for orders: places orders, drives each one's saga
/// (reserve inventory -> charge payment -> ship) over gRPC, retries transient
/// failures and compensates on failure or cancel, durably in PostgreSQL.
///
/// Examples:
///   orchestrator dev                      # everything in one process, SQLite, demo data
///   orchestrator serve --database-url postgres://postgres@127.0.0.1/orchestrator \
///       --inventory-url http://127.0.0.1:50061 --payment-url http://127.0.0.1:50062 \
///       --fulfillment-url http://127.0.0.1:50063
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve saga.v1.OrderService and AdminService on PostgreSQL, calling
    /// the participants.
    Serve(Box<ServeArgs>),
    /// The embedded mode: the orchestrator and the three participants in
    /// this process, each on its own port, on SQLite, with demo data. No
    /// database server needed.
    #[cfg(feature = "dev")]
    Dev(Box<DevArgs>),
    /// Not in this build (built without the `dev` feature): says so.
    #[cfg(not(feature = "dev"))]
    #[command(hide = true, disable_help_flag = true)]
    Dev {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Whether `--admin-token` of `subcommand` came on the command line (not
/// from ADMIN_TOKEN), where every user of the machine can read it.
fn admin_token_on_command_line(matches: &clap::ArgMatches, subcommand: &str) -> bool {
    matches
        .subcommand_matches(subcommand)
        .and_then(|m| m.value_source("admin_token"))
        == Some(clap::parser::ValueSource::CommandLine)
}

fn main() -> ExitCode {
    let (mut cli, matches): (Cli, _) = match common::cli::parse_args_with_matches("orchestrator") {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    match &mut cli.command {
        Command::Serve(args) => {
            args.tokens.admin_token_on_command_line =
                admin_token_on_command_line(&matches, "serve");
        }
        #[cfg(feature = "dev")]
        Command::Dev(args) => {
            args.tokens.admin_token_on_command_line = admin_token_on_command_line(&matches, "dev");
        }
        #[cfg(not(feature = "dev"))]
        Command::Dev { .. } => {}
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orchestrator: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(async {
            let telemetry = common::telemetry::init(&args.telemetry, "orchestrator")
                .map_err(|e| e.to_string())?;
            let result = serve(*args).await;
            telemetry.shutdown().await;
            result
        }),
        #[cfg(feature = "dev")]
        Command::Dev(args) => runtime.block_on(async {
            let telemetry = common::telemetry::init(&args.telemetry, "orchestrator")
                .map_err(|e| e.to_string())?;
            let result = orchestrator::dev::run(*args, common::cli::shutdown_signal())
                .await
                .map_err(|e| e.to_string());
            telemetry.shutdown().await;
            result
        }),
        #[cfg(not(feature = "dev"))]
        Command::Dev { .. } => {
            common::cli::init_logging();
            Err("this build has no embedded mode (`orchestrator dev` needs \
             the `dev` feature, on by default); use `orchestrator serve`"
                .to_owned())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("orchestrator: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let settings = args.settings().map_err(|e| e.to_string())?;
    let calls = GrpcParticipants::new(&settings.participants, settings.step_timeout)
        .map_err(|e| e.to_string())?;
    let store = orchestrator::server::connect(
        &args.database_url,
        args.max_connections,
        args.connect_timeout,
    )
    .await
    .map_err(|e| format!("cannot use the database: {e}"))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let http = match args.http_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot listen on {address} (--http-listen): {e}"))?,
        ),
        None => None,
    };
    tracing::info!(
        address = %listener.local_addr().map_err(|e| e.to_string())?,
        http = ?args.http_listen,
        replica = %settings.executor.replica_id,
        tls = settings.tls.is_some(),
        mtls = settings.tls.as_ref().is_some_and(|tls| tls.requires_client_certificate()),
        inventory = %settings.participants.inventory,
        payment = %settings.participants.payment,
        fulfillment = %settings.participants.fulfillment,
        "orchestrator listening"
    );
    orchestrator::server::serve(
        store,
        Arc::new(calls),
        settings,
        listener,
        http,
        common::cli::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!("orchestrator stopped");
    Ok(())
}
