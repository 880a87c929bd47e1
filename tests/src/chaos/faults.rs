//! The faults of a random run and the injector that carries them out, one
//! at a time, at random gaps drawn from the seed: participant faults
//! through `fault.v1.FaultInjection`, SIGKILLs and restarts of every
//! process, a crash of the orchestrator's PostgreSQL, a restart of the
//! participants' PostgreSQL, and network faults through the proxies.
//!
//! The first round holds one fault of every kind (each replica and each
//! participant killed once), in a seeded order, so even a short run covers
//! them all; random faults follow until the fault phase ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use participants::Participant;
use proto::fault::v1::{ClearFaultsRequest, FaultMode, SetFaultRequest};
use tokio::task::JoinHandle;
use tonic::Code;

use super::Rng;
use super::cluster::Cluster;
use super::postgres::MachineServer;
use super::proxy::AfterBlackhole;
use super::timeline::{Recovery, Timeline};
use super::workload::Client;

/// One fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `SetFault` on a participant; percent faults are cleared after `hold`.
    Participant {
        /// Whose.
        participant: Participant,
        /// The armed fault.
        request: SetFaultRequest,
        /// How long a percent fault stays armed.
        hold: Duration,
    },
    /// SIGKILL a replica, keep it down, start it again (same port and id).
    KillOrchestrator {
        /// Which.
        replica: usize,
        /// For how long.
        down: Duration,
    },
    /// SIGKILL a participant, keep it down, start it again (same port).
    KillParticipant {
        /// Which.
        participant: Participant,
        /// For how long.
        down: Duration,
    },
    /// `pg_ctl stop -m immediate` on the orchestrator's PostgreSQL, then start.
    CrashOrchestratorDb {
        /// For how long.
        down: Duration,
    },
    /// Stop and start the machine's PostgreSQL (the participants').
    RestartParticipantsDb {
        /// For how long.
        down: Duration,
    },
    /// Latency on every chunk through a participant's proxy, for `hold`.
    ProxyLatency {
        /// Whose.
        participant: Participant,
        /// How much, each way.
        latency: Duration,
        /// For how long.
        hold: Duration,
    },
    /// Reset every connection to a participant.
    ProxyReset {
        /// Whose.
        participant: Participant,
    },
    /// Black-hole a participant for `hold`, then resume or reset.
    ProxyBlackhole {
        /// Whose.
        participant: Participant,
        /// For how long.
        hold: Duration,
        /// How it ends.
        then: AfterBlackhole,
    },
}

/// Every kind, as named in the schedule and the summary.
pub const KINDS: &[&str] = &[
    "participant-fault",
    "kill-orchestrator",
    "kill-participant",
    "crash-orchestrator-db",
    "restart-participants-db",
    "proxy-latency",
    "proxy-reset",
    "proxy-blackhole",
];

impl Fault {
    /// Its kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Participant { .. } => "participant-fault",
            Self::KillOrchestrator { .. } => "kill-orchestrator",
            Self::KillParticipant { .. } => "kill-participant",
            Self::CrashOrchestratorDb { .. } => "crash-orchestrator-db",
            Self::RestartParticipantsDb { .. } => "restart-participants-db",
            Self::ProxyLatency { .. } => "proxy-latency",
            Self::ProxyReset { .. } => "proxy-reset",
            Self::ProxyBlackhole { .. } => "proxy-blackhole",
        }
    }
}

const FORWARD: &[(Participant, &str)] = &[
    (Participant::Inventory, "Reserve"),
    (Participant::Payment, "Charge"),
    (Participant::Fulfillment, "Ship"),
];
const COMPENSATIONS: &[(Participant, &str)] = &[
    (Participant::Inventory, "Release"),
    (Participant::Payment, "Refund"),
    (Participant::Fulfillment, "CancelShipment"),
];
const TRANSIENT: &[Code] = &[
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::ResourceExhausted,
    Code::Aborted,
    Code::Internal,
];

fn millis(rng: &mut Rng, low: u64, high: u64) -> Duration {
    Duration::from_millis(low + rng.next_u64() % (high - low + 1))
}

fn participant(rng: &mut Rng) -> Participant {
    Participant::ALL[rng.below(3)]
}

