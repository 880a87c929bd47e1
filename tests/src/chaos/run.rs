//! The random run: the whole system as processes, a seeded order plan
//! placed by a closed-loop client on both replicas, and faults of every
//! kind at seeded random times; then every fault is cleared, every saga
//! settles, and the invariants are checked from the databases, and by
//! `sagactl reconcile`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use participants::Participant;
use proto::fault::v1::ClearFaultsRequest;
use serde::Serialize;

use super::audit::{self, AuditReport, Databases};
use super::cluster::{Cluster, ClusterOptions};
use super::faults::{self, Fault, Injector};
use super::postgres::{MachineServer, PgTools, is_root};
use super::timeline::{Event, Recovery, Timeline};
use super::workload::{self, Client, OrderRecord};
use super::{Binaries, Rng};

/// How a random run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Orders to place.
    pub orders: usize,
    /// Client workers, each placing one order at a time and waiting for it.
    pub concurrency: usize,
    /// The seed of the order plan and the fault schedule.
    pub seed: u64,
    /// Cap on the fault phase: no order is placed and no fault injected
    /// after it.
    pub duration: Duration,
    /// Orders per second at most (None: as fast as the workers go).
    pub rate: Option<f64>,
    /// How long every saga may take to settle after the fault phase.
    pub settle_timeout: Duration,
    /// The binaries.
    pub binaries: Binaries,
    /// Keep temp dirs and databases.
    pub keep: bool,
    /// Run `sagactl reconcile` at the end.
    pub reconcile: bool,
    /// RUST_LOG of the services.
    pub service_log: String,
    /// Print fault events as they happen.
    pub echo: bool,
}

/// The run's result, also written as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The seed (replay with `--seed`).
    pub seed: u64,
    /// Orders asked for.
    pub orders_planned: usize,
    /// Orders the client got an id for.
    pub orders_placed: usize,
    /// Orders whose PlaceOrder never answered (the client gave up).
    pub orders_unanswered: usize,
    /// Orders that needed more than one PlaceOrder call.
    pub orders_placed_after_retry: usize,
    /// Recovery probes placed.
    pub canaries: usize,
    /// Every saga in the database, per status.
    pub outcomes: BTreeMap<String, usize>,
    /// Faults injected, per kind.
    pub faults: BTreeMap<String, usize>,
    /// Every fault kind was injected at least once.
    pub every_kind_injected: bool,
    /// SIGKILLs of processes.
    pub kills: usize,
    /// Database crashes and restarts.
    pub crashes: usize,
    /// Client cancels, per answer.
    pub cancels: BTreeMap<String, usize>,
    /// `sagactl abort` runs, per answer.
    pub aborts: BTreeMap<String, usize>,
    /// After each kill or crash.
    pub recoveries: Vec<Recovery>,
    /// Longest time from a restart to a completed canary, in milliseconds.
    pub max_recovery_ms: Option<u64>,
    /// Kills and crashes after which no canary completed in time.
    pub unrecovered: usize,
    /// Order ids answered but missing from the database (must be 0).
    pub lost_sagas: usize,
    /// Broken invariants (must be 0).
    pub invariant_violations: usize,
    /// Sagas that ended in NEEDS_ATTENTION (then retried with sagactl).
    pub needs_attention: usize,
    /// Attempts journalled twice (information).
    pub attempts_journalled_twice: usize,
    /// A few of them.
    pub journalled_twice: Vec<String>,
    /// `sagactl reconcile`: clean, discrepancies, error, or skipped.
    pub reconcile: String,
    /// Seconds of the fault phase.
    pub fault_phase_seconds: f64,
    /// Seconds until every saga settled after it.
    pub settle_seconds: f64,
    /// Seconds of the whole run.
    pub total_seconds: f64,
    /// Every invariant held and nothing was lost.
    pub passed: bool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The summary.
    pub summary: Summary,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Every broken invariant and reconcile problem.
    pub violations: Vec<String>,
}

