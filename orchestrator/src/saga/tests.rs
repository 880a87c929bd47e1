//! Table tests of every transition and property tests over random event
//! sequences.

use proptest::prelude::*;

use super::*;

const POLICY: Policy = Policy {
    action_attempts: 3,
    compensation_attempts: 2,
};
const DEF: &Definition = &ORDER_SAGA;

fn ok() -> Outcome {
    Outcome::Succeeded(vec![])
}
fn transient() -> Outcome {
    Outcome::Retryable("UNAVAILABLE".into())
}
fn rejected() -> Outcome {
    Outcome::Rejected("out of stock".into())
}

/// The call the state asks for next, now or after a backoff.
fn due(state: &SagaState) -> Option<(usize, Kind, u32)> {
    state.next_command().map(Command::call)
}

/// Applies the outcome of the call the state asks for next.
fn answer(state: &SagaState, outcome: Outcome) -> SagaState {
    let (step, kind, attempt) = due(state).expect("a call is due");
    state
        .apply(
            DEF,
            &POLICY,
            &Event::CallFinished {
                step,
                kind,
                attempt,
                outcome,
            },
        )
        .unwrap()
}

fn run(outcomes: impl IntoIterator<Item = Outcome>) -> SagaState {
    outcomes
        .into_iter()
        .fold(SagaState::new(DEF), |state, outcome| {
            answer(&state, outcome)
        })
}

fn cancel(state: &SagaState) -> Result<SagaState, Error> {
    state.apply(DEF, &POLICY, &Event::CancelRequested { reason: None })
}

#[test]
fn a_new_saga_is_pending_and_sends_the_first_action_at_once() {
    let state = SagaState::new(DEF);
    assert_eq!(state.status(DEF), Status::Pending);
    assert_eq!(
        state.next_command(),
        Some(Command::Call {
            step: 0,
            kind: Kind::Action,
            attempt: 1
        })
    );
    assert!(state.steps[0].attempted);
}

#[test]
fn happy_path_runs_the_steps_in_order_and_completes() {
    let mut state = SagaState::new(DEF);
    for (step, status) in [(1, Status::ChargingPayment), (2, Status::Shipping)] {
        state = answer(&state, ok());
        assert_eq!(state.status(DEF), status);
        assert_eq!(
            state.next_command(),
            Some(Command::Call {
                step,
                kind: Kind::Action,
                attempt: 1
            })
        );
    }
    state = answer(
        &state,
        Outcome::Succeeded(vec![("shipment_id".into(), "s1".into())]),
    );
    assert_eq!(state.status(DEF), Status::Completed);
    assert_eq!(state.next_command(), None);
    assert_eq!(state.outputs["shipment_id"], "s1");
}

#[test]
fn a_transient_failure_is_retried_after_a_backoff() {
    let state = run([ok(), transient()]);
    assert_eq!(state.status(DEF), Status::ChargingPayment);
    assert_eq!(
        state.next_command(),
        Some(Command::RetryLater {
            step: 1,
            kind: Kind::Action,
            attempt: 2
        })
    );
    let state = answer(&state, ok());
    assert_eq!(state.status(DEF), Status::Shipping);
}

#[test]
fn a_spent_action_budget_compensates_every_attempted_step_in_reverse() {
    let state = run([ok(), transient(), transient(), transient()]);
    assert_eq!(state.status(DEF), Status::Compensating);
    assert!(
        state
            .failure_reason
            .as_deref()
            .unwrap()
            .contains("charge_payment failed after 3 attempts")
    );
    // The failed charge is compensated too: a lost reply may have committed it.
    assert_eq!(
        state.next_command(),
        Some(Command::Call {
            step: 1,
            kind: Kind::Compensation,
            attempt: 1
        })
    );
    let state = answer(&state, ok());
    assert_eq!(state.phase, Phase::Compensating { step: 0 });
    let state = answer(&state, ok());
    assert_eq!(state.status(DEF), Status::Failed);
    assert_eq!(state.next_command(), None);
}

#[test]
fn a_rejection_is_not_retried() {
    let state = run([rejected()]);
    assert_eq!(state.phase, Phase::Compensating { step: 0 });
    assert_eq!(
        state.failure_reason.as_deref(),
        Some("reserve_inventory rejected: out of stock")
    );
    let state = answer(&state, ok());
    assert_eq!(state.status(DEF), Status::Failed);
}