/// A random participant fault of `mode` (FAIL_BEFORE, FAIL_AFTER_COMMIT or
/// DELAY), on a random step RPC, for a count of calls or a share of them.
fn participant_fault(rng: &mut Rng, mode: FaultMode) -> Fault {
    let forward = rng.below(2) == 0;
    let (participant, rpc) = if forward {
        FORWARD[rng.below(3)]
    } else {
        COMPENSATIONS[rng.below(3)]
    };
    let code = match mode {
        // A business rejection now and then, on forward steps only: the
        // saga compensates real work.
        FaultMode::FailBefore if forward && rng.below(6) == 0 => Code::FailedPrecondition,
        FaultMode::Delay => Code::Ok,
        _ => TRANSIENT[rng.below(TRANSIENT.len())],
    };
    let (count, percent) = if rng.below(2) == 0 {
        (1 + rng.below(10) as u32, 0)
    } else {
        (0, 10 + rng.below(21) as u32)
    };
    let latency_ms = if mode == FaultMode::Delay {
        // Some beyond the 1 s step deadline.
        50 + (rng.next_u64() % 1450) as u32
    } else {
        0
    };
    Fault::Participant {
        participant,
        request: SetFaultRequest {
            rpc: rpc.into(),
            mode: mode.into(),
            code: code as i32,
            count,
            percent,
            latency_ms,
        },
        hold: millis(rng, 2_000, 6_000),
    }
}

fn down(rng: &mut Rng) -> Duration {
    millis(rng, 200, 2_000)
}

/// One fault of every kind and target: each participant-fault mode, each
/// replica and each participant killed, both databases, every proxy fault
/// (a black hole ending each way); in a seeded order.
pub fn first_round(rng: &mut Rng, replicas: usize) -> Vec<Fault> {
    let mut round = vec![
        participant_fault(rng, FaultMode::FailBefore),
        participant_fault(rng, FaultMode::FailAfterCommit),
        participant_fault(rng, FaultMode::Delay),
    ];
    for replica in 0..replicas {
        round.push(Fault::KillOrchestrator {
            replica,
            down: down(rng),
        });
    }
    for participant in Participant::ALL {
        round.push(Fault::KillParticipant {
            participant,
            down: down(rng),
        });
    }
    round.push(Fault::CrashOrchestratorDb { down: down(rng) });
    round.push(Fault::RestartParticipantsDb { down: down(rng) });
    round.push(Fault::ProxyLatency {
        participant: participant(rng),
        latency: millis(rng, 50, 600),
        hold: millis(rng, 2_000, 5_000),
    });
    round.push(Fault::ProxyReset {
        participant: participant(rng),
    });
    for then in [AfterBlackhole::Resume, AfterBlackhole::Reset] {
        round.push(Fault::ProxyBlackhole {
            participant: participant(rng),
            hold: millis(rng, 1_000, 4_000),
            then,
        });
    }
    // Fisher-Yates with the run's generator.
    for i in (1..round.len()).rev() {
        round.swap(i, rng.below(i + 1));
    }
    round
}

/// A random fault: participant faults are the most frequent, database
/// crashes the rarest.
pub fn random(rng: &mut Rng, replicas: usize) -> Fault {
    match rng.below(100) {
        0..40 => {
            let mode = [
                FaultMode::FailBefore,
                FaultMode::FailAfterCommit,
                FaultMode::Delay,
            ][rng.below(3)];
            participant_fault(rng, mode)
        }
        40..52 => Fault::KillOrchestrator {
            replica: rng.below(replicas),
            down: down(rng),
        },
        52..64 => Fault::KillParticipant {
            participant: participant(rng),
            down: down(rng),
        },
        64..69 => Fault::CrashOrchestratorDb { down: down(rng) },
        69..74 => Fault::RestartParticipantsDb { down: down(rng) },
        74..83 => Fault::ProxyLatency {
            participant: participant(rng),
            latency: millis(rng, 50, 600),
            hold: millis(rng, 2_000, 5_000),
        },
        83..91 => Fault::ProxyReset {
            participant: participant(rng),
        },
        _ => Fault::ProxyBlackhole {
            participant: participant(rng),
            hold: millis(rng, 1_000, 4_000),
            then: if rng.below(2) == 0 {
                AfterBlackhole::Resume
            } else {
                AfterBlackhole::Reset
            },
        },
    }
}