/// Runs it. An error means the run could not be carried out (a process
/// did not come back, a database could not be reached); a run that was
/// carried out returns its report, passed or not.
pub async fn run(options: &RunOptions) -> Result<RunReport> {
    ensure!(
        is_root(),
        "the random run restarts the machine's PostgreSQL (pg_ctlcluster) and needs root; \
         run it as root (the snapshot scenario does not need it)"
    );
    ensure!(options.orders > 0, "--orders must be at least 1");
    ensure!(options.concurrency > 0, "--concurrency must be at least 1");
    let tools = PgTools::find()?;
    let started = Instant::now();
    let cluster_options = ClusterOptions::chaos(2, &options.service_log, options.keep);
    let mut cluster = Cluster::start(&options.binaries, &tools, &cluster_options).await?;
    // Declared after the cluster, so dropped before it: whatever happens
    // below (an error, a panic, an interrupt), the machine's server is
    // started again before the participants' databases are dropped.
    let machine = MachineServer::find()?;
    if options.echo {
        println!(
            "chaos: system up in {:.1}s (orchestrator PostgreSQL on port {}, logs in {})",
            started.elapsed().as_secs_f64(),
            cluster.orchestrator_db.port(),
            cluster.logs().display()
        );
    }
    let report = drive(&mut cluster, &machine, options, started).await;
    if report.as_ref().map_or(true, |r| !r.summary.passed) {
        cluster.keep_logs();
    }
    report
}

async fn drive(
    cluster: &mut Cluster,
    machine: &MachineServer,
    options: &RunOptions,
    started: Instant,
) -> Result<RunReport> {
    let mut rng = Rng::new(options.seed);
    let mut plan_rng = rng.fork();
    let mut fault_rng = rng.fork();
    let initial = workload::seed_catalog(cluster).await?;
    let replicas = cluster.orchestrators.len();
    let plans = Arc::new(workload::plans(
        &mut plan_rng,
        options.orders,
        replicas,
        options.seed,
    ));
    let timeline = Arc::new(Timeline::new(options.echo));
    let client = Client::new(cluster, timeline.clone())?;

    // The fault phase: the workers and the injector side by side.
    let phase_end = Instant::now() + options.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let workload_done = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let phase_started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let (client, plans, next, stop) =
                (client.clone(), plans.clone(), next.clone(), stop.clone());
            let rate = options.rate;
            tokio::spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= phase_end {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(plan) = plans.get(index) else {
                        return;
                    };
                    if let Some(rate) = rate {
                        let due = phase_started + Duration::from_secs_f64(index as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    client.run(plan, Duration::from_secs(30)).await;
                }
            })
        })
        .collect();
    let workload = {
        let workload_done = workload_done.clone();
        async move {
            for worker in workers {
                let _ = worker.await;
            }
            workload_done.store(true, Ordering::Relaxed);
        }
    };
    let injection = {
        let timeline = timeline.clone();
        let stop = stop.clone();
        let workload_done = workload_done.clone();
        let mut injector = Injector::new(cluster, machine, client.clone(), timeline.clone());
        async move {
            let mut queue: VecDeque<Fault> = faults::first_round(&mut fault_rng, replicas).into();
            let first_round = queue.len();
            let mut injected = 0usize;
            let result = loop {
                // A seeded gap, cut short when the phase ends.
                let gap = Duration::from_millis(300 + fault_rng.next_u64() % 1_700);
                let until = Instant::now() + gap;
                while Instant::now() < until
                    && Instant::now() < phase_end
                    && !(workload_done.load(Ordering::Relaxed) && injected >= first_round)
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if Instant::now() >= phase_end
                    || (workload_done.load(Ordering::Relaxed) && injected >= first_round)
                {
                    break Ok(());
                }
                let fault = queue
                    .pop_front()
                    .unwrap_or_else(|| faults::random(&mut fault_rng, replicas));
                if let Err(error) = injector.inject(&fault, &mut fault_rng).await {
                    break Err(error);
                }
                injected += 1;
            };
            injector.stop_timers();
            if injected < first_round {
                timeline.record(
                    "note",
                    "schedule",
                    format!(
                        "the fault phase ended after {injected} of the first round's {first_round} faults (raise --duration)"
                    ),
                );
            }
            stop.store(true, Ordering::Relaxed);
            result
        }
    };
    let ((), injected) = tokio::join!(workload, injection);
    let fault_phase = phase_started.elapsed();
    if options.echo {
        println!(
            "chaos: fault phase over after {:.1}s; healing",
            fault_phase.as_secs_f64()
        );
    }
    // Heal whatever the injector left, even after it failed.
    let healed = heal(cluster, machine, &timeline).await;
    injected?;
    healed?;

    // Settle.
    let settle_started = Instant::now();
    wait_all_settled(cluster, options.settle_timeout).await?;
    let needs_attention = needs_attention(cluster).await?;
    if !needs_attention.is_empty() {
        // What an operator does once the faults are gone: resume them.
        for id in &needs_attention {
            let answer =
                sagactl(cluster, &["retry", id, "--reason", "chaos: faults cleared"]).await;
            timeline.record(
                "sagactl-retry",
                id,
                answer.map_or_else(|e| e.to_string(), |o| o.1),
            );
        }
        wait_all_settled(cluster, options.settle_timeout).await?;
    }
    let settle = settle_started.elapsed();
    if options.echo {
        println!(
            "chaos: every saga settled {:.1}s after the fault phase; auditing",
            settle.as_secs_f64()
        );
    }

    let records = client.records();
    let audit = audit::audit(Databases::of(cluster), &initial, &records).await?;
    let mut violations = audit.violations.clone();
    let reconcile = if options.reconcile {
        reconcile(cluster, &mut violations).await
    } else {
        "skipped (--no-reconcile)".to_owned()
    };
    let summary = summarize(
        options,
        &records,
        &timeline,
        &audit,
        needs_attention.len(),
        &violations,
        reconcile,
        (fault_phase, settle, started.elapsed()),
    );
    Ok(RunReport {
        summary,
        events: timeline.events(),
        violations,
    })
}

