//! The saga state machine: a pure transducer `(state, event) -> transition`.
//! No I/O, no clock, no randomness, no async: the executor feeds it events
//! (call outcomes, cancel and operator requests) and carries out the
//! commands it returns, after the new state is durable.
//!
//! The machine is generic over a [`Definition`]: a saga type's name and
//! version, its steps in forward order (each with its journal name, its
//! status label, its participant, its action and its compensation), and
//! which step is the pivot (a field: `pivot`, not "the last one"). The order
//! saga is [`ORDER_SAGA`], `order` v1: reserve → charge → ship, ship the
//! pivot and the last step. A [`Registry`] resolves the (name, version) a
//! saga row records to its definition; new sagas start under the current
//! (highest) version of their name, sagas in flight stay on theirs.
//!
//! ## The pivot, as built
//!
//! Before the pivot succeeded, a failure compensates every attempted step,
//! newest first, and a cancel or abort is honoured. When the pivot's
//! action succeeds, a cancel that was waiting for it comes too late (it is
//! dropped; the saga goes on). If the pivot is the last step the saga is
//! COMPLETED; otherwise the steps after it run forward only: any failure of
//! theirs (retryable or rejected) is retried after a backoff, without an
//! attempt budget, since nothing after the pivot can be undone (such a
//! saga shows as stuck to an operator), and a cancel or abort is refused
//! ([`Error::PastPivot`]). The saga is COMPLETED when its last step
//! succeeded.
//!
//! ## A saga this replica cannot drive
//!
//! A saga whose (name, version) the registry does not know, or whose
//! stored state does not fit its definition (another number of steps, a
//! step index beyond them), is set aside: [`SagaState::hold`] keeps its
//! phase and marks it [`SagaState::held`], which reads as NEEDS_ATTENTION
//! with the reason as its failure reason and runs nothing. An operator
//! retry, accepted only by a replica that knows the definition and on
//! which the state fits, lifts it and resumes the saga where it was.
//! No index into the steps panics: the machine reads steps with `get`.
//!
//! ## Transition table
//!
//! `k` is the step being run, `j` the step being compensated, `A(k)` its
//! action, `C(j)` its compensation, "attempted" a step whose action may have
//! been sent (step 0 counts as attempted from creation: the executor sends
//! Reserve as soon as the order is recorded, without another write).
//!
//! | phase                | event                          | next phase / command                           |
//! |----------------------|--------------------------------|------------------------------------------------|
//! | Pending, Forward(k)  | A(k) succeeded, k the last step | Completed, Finish (a pending cancel is dropped) |
//! | Pending, Forward(k)  | A(k) succeeded, k the pivot or after it | Forward(k+1), call A(k+1) (a pending cancel is dropped) |
//! | Pending, Forward(k)  | A(k) succeeded, cancel asked, k before pivot | Compensating(k), call C(k)       |
//! | Pending, Forward(k)  | A(k) succeeded                 | Forward(k+1), call A(k+1)                       |
//! | Pending, Forward(k)  | A(k) retryable, budget left, no cancel | same, retry A(k) after backoff          |
//! | Pending, Forward(k)  | A(k) retryable, budget spent   | Compensating(k), call C(k)                      |
//! | Pending, Forward(k)  | A(k) rejected                  | Compensating(k), call C(k)                      |
//! | Forward(k) past pivot| A(k) failed (retryable or rejected) | same, retry A(k) after backoff, no budget  |
//! | Forward(k) past pivot| cancel / abort                 | refused (`Error::PastPivot`)                    |
//! | Pending, Forward(k)  | cancel, call in flight         | same phase, cancel recorded (CANCELLING)        |
//! | Pending, Forward(k)  | cancel, waiting for a retry    | Compensating(k), call C(k)                      |
//! | Compensating(j)      | C(j) succeeded                 | Compensating(next attempted below j), or Failed / Cancelled, Finish |
//! | Compensating(j)      | C(j) failed, budget left       | same, retry C(j) after backoff                  |
//! | Compensating(j)      | C(j) failed, budget spent      | NeedsAttention, Finish                          |
//! | NeedsAttention       | operator retry                 | Compensating(j), fresh budget, call C(j)        |
//! | Pending, Forward(k)  | operator retry (retry waiting) | same, fresh budget, call A(k) now              |
//! | before pivot         | operator abort                 | as cancel, but ends Failed                      |
//! | Completed            | cancel / abort                 | refused (`Error::AlreadyCompleted`)             |
//! | any, held            | cancel / abort                 | refused (`Error::Held`)                         |
//! | any, held            | operator retry                 | held lifted, then as the row for its phase      |
//! | Failed, Cancelled    | cancel                         | unchanged (the API answers the status)          |
//! | not terminal         | late outcome of an action      | unchanged but for: its step counts as attempted |
//! | any terminal         | late call outcome              | unchanged (absorbed; journalled by the executor)|
//!
//! Anything not listed is an explicit [`Error`].
//!
//! ## What survives a database that loses its tail
//!
//! Forward progress is committed without waiting for the flush
//! ([`SagaState::must_be_durable`]): a state read back after a crash may
//! predate the writes that marked later steps attempted, while their calls
//! went out. The executor therefore decides only on
//! [`SagaState::recovered`] copies of what it reads, in which every step
//! after the current forward step counts as attempted, and an abort sends
//! their (tombstone-safe) compensations too. Only the driver that wrote
//! every transition since the saga's durable start trusts its own copy.

pub mod invariants;
mod machine;
mod registry;
#[cfg(test)]
mod tests;

pub use machine::*;
pub use registry::Registry;
