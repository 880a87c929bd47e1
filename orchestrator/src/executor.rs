//! The executor drives sagas: it carries out the state machine's commands
//! (calls to participants), records each outcome as one transition, waits
//! out stored backoffs, and keeps the sagas it drives leased.
//!
//! - A saga placed here is driven at once, in-process, holding one of
//!   `max_in_flight` permits (PlaceOrder answers RESOURCE_EXHAUSTED when
//!   none is left).
//! - The sweeper claims sagas with work due and no live lease (a replica
//!   crashed, or handed them back) with `FOR UPDATE SKIP LOCKED`.
//! - The renewer extends the leases of every saga driven here, and wakes
//!   the drivers whose lease another replica took, so they stop at once.
//! - A request (cancel, retry, abort) is committed by whichever replica
//!   received it and marks the saga as woken; the sweeper of the replica
//!   driving it finds the marks (one query per tick) and wakes the drivers,
//!   which may be waiting out a long backoff.
//! - A driver that stops without settling its saga (lease lost, stopping)
//!   tells the saga's WatchOrder streams here, which then read the store.
//! - A transition that loses a race (a cancel or operator request changed
//!   the row) reloads the row and re-applies the same event; a driver whose
//!   lease was taken over stops.
//!
//! Writes per saga on the happy path: the creation, then one per step
//! outcome. A call is never written before it is sent: the state already
//! says which call is next, and a replica that resumes after a crash sends
//! it again (participants are idempotent).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

use crate::clients::{StepCall, StepCalls};
use crate::error::Error;
use crate::saga::{Command, Definition, Event, Kind, Outcome, Policy, Registry, SagaState, Status};
use crate::store::{
    Commit, JournalEntry, JournalKind, JournalOutcome, LeaseChange, NextAttempt, SagaRecord,
    SagaStore,
};

/// How the executor behaves.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// This replica's name in leases and the journal.
    pub replica_id: String,
    /// Attempt budgets.
    pub policy: Policy,
    /// First retry delay (before jitter); doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often the sweeper looks for orphaned or due sagas, and for the
    /// wake marks requests left on sagas driven here.
    pub poll_interval: Duration,
    /// Most sagas driven at once by this replica.
    pub max_in_flight: usize,
    /// Most WatchOrder streams open at once on this replica.
    pub max_watches: usize,
    /// The saga definitions this replica knows: each saga is driven by the
    /// (name, version) it started under; new sagas start under the current
    /// version of their name.
    pub registry: Arc<Registry>,
}

/// Resolves once the stop flag of [`Executor::stopping`] is set, at once if
/// it already is (or if the executor is gone).
pub async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// A saga's status as this replica last wrote it (for WatchOrder).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// Its new status.
    pub status: Status,
    /// Why it failed, was cancelled or needs attention.
    pub failure_reason: Option<String>,
    /// When (seconds since the epoch).
    pub updated_at: f64,
}

/// Seconds since the Unix epoch, now.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Exponential backoff with full jitter: a delay uniformly drawn from
/// `[0, min(cap, base * 2^(attempt-1))]`, `fraction` being the draw in
/// `[0, 1)`. Pure, so it is tested without randomness.
pub fn backoff_delay(base: Duration, cap: Duration, attempt: u32, fraction: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1 << exponent).min(cap);
    ceiling.mul_f64(fraction.clamp(0.0, 1.0))
}

/// The backoff before the next attempt of a saga waiting for a retry: it
/// doubles with the failures counted since the operator's last retry
/// ([`SagaState::failures_since_retry`]), so after a retry it starts again
/// from `base`. Pure, like [`backoff_delay`].
pub fn retry_backoff(base: Duration, cap: Duration, state: &SagaState, fraction: f64) -> Duration {
    backoff_delay(base, cap, state.failures_since_retry(), fraction)
}

/// What an accepted request did to its saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEffect {
    /// The saga changed; the request is journalled and its driver woken.
    Changed,
    /// The saga was already as the operator asks (a second retry while
    /// the retried attempt is in flight); the request is journalled all
    /// the same and the driver woken.
    Unchanged,
    /// Nothing to do and nothing written: a cancel that repeats one
    /// already recorded (clients retry it; the first is in the journal),
    /// or a request that leaves a settled saga as it is.
    NotWritten,
}