/// How long a recovery may take before the run gives up on its canary.
const CANARY_PATIENCE: Duration = Duration::from_secs(60);
/// How long a restarted process may take to serve.
const START_PATIENCE: Duration = Duration::from_secs(90);

/// Carries out faults on a cluster; timers it started (clearing a fault,
/// ending a black hole) are stopped by [`Injector::stop_timers`].
pub struct Injector<'a> {
    /// The system.
    pub cluster: &'a mut Cluster,
    /// The machine's server, for its restart.
    pub machine: &'a MachineServer,
    /// For canaries.
    pub client: Client,
    /// Where events go.
    pub timeline: Arc<Timeline>,
    timers: Vec<JoinHandle<()>>,
}

fn describe(request: &SetFaultRequest) -> String {
    let mode = FaultMode::try_from(request.mode)
        .map(|m| m.as_str_name().trim_start_matches("FAULT_MODE_").to_owned())
        .unwrap_or_default();
    let mut text = format!("{} {mode}", request.rpc);
    if mode != "DELAY" {
        text.push_str(&format!(" {:?}", Code::from_i32(request.code)));
    } else {
        text.push_str(&format!(" {}ms", request.latency_ms));
    }
    if request.count > 0 {
        text.push_str(&format!(", next {} calls", request.count));
    } else {
        text.push_str(&format!(", {}% of calls", request.percent));
    }
    text
}

impl<'a> Injector<'a> {
    /// An injector on `cluster`.
    pub fn new(
        cluster: &'a mut Cluster,
        machine: &'a MachineServer,
        client: Client,
        timeline: Arc<Timeline>,
    ) -> Self {
        Self {
            cluster,
            machine,
            client,
            timeline,
            timers: Vec::new(),
        }
    }

    /// Stops the timers of faults still in force (the run heals everything
    /// itself afterwards).
    pub fn stop_timers(&mut self) {
        for timer in self.timers.drain(..) {
            timer.abort();
        }
    }

