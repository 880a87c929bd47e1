//! `chaos`: the chaos suite over the real binaries. Parses flags, runs the
//! library (`harness::chaos`), prints the schedule and the summary, and
//! exits 0 only when every invariant held.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use common::cli::parse_duration;
use harness::chaos::run::{RunOptions, RunReport};
use harness::chaos::snapshot::{SnapshotOptions, SnapshotOutcome};
use harness::chaos::timeline::format_event;
use harness::chaos::{Binaries, random_seed};

/// Chaos suite: runs the orchestrator (two `orchestrator serve` replicas),
/// the three participants and `sagactl` as real processes, injects faults
/// across every failure domain at random times, then checks the design's
/// invariants from the databases.
///
/// Topology: the orchestrator's database on a PostgreSQL instance of its
/// own (initdb in a temp dir, configured for replication so pg_basebackup
/// works, fsync on, removed at the end); the participants' databases on the machine's PostgreSQL
/// (127.0.0.1:5432, or $DATABASE_URL), dropped at the end; every
/// orchestrator-to-participant connection through a TCP fault proxy.
///
/// Faults (first one of every kind, in a seeded order, then random ones):
/// participant faults (FAIL_BEFORE, FAIL_AFTER_COMMIT, DELAY; count or
/// percent) through fault.v1.FaultInjection; SIGKILL and restart of each
/// replica (same port and replica id) and each participant; a crash of the
/// orchestrator's PostgreSQL (pg_ctl stop -m immediate) and a restart of
/// the machine's PostgreSQL (always left running, also on errors);
/// latency, connection resets and black holes in the proxies. About 5% of
/// the orders are cancelled by the client and 1% aborted with
/// `sagactl abort`. After each kill or crash the recovery is timed: until
/// the process serves, and until a canary order through it completes.
///
/// At the end: every fault cleared, every saga settled, then invariants
/// 1-5 checked from the databases and `sagactl reconcile` run.
///
/// The binaries come from the target dir of this build profile (build
/// them with `cargo build --workspace --bins`), or --bin-dir. The random
/// run needs root (it restarts the machine's PostgreSQL and runs initdb as
/// the postgres user).
///
/// The snapshot scenario (--scenario snapshot): one replica; Reserve
/// delayed; a pg_basebackup of the orchestrator's instance while the
/// saga's start is durable but nothing more; Charge succeeds, Ship hangs;
/// the instance crashed and restored from the backup (the progress,
/// committed asynchronously, is gone); Reserve failing from then on; the
/// client cancels. The order must end CANCELLED with the money and the
/// stock back. With --summary-json, its outcome is written instead.
///
/// Environment: DATABASE_URL (the machine's server, default
/// postgres://postgres@127.0.0.1:5432/postgres), CHAOS_BIN_DIR (the
/// binaries), PG_BINDIR (initdb, pg_ctl, pg_basebackup), CHAOS_DEBUG
/// (notes on retried starts).
///
/// Exit status: 0 every invariant held, 1 a violation (or a lost saga, or
/// reconcile found discrepancies), 2 the run could not be carried out.
///
/// Examples:
///   chaos --orders 300 --concurrency 16 --rate 10 --seed 42
///   chaos --orders 10000 --concurrency 64 --duration 30m
///   chaos --scenario snapshot
#[derive(Debug, Parser)]
#[command(name = "chaos", verbatim_doc_comment)]
struct Cli {
    /// Which run: `random` (faults at random times) or `snapshot` (the
    /// deterministic loss of asynchronously committed progress).
    #[arg(long, value_enum, default_value = "random")]
    scenario: Scenario,

    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: usize,

    /// Client workers; each places one order and waits for it to settle.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,

    /// Seed of the order plan and the fault schedule [default: from the
    /// clock; printed so the run can be replayed].
    #[arg(long)]
    seed: Option<u64>,

    /// Cap on the fault phase (orders are placed and faults injected
    /// within it; the phase also ends once every order was placed and the
    /// first round of faults is done), e.g. 90s, 30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    duration: Duration,

    /// Orders per second at most, to spread a small run over its faults
    /// [default: as fast as the workers go].
    #[arg(long)]
    rate: Option<f64>,

    /// How long the sagas may take to settle after the fault phase.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    settle_timeout: Duration,

    /// Directory of the orchestrator, participant and sagactl binaries
    /// [default: the target dir of this build profile, or $CHAOS_BIN_DIR].
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// Keep the temp dirs (PostgreSQL data, logs) and the databases.
    #[arg(long)]
    keep: bool,

    /// Skip `sagactl reconcile` at the end.
    #[arg(long)]
    no_reconcile: bool,

    /// Also write the summary as one JSON line to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,

    /// RUST_LOG of the services (their logs go to files, kept when a run
    /// fails).
    #[arg(long, default_value = "warn")]
    service_log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Random,
    Snapshot,
}