/// Clears every participant fault and proxy fault, and brings every
/// process and database back up.
async fn heal(cluster: &mut Cluster, machine: &MachineServer, timeline: &Timeline) -> Result<()> {
    for proxy in &cluster.proxies {
        proxy.heal();
    }
    tokio::task::block_in_place(|| machine.start())?;
    if !cluster.orchestrator_db.is_running() {
        let db = &mut cluster.orchestrator_db;
        tokio::task::block_in_place(|| db.start())?;
    }
    for service in cluster
        .participants
        .iter_mut()
        .chain(cluster.orchestrators.iter_mut())
    {
        if !service.is_running() {
            service
                .start_until_serving(Duration::from_secs(90))
                .await
                .with_context(|| format!("bringing {} back", service.name()))?;
        }
    }
    for participant in Participant::ALL {
        let mut faults = cluster.faults(participant)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match faults.clear_faults(ClearFaultsRequest {}).await {
                Ok(_) => break,
                Err(status) if Instant::now() < deadline => {
                    let _ = status;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => {
                    return Err(anyhow::anyhow!(
                        "cannot clear the faults of {}: {}",
                        participant.name(),
                        status.message()
                    ));
                }
            }
        }
    }
    timeline.record(
        "heal",
        "everything",
        "faults cleared, proxies forwarding, every process and database up",
    );
    Ok(())
}

/// Waits until no saga in the orchestrator's database is unsettled.
async fn wait_all_settled(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let active: Result<Vec<(String, String)>, sqlx::Error> = sqlx::query_as(
            "SELECT saga_id, status FROM sagas
             WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'NEEDS_ATTENTION')
             ORDER BY saga_id LIMIT 5",
        )
        .fetch_all(&cluster.orchestrator_pool)
        .await;
        match active {
            Ok(active) if active.is_empty() => return Ok(()),
            Ok(active) if Instant::now() > deadline => {
                anyhow::bail!(
                    "sagas still unsettled {timeout:?} after the fault phase, e.g. {active:?}"
                )
            }
            Err(error) if Instant::now() > deadline => {
                return Err(error).context("reading the orchestrator's sagas");
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn needs_attention(cluster: &Cluster) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT saga_id FROM sagas WHERE status = 'NEEDS_ATTENTION'")
            .fetch_all(&cluster.orchestrator_pool)
            .await?,
    )
}

