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

/// Applies the outcome of the call the state asks for next.
fn answer(state: &SagaState, outcome: Outcome) -> SagaState {
    let (step, kind, attempt) = match state.next_command().expect("a call is due") {
        Command::Call {
            step,
            kind,
            attempt,
        }
        | Command::RetryLater {
            step,
            kind,
            attempt,
        } => (step, kind, attempt),
    };
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
        let Some(
            Command::Call {
                step,
                kind,
                attempt,
            }
            | Command::RetryLater {
                step,
                kind,
                attempt,
            },
        ) = state.next_command()
        else {
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
