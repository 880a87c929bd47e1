//! The bodies of the fuzz targets (`fuzz/fuzz_targets/`), kept here so
//! that the test suite builds them and runs them over the seed corpus and
//! the property tests: each panics, naming what broke, when the code under
//! test disagrees with its contract.
//!
//! - [`place_order`], [`reserve`], [`charge`], [`ship`]: the bytes are
//!   decoded as the request the server's gRPC codec would decode (a
//!   malformed message must be an error, never a panic), then the server's
//!   own validation must accept it exactly when [`crate::contract`] says
//!   so, keep what it accepted unchanged, and refuse with
//!   INVALID_ARGUMENT. PlaceOrder's bytes also carry a `traceparent`
//!   header, checked against the W3C form.
//! - [`saga_machine`]: the bytes are a sequence of events for the saga
//!   machine; it must never panic and every state it reaches keeps
//!   `orchestrator::saga::invariants`.

use common::domain::{Id, Items};
use prost::Message;
use tonic::{Code, Status};

use orchestrator::api::{ValidOrder, validate_place_order};
use orchestrator::saga::{
    Definition, Event, Kind, ORDER_SAGA, Outcome, Policy, SagaState, StepDef, invariants,
};
use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use proto::saga::v1 as saga;

use crate::contract;

/// What one request's check found: whether the request was accepted (the
/// checks agree with the contract either way).
pub type Checked = Result<bool, String>;

/// The fuzz target for PlaceOrder: `[n, traceparent (n bytes), message]`.
pub fn place_order(data: &[u8]) {
    let (header, message) = match data.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n).min(rest.len())),
        None => (&[][..], data),
    };
    if let Ok(header) = std::str::from_utf8(header)
        && let Err(broken) = check_traceparent(header)
    {
        panic!("{broken}");
    }
    if let Ok(request) = saga::PlaceOrderRequest::decode(message) {
        check_place_order(request).unwrap_or_else(|broken| panic!("{broken}"));
    }
}

/// The fuzz target for inventory's Reserve.
pub fn reserve(data: &[u8]) {
    if let Ok(request) = inventory::ReserveRequest::decode(data) {
        check_reserve(request).unwrap_or_else(|broken| panic!("{broken}"));
    }
}

/// The fuzz target for payment's Charge.
pub fn charge(data: &[u8]) {
    if let Ok(request) = payment::ChargeRequest::decode(data) {
        check_charge(request).unwrap_or_else(|broken| panic!("{broken}"));
    }
}

/// The fuzz target for fulfillment's Ship.
pub fn ship(data: &[u8]) {
    if let Ok(request) = fulfillment::ShipRequest::decode(data) {
        check_ship(request).unwrap_or_else(|broken| panic!("{broken}"));
    }
}

/// Checks the orchestrator's PlaceOrder validation on `request`.
pub fn check_place_order(request: saga::PlaceOrderRequest) -> Checked {
    check_place_order_with(request, |request| {
        validate_place_order(request).map_err(Status::from)
    })
}

/// Checks a PlaceOrder validation `validate` on `request`: the
/// orchestrator's, or a wrong one that a test feeds to show the check
/// catches it.
pub fn check_place_order_with(
    request: saga::PlaceOrderRequest,
    validate: impl FnOnce(saga::PlaceOrderRequest) -> Result<ValidOrder, Status>,
) -> Checked {
    let expected = contract::place_order(&request);
    let answer = validate(request.clone());
    agree("PlaceOrder", &request, expected, &answer)?;
    if let Ok(order) = answer {
        let given: Vec<(&str, i32)> = request
            .items
            .iter()
            .map(|i| (i.product_id.as_str(), i.quantity))
            .collect();
        let kept: Vec<(&str, i32)> = order
            .items
            .iter()
            .map(|i| (i.product_id.as_str(), i.quantity))
            .collect();
        let key = (!request.idempotency_key.is_empty()).then_some(&request.idempotency_key);
        if order.customer_id != request.customer_id
            || kept != given
            || order.idempotency_key.as_ref() != key
        {
            return Err(format!(
                "PlaceOrder accepted {request:?} but changed it into {order:?}"
            ));
        }
    }
    Ok(expected)
}

/// Checks inventory's Reserve validation on `request`.
pub fn check_reserve(request: inventory::ReserveRequest) -> Checked {
    let expected = contract::reserve(&request);
    let answer = participants::inventory::validate_reserve(request.clone()).map_err(Status::from);
    let given = request
        .items
        .iter()
        .map(|i| (i.product_id.as_str(), i.quantity));
    saga_items(
        "Reserve",
        &request,
        &request.saga_id,
        given,
        expected,
        answer,
    )
}

/// Checks payment's Charge validation on `request`.
pub fn check_charge(request: payment::ChargeRequest) -> Checked {
    let expected = contract::charge(&request);
    let answer = participants::payment::validate_charge(request.clone()).map_err(Status::from);
    agree("Charge", &request, expected, &answer)?;
    if let Ok((saga_id, customer_id, amount)) = answer
        && (saga_id.as_str() != request.saga_id
            || customer_id.as_str() != request.customer_id
            || amount.get() != request.amount_cents)
    {
        return Err(format!("Charge changed what it accepted: {request:?}"));
    }
    Ok(expected)
}

