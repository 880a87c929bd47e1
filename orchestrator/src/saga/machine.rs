use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a call is a step's forward action or its undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Reserve, Charge, Ship.
    Action,
    /// Release, Refund, CancelShipment.
    Compensation,
}

impl Kind {
    /// `ACTION` or `COMPENSATION`, as stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "ACTION",
            Self::Compensation => "COMPENSATION",
        }
    }
}

/// Where a saga stands, as the API reports it. The names are the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Pending,
    ReservingInventory,
    ChargingPayment,
    Shipping,
    Completed,
    Compensating,
    Failed,
    Cancelling,
    Cancelled,
    NeedsAttention,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 10] = [
        Self::Pending,
        Self::ReservingInventory,
        Self::ChargingPayment,
        Self::Shipping,
        Self::Completed,
        Self::Compensating,
        Self::Failed,
        Self::Cancelling,
        Self::Cancelled,
        Self::NeedsAttention,
    ];

    /// The contract name, e.g. `RESERVING_INVENTORY`; also the stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::ReservingInventory => "RESERVING_INVENTORY",
            Self::ChargingPayment => "CHARGING_PAYMENT",
            Self::Shipping => "SHIPPING",
            Self::Completed => "COMPLETED",
            Self::Compensating => "COMPENSATING",
            Self::Failed => "FAILED",
            Self::Cancelling => "CANCELLING",
            Self::Cancelled => "CANCELLED",
            Self::NeedsAttention => "NEEDS_ATTENTION",
        }
    }

    /// Parses a contract name (also accepts the `ORDER_STATUS_` prefix and
    /// lower case).
    pub fn parse(text: &str) -> Option<Self> {
        let upper = text.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("ORDER_STATUS_").unwrap_or(&upper);
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// COMPLETED, FAILED or CANCELLED: nothing will ever happen again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Terminal, or NEEDS_ATTENTION: nothing happens without an operator.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == Self::NeedsAttention
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a saga, read top to bottom like the business process: its
/// name, the status the saga shows while its action runs, the participant
/// that serves it, and its action and compensation (the RPCs the
/// participant's adapter makes; the names are journalled).
#[derive(Debug)]
pub struct StepDef {
    /// Name in the journal, e.g. `reserve_inventory` (the contract's step
    /// names for the order saga).
    pub name: &'static str,
    /// Status while the action runs: one of the contract's statuses (a new
    /// label would be a change of the contract).
    pub status: Status,
    /// The participant that serves the step, e.g. `inventory`: the key of
    /// its adapter (`clients::StepAdapter`) and of its call bound.
    pub participant: &'static str,
    /// The action's gRPC method, e.g. `inventory.v1.InventoryService/Reserve`.
    pub action: &'static str,
    /// The compensation's gRPC method.
    pub compensation: &'static str,
}

/// A saga definition: its name and version (recorded with every saga row),
/// its steps in forward order and which of them is the pivot. Once the
/// pivot succeeded the saga only goes forward: it is never compensated, a
/// cancel comes too late, and the steps after the pivot (if any) are
/// retried until they succeed.
#[derive(Debug)]
pub struct Definition {
    /// The saga type, e.g. `order`.
    pub name: &'static str,
    /// Its version; a deploy that changes the steps adds a version, and
    /// sagas started under an older one finish under it.
    pub version: u32,
    /// The steps, in forward order; at least one.
    pub steps: &'static [StepDef],
    /// Index of the pivot step in `steps`.
    pub pivot: usize,
}

impl Definition {
    /// No definition: what a commit names for a state that is set aside
    /// because its own definition is not known ([`SagaState::held`]); such
    /// a state's status and current step read no step of it.
    pub const NONE: Definition = Definition {
        name: "",
        version: 0,
        steps: &[],
        pivot: 0,
    };

    /// The step at `index`, if the definition has one.
    pub fn step(&self, index: usize) -> Option<&'static StepDef> {
        self.steps.get(index)
    }

    /// `order v1`, as messages name a definition.
    pub fn label(&self) -> String {
        format!("{} v{}", self.name, self.version)
    }

    /// Checks the definition is usable: a name, at least one step, the
    /// pivot one of them, step names unique, every step served by a named
    /// participant.
    pub fn validate(&self) -> Result<(), String> {
        let label = self.label();
        if self.name.is_empty() {
            return Err("a saga definition needs a name".to_owned());
        }
        if self.steps.is_empty() {
            return Err(format!("saga definition {label} has no steps"));
        }
        if self.pivot >= self.steps.len() {
            return Err(format!(
                "saga definition {label}: the pivot is step {} of {}",
                self.pivot,
                self.steps.len()
            ));
        }
        for (index, step) in self.steps.iter().enumerate() {
            if step.name.is_empty() || step.participant.is_empty() {
                return Err(format!(
                    "saga definition {label}: step {index} needs a name and a participant"
                ));
            }
            if self.steps.iter().take(index).any(|s| s.name == step.name) {
                return Err(format!(
                    "saga definition {label}: step name {} is used twice",
                    step.name
                ));
            }
        }
        Ok(())
    }
}