#[test]
fn a_rejected_shipment_is_cancelled_refunded_and_released() {
    let mut state = run([ok(), ok(), rejected()]);
    let mut compensated = vec![];
    while let Some(Command::Call { step, kind, .. }) = state.next_command() {
        assert_eq!(kind, Kind::Compensation);
        compensated.push(step);
        state = answer(&state, ok());
    }
    assert_eq!(compensated, [2, 1, 0]);
    assert_eq!(state.status(DEF), Status::Failed);
}

#[test]
fn a_spent_compensation_budget_needs_attention_and_an_operator_retry_resumes() {
    let state = run([rejected(), transient(), transient()]);
    assert_eq!(state.status(DEF), Status::NeedsAttention);
    assert_eq!(state.next_command(), None);
    let reason = state.failure_reason.clone().unwrap();
    assert!(
        reason.contains("compensation reserve_inventory failed 2 times"),
        "{reason}"
    );

    let state = state.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
    assert_eq!(state.status(DEF), Status::Compensating);
    assert_eq!(
        state.next_command(),
        Some(Command::Call {
            step: 0,
            kind: Kind::Compensation,
            attempt: 3
        }),
        "attempts keep counting; the budget starts again"
    );
    let state = answer(&state, transient());
    assert_eq!(
        state.status(DEF),
        Status::Compensating,
        "one more attempt is allowed"
    );
    let state = answer(&state, ok());
    assert_eq!(state.status(DEF), Status::Failed);
}

#[test]
fn cancel_while_a_call_is_in_flight_waits_for_its_outcome() {
    let state = run([ok()]);
    let cancelled = cancel(&state).unwrap();
    assert_eq!(cancelled.status(DEF), Status::Cancelling);
    assert_eq!(
        cancelled.phase,
        Phase::Forward { step: 1 },
        "the charge in flight finishes"
    );
    // The charge succeeds: both attempted steps are compensated.
    let mut state = answer(&cancelled, ok());
    let mut compensated = vec![];
    while let Some(Command::Call { step, kind, .. }) = state.next_command() {
        assert_eq!(kind, Kind::Compensation);
        compensated.push(step);
        state = answer(&state, ok());
    }
    assert_eq!(compensated, [1, 0]);
    assert_eq!(state.status(DEF), Status::Cancelled);
    assert_eq!(
        state.failure_reason.as_deref(),
        Some("cancelled by the client")
    );
}

#[test]
fn cancel_while_waiting_for_a_retry_compensates_at_once() {
    let state = run([ok(), transient()]);
    let state = state
        .apply(
            DEF,
            &POLICY,
            &Event::CancelRequested {
                reason: Some("changed my mind".into()),
            },
        )
        .unwrap();
    assert_eq!(state.status(DEF), Status::Cancelling);
    assert_eq!(
        state.next_command(),
        Some(Command::Call {
            step: 1,
            kind: Kind::Compensation,
            attempt: 1
        })
    );
    assert_eq!(
        state.failure_reason.as_deref(),
        Some("cancelled by the client: changed my mind")
    );
}

#[test]
fn cancel_while_pending_still_releases_the_reservation_that_may_be_in_flight() {
    let state = cancel(&SagaState::new(DEF)).unwrap();
    assert_eq!(state.status(DEF), Status::Cancelling);
    let state = answer(&state, ok());
    assert_eq!(state.phase, Phase::Compensating { step: 0 });
    let state = answer(&state, ok());
    assert_eq!(state.status(DEF), Status::Cancelled);
}

#[test]
fn a_shipment_that_succeeds_after_a_cancel_completes_the_order() {
    let state = cancel(&run([ok(), ok()])).unwrap();
    assert_eq!(state.status(DEF), Status::Cancelling);
    let state = answer(&state, ok());
    assert_eq!(
        state.status(DEF),
        Status::Completed,
        "the pivot won the race"
    );
    assert_eq!(state.failure_reason, None, "nothing failed");
}