/// Checks fulfillment's Ship validation on `request`.
pub fn check_ship(request: fulfillment::ShipRequest) -> Checked {
    let expected = contract::ship(&request);
    let answer = participants::fulfillment::validate_ship(request.clone()).map_err(Status::from);
    let given = request
        .items
        .iter()
        .map(|i| (i.product_id.as_str(), i.quantity));
    saga_items("Ship", &request, &request.saga_id, given, expected, answer)
}

/// The check of a request for a saga's items (Reserve, Ship): agreed with
/// the contract, and what was accepted kept as given.
fn saga_items<'a>(
    what: &str,
    request: &impl std::fmt::Debug,
    saga_id: &str,
    given: impl Iterator<Item = (&'a str, i32)>,
    expected: bool,
    answer: Result<(Id, Items), Status>,
) -> Checked {
    agree(what, request, expected, &answer)?;
    if let Ok((kept_saga, items)) = answer {
        let kept: Vec<(&str, i32)> = items
            .as_slice()
            .iter()
            .map(|i| (i.product_id.as_str(), i.quantity.get()))
            .collect();
        if kept_saga.as_str() != saga_id || kept != given.collect::<Vec<_>>() {
            return Err(format!("{what} changed what it accepted: {request:?}"));
        }
    }
    Ok(expected)
}

/// Checks `common::telemetry::trace_id_of` on a `traceparent` header.
pub fn check_traceparent(header: &str) -> Checked {
    let expected = contract::traceparent(header);
    let parsed = common::telemetry::trace_id_of(header);
    if parsed != expected {
        return Err(format!(
            "traceparent {header:?}: parsed {parsed:?}, the W3C form says {expected:?}"
        ));
    }
    Ok(expected.is_some())
}

/// Whether a validation's answer agrees with the contract: accepted
/// exactly when expected, and otherwise refused with INVALID_ARGUMENT and
/// a message.
fn agree<T>(
    what: &str,
    request: &impl std::fmt::Debug,
    expected: bool,
    answer: &Result<T, Status>,
) -> Result<(), String> {
    match answer {
        Ok(_) if expected => Ok(()),
        Ok(_) => Err(format!(
            "{what} accepted {request:?}, which the contract refuses"
        )),
        Err(status) if expected => Err(format!(
            "{what} refused {request:?}, which the contract accepts: {status:?}"
        )),
        Err(status) if status.code() != Code::InvalidArgument || status.message().is_empty() => {
            Err(format!(
                "{what} refused {request:?} with {status:?}, not INVALID_ARGUMENT and a message"
            ))
        }
        Err(_) => Ok(()),
    }
}

// ---- the saga machine ----

/// A saga of four steps whose pivot is the second: two steps run forward
/// only after it.
pub const PIVOT_IN_THE_MIDDLE: Definition = Definition {
    name: "fuzz",
    version: 1,
    steps: &[
        step("a", "undo a"),
        step("pivot", "undo pivot"),
        step("c", "undo c"),
        step("d", "undo d"),
    ],
    pivot: 1,
};

/// A saga of one step, its pivot.
pub const ONE_STEP: Definition = Definition {
    name: "single",
    version: 1,
    steps: &[step("only", "undo only")],
    pivot: 0,
};

const fn step(action: &'static str, compensation: &'static str) -> StepDef {
    StepDef {
        name: action,
        status: orchestrator::saga::Status::ReservingInventory,
        participant: "fuzz",
        action,
        compensation,
    }
}

/// Bytes read one at a time, zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                byte
            }
            None => 0,
        }
    }

    fn outcome(&mut self) -> Outcome {
        match self.next() % 3 {
            0 => Outcome::Succeeded(vec![("out".into(), "1".into())]),
            1 => Outcome::Retryable("UNAVAILABLE".into()),
            _ => Outcome::Rejected("FAILED_PRECONDITION".into()),
        }
    }
}