fn main() -> ExitCode {
    let cli: Cli = match common::cli::parse_args("chaos") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chaos: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            code = run(cli) => code,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the run stops every process and removes the temp
                // instance and databases; the machine's server is started.
                eprintln!("chaos: interrupted; cleaning up");
                ExitCode::from(130)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

async fn run(cli: Cli) -> ExitCode {
    let binaries = match Binaries::find(cli.bin_dir.as_deref()) {
        Ok(binaries) => binaries,
        Err(error) => {
            eprintln!("chaos: {error:#}");
            return ExitCode::from(2);
        }
    };
    match cli.scenario {
        Scenario::Random => random(cli, binaries).await,
        Scenario::Snapshot => snapshot(cli, binaries).await,
    }
}

async fn random(cli: Cli, binaries: Binaries) -> ExitCode {
    let seed = cli.seed.unwrap_or_else(random_seed);
    println!(
        "chaos: seed {seed} (replay with --seed {seed}); {} orders, concurrency {}, binaries in {}",
        cli.orders,
        cli.concurrency,
        binaries.dir.display()
    );
    println!("chaos: fault schedule, as it happens:");
    let options = RunOptions {
        orders: cli.orders,
        concurrency: cli.concurrency,
        seed,
        duration: cli.duration,
        rate: cli.rate,
        settle_timeout: cli.settle_timeout,
        binaries,
        keep: cli.keep,
        reconcile: !cli.no_reconcile,
        service_log: cli.service_log.clone(),
        echo: true,
    };
    let report = match harness::chaos::run::run(&options).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("chaos: the run could not be carried out (seed {seed}): {error:#}");
            return ExitCode::from(2);
        }
    };
    print_report(&report);
    if let Some(path) = &cli.summary_json
        && let Err(error) = write_json(path, &report.summary)
    {
        eprintln!("chaos: {error}");
        return ExitCode::from(2);
    }
    if report.summary.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let line = serde_json::to_string(value).map_err(|e| e.to_string())?;
    std::fs::write(path, format!("{line}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn counts(map: &std::collections::BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(report: &RunReport) {
    let s = &report.summary;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nchaos: summary (seed {})", s.seed);
    let _ = writeln!(
        out,
        "  orders:      {} planned, {} placed ({} only after retries), {} never answered; {} canaries",
        s.orders_planned,
        s.orders_placed,
        s.orders_placed_after_retry,
        s.orders_unanswered,
        s.canaries
    );
    let _ = writeln!(out, "  outcomes:    {}", counts(&s.outcomes));
    let _ = writeln!(
        out,
        "  faults:      {}{}",
        counts(&s.faults),
        if s.every_kind_injected {
            ""
        } else {
            " (NOT every kind: raise --duration)"
        }
    );
    let _ = writeln!(
        out,
        "  kills:       {}; database crashes/restarts: {}",
        s.kills, s.crashes
    );
    let _ = writeln!(out, "  cancels:     {}", counts(&s.cancels));
    let _ = writeln!(out, "  aborts:      {}", counts(&s.aborts));
    let _ = writeln!(
        out,
        "  recoveries (down / serving after restart / canary completed after restart):"
    );
    for r in &s.recoveries {
        let canary = r
            .canary_ms
            .map_or("no canary completed".to_owned(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            out,
            "    {:<24} {:<16} {:>5} ms / {:>5} ms / {canary}",
            r.kind, r.target, r.down_ms, r.serving_ms
        );
    }
    let _ = writeln!(
        out,
        "  phases:      faults {:.1}s, settling {:.1}s, total {:.1}s",
        s.fault_phase_seconds, s.settle_seconds, s.total_seconds
    );
    let _ = writeln!(
        out,
        "  journal:     {} attempts journalled twice (information)",
        s.attempts_journalled_twice
    );
    for sample in &s.journalled_twice {
        let _ = writeln!(out, "    {sample}");
    }
    let _ = writeln!(
        out,
        "  NEEDS_ATTENTION before the operator retry: {}",
        s.needs_attention
    );
    let _ = writeln!(out, "  reconcile:   {}", s.reconcile);
    let _ = writeln!(out, "  lost sagas:  {}", s.lost_sagas);
    let _ = writeln!(out, "  invariant violations: {}", s.invariant_violations);
    for violation in report.violations.iter().take(25) {
        let _ = writeln!(out, "    {violation}");
    }
    if report.violations.len() > 25 {
        let _ = writeln!(out, "    ... and {} more", report.violations.len() - 25);
    }
    let notes: Vec<&harness::chaos::timeline::Event> =
        report.events.iter().filter(|e| e.kind == "note").collect();
    for note in notes {
        let _ = writeln!(out, "  note: {}", note.detail);
    }
    let _ = writeln!(out, "chaos: {}", if s.passed { "PASSED" } else { "FAILED" });
}

async fn snapshot(cli: Cli, binaries: Binaries) -> ExitCode {
    println!(
        "chaos: snapshot scenario (binaries in {})",
        binaries.dir.display()
    );
    let options = SnapshotOptions {
        binaries,
        keep: cli.keep,
        service_log: cli.service_log.clone(),
        echo: false,
    };
    let outcome: SnapshotOutcome = match harness::chaos::snapshot::run(&options).await {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("chaos: the snapshot scenario could not be carried out: {error:#}");
            return ExitCode::from(2);
        }
    };
    for event in &outcome.timeline {
        println!("{}", format_event(event));
    }
    let violations = outcome.violations();
    println!(
        "chaos: order {} ended {}; balance {} (initially {}), stock {} + {} reserved (initially {}), charge {:?}, shipment {:?}",
        outcome.order_id,
        outcome.status,
        outcome.balance,
        outcome.initial_balance,
        outcome.stock,
        outcome.reserved,
        outcome.initial_stock,
        outcome.charge,
        outcome.shipment
    );
    if let Some(path) = &cli.summary_json
        && let Err(error) = write_json(path, &outcome)
    {
        eprintln!("chaos: {error}");
        return ExitCode::from(2);
    }
    if violations.is_empty() {
        println!("chaos: snapshot scenario PASSED: the lost progress was compensated");
        ExitCode::SUCCESS
    } else {
        for violation in &violations {
            println!("  {violation}");
        }
        println!("chaos: snapshot scenario FAILED");
        ExitCode::from(1)
    }
}