#[test]
fn terminal_states_absorb_cancels_and_late_outcomes() {
    let completed = run([ok(), ok(), ok()]);
    let failed = run([rejected(), ok()]);
    let cancelled = answer(&answer(&cancel(&SagaState::new(DEF)).unwrap(), ok()), ok());
    assert_eq!(cancelled.status(DEF), Status::Cancelled);

    assert_eq!(cancel(&completed), Err(Error::AlreadyCompleted));
    for state in [&failed, &cancelled] {
        assert_eq!(cancel(state).as_ref(), Ok(state), "cancel changes nothing");
    }
    for state in [&completed, &failed, &cancelled] {
        for step in 0..3 {
            for kind in [Kind::Action, Kind::Compensation] {
                for attempt in 1..4 {
                    let late = state
                        .apply(
                            DEF,
                            &POLICY,
                            &Event::CallFinished {
                                step,
                                kind,
                                attempt,
                                outcome: ok(),
                            },
                        )
                        .unwrap();
                    assert_eq!(&late, state);
                }
            }
        }
        assert!(matches!(
            state.apply(DEF, &POLICY, &Event::OperatorRetry),
            Err(Error::Settled(..))
        ));
        assert!(
            state
                .apply(DEF, &POLICY, &Event::OperatorAbort { reason: "x".into() })
                .is_err()
        );
    }
}

#[test]
fn operator_abort_compensates_and_ends_failed() {
    let state = run([ok(), transient()]);
    let state = state
        .apply(
            DEF,
            &POLICY,
            &Event::OperatorAbort {
                reason: "payment down".into(),
            },
        )
        .unwrap();
    assert_eq!(state.status(DEF), Status::Compensating);
    let state = answer(&answer(&state, ok()), ok());
    assert_eq!(state.status(DEF), Status::Failed);
    assert_eq!(
        state.failure_reason.as_deref(),
        Some("aborted by an operator: payment down")
    );
}

#[test]
fn abort_of_a_compensating_saga_is_refused() {
    let state = run([rejected()]);
    assert!(matches!(
        state.apply(DEF, &POLICY, &Event::OperatorAbort { reason: "x".into() }),
        Err(Error::AlreadyCompensating(Status::Compensating))
    ));
}

#[test]
fn operator_retry_skips_the_backoff_with_a_fresh_budget() {
    let state = run([ok(), transient(), transient()]);
    let state = state.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
    assert_eq!(
        state.next_command(),
        Some(Command::Call {
            step: 1,
            kind: Kind::Action,
            attempt: 3
        })
    );
    // Three more attempts are allowed before the saga gives up.
    let state = answer(&answer(&state, transient()), transient());
    assert_eq!(state.status(DEF), Status::ChargingPayment);
    let state = answer(&state, transient());
    assert_eq!(state.status(DEF), Status::Compensating);
}

#[test]
fn an_outcome_for_another_attempt_is_absorbed() {
    let state = run([ok()]);
    let stale = state
        .apply(
            DEF,
            &POLICY,
            &Event::CallFinished {
                step: 0,
                kind: Kind::Action,
                attempt: 1,
                outcome: rejected(),
            },
        )
        .unwrap();
    assert_eq!(stale, state);
}

#[test]
fn statuses_round_trip_through_their_names() {
    for status in Status::ALL {
        assert_eq!(Status::parse(status.as_str()), Some(status));
        assert_eq!(
            Status::parse(&format!("ORDER_STATUS_{status}")),
            Some(status)
        );
    }
    assert_eq!(Status::parse("shipping"), Some(Status::Shipping));
    assert_eq!(Status::parse("SHIPPED"), None);
}

// ---- properties over random event sequences ----

#[derive(Debug, Clone)]
enum Input {
    Answer(u8),
    Cancel,
    Retry,
    Abort,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => (0u8..3).prop_map(Input::Answer),
        1 => Just(Input::Cancel),
        1 => Just(Input::Retry),
        1 => Just(Input::Abort),
    ]
}

/// A record of what the executor would have sent.
#[derive(Default)]
struct Trace {
    actions: Vec<usize>,
    compensations: Vec<usize>,
}