/// Drives sagas. One per orchestrator process.
pub struct Executor {
    store: Arc<dyn SagaStore>,
    calls: Arc<dyn StepCalls>,
    config: ExecutorConfig,
    permits: Arc<Semaphore>,
    /// One permit per open WatchOrder stream, held by the stream.
    watch_permits: Arc<Semaphore>,
    /// Sagas driven here, with the handle that wakes their driver early.
    driving: Mutex<HashMap<String, Arc<Notify>>>,
    /// WatchOrder streams, per saga: a status change reaches only the
    /// watchers of that saga.
    watchers: Mutex<HashMap<String, watch::Sender<Option<StatusUpdate>>>>,
    stopping: watch::Sender<bool>,
    /// The sweeper and the renewer, awaited on shutdown so that no claim
    /// lands after the leases were handed back.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Sagas this executor drove to each settled status since it started
    /// (the admin Stats call's terminal counts: no read of history).
    settled: Mutex<HashMap<Status, u64>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.config)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor on `store`, calling participants through `calls`.
    pub fn new(
        store: Arc<dyn SagaStore>,
        calls: Arc<dyn StepCalls>,
        config: ExecutorConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            calls,
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            watch_permits: Arc::new(Semaphore::new(config.max_watches)),
            config,
            driving: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            stopping: watch::channel(false).0,
            background: Mutex::new(Vec::new()),
            settled: Mutex::new(HashMap::new()),
        })
    }

    /// How many sagas this executor drove to `status` since it started.
    pub fn settled_count(&self, status: Status) -> u64 {
        let settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        settled.get(&status).copied().unwrap_or(0)
    }

    /// Counts a saga that reached `status`, if it is settled.
    fn settled(&self, status: Status) {
        if !status.is_settled() {
            return;
        }
        *self
            .settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_insert(0) += 1;
        common::metrics::count(crate::metrics::FINISHED, &[("outcome", status.as_str())], 1);
        if status == Status::NeedsAttention {
            common::metrics::count(crate::metrics::NEEDS_ATTENTION, &[], 1);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    /// The participant calls.
    pub fn calls(&self) -> &Arc<dyn StepCalls> {
        &self.calls
    }

    /// Sagas driven here now.
    pub fn in_flight(&self) -> usize {
        self.config.max_in_flight - self.permits.available_permits()
    }

    /// Status changes of `saga_id` written by this replica, from now on
    /// (None until the first). Call [`Executor::unwatch`] when done.
    pub fn watch(&self, saga_id: &str) -> watch::Receiver<Option<StatusUpdate>> {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(saga_id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Forgets `saga_id`'s watch once nobody watches it any more and no
    /// driver here keeps its status current.
    pub fn unwatch(&self, saga_id: &str) {
        if self.is_driving(saga_id) {
            return; // the driver forgets it when it ends
        }
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if watchers
            .get(saga_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            watchers.remove(saga_id);
        }
    }

    /// Whether this replica drives `saga_id` now (then its changes arrive
    /// through [`Executor::watch`] and need no polling).
    pub fn is_driving(&self, saga_id: &str) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(saga_id)
    }

    /// The stop flag. Wait on it with [`stopped`], never `changed()`: the
    /// flag may have been set before the subscription, and a change made
    /// before it is never reported.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Takes one in-flight slot for a new saga, or refuses at once.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        if *self.stopping.borrow() {
            return Err(Error::Unavailable(
                "the orchestrator is shutting down".into(),
            ));
        }
        self.permits.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many orders in flight (limit {}); try again later",
                self.config.max_in_flight
            ))
        })
    }

    /// Takes one slot for a WatchOrder stream, held until the stream ends,
    /// or refuses at once (`--max-watches`).
    pub fn watch_slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.watch_permits.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many WatchOrder streams ({}, the --max-watches bound); try again when one ends",
                self.config.max_watches
            ))
        })
    }

    /// WatchOrder streams open now.
    pub fn watch_streams(&self) -> usize {
        self.config.max_watches - self.watch_permits.available_permits()
    }

    /// Wakes the driver of `saga_id` if it runs here (after a cancel or an
    /// operator request changed the saga).
    pub fn wake(&self, saga_id: &str) -> bool {
        let driving = self.driving.lock().unwrap_or_else(|e| e.into_inner());
        match driving.get(saga_id) {
            Some(notify) => {
                notify.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes the WatchOrder streams of `saga_id` here without a new status,
    /// so that they look again at who drives it: a driver here stopped
    /// (lease lost, or stopping) and they must read the store now.
    fn nudge_watchers(&self, saga_id: &str) {
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = watchers.get(saga_id) {
            sender.send_modify(|_| {});
        }
    }

    /// Tells the WatchOrder streams of `saga_id` about a status change.
    pub fn publish(&self, saga_id: &str, state: &SagaState, status: Status) {
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = watchers.get(saga_id) {
            sender.send_replace(Some(StatusUpdate {
                status,
                failure_reason: state.failure_reason.clone(),
                updated_at: now_epoch(),
            }));
        }
    }

    /// Applies a client's or operator's request (cancel, retry, abort) to a
    /// saga, journalled as a CONTROL entry by `actor` with `detail`, and
    /// makes sure a driver acts on it. Returns the saga after the request.
    pub async fn request(
        self: &Arc<Self>,
        saga_id: &str,
        event: &Event,
        name: &str,
        actor: &str,
        detail: &str,
    ) -> Result<SagaRecord, Error> {
        Ok(self
            .request_with_effect(saga_id, event, name, actor, detail)
            .await?
            .0)
    }

    /// [`Executor::request`], also saying what the request did. Every
    /// accepted operator request on an unsettled saga is journalled and
    /// wakes the saga's driver, wherever it runs, even when the state was
    /// already as asked; a repeated cancel, or a request that leaves a
    /// settled saga as it is, writes nothing.
    pub async fn request_with_effect(
        self: &Arc<Self>,
        saga_id: &str,
        event: &Event,
        name: &str,
        actor: &str,
        detail: &str,
    ) -> Result<(SagaRecord, RequestEffect), Error> {
        loop {
            let saga = recovered(
                self.store
                    .load(saga_id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("no order {saga_id}")))?,
            );
            // A saga this replica cannot drive is refused, not guessed at:
            // a retry resumes it once a replica that knows its version runs.
            let definition = saga
                .definition(&self.config.registry)
                .map_err(Error::FailedPrecondition)?;
            let next = saga.state.apply(definition, &self.config.policy, event)?;
            let effect = if next != saga.state {
                RequestEffect::Changed
            } else if saga.status.is_settled() || matches!(event, Event::CancelRequested { .. }) {
                return Ok((saga, RequestEffect::NotWritten));
            } else {
                RequestEffect::Unchanged
            };
            let detail = match effect {
                RequestEffect::Unchanged => format!("{detail} (the saga was already so)"),
                _ => detail.to_owned(),
            };
            let now = now_epoch();
            let journal = [JournalEntry {
                step: name.to_owned(),
                kind: JournalKind::Control,
                attempt: 0,
                outcome: JournalOutcome::Accepted,
                detail: detail.clone(),
                rpc: String::new(),
                actor: actor.to_owned(),
                started_at: now,
                finished_at: Some(now),
            }];
            let commit = Commit {
                saga_id,
                expected_version: saga.version,
                state: &next,
                definition,
                journal: &journal,
                next_attempt: if next.waiting_retry {
                    NextAttempt::Keep
                } else {
                    NextAttempt::Clear
                },
                lease: LeaseChange::Keep,
                durable: true,
                // The driver may run on another replica, waiting out a
                // backoff: its sweeper finds the mark and wakes it.
                wake: true,
            };
            let Some(version) = self.store.commit(commit).await? else {
                continue; // the saga moved meanwhile: decide again
            };
            let status = next.status(definition);
            tracing::info!(saga_id, request = name, actor, detail, %status, ?effect, "request accepted");
            if status != saga.status {
                self.publish(saga_id, &next, status);
            }
            self.resume(saga_id).await;
            return Ok((
                SagaRecord {
                    state: next,
                    status,
                    version,
                    ..saga
                },
                effect,
            ));
        }
    }

    /// Gets a driver to look at a saga now: wakes it if it runs here, or
    /// starts one here if no replica holds the saga's lease. (A driver on
    /// another replica is woken by its sweeper, which finds the mark the
    /// request's commit left, or notices at its next write.)
    async fn resume(self: &Arc<Self>, saga_id: &str) {
        if self.wake(saga_id) {
            return;
        }
        let Ok(permit) = self.admit() else {
            return; // the sweeper takes it when a slot frees up
        };
        match self
            .store
            .claim(saga_id, &self.config.replica_id, self.config.lease_ttl)
            .await
        {
            Ok(Some(saga)) => {
                common::metrics::count(crate::metrics::CLAIMS, &[("source", "resume")], 1);
                self.spawn(recovered(saga), permit)
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, saga_id, "could not claim the saga to resume it"),
        }
    }

    /// Drives `saga`, which this replica has leased, on a task of its own.
    pub fn spawn(self: &Arc<Self>, saga: SagaRecord, permit: OwnedSemaphorePermit) {
        let notify = Arc::new(Notify::new());
        {
            let mut driving = self.driving.lock().unwrap_or_else(|e| e.into_inner());
            if driving.contains_key(&saga.saga_id) {
                // Already driven here (a claim raced a local start).
                return;
            }
            driving.insert(saga.saga_id.clone(), notify.clone());
        }
        // While a saga is driven here its watch holds its latest status, so
        // a WatchOrder needs no read to start.
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(saga.saga_id.clone())
            .or_insert_with(|| watch::channel(None).0)
            .send_replace(Some(StatusUpdate {
                status: saga.status,
                failure_reason: saga.state.failure_reason.clone(),
                updated_at: saga.updated_at,
            }));
        // One span per driver of the saga; its parent is the trace the saga
        // was created in, so a resumed saga stays in its trace.
        // A root in the process's span tree (not the caller's child, which
        // would keep PlaceOrder's span open until the saga ends).
        let span = tracing::info_span!(
            parent: None,
            "saga",
            saga_id = %saga.saga_id,
            trace_id = tracing::field::Empty,
        );
        common::telemetry::continue_trace(&span, saga.trace_parent.as_deref());
        let executor = self.clone();
        tokio::spawn(
            async move {
                let saga_id = saga.saga_id.clone();
                let _ = executor.drive(saga, &notify).await;
                executor
                    .driving
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&saga_id);
                // Streams here that still wait for a status (the lease was
                // lost, or this replica stops) switch to reading the store.
                executor.nudge_watchers(&saga_id);
                executor.unwatch(&saga_id);
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// Starts the sweeper and the lease renewer. Leases this replica held
    /// before a restart are released first, so its sagas resume at once.
    pub async fn start(self: &Arc<Self>) -> Result<(), Error> {
        let released = self.store.release_leases(&self.config.replica_id).await?;
        if released > 0 {
            tracing::info!(
                released,
                "resuming sagas this replica held before it stopped"
            );
        }
        let mut background = self.background.lock().unwrap_or_else(|e| e.into_inner());
        background.push(tokio::spawn(self.clone().sweep()));
        background.push(tokio::spawn(self.clone().renew()));
        Ok(())
    }

    /// Refuses new orders and tells drivers and watch streams to stop;
    /// [`Executor::shutdown`] then waits for them.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Stops taking work: drivers finish the call they are making, record
    /// it and stop; then every lease is handed back for other replicas.
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_stop();
        let background: Vec<_> =
            std::mem::take(&mut *self.background.lock().unwrap_or_else(|e| e.into_inner()));
        for task in background {
            let _ = task.await;
        }
        let all = u32::try_from(self.config.max_in_flight).unwrap_or(u32::MAX);
        match tokio::time::timeout(grace, self.permits.acquire_many(all)).await {
            Ok(_) => tracing::info!("every saga driver stopped"),
            Err(_) => tracing::warn!(
                still_running = self.in_flight(),
                "saga drivers still running after the grace period; their leases are released anyway"
            ),
        }
        match self.store.release_leases(&self.config.replica_id).await {
            Ok(released) => tracing::info!(released, "leases handed back"),
            Err(error) => tracing::warn!(%error, "could not hand leases back; they will expire"),
        }
    }

    async fn sweep(self: Arc<Self>) {
        let mut stopping = self.stopping();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                _ = stopped(&mut stopping) => return,
            }
            self.wake_requested().await;
            let free = self.permits.available_permits().min(256) as i64;
            if free == 0 {
                continue;
            }
            let began = Instant::now();
            let claimed = self
                .store
                .claim_due(&self.config.replica_id, free, self.config.lease_ttl)
                .await;
            if let Ok(claimed) = &claimed {
                let now = now_epoch();
                let lag = claimed
                    .iter()
                    .filter_map(|saga| saga.next_attempt_at.map(|at| now - at))
                    .reduce(f64::max);
                crate::metrics::sweep(began.elapsed().as_secs_f64(), claimed.len(), lag);
            }
            match claimed {
                Ok(claimed) => {
                    if *stopping.borrow() {
                        // Stopping: the leases just taken are handed back
                        // with all the others.
                        return;
                    }
                    for saga in claimed {
                        tracing::info!(saga_id = %saga.saga_id, status = %saga.status, "claimed saga");
                        match self.permits.clone().try_acquire_owned() {
                            Ok(permit) => self.spawn(recovered(saga), permit),
                            // Cannot happen with one sweeper; the lease expires
                            // and the saga is claimed again.
                            Err(_) => break,
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "sweeper could not claim sagas"),
            }
        }
    }

    /// Wakes the drivers here whose saga a request changed, on any replica
    /// (the marks of [`SagaStore::take_wakes`]): one query per tick, none
    /// while nothing is driven here.
    async fn wake_requested(&self) {
        if self
            .driving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return;
        }
        match self.store.take_wakes(&self.config.replica_id).await {
            Ok(woken) => {
                for saga_id in woken {
                    if self.wake(&saga_id) {
                        tracing::debug!(saga_id, "driver woken by a request");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "could not look for woken sagas"),
        }
    }

    async fn renew(self: Arc<Self>) {
        let mut stopping = self.stopping();
        let period = self.config.lease_ttl / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stopped(&mut stopping) => return,
            }
            let ids: Vec<String> = self
                .driving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            match self
                .store
                .renew_leases(&self.config.replica_id, &ids, self.config.lease_ttl)
                .await
            {
                // A lease another replica took (this one stalled past its
                // expiry): its driver is woken to find out and stop now,
                // not at the end of its backoff, so that it frees its
                // permit and its watchers read the new driver's progress.
                Ok(held) if held.len() < ids.len() => {
                    let held: HashSet<&String> = held.iter().collect();
                    for saga_id in ids.iter().filter(|id| !held.contains(id)) {
                        self.wake(saga_id);
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not renew leases"),
            }
        }
    }

    /// Reloads a saga; None when this replica no longer holds its lease.
    async fn reload_owned(&self, saga_id: &str) -> Option<SagaRecord> {
        let saga = self.reload(saga_id).await?;
        self.owns(&saga).then_some(saga)
    }

    /// Whether this replica holds the saga's lease; logs when it does not.
    fn owns(&self, saga: &SagaRecord) -> bool {
        let owned = saga.lease_owner.as_deref() == Some(&self.config.replica_id);
        if !owned {
            tracing::info!("lease lost; another replica drives this saga now");
        }
        owned
    }

    /// Reloads a saga, whoever holds it, retrying while the store fails;
    /// None when the saga is gone or the executor is stopping.
    async fn reload(&self, saga_id: &str) -> Option<SagaRecord> {
        loop {
            match self.store.load(saga_id).await {
                Ok(saga) => return saga.map(recovered),
                Err(error) => {
                    tracing::warn!(%error, "cannot reload the saga; retrying");
                    if self.pause(Duration::from_secs(1)).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Sleeps; true when the executor started stopping meanwhile.
    async fn pause(&self, duration: Duration) -> bool {
        let mut stopping = self.stopping();
        if *stopping.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => false,
            _ = stopped(&mut stopping) => true,
        }
    }

    fn retry_delay(&self, state: &SagaState) -> Duration {
        let fraction = (common::domain::random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        retry_backoff(
            self.config.backoff_base,
            self.config.backoff_cap,
            state,
            fraction,
        )
    }

    async fn drive(&self, mut saga: SagaRecord, notify: &Notify) -> Option<()> {
        tracing::debug!(status = %saga.status, "driving");
        let definition = match saga.definition(&self.config.registry) {
            Ok(definition) => definition,
            Err(reason) => return self.hold(saga, reason).await,
        };
        let mut stopping = self.stopping();
        // When a stored backoff ends, in this process's clock.
        let mut due = due_instant(saga.next_attempt_at);
        loop {
            if *stopping.borrow() {
                return None;
            }
            let (step, kind, attempt) = match saga.state.next_command() {
                None => return Some(()),
                Some(Command::Call {
                    step,
                    kind,
                    attempt,
                }) => (step, kind, attempt),
                Some(Command::RetryLater {
                    step,
                    kind,
                    attempt,
                }) => {
                    if let Some(at) = due.filter(|at| *at > Instant::now()) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at.into()) => {}
                            _ = notify.notified() => {}
                            _ = stopped(&mut stopping) => return None,
                        }
                        // A cancel or an operator may have changed the saga
                        // meanwhile, here or on another replica.
                        let fresh = self.reload_owned(&saga.saga_id).await?;
                        if fresh.version != saga.version {
                            due = due_instant(fresh.next_attempt_at);
                            saga = fresh;
                        }
                        continue;
                    }
                    (step, kind, attempt)
                }
            };

            let Some(step_def) = definition.step(step) else {
                // Cannot happen: the state fits its definition.
                let reason = format!("saga definition {} has no step {step}", definition.label());
                return self.hold(saga, reason).await;
            };
            let rpc = match kind {
                Kind::Action => step_def.action,
                Kind::Compensation => step_def.compensation,
            };
            let started_at = now_epoch();
            // A span per attempt, only when traces are exported.
            let attempt_span = if common::telemetry::enabled() {
                tracing::info_span!(
                    "step",
                    otel.name = format!(
                        "{} {}",
                        match kind {
                            Kind::Action => "action",
                            Kind::Compensation => "compensation",
                        },
                        step_def.name
                    ),
                    step = step_def.name,
                    kind = kind.as_str(),
                    attempt,
                    rpc = rpc,
                    outcome = tracing::field::Empty,
                    rpc.grpc.status_code = tracing::field::Empty,
                )
            } else {
                tracing::Span::none()
            };
            let outcome = self
                .calls
                .call(StepCall {
                    saga_id: &saga.saga_id,
                    step: step_def,
                    kind,
                    customer_id: &saga.customer_id,
                    items: &saga.items,
                    outputs: &saga.state.outputs,
                })
                .instrument(attempt_span.clone())
                .await;
            let finished_at = now_epoch();
            let journalled = JournalOutcome::of(&outcome);
            crate::metrics::call(
                step_def.name,
                kind.as_str(),
                journalled.as_str(),
                match &outcome {
                    Outcome::Succeeded(_) => "OK",
                    Outcome::Retryable(detail) | Outcome::Rejected(detail) => {
                        common::metrics::code_of(detail)
                    }
                },
                finished_at - started_at,
                matches!(outcome, Outcome::Retryable(_)),
            );
            attempt_span.record("outcome", journalled.as_str());
            drop(attempt_span);
            let detail = match &outcome {
                // What a compensation did (released, tombstoned, ...) helps
                // an operator; an action's outputs are in the saga's state.
                Outcome::Succeeded(outputs) if kind == Kind::Compensation => outputs
                    .iter()
                    .map(|(_, v)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                Outcome::Succeeded(_) => String::new(),
                Outcome::Retryable(detail) | Outcome::Rejected(detail) => detail.clone(),
            };
            tracing::info!(
                step = step_def.name,
                kind = kind.as_str(),
                attempt,
                outcome = journalled.as_str(),
                detail,
                "call finished"
            );
            let journal = [JournalEntry {
                step: step_def.name.to_owned(),
                kind: kind.into(),
                attempt: attempt as i32,
                outcome: journalled,
                detail,
                rpc: rpc.to_owned(),
                actor: self.config.replica_id.clone(),
                started_at,
                finished_at: Some(finished_at),
            }];
            let event = Event::CallFinished {
                step,
                kind,
                attempt,
                outcome,
            };
            match self.record(&mut saga, definition, &event, &journal).await {
                Some(delay) => due = delay.map(|d| Instant::now() + d),
                None => return None,
            }
        }
    }

    /// Sets aside a saga this replica cannot drive (its definition is not
    /// known here, or its state does not fit it): NEEDS_ATTENTION with
    /// `reason`, journalled once, its phase kept for an operator retry on
    /// a replica that knows it, and its lease handed back. Always None:
    /// the driver stops.
    async fn hold(&self, mut saga: SagaRecord, reason: String) -> Option<()> {
        tracing::warn!(
            definition = %saga.definition_name,
            version = saga.definition_version,
            reason,
            "saga set aside"
        );
        let owner = self.config.replica_id.as_str();
        loop {
            if saga.state.held.is_some() || saga.status.is_settled() {
                return None;
            }
            let next = saga.state.hold(reason.clone());
            let now = now_epoch();
            let journal = [JournalEntry {
                step: "definition".to_owned(),
                kind: JournalKind::Control,
                attempt: 0,
                outcome: JournalOutcome::Rejected,
                detail: reason.clone(),
                rpc: String::new(),
                actor: owner.to_owned(),
                started_at: now,
                finished_at: Some(now),
            }];
            let commit = Commit {
                saga_id: &saga.saga_id,
                expected_version: saga.version,
                state: &next,
                // No step of it is read: a held state's status and step
                // need no definition.
                definition: &Definition::NONE,
                journal: &journal,
                next_attempt: NextAttempt::Keep,
                lease: LeaseChange::Release { owner },
                durable: true,
                wake: false,
            };
            match self.store.commit(commit).await {
                Ok(Some(_)) => {
                    self.publish(&saga.saga_id, &next, Status::NeedsAttention);
                    self.settled(Status::NeedsAttention);
                    return None;
                }
                Ok(None) => {
                    let fresh = self.reload(&saga.saga_id).await?;
                    if !self.owns(&fresh) {
                        return None;
                    }
                    saga = fresh;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot set the saga aside; retrying");
                    if self.pause(Duration::from_secs(1)).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Applies `event` and writes the transition with `journal`, re-applying
    /// to a fresh read when the row changed meanwhile. Returns the backoff
    /// to wait before the next call (None inside when there is none), or
    /// None when this replica lost the saga or is stopping.
    async fn record(
        &self,
        saga: &mut SagaRecord,
        definition: &'static Definition,
        event: &Event,
        journal: &[JournalEntry],
    ) -> Option<Option<Duration>> {
        let owner = self.config.replica_id.as_str();
        let mut late_journal: Vec<JournalEntry>;
        loop {
            // A reply the state read back was not waiting for (the saga was
            // taken over, reloaded, or the database lost the write that
            // marked its step): journalled as such, so a replay of the same
            // attempt number later reads as what it is.
            let journal = match event {
                Event::CallFinished {
                    step,
                    kind,
                    attempt,
                    ..
                } if !saga.state.awaits(*step, *kind, *attempt) => {
                    late_journal = journal.iter().map(late_reply).collect();
                    &late_journal
                }
                _ => journal,
            };
            let next: SagaState = match saga.state.apply(definition, &self.config.policy, event) {
                Ok(next) => next,
                Err(error) => {
                    // Call outcomes are always applicable; keep the state.
                    tracing::error!(%error, "state machine refused a call outcome");
                    saga.state.clone()
                }
            };
            let status = next.status(definition);
            let delay = next.waiting_retry.then(|| self.retry_delay(&next));
            let commit = Commit {
                saga_id: &saga.saga_id,
                expected_version: saga.version,
                state: &next,
                definition,
                journal,
                next_attempt: delay.map_or(NextAttempt::Clear, NextAttempt::In),
                durable: SagaState::must_be_durable(event, &next),
                lease: if status.is_settled() {
                    LeaseChange::Release { owner }
                } else {
                    LeaseChange::Extend {
                        owner,
                        ttl: self.config.lease_ttl,
                    }
                },
                // This write follows every version before it: any request
                // that marked the saga woken has been seen.
                wake: false,
            };
            match self.store.commit(commit).await {
                Ok(Some(version)) => {
                    let changed = status != saga.status;
                    saga.version = version;
                    saga.state = next;
                    saga.status = status;
                    if changed {
                        self.publish(&saga.saga_id, &saga.state, status);
                        log_status(saga, delay);
                        self.settled(saga.status);
                    } else if let Some(delay) = delay {
                        tracing::info!(?delay, "retrying after backoff");
                    }
                    return Some(delay);
                }
                Ok(None) => {
                    // The row changed under us: re-apply to what is there now,
                    // unless what is there is this very write, which landed
                    // although its answer was lost (a connection that broke
                    // after the commit): journalling it again would record
                    // the call twice.
                    let fresh = self.reload(&saga.saga_id).await?;
                    if next != saga.state && fresh.state == next.recovered() {
                        let changed = fresh.status != saga.status;
                        *saga = fresh;
                        if changed {
                            self.publish(&saga.saga_id, &saga.state, saga.status);
                            log_status(saga, delay);
                            self.settled(saga.status);
                        }
                        return Some(delay);
                    }
                    if !self.owns(&fresh) {
                        return None;
                    }
                    *saga = fresh;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot record the outcome; retrying");
                    if self.pause(Duration::from_secs(1)).await {
                        // The call is sent again by whoever resumes the saga.
                        return None;
                    }
                }
            }
        }
    }
}

/// A journal row of a call as a late reply.
fn late_reply(entry: &JournalEntry) -> JournalEntry {
    let detail = if entry.detail.is_empty() {
        LATE_REPLY.to_owned()
    } else {
        format!("{LATE_REPLY}: {}", entry.detail)
    };
    JournalEntry {
        detail,
        ..entry.clone()
    }
}

/// How a late reply's journal row starts.
pub const LATE_REPLY: &str = "late reply (the saga was not waiting for it)";

/// A saga read back from the store, ready to be decided on: its state
/// distrusts forward progress that may not have been durable
/// ([`SagaState::recovered`]). Only the driver that created a saga and has
/// written every transition since may trust its own copy.
fn recovered(mut saga: SagaRecord) -> SagaRecord {
    saga.state = saga.state.recovered();
    saga
}

fn log_status(saga: &SagaRecord, delay: Option<Duration>) {
    let status = saga.status;
    let reason = saga.state.failure_reason.as_deref().unwrap_or("");
    match status {
        Status::Completed => tracing::info!(%status, "saga completed"),
        Status::Failed | Status::Cancelled => tracing::info!(%status, reason, "saga ended"),
        Status::NeedsAttention => tracing::warn!(%status, reason, "saga needs an operator"),
        Status::Compensating | Status::Cancelling => {
            tracing::info!(%status, reason, "compensating")
        }
        _ => tracing::info!(%status, ?delay, "next step"),
    }
}

/// A stored deadline (seconds since the epoch) as an `Instant`.
fn due_instant(at: Option<f64>) -> Option<Instant> {
    let wait = at? - now_epoch();
    (wait > 0.0).then(|| Instant::now() + Duration::from_secs_f64(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::ORDER_SAGA;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_below_it() {
        let base = Duration::from_millis(50);
        let cap = Duration::from_secs(10);
        assert_eq!(backoff_delay(base, cap, 1, 1.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(base, cap, 2, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(base, cap, 4, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(base, cap, 20, 1.0), cap);
        assert_eq!(backoff_delay(base, cap, u32::MAX, 1.0), cap);
        assert_eq!(backoff_delay(base, cap, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(base, cap, 3, 0.5), Duration::from_millis(100));
    }

    #[test]
    fn the_backoff_after_an_operator_retry_starts_again_from_the_base() {
        use crate::saga::Outcome;
        let policy = Policy {
            action_attempts: 100,
            compensation_attempts: 100,
        };
        let base = Duration::from_millis(50);
        let cap = Duration::from_secs(10);
        let fail = |state: &SagaState| {
            let Some((step, kind, attempt)) = state.next_command().map(Command::call) else {
                panic!("a call is due: {state:?}");
            };
            let event = Event::CallFinished {
                step,
                kind,
                attempt,
                outcome: Outcome::Retryable("UNAVAILABLE".into()),
            };
            state.apply(&ORDER_SAGA, &policy, &event).unwrap()
        };
        let mut state = SagaState::new(&ORDER_SAGA);
        state = fail(&state);
        assert_eq!(retry_backoff(base, cap, &state, 1.0), base, "first backoff");
        for _ in 0..12 {
            state = fail(&state);
        }
        assert_eq!(retry_backoff(base, cap, &state, 1.0), cap, "at the cap");
        // The operator retries: the attempt goes out now, and when it fails
        // the backoff starts again from the base, then doubles.
        state = state
            .apply(&ORDER_SAGA, &policy, &Event::OperatorRetry)
            .unwrap();
        assert!(!state.waiting_retry);
        state = fail(&state);
        assert_eq!(retry_backoff(base, cap, &state, 1.0), base);
        state = fail(&state);
        assert_eq!(retry_backoff(base, cap, &state, 1.0), 2 * base);
    }

    #[test]
    fn stored_deadlines_become_instants() {
        assert_eq!(due_instant(None), None);
        assert_eq!(due_instant(Some(now_epoch() - 5.0)), None);
        let due = due_instant(Some(now_epoch() + 60.0)).unwrap();
        assert!(due > Instant::now() + Duration::from_secs(50));
    }

    /// No participant is ever called by these tests.
    struct NoCalls;

    #[tonic::async_trait]
    impl StepCalls for NoCalls {
        async fn call(&self, call: StepCall<'_>) -> Outcome {
            panic!("no call expected: {call:?}");
        }
    }

    /// A stop that comes before the background tasks first ran (a replica
    /// stopped the moment it started) still ends them: they look at the
    /// flag, not only at changes to it. On one thread the tasks cannot run
    /// before `shutdown` sets the flag.
    #[tokio::test(flavor = "current_thread")]
    async fn a_replica_stopped_as_soon_as_it_started_stops() {
        let store = crate::server::connect("sqlite::memory:", 1, Duration::from_secs(5))
            .await
            .unwrap();
        let executor = Executor::new(
            store,
            Arc::new(NoCalls),
            ExecutorConfig {
                replica_id: "r1".into(),
                policy: crate::config::default_policy(),
                backoff_base: Duration::from_millis(50),
                backoff_cap: Duration::from_secs(1),
                lease_ttl: Duration::from_secs(3),
                poll_interval: Duration::from_millis(100),
                max_in_flight: 8,
                max_watches: 8,
                registry: Arc::default(),
            },
        );
        executor.start().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            executor.shutdown(Duration::from_secs(1)),
        )
        .await
        .expect("the background tasks ended");
    }
}