/// The order saga: reserve inventory → charge payment → ship (the pivot).
pub const ORDER_SAGA: Definition = Definition {
    name: "order",
    version: 1,
    steps: &[
        StepDef {
            name: "reserve_inventory",
            status: Status::ReservingInventory,
            participant: "inventory",
            action: "inventory.v1.InventoryService/Reserve",
            compensation: "inventory.v1.InventoryService/Release",
        },
        StepDef {
            name: "charge_payment",
            status: Status::ChargingPayment,
            participant: "payment",
            action: "payment.v1.PaymentService/Charge",
            compensation: "payment.v1.PaymentService/Refund",
        },
        StepDef {
            name: "ship_order",
            status: Status::Shipping,
            participant: "fulfillment",
            action: "fulfillment.v1.FulfillmentService/Ship",
            compensation: "fulfillment.v1.FulfillmentService/CancelShipment",
        },
    ],
    pivot: 2,
};

/// Attempt budgets. An action whose budget is spent makes the saga
/// compensate; a compensation whose budget is spent makes it NEEDS_ATTENTION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per action (at least 1).
    pub action_attempts: u32,
    /// Attempts per compensation before an operator is needed (at least 1).
    pub compensation_attempts: u32,
}

/// Why a saga is being (or was) compensated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// A step was rejected or ran out of attempts: ends FAILED.
    Failure,
    /// The client cancelled: ends CANCELLED.
    Cancel,
    /// An operator aborted: ends FAILED.
    Abort,
}

/// The phase of the saga's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Recorded; the first action may already be on the wire.
    Pending,
    /// Running the action of `step`.
    Forward { step: usize },
    /// Running the compensation of `step`.
    Compensating { step: usize },
    /// The pivot succeeded.
    Completed,
    /// Compensated after a failure or an abort.
    Failed,
    /// Compensated after a cancel.
    Cancelled,
    /// The compensation of `step` ran out of attempts.
    NeedsAttention { step: usize },
}

/// What the saga knows about one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// The action may have been sent: it must be compensated on abort.
    /// Set when the machine decides to run the step, when a reply for it
    /// arrives that the state was not waiting for, and for every later
    /// step when a state is read back from the store
    /// ([`SagaState::recovered`]).
    pub attempted: bool,
    /// Action attempts whose outcome was recorded.
    pub action_attempts: u32,
    /// The action succeeded.
    pub succeeded: bool,
    /// Compensation attempts whose outcome was recorded.
    pub compensation_attempts: u32,
    /// The compensation succeeded.
    pub compensated: bool,
    /// Attempts (of the kind running now) that an operator retry forgave:
    /// the budget counts from here.
    pub forgiven: u32,
}