/// Drives a saga with `inputs`, then keeps answering "succeeded" to calls
/// (an operator retry unsticks NEEDS_ATTENTION) until it settles.
fn drive(inputs: &[Input], policy: &Policy) -> (SagaState, Trace, bool) {
    let mut trace = Trace {
        // The first action is sent as soon as the saga is recorded.
        actions: vec![0],
        ..Trace::default()
    };
    let mut state = SagaState::new(DEF);
    let mut ran_after_completed = false;
    let send = |state: &SagaState, outcome: Outcome, trace: &mut Trace| -> SagaState {
        let Some((step, kind, attempt)) = due(state) else {
            return state.clone();
        };
        match kind {
            Kind::Action if !(step == 0 && attempt == 1) => trace.actions.push(step),
            Kind::Action => {}
            Kind::Compensation => trace.compensations.push(step),
        }
        state
            .apply(
                DEF,
                policy,
                &Event::CallFinished {
                    step,
                    kind,
                    attempt,
                    outcome,
                },
            )
            .unwrap()
    };
    for input in inputs {
        let was_completed = state.phase == Phase::Completed;
        let next = match input {
            Input::Answer(0) => send(&state, ok(), &mut trace),
            Input::Answer(1) => send(&state, transient(), &mut trace),
            Input::Answer(_) => send(&state, rejected(), &mut trace),
            Input::Cancel => cancel(&state).unwrap_or(state.clone()),
            Input::Retry => state
                .apply(DEF, policy, &Event::OperatorRetry)
                .unwrap_or(state.clone()),
            Input::Abort => state
                .apply(DEF, policy, &Event::OperatorAbort { reason: "x".into() })
                .unwrap_or(state.clone()),
        };
        if was_completed && next != state {
            ran_after_completed = true;
        }
        invariants::check(DEF, &next).unwrap_or_else(|broken| panic!("{broken}: {next:?}"));
        state = next;
    }
    for _ in 0..100 {
        if state.phase == (Phase::NeedsAttention { step: 0 })
            || matches!(state.phase, Phase::NeedsAttention { .. })
        {
            state = state.apply(DEF, policy, &Event::OperatorRetry).unwrap();
        }
        if state.next_command().is_none() {
            break;
        }
        state = send(&state, ok(), &mut trace);
    }
    (state, trace, ran_after_completed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_saga_settles_and_undoes_exactly_what_it_attempted(
        inputs in proptest::collection::vec(input(), 0..60),
        action_attempts in 1u32..4,
        compensation_attempts in 1u32..4,
    ) {
        let policy = Policy { action_attempts, compensation_attempts };
        let (state, trace, ran_after_completed) = drive(&inputs, &policy);
        let status = state.status(DEF);

        // It always ends terminal (NEEDS_ATTENTION was resumed by the driver).
        prop_assert!(status.is_terminal(), "ended {status:?}");
        // Nothing runs after COMPLETED.
        prop_assert!(!ran_after_completed);
        // A step is compensated only if its action was sent.
        for step in &trace.compensations {
            prop_assert!(trace.actions.contains(step), "compensated {step} never attempted: {:?}", trace.actions);
        }
        // Compensations run newest first: the sequence never goes back up.
        prop_assert!(trace.compensations.windows(2).all(|w| w[0] >= w[1]), "{:?}", trace.compensations);
        match status {
            Status::Completed => {
                prop_assert!(trace.compensations.is_empty());
                prop_assert!(state.steps.iter().all(|s| s.succeeded));
            }
            _ => {
                // Failed or cancelled: every attempted step was undone.
                for (index, step) in state.steps.iter().enumerate() {
                    prop_assert_eq!(step.attempted, step.compensated, "step {}", index);
                    prop_assert_eq!(step.attempted, trace.actions.contains(&index));
                }
                prop_assert!(state.failure_reason.is_some());
            }
        }
    }

    #[test]
    fn cancel_after_completed_is_always_refused(inputs in proptest::collection::vec(input(), 0..30)) {
        let (state, _, _) = drive(&inputs, &POLICY);
        if state.phase == Phase::Completed {
            prop_assert_eq!(cancel(&state), Err(Error::AlreadyCompleted));
        }
    }

    #[test]
    fn next_command_never_targets_an_unattempted_compensation(
        inputs in proptest::collection::vec(input(), 0..40),
    ) {
        let (state, _, _) = drive(&inputs, &POLICY);
        if let Some(Command::Call { step, kind: Kind::Compensation, .. }) = state.next_command() {
            prop_assert!(state.steps[step].attempted);
        }
    }
}

// ---- a database that loses its asynchronously committed tail ----

/// Applies the outcome of the due call, keeping `durable` (what survives a
/// database crash) in step with the executor's commit rule.
fn answer_durably(state: &SagaState, durable: &mut SagaState, outcome: Outcome) -> SagaState {
    let Some((step, kind, attempt)) = due(state) else {
        return state.clone();
    };
    let event = Event::CallFinished {
        step,
        kind,
        attempt,
        outcome,
    };
    let next = state.apply(DEF, &POLICY, &event).unwrap();
    if SagaState::must_be_durable(&event, &next) {
        *durable = next.clone();
    }
    next
}

#[test]
fn only_forward_progress_may_skip_the_flush() {
    let start = SagaState::new(DEF);
    let mut durable = start.clone();
    let reserved = answer_durably(&start, &mut durable, ok());
    assert_eq!(reserved.phase, Phase::Forward { step: 1 });
    assert_eq!(
        durable, start,
        "reserve's success is committed without a flush"
    );
    let retrying = answer_durably(&reserved, &mut durable, transient());
    assert_eq!(durable, retrying, "a retry deadline is durable");
    let charged = answer_durably(&retrying, &mut durable, ok());
    assert_eq!(durable, retrying);
    let completed = answer_durably(&charged, &mut durable, ok());
    assert_eq!(completed.phase, Phase::Completed);
    assert_eq!(durable, completed, "the end is durable");
    let failing = answer_durably(&charged, &mut durable, rejected());
    assert_eq!(failing.phase, Phase::Compensating { step: 2 });
    assert_eq!(durable, failing, "a decision to compensate is durable");
}

#[test]
fn a_recovered_state_counts_every_later_step_as_possibly_attempted() {
    let start = SagaState::new(DEF);
    let recovered = start.recovered();
    assert!(recovered.steps.iter().all(|s| s.attempted));
    assert_eq!(recovered.phase, start.phase);
    assert_eq!(recovered.next_command(), start.next_command());
    assert_eq!(recovered.recovered(), recovered, "idempotent");

    let at_charge = run([ok()]);
    let recovered = at_charge.recovered();
    assert!(recovered.steps.iter().all(|s| s.attempted));

    // Compensating: the decision was durable and knows what to undo.
    let compensating = run([ok(), rejected()]);
    assert_eq!(compensating.recovered(), compensating);
    let done = run([ok(), ok(), ok()]);
    assert_eq!(done.recovered(), done);
}

/// The case the design's "compensate every attempted step" missed when all
/// databases shared one WAL: the saga's start is durable, Reserve and
/// Charge succeed (committed without a flush), Ship is sent, the database
/// loses those two writes, Reserve's replay fails, the client cancels.
#[test]
fn a_cancel_after_a_lost_tail_refunds_the_charge_and_cancels_the_shipment() {
    let start = SagaState::new(DEF);
    let mut durable = start.clone();
    let reserved = answer_durably(&start, &mut durable, ok());
    let shipping = answer_durably(&reserved, &mut durable, ok());
    assert_eq!(shipping.status(DEF), Status::Shipping);
    assert_eq!(durable, start, "only the start reached the disk");

    // The database crashes; the driver reads back what survived.
    let resumed = durable.recovered();
    // Ship's reply arrives late (timed out), for a step the state is not
    // running: absorbed, and the step counts as attempted.
    let resumed = resumed
        .apply(
            DEF,
            &POLICY,
            &Event::CallFinished {
                step: 2,
                kind: Kind::Action,
                attempt: 1,
                outcome: transient(),
            },
        )
        .unwrap();
    assert_eq!(resumed.phase, Phase::Pending);
    // Reserve's replay fails; the client cancels while it waits to retry.
    let waiting = answer(&resumed, transient());
    assert!(waiting.waiting_retry);
    let mut state = cancel(&waiting).unwrap();
    let mut compensated = Vec::new();
    while let Some(Command::Call {
        step,
        kind: Kind::Compensation,
        ..
    }) = state.next_command()
    {
        compensated.push(step);
        state = answer(&state, ok());
    }
    assert_eq!(state.phase, Phase::Cancelled);
    assert_eq!(compensated, [2, 1, 0], "cancel shipment, refund, release");
}

#[test]
fn a_late_action_reply_marks_its_step_attempted_until_the_saga_ends() {
    let late = |state: &SagaState, step| {
        state
            .apply(
                DEF,
                &POLICY,
                &Event::CallFinished {
                    step,
                    kind: Kind::Action,
                    attempt: 1,
                    outcome: ok(),
                },
            )
            .unwrap()
    };
    let pending = SagaState::new(DEF);
    let marked = late(&pending, 1);
    assert!(marked.steps[1].attempted);
    assert!(!marked.steps[1].succeeded, "a late success drives nothing");
    assert_eq!(marked.phase, Phase::Pending);
    let cancelled = cancel(&answer(&run([transient()]), transient())).unwrap();
    let ended = std::iter::successors(Some(cancelled), |s| {
        s.next_command().map(|_| answer(s, ok()))
    })
    .last()
    .unwrap();
    assert_eq!(ended.phase, Phase::Cancelled);
    assert_eq!(late(&ended, 1), ended, "terminal states stay as they are");
}

#[derive(Debug, Clone)]
enum Fault {
    Answer(u8),
    Cancel,
    Abort,
    /// The database loses everything not yet flushed; the saga resumes from
    /// what survived.
    Crash,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        8 => (0u8..3).prop_map(Fault::Answer),
        1 => Just(Fault::Cancel),
        1 => Just(Fault::Abort),
        2 => Just(Fault::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the database loses of its asynchronously committed tail, a
    /// saga that does not complete sends the compensation of every action
    /// it ever sent, and one that completes sends none.
    #[test]
    fn lost_progress_never_leaves_an_action_uncompensated(
        faults in proptest::collection::vec(fault(), 0..60),
    ) {
        let mut state = SagaState::new(DEF);
        let mut durable = state.clone();
        let mut sent: Vec<usize> = vec![0];
        let mut compensated: Vec<usize> = Vec::new();
        let mut step_once = |state: &SagaState, durable: &mut SagaState, outcome| {
            match due(state) {
                Some((step, kind, _)) => {
                    match kind {
                        Kind::Action => sent.push(step),
                        Kind::Compensation => compensated.push(step),
                    }
                    answer_durably(state, durable, outcome)
                }
                None => state.clone(),
            }
        };
        for fault in faults.iter().chain(std::iter::repeat_n(&Fault::Answer(0), 40)) {
            state = match fault {
                Fault::Answer(0) => step_once(&state, &mut durable, ok()),
                Fault::Answer(1) => step_once(&state, &mut durable, transient()),
                Fault::Answer(_) => step_once(&state, &mut durable, rejected()),
                // Requests are committed durably.
                Fault::Cancel => cancel(&state).unwrap_or(state.clone()),
                Fault::Abort => state
                    .apply(DEF, &POLICY, &Event::OperatorAbort { reason: "x".into() })
                    .unwrap_or(state.clone()),
                Fault::Crash => durable.recovered(),
            };
            if matches!(fault, Fault::Cancel | Fault::Abort) {
                durable = state.clone();
            }
            if let Phase::NeedsAttention { .. } = state.phase {
                state = state.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
                durable = state.clone();
            }
        }
        let status = state.status(DEF);
        prop_assert!(status.is_terminal(), "ended {status:?}");
        if status == Status::Completed {
            prop_assert!(compensated.is_empty(), "compensated {compensated:?}");
        } else {
            for step in &sent {
                prop_assert!(compensated.contains(step),
                    "action {step} sent ({sent:?}) but never compensated ({compensated:?})");
            }
        }
    }
}

// ---- the backoff counts from the operator's retry ----

#[test]
fn the_backoff_after_an_operator_retry_counts_from_the_retry() {
    // Two charge failures: the next backoff counts both.
    let state = run([ok(), transient(), transient()]);
    assert!(state.waiting_retry);
    assert_eq!(state.failures_since_retry(), 2);
    // The retry sends the next attempt at once; its failure is the first
    // the backoff counts, so the delay starts again from the base.
    let state = state.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
    assert_eq!(state.failures_since_retry(), 0);
    let state = answer(&state, transient());
    assert!(state.waiting_retry);
    assert_eq!(state.current_attempts(), 3);
    assert_eq!(state.failures_since_retry(), 1);
    let state = answer(&state, transient());
    assert_eq!(state.failures_since_retry(), 2);
}

#[test]
fn a_compensation_counts_its_backoff_from_its_own_start_and_from_a_retry() {
    // A rejected charge: the refund starts with no failure counted, though
    // the charge failed before.
    let state = run([ok(), transient(), rejected()]);
    assert_eq!(state.status(DEF), Status::Compensating);
    assert_eq!(state.failures_since_retry(), 0);
    let state = answer(&state, transient());
    assert_eq!(state.failures_since_retry(), 1);
    // Budget spent (2): NEEDS_ATTENTION; the retry forgives both.
    let state = answer(&state, transient());
    assert_eq!(state.status(DEF), Status::NeedsAttention);
    let state = state.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
    assert_eq!(state.failures_since_retry(), 0);
    let state = answer(&state, transient());
    assert!(state.waiting_retry);
    assert_eq!(state.failures_since_retry(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever happened before, a retry followed by a transient failure
    /// backs off as after a first failure; and the count never exceeds the
    /// budget of the kind that runs.
    #[test]
    fn a_retry_restarts_the_backoff(
        inputs in proptest::collection::vec(input(), 0..60),
    ) {
        let mut state = SagaState::new(DEF);
        for input in &inputs {
            state = match input {
                Input::Answer(n) if due(&state).is_some() => answer(&state, match n {
                    0 => ok(),
                    1 => transient(),
                    _ => rejected(),
                }),
                Input::Answer(_) => state.clone(),
                Input::Cancel => cancel(&state).unwrap_or(state.clone()),
                Input::Retry => state
                    .apply(DEF, &POLICY, &Event::OperatorRetry)
                    .unwrap_or(state.clone()),
                Input::Abort => state
                    .apply(DEF, &POLICY, &Event::OperatorAbort { reason: "x".into() })
                    .unwrap_or(state.clone()),
            };
            let budget = match state.current() {
                Some((_, Kind::Action)) => POLICY.action_attempts,
                _ => POLICY.compensation_attempts,
            };
            prop_assert!(state.failures_since_retry() <= budget,
                "{} failures counted, budget {budget}: {state:?}", state.failures_since_retry());
        }
        let Ok(retried) = state.apply(DEF, &POLICY, &Event::OperatorRetry) else {
            return Ok(()); // settled: nothing to retry
        };
        prop_assert_eq!(retried.failures_since_retry(), 0);
        if due(&retried).is_none() {
            return Ok(());
        }
        let failed = answer(&retried, transient());
        if failed.waiting_retry {
            prop_assert_eq!(failed.failures_since_retry(), 1, "{:?}", failed);
        }
    }
}

#[test]
fn a_cancel_stays_requested_when_its_compensation_needs_an_operator_and_an_abort_is_not_one() {
    // Reserved, then charging waits for a retry: the cancel compensates at
    // once, and the refund fails until its budget is spent.
    let state = cancel(&run([ok(), transient()])).unwrap();
    assert!(state.cancel_requested());
    let state = answer(&answer(&state, transient()), transient());
    assert_eq!(state.status(DEF), Status::NeedsAttention);
    assert!(state.cancel_requested(), "{state:?}");

    let aborted = run([ok(), transient()])
        .apply(
            DEF,
            &POLICY,
            &Event::OperatorAbort {
                reason: "fraud".into(),
            },
        )
        .unwrap();
    assert!(!aborted.cancel_requested());
    assert!(!SagaState::new(DEF).cancel_requested());
}

/// Four steps, the pivot the third: the fourth only goes forward.
static PIVOT_IN_THE_MIDDLE: Definition = Definition {
    name: "pivoted",
    version: 1,
    steps: &[
        StepDef {
            name: "a",
            status: Status::ReservingInventory,
            participant: "pa",
            action: "A",
            compensation: "undo A",
        },
        StepDef {
            name: "b",
            status: Status::ChargingPayment,
            participant: "pb",
            action: "B",
            compensation: "undo B",
        },
        StepDef {
            name: "pivot",
            status: Status::Shipping,
            participant: "pc",
            action: "P",
            compensation: "undo P",
        },
        StepDef {
            name: "after",
            status: Status::Shipping,
            participant: "pd",
            action: "D",
            compensation: "undo D",
        },
    ],
    pivot: 2,
};

fn answer_in(definition: &Definition, state: &SagaState, outcome: Outcome) -> SagaState {
    let (step, kind, attempt) = due(state).expect("a call is due");
    state
        .apply(
            definition,
            &POLICY,
            &Event::CallFinished {
                step,
                kind,
                attempt,
                outcome,
            },
        )
        .unwrap()
}

#[test]
fn the_pivot_is_the_definitions_field_and_steps_after_it_only_go_forward() {
    let def = &PIVOT_IN_THE_MIDDLE;
    let mut state = SagaState::new(def);
    for _ in 0..2 {
        state = answer_in(def, &state, ok());
    }
    // A cancel while the pivot is in flight is recorded, then comes too
    // late: the pivot succeeds and the saga goes on to the step after it.
    state = state
        .apply(def, &POLICY, &Event::CancelRequested { reason: None })
        .unwrap();
    assert_eq!(state.status(def), Status::Cancelling);
    state = answer_in(def, &state, ok());
    assert_eq!(state.phase, Phase::Forward { step: 3 });
    assert_eq!(state.stop_requested, None);
    assert_eq!(state.status(def), Status::Shipping);
    // Past the pivot: no cancel, no abort, and failures of every kind are
    // retried beyond the action budget, never compensated.
    assert_eq!(
        state.apply(def, &POLICY, &Event::CancelRequested { reason: None }),
        Err(Error::PastPivot("pivot"))
    );
    for _ in 0..(POLICY.action_attempts * 2) {
        state = answer_in(def, &state, rejected());
        assert_eq!(state.phase, Phase::Forward { step: 3 });
        assert!(state.waiting_retry);
        state = answer_in(def, &state, transient());
    }
    state = answer_in(def, &state, ok());
    assert_eq!(state.phase, Phase::Completed);
    assert!(state.steps.iter().all(|s| !s.compensated));
}

#[test]
fn a_pivot_failure_before_it_succeeded_still_compensates() {
    let def = &PIVOT_IN_THE_MIDDLE;
    let mut state = SagaState::new(def);
    for _ in 0..2 {
        state = answer_in(def, &state, ok());
    }
    state = answer_in(def, &state, rejected());
    assert_eq!(state.phase, Phase::Compensating { step: 2 });
}

#[test]
fn a_state_that_does_not_fit_its_definition_is_refused_and_never_panics() {
    let four = SagaState::new(&PIVOT_IN_THE_MIDDLE);
    assert!(four.fits(&PIVOT_IN_THE_MIDDLE).is_ok());
    let error = four.fits(DEF).unwrap_err();
    assert!(
        error.contains("it has 4 steps, the definition 3"),
        "{error}"
    );
    // Applied anyway: nothing panics, whatever the step numbers.
    let mut at_four = four.clone();
    at_four.phase = Phase::Forward { step: 3 };
    assert!(at_four.fits(DEF).is_err());
    assert_eq!(at_four.status(DEF), Status::NeedsAttention);
    for step in [3, 7, usize::MAX - 1] {
        for kind in [Kind::Action, Kind::Compensation] {
            let event = Event::CallFinished {
                step,
                kind,
                attempt: 1,
                outcome: ok(),
            };
            let _ = at_four.apply(DEF, &POLICY, &event);
            let _ = four.apply(DEF, &POLICY, &event);
        }
    }
    let _ = at_four.apply(DEF, &POLICY, &Event::OperatorRetry);
    let _ = at_four.failures_since_retry();
    let _ = at_four.recovered();
}

#[test]
fn a_held_saga_needs_attention_runs_nothing_and_a_retry_resumes_it_where_it_was() {
    let charging = answer(&SagaState::new(DEF), ok());
    let reason = "saga definition order v3 is not known to this replica (it knows v1, v2)";
    let held = charging.hold(reason.to_owned());
    assert_eq!(held.status(DEF), Status::NeedsAttention);
    assert_eq!(held.failure_reason.as_deref(), Some(reason));
    assert_eq!(held.next_command(), None);
    assert_eq!(held.phase, charging.phase, "the phase is kept");
    assert_eq!(held.hold("another".into()), held, "set aside once");
    assert!(matches!(cancel(&held), Err(Error::Held(_))));
    // The stored JSON of a saga never held has no such field; old rows
    // read back as not held.
    let json = serde_json::to_value(&charging).unwrap();
    assert!(json.get("held").is_none());
    let back: SagaState = serde_json::from_value(json).unwrap();
    assert_eq!(back, charging);
    let resumed = held.apply(DEF, &POLICY, &Event::OperatorRetry).unwrap();
    assert_eq!(resumed.held, None);
    assert_eq!(resumed.failure_reason, None);
    assert_eq!(resumed.phase, Phase::Forward { step: 1 });
    assert_eq!(
        resumed.next_command(),
        Some(Command::Call {
            step: 1,
            kind: Kind::Action,
            attempt: 1
        })
    );
}
