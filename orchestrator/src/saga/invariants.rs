//! What every reachable saga state and every transition keep, as checks
//! that name the first broken rule. The machine is built to keep them; the
//! property tests and the `saga_machine` fuzz target drive it with random
//! events (late, duplicated, for steps that do not exist, cancels, operator
//! retries and aborts, reads back after a lost tail, holds) and check
//! every state they reach.
//!
//! The rules, for a state of a definition it fits:
//!
//! - a step succeeded or was compensated only if its action was attempted;
//! - the step a phase names exists, and a compensating or NEEDS_ATTENTION
//!   step was attempted and is not compensated yet;
//! - COMPLETED: every step succeeded, none compensated, no stop pending, no
//!   failure reason;
//! - FAILED or CANCELLED: every attempted step compensated, a cause (a
//!   cancel for CANCELLED, none for FAILED) and a failure reason;
//! - once the pivot succeeded, nothing is compensated, ever;
//! - compensating or NEEDS_ATTENTION: a cause, no stop pending;
//! - a retry waits only in a forward or compensating phase;
//! - the next command is for the current step, attempt one past those
//!   recorded, and a compensation only of an attempted step; none once
//!   settled or held;
//!
//! and for a transition that was accepted:
//!
//! - what a step did (attempted, succeeded, compensated) is never undone;
//! - a finished saga (COMPLETED, FAILED, CANCELLED), not held, never
//!   changes;
//! - an outcome the state was not waiting for changes at most which steps
//!   count as attempted.

use super::{Cause, Command, Definition, Event, Kind, Phase, SagaState, Status};

/// Checks the rules every reachable state of `definition` keeps (see the
/// module); the first broken one is the error.
pub fn check(definition: &Definition, state: &SagaState) -> Result<(), String> {
    let steps = &state.steps;
    if steps.len() != definition.steps.len() {
        return Err(format!(
            "{} step states for {} steps",
            steps.len(),
            definition.steps.len()
        ));
    }
    for (index, step) in steps.iter().enumerate() {
        if (step.succeeded || step.compensated) && !step.attempted {
            return Err(format!(
                "step {index} has an outcome but was never attempted"
            ));
        }
    }
    let undone = |step: usize| {
        steps
            .get(step)
            .is_some_and(|s| s.attempted && !s.compensated)
    };
    match state.phase {
        Phase::Forward { step } if step >= steps.len() => {
            return Err(format!("forward at step {step} of {}", steps.len()));
        }
        Phase::Compensating { step } | Phase::NeedsAttention { step } if !undone(step) => {
            return Err(format!(
                "{:?} at step {step}, which is not attempted and uncompensated",
                state.phase
            ));
        }
        Phase::Completed => {
            if !steps.iter().all(|s| s.succeeded && !s.compensated) {
                return Err("COMPLETED with a step not succeeded or compensated".into());
            }
            if state.stop_requested.is_some() || state.failure_reason.is_some() {
                return Err("COMPLETED with a stop pending or a failure reason".into());
            }
        }
        Phase::Failed | Phase::Cancelled => {
            if let Some(index) = steps.iter().position(|s| s.attempted && !s.compensated) {
                return Err(format!(
                    "{:?} with step {index} attempted and not compensated",
                    state.phase
                ));
            }
            let cancelled = state.phase == Phase::Cancelled;
            if state.cause.is_none() || (state.cause == Some(Cause::Cancel)) != cancelled {
                return Err(format!("{:?} with cause {:?}", state.phase, state.cause));
            }
            if state.failure_reason.is_none() {
                return Err(format!("{:?} without a failure reason", state.phase));
            }
        }
        _ => {}
    }
    let compensates = matches!(
        state.phase,
        Phase::Compensating { .. } | Phase::NeedsAttention { .. }
    );
    let pivot_succeeded = steps.get(definition.pivot).is_some_and(|s| s.succeeded);
    if pivot_succeeded
        && (compensates
            || matches!(state.phase, Phase::Failed | Phase::Cancelled)
            || steps.iter().any(|s| s.compensated))
    {
        return Err(format!("{:?} after the pivot succeeded", state.phase));
    }
    if compensates && (state.cause.is_none() || state.stop_requested.is_some()) {
        return Err(format!(
            "{:?} with cause {:?} and stop {:?}",
            state.phase, state.cause, state.stop_requested
        ));
    }
    if state.waiting_retry
        && !matches!(
            state.phase,
            Phase::Forward { .. } | Phase::Compensating { .. }
        )
    {
        return Err(format!("a retry waits in {:?}", state.phase));
    }
    check_next_command(definition, state)
}

fn check_next_command(definition: &Definition, state: &SagaState) -> Result<(), String> {
    let status = state.status(definition);
    let command = state.next_command();
    let settled = status.is_terminal() || status == Status::NeedsAttention;
    let command = match command {
        None if settled => return Ok(()),
        None => return Err(format!("{status:?} but nothing to do")),
        Some(command) if settled => return Err(format!("{status:?} but {command:?} is due")),
        Some(command) => command,
    };
    let (step, kind, attempt) = command.call();
    if state.current() != Some((step, kind)) {
        return Err(format!("{command:?} is not the current step"));
    }
    if attempt != state.current_attempts() + 1 {
        return Err(format!(
            "{command:?} after {} recorded attempts",
            state.current_attempts()
        ));
    }
    if kind == Kind::Compensation && !state.steps.get(step).is_some_and(|s| s.attempted) {
        return Err(format!("{command:?} undoes a step never attempted"));
    }
    if matches!(command, Command::RetryLater { .. }) != state.waiting_retry {
        return Err(format!(
            "{command:?} with waiting_retry {}",
            state.waiting_retry
        ));
    }
    Ok(())
}

/// Checks an accepted transition `before` → `after` by `event` (see the
/// module), then `after` itself.
pub fn check_transition(
    definition: &Definition,
    before: &SagaState,
    event: &Event,
    after: &SagaState,
) -> Result<(), String> {
    for (index, (was, is)) in before.steps.iter().zip(&after.steps).enumerate() {
        if (was.attempted && !is.attempted)
            || (was.succeeded && !is.succeeded)
            || (was.compensated && !is.compensated)
        {
            return Err(format!("{event:?} undid what step {index} did"));
        }
    }
    let finished = matches!(
        before.phase,
        Phase::Completed | Phase::Failed | Phase::Cancelled
    );
    if finished && before.held.is_none() && after != before {
        return Err(format!("{event:?} changed a {:?} saga", before.phase));
    }
    if let Event::CallFinished {
        step,
        kind,
        attempt,
        ..
    } = event
        && !before.awaits(*step, *kind, *attempt)
    {
        let mut only_attempted = after.clone();
        for (step, was) in only_attempted.steps.iter_mut().zip(&before.steps) {
            step.attempted = was.attempted;
        }
        if only_attempted != *before {
            return Err(format!(
                "{event:?}, not awaited, changed more than attempts"
            ));
        }
    }
    check(definition, after)
}