/// The whole durable state of one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    /// The phase.
    pub phase: Phase,
    /// One entry per step of the definition.
    pub steps: Vec<StepState>,
    /// Why the saga compensates; set when compensation begins.
    pub cause: Option<Cause>,
    /// A cancel or abort asked for while a call was in flight; acted on when
    /// its outcome arrives.
    pub stop_requested: Option<Cause>,
    /// The last attempt failed retryably and the next one is waiting for its
    /// backoff (no call is in flight).
    pub waiting_retry: bool,
    /// Why the saga failed, was cancelled or needs attention.
    pub failure_reason: Option<String>,
    /// The last error a participant answered.
    pub last_error: Option<String>,
    /// Outputs of succeeded actions (reservation_id, total_amount_cents, ...).
    pub outputs: BTreeMap<String, String>,
    /// Set aside: the replica that read the saga could not drive it (its
    /// definition's version is unknown to it, or the state does not fit
    /// the definition). The saga is NEEDS_ATTENTION and runs nothing; its
    /// phase is kept, so an operator retry on a replica that knows the
    /// definition resumes it where it was. Absent from the stored JSON
    /// when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
}

/// Why a saga was set aside, and what to restore when it resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The message, e.g. "saga definition order v3 is not known to this
    /// replica (it knows v1, v2)".
    pub reason: String,
    /// The saga's own failure reason before it was set aside.
    pub failure_reason: Option<String>,
}

/// How a call ended, as classified by the participant adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// OK, with the outputs later steps (and the API) need.
    Succeeded(Vec<(String, String)>),
    /// A transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, ...): retry.
    Retryable(String),
    /// A business rejection: do not retry the action; compensate.
    Rejected(String),
}

/// Something that happened to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A call to a participant ended.
    CallFinished {
        step: usize,
        kind: Kind,
        attempt: u32,
        outcome: Outcome,
    },
    /// The client asked to cancel.
    CancelRequested { reason: Option<String> },
    /// An operator asked to resume now with a fresh attempt budget.
    OperatorRetry,
    /// An operator asked to force compensation.
    OperatorAbort { reason: String },
}

/// What the executor does next for a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Send this call now.
    Call {
        step: usize,
        kind: Kind,
        attempt: u32,
    },
    /// Send this call after a backoff (the executor picks the delay and
    /// stores the deadline with the transition).
    RetryLater {
        step: usize,
        kind: Kind,
        attempt: u32,
    },
}

impl Command {
    /// The call, now or later: its step, kind and attempt.
    pub fn call(self) -> (usize, Kind, u32) {
        match self {
            Self::Call {
                step,
                kind,
                attempt,
            }
            | Self::RetryLater {
                step,
                kind,
                attempt,
            } => (step, kind, attempt),
        }
    }
}