    /// Carries out `fault`; returns once a killed or crashed thing is back
    /// and its recovery measured. An error means the system could not be
    /// brought back, and ends the run.
    pub async fn inject(&mut self, fault: &Fault, rng: &mut Rng) -> Result<()> {
        let timeline = self.timeline.clone();
        match fault {
            Fault::Participant {
                participant,
                request,
                hold,
            } => {
                let mut faults = self.cluster.faults(*participant)?;
                let detail = describe(request);
                match faults.set_fault(request.clone()).await {
                    Ok(_) => timeline.record(fault.kind(), participant.name(), detail),
                    Err(status) => timeline.record(
                        fault.kind(),
                        participant.name(),
                        format!("{detail}: not armed ({})", status.message()),
                    ),
                }
                if request.count == 0 {
                    let hold = *hold;
                    let name = participant.name();
                    self.timers.push(tokio::spawn(async move {
                        tokio::time::sleep(hold).await;
                        let cleared = faults.clear_faults(ClearFaultsRequest {}).await;
                        let detail = match cleared {
                            Ok(reply) => format!("{} cleared", reply.into_inner().cleared),
                            Err(status) => format!("failed: {}", status.message()),
                        };
                        timeline.record("clear-faults", name, detail);
                    }));
                }
            }
            Fault::KillOrchestrator { replica, down } => {
                let service = &mut self.cluster.orchestrators[*replica];
                let name = service.name().to_owned();
                service.kill();
                timeline.record(fault.kind(), &name, format!("SIGKILL, down {down:?}"));
                tokio::time::sleep(*down).await;
                let restarted = Instant::now();
                self.cluster.orchestrators[*replica]
                    .start_until_serving(START_PATIENCE)
                    .await
                    .with_context(|| format!("restarting {name}"))?;
                self.measure(fault.kind(), &name, *down, restarted, *replica)
                    .await;
            }
            Fault::KillParticipant { participant, down } => {
                let index = super::cluster::index_of(*participant);
                self.cluster.participants[index].kill();
                let name = participant.name();
                timeline.record(fault.kind(), name, format!("SIGKILL, down {down:?}"));
                tokio::time::sleep(*down).await;
                let restarted = Instant::now();
                self.cluster.participants[index]
                    .start_until_serving(START_PATIENCE)
                    .await
                    .with_context(|| format!("restarting {name}"))?;
                let replica = rng.below(self.cluster.orchestrators.len());
                self.measure(fault.kind(), name, *down, restarted, replica)
                    .await;
            }
            Fault::CrashOrchestratorDb { down } => {
                let db = &mut self.cluster.orchestrator_db;
                tokio::task::block_in_place(|| db.crash())?;
                timeline.record(
                    fault.kind(),
                    "orchestrator-db",
                    format!("pg_ctl stop -m immediate, down {down:?}"),
                );
                tokio::time::sleep(*down).await;
                let restarted = Instant::now();
                let db = &mut self.cluster.orchestrator_db;
                tokio::task::block_in_place(|| db.start())?;
                let replica = rng.below(self.cluster.orchestrators.len());
                self.measure(fault.kind(), "orchestrator-db", *down, restarted, replica)
                    .await;
            }
            Fault::RestartParticipantsDb { down } => {
                let machine = self.machine;
                tokio::task::block_in_place(|| machine.stop())?;
                timeline.record(
                    fault.kind(),
                    "participants-db",
                    format!("pg_ctlcluster stop, down {down:?}"),
                );
                tokio::time::sleep(*down).await;
                let restarted = Instant::now();
                tokio::task::block_in_place(|| machine.start())?;
                let replica = rng.below(self.cluster.orchestrators.len());
                self.measure(fault.kind(), "participants-db", *down, restarted, replica)
                    .await;
            }
            Fault::ProxyLatency {
                participant,
                latency,
                hold,
            } => {
                let proxy = self.cluster.proxy(*participant).clone();
                proxy.set_latency(*latency);
                timeline.record(
                    fault.kind(),
                    participant.name(),
                    format!("+{latency:?} each way for {hold:?}"),
                );
                let hold = *hold;
                let name = participant.name();
                self.timers.push(tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    proxy.set_latency(Duration::ZERO);
                    timeline.record("proxy-latency-end", name, "");
                }));
            }
            Fault::ProxyReset { participant } => {
                self.cluster.proxy(*participant).reset_all();
                timeline.record(fault.kind(), participant.name(), "RST on every connection");
            }
            Fault::ProxyBlackhole {
                participant,
                hold,
                then,
            } => {
                let proxy = self.cluster.proxy(*participant).clone();
                proxy.start_blackhole();
                timeline.record(
                    fault.kind(),
                    participant.name(),
                    format!("for {hold:?}, then {}", then.name()),
                );
                let (hold, then) = (*hold, *then);
                let name = participant.name();
                self.timers.push(tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    proxy.end_blackhole(then);
                    timeline.record("proxy-blackhole-end", name, then.name());
                }));
            }
        }
        Ok(())
    }

    /// Records how long `target` took to serve and to complete a canary
    /// through `replica` after its restart at `restarted`.
    async fn measure(
        &mut self,
        kind: &str,
        target: &str,
        down: Duration,
        restarted: Instant,
        replica: usize,
    ) {
        let serving = restarted.elapsed();
        let canary = self.client.canary(replica, CANARY_PATIENCE).await;
        let canary_ms = canary.map(|_| restarted.elapsed().as_millis() as u64);
        self.timeline.record(
            "recovered",
            target,
            match canary_ms {
                Some(ms) => format!(
                    "serving after {} ms, canary through {} completed after {ms} ms",
                    serving.as_millis(),
                    super::cluster::replica_id(replica)
                ),
                None => format!(
                    "serving after {} ms, no canary completed within {CANARY_PATIENCE:?}",
                    serving.as_millis()
                ),
            },
        );
        self.timeline.recovered(Recovery {
            kind: kind.to_owned(),
            target: target.to_owned(),
            down_ms: down.as_millis() as u64,
            serving_ms: serving.as_millis() as u64,
            canary_ms,
        });
    }
}