/// Runs `sagactl --endpoint <first replica> ARGS`; its exit code and
/// trimmed stdout (or stderr when it failed).
async fn sagactl(cluster: &Cluster, args: &[&str]) -> Result<(i32, String)> {
    let mut command = std::process::Command::new(cluster.binaries.path("sagactl"));
    command
        .arg("--endpoint")
        .arg(cluster.orchestrators[0].endpoint())
        .args(args)
        .env_remove("SAGACTL_TOKEN")
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .context("running sagactl")?;
    let code = output.status.code().unwrap_or(-1);
    let text = if output.status.success() {
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    } else {
        String::from_utf8_lossy(&output.stderr).trim().to_owned()
    };
    Ok((code, text))
}

/// `sagactl reconcile --output json`: 0 clean, 1 discrepancies (each a
/// violation), anything else an error (a violation too: the run cannot
/// say it is clean).
async fn reconcile(cluster: &Cluster, violations: &mut Vec<String>) -> String {
    match sagactl(cluster, &["reconcile", "--output", "json"]).await {
        Ok((0, _)) => "clean".to_owned(),
        Ok((1, stdout)) => {
            let short: String = stdout.chars().take(2_000).collect();
            violations.push(format!(
                "(reconcile) sagactl reconcile found discrepancies: {short}"
            ));
            "discrepancies".to_owned()
        }
        Ok((code, stderr)) => {
            let short: String = stderr.chars().take(500).collect();
            violations.push(format!(
                "(reconcile) sagactl reconcile failed with exit {code}: {short}"
            ));
            format!("error (exit {code})")
        }
        Err(error) => {
            violations.push(format!("(reconcile) {error:#}"));
            "error".to_owned()
        }
    }
}

/// The first word of an answer (`CANCELLED`, `refused`, `error`).
fn answer_kind(answer: &str) -> String {
    answer.split([':', ' ']).next().unwrap_or(answer).to_owned()
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    options: &RunOptions,
    records: &[OrderRecord],
    timeline: &Timeline,
    audit: &AuditReport,
    needs_attention: usize,
    violations: &[String],
    reconcile: String,
    (fault_phase, settle, total): (Duration, Duration, Duration),
) -> Summary {
    let planned: Vec<&OrderRecord> = records.iter().filter(|r| !r.canary).collect();
    let mut faults: BTreeMap<String, usize> =
        faults::KINDS.iter().map(|k| (k.to_string(), 0)).collect();
    let mut cancels = BTreeMap::new();
    let mut aborts = BTreeMap::new();
    for event in timeline.events() {
        if let Some(count) = faults.get_mut(&event.kind) {
            *count += 1;
        }
        match event.kind.as_str() {
            "cancel" => *cancels.entry(answer_kind(&event.detail)).or_default() += 1,
            "abort" => *aborts.entry(answer_kind(&event.detail)).or_default() += 1,
            _ => {}
        }
    }
    let count = |kind: &str| faults.get(kind).copied().unwrap_or(0);
    let recoveries = timeline.recoveries();
    let lost = audit.lost.len();
    Summary {
        seed: options.seed,
        orders_planned: options.orders,
        orders_placed: planned.iter().filter(|r| r.order_id.is_some()).count(),
        orders_unanswered: planned.iter().filter(|r| r.order_id.is_none()).count(),
        orders_placed_after_retry: planned
            .iter()
            .filter(|r| r.order_id.is_some() && r.place_attempts > 1)
            .count(),
        canaries: records.len() - planned.len(),
        outcomes: audit.by_status.clone(),
        every_kind_injected: faults.values().all(|n| *n > 0),
        kills: count("kill-orchestrator") + count("kill-participant"),
        crashes: count("crash-orchestrator-db") + count("restart-participants-db"),
        faults,
        cancels,
        aborts,
        max_recovery_ms: recoveries.iter().filter_map(|r| r.canary_ms).max(),
        unrecovered: recoveries.iter().filter(|r| r.canary_ms.is_none()).count(),
        recoveries,
        lost_sagas: lost,
        invariant_violations: audit.violations.len(),
        needs_attention,
        attempts_journalled_twice: audit.attempts_journalled_twice,
        journalled_twice: audit.journalled_twice.clone(),
        passed: lost == 0 && violations.is_empty(),
        reconcile,
        fault_phase_seconds: round(fault_phase),
        settle_seconds: round(settle),
        total_seconds: round(total),
    }
}

fn round(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10.0).round() / 10.0
}