/// Why an event cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Cancel or abort after the pivot succeeded.
    #[error("the order is COMPLETED: it shipped and can no longer be cancelled or compensated")]
    AlreadyCompleted,
    /// Retry or abort of a saga that has finished.
    #[error("the saga is {0}: there is nothing to {1}")]
    Settled(Status, &'static str),
    /// Abort of a saga that is already compensating.
    #[error("the saga is already compensating ({0}); use retry to resume it")]
    AlreadyCompensating(Status),
    /// Cancel or abort after the pivot succeeded, while the steps after it
    /// run.
    #[error("the saga passed its pivot ({0}): it can only go forward")]
    PastPivot(&'static str),
    /// Cancel or abort of a saga set aside ([`SagaState::held`]): it needs
    /// an operator retry first.
    #[error("the saga is NEEDS_ATTENTION ({0}); retry it first")]
    Held(String),
}

impl SagaState {
    /// A new saga of `definition`. Its first action counts as attempted from
    /// the start: the executor sends it as soon as the saga is recorded.
    pub fn new(definition: &Definition) -> Self {
        let mut steps = vec![StepState::default(); definition.steps.len()];
        if let Some(first) = steps.first_mut() {
            first.attempted = true;
        }
        Self {
            phase: Phase::Pending,
            steps,
            cause: None,
            stop_requested: None,
            waiting_retry: false,
            failure_reason: None,
            last_error: None,
            outputs: BTreeMap::new(),
            held: None,
        }
    }

    /// The client asked to cancel: the cancel is recorded, being acted on
    /// or done, whatever the status now (a cancelled saga whose
    /// compensation needs an operator still says so). The one definition;
    /// the stored column and every API read it.
    pub fn cancel_requested(&self) -> bool {
        let cancel = Some(Cause::Cancel);
        self.cause == cancel || self.stop_requested == cancel
    }

    /// Whether this state can be driven by `definition`: one step state
    /// per step, and the current step one of them. The message says what
    /// does not fit.
    pub fn fits(&self, definition: &Definition) -> Result<(), String> {
        if self.steps.len() != definition.steps.len() {
            return Err(format!(
                "the saga's stored state does not fit saga definition {}: it has {} steps, the definition {}",
                definition.label(),
                self.steps.len(),
                definition.steps.len()
            ));
        }
        match self.current() {
            Some((step, _)) if step >= definition.steps.len() => Err(format!(
                "the saga's stored state does not fit saga definition {}: it is at step {step} of {}",
                definition.label(),
                definition.steps.len()
            )),
            _ => Ok(()),
        }
    }

    /// The saga set aside with `reason` (see [`SagaState::held`]): it
    /// shows NEEDS_ATTENTION with the reason as its failure reason, keeps
    /// its phase and runs nothing until an operator retries it. A saga
    /// already set aside keeps its first reason.
    pub fn hold(&self, reason: String) -> SagaState {
        let mut state = self.clone();
        if state.held.is_none() {
            state.held = Some(Held {
                reason: reason.clone(),
                failure_reason: state.failure_reason.take(),
            });
            state.failure_reason = Some(reason);
        }
        state
    }

    /// The state as read back from the store, before anything is decided
    /// on it.
    ///
    /// Forward progress is committed without waiting for the flush (see
    /// [`SagaState::must_be_durable`]), and the call to the next step goes
    /// out before that write is on disk. A database that loses its tail
    /// (a power loss, a failover to a lagging replica, a restore) can
    /// therefore hand back a state that does not know later steps were
    /// attempted. So every step after the current forward step counts as
    /// possibly attempted: if the saga aborts, their compensations are
    /// sent too. Compensations are tombstone-safe, so one for a step that
    /// never ran is harmless (and it fences off a late action). Idempotent,
    /// and a no-op once the saga compensates: decisions to compensate are
    /// durable, so a state that compensates already knows what to undo.
    pub fn recovered(&self) -> SagaState {
        let mut state = self.clone();
        let first_unknown = match self.phase {
            Phase::Pending => 1,
            Phase::Forward { step } => step + 1,
            _ => return state,
        };
        for step in state.steps.iter_mut().skip(first_unknown) {
            step.attempted = true;
        }
        state
    }

    /// Whether the write of the transition from `self` to `next` by
    /// `event` must be on disk before the executor acts on it. Only a
    /// forward step's success that moves to the next step may be written
    /// without waiting for the flush: losing it costs a replay (the
    /// participant answers with its first result), and
    /// [`SagaState::recovered`] makes compensation cover the steps it
    /// would have marked. A saga's start, every decision to compensate,
    /// every retry deadline and every end are durable.
    pub fn must_be_durable(event: &Event, next: &SagaState) -> bool {
        !matches!(
            (event, next.phase),
            (
                Event::CallFinished {
                    kind: Kind::Action,
                    outcome: Outcome::Succeeded(_),
                    ..
                },
                Phase::Forward { .. }
            )
        )
    }

    /// The status the API reports.
    pub fn status(&self, definition: &Definition) -> Status {
        if self.held.is_some() {
            return Status::NeedsAttention;
        }
        match self.phase {
            Phase::Pending | Phase::Forward { .. }
                if self.stop_requested == Some(Cause::Cancel) =>
            {
                Status::Cancelling
            }
            Phase::Pending | Phase::Forward { .. } if self.stop_requested == Some(Cause::Abort) => {
                Status::Compensating
            }
            Phase::Pending => Status::Pending,
            // A step the definition does not have (a state that does not
            // fit it) is for an operator.
            Phase::Forward { step } => definition
                .step(step)
                .map_or(Status::NeedsAttention, |s| s.status),
            Phase::Compensating { .. } if self.cause == Some(Cause::Cancel) => Status::Cancelling,
            Phase::Compensating { .. } => Status::Compensating,
            Phase::Completed => Status::Completed,
            Phase::Failed => Status::Failed,
            Phase::Cancelled => Status::Cancelled,
            Phase::NeedsAttention { .. } => Status::NeedsAttention,
        }
    }

    /// The step being run or compensated, if any.
    pub fn current(&self) -> Option<(usize, Kind)> {
        match self.phase {
            Phase::Pending => Some((0, Kind::Action)),
            Phase::Forward { step } => Some((step, Kind::Action)),
            Phase::Compensating { step } | Phase::NeedsAttention { step } => {
                Some((step, Kind::Compensation))
            }
            Phase::Completed | Phase::Failed | Phase::Cancelled => None,
        }
    }

    /// Attempts recorded for the current step and kind.
    pub fn current_attempts(&self) -> u32 {
        match self.current() {
            Some((step, kind)) => self.steps.get(step).map_or(0, |s| match kind {
                Kind::Action => s.action_attempts,
                Kind::Compensation => s.compensation_attempts,
            }),
            None => 0,
        }
    }

    /// Whether the outcome of this call drives the saga: it is the call
    /// the state is waiting for. Any other outcome is a late reply.
    pub fn awaits(&self, step: usize, kind: Kind, attempt: u32) -> bool {
        self.held.is_none()
            && self.current() == Some((step, kind))
            && self.current_attempts() + 1 == attempt
            && !matches!(self.phase, Phase::NeedsAttention { .. })
    }

    /// Failed attempts of the current step and kind that its next backoff
    /// counts: those since an operator's retry forgave the earlier ones, or
    /// since the step (or its compensation) began. The executor's backoff
    /// doubles with this number from the base delay, so after a retry it
    /// starts again from the base instead of staying at the cap.
    pub fn failures_since_retry(&self) -> u32 {
        match self.current() {
            Some((step, _)) => self
                .current_attempts()
                .saturating_sub(self.steps.get(step).map_or(0, |s| s.forgiven)),
            None => 0,
        }
    }

    /// What the executor must do next; None when the saga is settled
    /// (terminal or NEEDS_ATTENTION). Derived from the state alone, so a
    /// replica that takes a saga over after a crash resumes it exactly.
    pub fn next_command(&self) -> Option<Command> {
        if self.held.is_some() {
            return None;
        }
        let (step, kind) = match self.phase {
            Phase::Pending => (0, Kind::Action),
            Phase::Forward { step } => (step, Kind::Action),
            Phase::Compensating { step } => (step, Kind::Compensation),
            _ => return None,
        };
        let attempt = self.current_attempts() + 1;
        Some(if self.waiting_retry {
            Command::RetryLater {
                step,
                kind,
                attempt,
            }
        } else {
            Command::Call {
                step,
                kind,
                attempt,
            }
        })
    }

    /// Applies `event`; returns the next state. The input is untouched, so
    /// a caller whose write loses a race can re-apply to the fresh state.
    pub fn apply(
        &self,
        definition: &Definition,
        policy: &Policy,
        event: &Event,
    ) -> Result<SagaState, Error> {
        let mut next = self.clone();
        match event {
            Event::CallFinished {
                step,
                kind,
                attempt,
                outcome,
            } => next.on_call_finished(definition, policy, *step, *kind, *attempt, outcome),
            Event::CancelRequested { reason } => next.on_stop(
                definition,
                Cause::Cancel,
                match reason {
                    Some(reason) if !reason.is_empty() => {
                        format!("cancelled by the client: {reason}")
                    }
                    _ => "cancelled by the client".to_owned(),
                },
            )?,
            Event::OperatorAbort { reason } => next.on_stop(
                definition,
                Cause::Abort,
                format!("aborted by an operator: {reason}"),
            )?,
            Event::OperatorRetry => next.on_operator_retry(definition)?,
        }
        Ok(next)
    }

    fn on_call_finished(
        &mut self,
        definition: &Definition,
        policy: &Policy,
        step: usize,
        kind: Kind,
        attempt: u32,
        outcome: &Outcome,
    ) {
        let open = !matches!(
            self.phase,
            Phase::Completed | Phase::Failed | Phase::Cancelled
        );
        // A step neither the state nor the definition has changes nothing.
        let (Some(def), Some(_)) = (definition.step(step), self.steps.get(step)) else {
            return;
        };
        // Only the outcome of the call the state is waiting for drives the
        // saga. A late reply (a call sent before a cancel switched the saga
        // to compensation, before a takeover, or before the database lost
        // the write that marked its step) is journalled by the executor and
        // otherwise absorbed, except that an action the state did not
        // believe was sent now counts as attempted, so an abort undoes it.
        if !self.awaits(step, kind, attempt) {
            if kind == Kind::Action
                && open
                && let Some(late) = self.steps.get_mut(step)
            {
                late.attempted = true;
            }
            return;
        }
        self.waiting_retry = false;
        let name = def.name;
        let last = step + 1 == definition.steps.len();
        // At or past the pivot: the saga only goes forward.
        let past_pivot = step > definition.pivot;
        match kind {
            Kind::Action => {
                let forgiven = self.step_mut(step, |s| {
                    s.action_attempts = attempt;
                    s.forgiven
                });
                match outcome {
                    Outcome::Succeeded(outputs) => {
                        self.step_mut(step, |s| s.succeeded = true);
                        self.outputs.extend(outputs.iter().cloned());
                        if last {
                            // The last step succeeded (the pivot, or the
                            // last step after it): a pending cancel lost
                            // the race, and its reason is no failure of a
                            // completed order.
                            self.phase = Phase::Completed;
                            self.stop_requested = None;
                            self.failure_reason = None;
                        } else if step >= definition.pivot {
                            // The pivot (or a step after it) succeeded: a
                            // pending cancel comes too late.
                            self.stop_requested = None;
                            self.failure_reason = None;
                            self.advance(step);
                        } else if let Some(cause) = self.stop_requested {
                            self.begin_compensation(cause);
                        } else {
                            self.advance(step);
                        }
                    }
                    // A step after the pivot cannot be compensated: it is
                    // retried until it succeeds (an operator sees it stuck).
                    Outcome::Retryable(detail) | Outcome::Rejected(detail) if past_pivot => {
                        self.last_error = Some(detail.clone());
                        self.phase = Phase::Forward { step };
                        self.waiting_retry = true;
                    }
                    Outcome::Retryable(detail) => {
                        self.last_error = Some(detail.clone());
                        let used = attempt.saturating_sub(forgiven);
                        if let Some(cause) = self.stop_requested {
                            self.begin_compensation(cause);
                        } else if used < policy.action_attempts {
                            self.phase = Phase::Forward { step };
                            self.waiting_retry = true;
                        } else {
                            self.failure_reason =
                                Some(format!("{name} failed after {used} attempts: {detail}"));
                            self.begin_compensation(Cause::Failure);
                        }
                    }
                    Outcome::Rejected(detail) => {
                        self.last_error = Some(detail.clone());
                        if let Some(cause) = self.stop_requested {
                            self.begin_compensation(cause);
                        } else {
                            self.failure_reason = Some(format!("{name} rejected: {detail}"));
                            self.begin_compensation(Cause::Failure);
                        }
                    }
                }
            }
            Kind::Compensation => {
                let forgiven = self.step_mut(step, |s| {
                    s.compensation_attempts = attempt;
                    s.forgiven
                });
                match outcome {
                    Outcome::Succeeded(_) => {
                        self.step_mut(step, |s| s.compensated = true);
                        self.continue_compensation();
                    }
                    // Compensations must eventually succeed: a rejection is
                    // retried like a transient failure.
                    Outcome::Retryable(detail) | Outcome::Rejected(detail) => {
                        self.last_error = Some(detail.clone());
                        let used = attempt.saturating_sub(forgiven);
                        if used < policy.compensation_attempts {
                            self.waiting_retry = true;
                        } else {
                            self.phase = Phase::NeedsAttention { step };
                            let cause = self.failure_reason.take().unwrap_or_default();
                            self.failure_reason = Some(format!(
                                "{cause}; then compensation {name} failed {used} times: {detail}"
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Runs `change` on the state of `step` (which the caller checked
    /// exists); the default when it does not.
    fn step_mut<T: Default>(&mut self, step: usize, change: impl FnOnce(&mut StepState) -> T) -> T {
        self.steps.get_mut(step).map(change).unwrap_or_default()
    }

    /// Moves on to the step after `step`, which now counts as attempted.
    fn advance(&mut self, step: usize) {
        self.phase = Phase::Forward { step: step + 1 };
        self.step_mut(step + 1, |s| s.attempted = true);
    }

    /// Switches to compensating every attempted step, newest first.
    fn begin_compensation(&mut self, cause: Cause) {
        self.cause = Some(cause);
        for step in &mut self.steps {
            step.forgiven = 0;
        }
        self.stop_requested = None;
        self.waiting_retry = false;
        self.continue_compensation();
    }

    /// Moves to the newest attempted step not yet compensated, or ends.
    fn continue_compensation(&mut self) {
        let next = self
            .steps
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| s.attempted && !s.compensated)
            .map(|(j, _)| j);
        self.phase = match (next, self.cause) {
            (Some(step), _) => Phase::Compensating { step },
            (None, Some(Cause::Cancel)) => Phase::Cancelled,
            (None, _) => Phase::Failed,
        };
    }

    /// Whether the pivot of `definition` succeeded.
    fn past_pivot(&self, definition: &Definition) -> bool {
        self.steps
            .get(definition.pivot)
            .is_some_and(|pivot| pivot.succeeded)
    }

    fn on_stop(
        &mut self,
        definition: &Definition,
        cause: Cause,
        reason: String,
    ) -> Result<(), Error> {
        if let Some(held) = &self.held {
            return Err(Error::Held(held.reason.clone()));
        }
        let status = self.status(definition);
        match self.phase {
            Phase::Completed => Err(Error::AlreadyCompleted),
            Phase::Failed | Phase::Cancelled if cause == Cause::Cancel => Ok(()),
            Phase::Failed | Phase::Cancelled => Err(Error::Settled(status, "abort")),
            Phase::Compensating { .. } | Phase::NeedsAttention { .. } if cause == Cause::Cancel => {
                Ok(())
            }
            Phase::Compensating { .. } | Phase::NeedsAttention { .. } => {
                Err(Error::AlreadyCompensating(status))
            }
            Phase::Forward { .. } if self.past_pivot(definition) => Err(Error::PastPivot(
                definition.step(definition.pivot).map_or("", |s| s.name),
            )),
            Phase::Pending | Phase::Forward { .. } => {
                if self.stop_requested.is_some() {
                    // The first request wins; repeating it changes nothing.
                    return if cause == Cause::Abort {
                        Err(Error::AlreadyCompensating(status))
                    } else {
                        Ok(())
                    };
                }
                self.failure_reason = Some(reason);
                if self.waiting_retry {
                    // No call in flight: compensate now.
                    self.begin_compensation(cause);
                } else {
                    // Let the call in flight finish; its outcome triggers
                    // the compensation.
                    self.stop_requested = Some(cause);
                }
                Ok(())
            }
        }
    }

    fn on_operator_retry(&mut self, definition: &Definition) -> Result<(), Error> {
        // A saga set aside resumes where it was (the executor retries it
        // only once it knows its definition and the state fits it).
        if let Some(held) = self.held.take() {
            self.failure_reason = held.failure_reason;
        }
        match self.phase {
            Phase::Completed | Phase::Failed | Phase::Cancelled => {
                Err(Error::Settled(self.status(definition), "retry"))
            }
            Phase::NeedsAttention { step } => {
                self.step_mut(step, |s| s.forgiven = s.compensation_attempts);
                self.phase = Phase::Compensating { step };
                self.waiting_retry = false;
                Ok(())
            }
            Phase::Pending | Phase::Forward { .. } | Phase::Compensating { .. } => {
                if let Some((step, _)) = self.current() {
                    let attempts = self.current_attempts();
                    self.step_mut(step, |s| s.forgiven = attempts);
                }
                // Skip the backoff: the next attempt goes out now.
                self.waiting_retry = false;
                Ok(())
            }
        }
    }
}