/// The fuzz target for the saga machine: `[definition, action budget,
/// compensation budget, events...]`. Each event is drawn from the bytes:
/// the outcome of the due call (most often), an outcome of any call (late,
/// repeated, of a step that does not exist), a cancel, an operator retry
/// or abort, a read back after a lost tail, or a hold and its retry. At
/// the end the saga is driven to a finish with successes and retries.
pub fn saga_machine(data: &[u8]) {
    let mut bytes = Bytes(data);
    let definition: &Definition = match bytes.next() % 3 {
        0 => &ORDER_SAGA,
        1 => &PIVOT_IN_THE_MIDDLE,
        _ => &ONE_STEP,
    };
    let policy = Policy {
        action_attempts: u32::from(bytes.next() % 4) + 1,
        compensation_attempts: u32::from(bytes.next() % 4) + 1,
    };
    let mut state = SagaState::new(definition);
    let fail = |broken: String, state: &SagaState| broken_machine(definition, &broken, state);
    if let Err(broken) = invariants::check(definition, &state) {
        fail(broken, &state);
    }
    while !bytes.0.is_empty() {
        let event = match bytes.next() % 12 {
            0..=4 => match state.next_command() {
                Some(command) => {
                    let (step, kind, attempt) = command.call();
                    Event::CallFinished {
                        step,
                        kind,
                        attempt,
                        outcome: bytes.outcome(),
                    }
                }
                None => continue,
            },
            5 => Event::CallFinished {
                step: usize::from(bytes.next() % 6),
                kind: if bytes.next() % 2 == 0 {
                    Kind::Action
                } else {
                    Kind::Compensation
                },
                attempt: u32::from(bytes.next() % 6),
                outcome: bytes.outcome(),
            },
            6 => Event::CancelRequested {
                reason: match bytes.next() % 3 {
                    0 => None,
                    1 => Some(String::new()),
                    _ => Some("changed my mind".into()),
                },
            },
            7 => Event::OperatorRetry,
            8 => Event::OperatorAbort {
                reason: "by hand".into(),
            },
            9 => {
                let recovered = state.recovered();
                if recovered.recovered() != recovered {
                    fail("reading back twice is not reading back once".into(), &state);
                }
                if let Err(broken) = invariants::check(definition, &recovered) {
                    fail(format!("read back: {broken}"), &recovered);
                }
                state = recovered;
                continue;
            }
            10 => {
                check_hold(definition, &policy, &state).unwrap_or_else(|b| fail(b, &state));
                continue;
            }
            _ => {
                // The same event under a definition the state does not fit:
                // refused or absorbed, never a panic.
                let other = if std::ptr::eq(definition, &ONE_STEP) {
                    &ORDER_SAGA
                } else {
                    &ONE_STEP
                };
                if state.fits(other).is_ok() {
                    fail(format!("fits {}", other.label()), &state);
                }
                let _ = state.apply(other, &policy, &Event::OperatorRetry);
                let _ = state.apply(
                    other,
                    &policy,
                    &Event::CallFinished {
                        step: 0,
                        kind: Kind::Action,
                        attempt: 1,
                        outcome: bytes.outcome(),
                    },
                );
                continue;
            }
        };
        match state.apply(definition, &policy, &event) {
            Ok(next) => {
                if let Err(broken) = invariants::check_transition(definition, &state, &event, &next)
                {
                    fail(format!("after {event:?}: {broken}"), &state);
                }
                state = next;
            }
            Err(error) if matches!(event, Event::CallFinished { .. }) => {
                fail(format!("a call's outcome was refused: {error}"), &state);
            }
            Err(_) => {}
        }
    }
    settle(definition, &policy, state);
}

fn broken_machine(definition: &Definition, broken: &str, state: &SagaState) -> ! {
    panic!(
        "{broken}\nstate: {state:?}\ndefinition: {}",
        definition.label()
    )
}

/// A held saga needs attention, runs nothing, refuses cancel and abort,
/// and an operator retry of it does what a retry of the saga would have.
fn check_hold(definition: &Definition, policy: &Policy, state: &SagaState) -> Result<(), String> {
    let held = state.hold("definition unknown here".into());
    if held.status(definition) != orchestrator::saga::Status::NeedsAttention
        || held.next_command().is_some()
    {
        return Err("a held saga is not NEEDS_ATTENTION or has work".into());
    }
    for stop in [
        Event::CancelRequested { reason: None },
        Event::OperatorAbort { reason: "x".into() },
    ] {
        if held.apply(definition, policy, &stop).is_ok() {
            return Err(format!("a held saga accepted {stop:?}"));
        }
    }
    let lifted = held.apply(definition, policy, &Event::OperatorRetry);
    let retried = state.apply(definition, policy, &Event::OperatorRetry);
    match (lifted, retried) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(_), Err(_)) => Ok(()),
        (a, b) => Err(format!(
            "a retry of the held saga gave {a:?}, of the saga {b:?}"
        )),
    }
}

/// Answers every due call with a success (an operator retry resumes a
/// saga that needs attention) until the saga finishes; it must.
fn settle(definition: &Definition, policy: &Policy, mut state: SagaState) {
    let fail = |broken: String, state: &SagaState| broken_machine(definition, &broken, state);
    for _ in 0..100 {
        if state.status(definition) == orchestrator::saga::Status::NeedsAttention {
            state = state
                .apply(definition, policy, &Event::OperatorRetry)
                .unwrap_or_else(|e| fail(format!("retry refused: {e}"), &state));
        }
        let Some(command) = state.next_command() else {
            break;
        };
        let (step, kind, attempt) = command.call();
        let event = Event::CallFinished {
            step,
            kind,
            attempt,
            outcome: Outcome::Succeeded(Vec::new()),
        };
        let next = state
            .apply(definition, policy, &event)
            .unwrap_or_else(|e| fail(format!("{event:?} refused: {e}"), &state));
        if let Err(broken) = invariants::check_transition(definition, &state, &event, &next) {
            fail(broken, &state);
        }
        state = next;
    }
    let status = state.status(definition);
    if !status.is_terminal() {
        fail(format!("still {status:?} after 100 successes"), &state);
    }
}
