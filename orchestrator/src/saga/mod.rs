//! The saga state machine: a pure transducer `(state, event) -> transition`.
//! No I/O, no clock, no randomness, no async: the executor feeds it events
//! (call outcomes, cancel and operator requests) and carries out the
//! commands it returns, after the new state is durable.
//!
//! The machine is generic over a [`Definition`], a list of steps; the order
//! saga is [`ORDER_SAGA`] (reserve → charge → ship, ship the pivot).
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
//! | Pending, Forward(k)  | A(k) succeeded, k last or pivot reached and last | Completed, Finish            |
//! | Pending, Forward(k)  | A(k) succeeded, cancel asked, k before pivot | Compensating(k), call C(k)       |
//! | Pending, Forward(k)  | A(k) succeeded                 | Forward(k+1), call A(k+1)                       |
//! | Pending, Forward(k)  | A(k) retryable, budget left, no cancel | same, retry A(k) after backoff          |
//! | Pending, Forward(k)  | A(k) retryable, budget spent   | Compensating(k), call C(k)                      |
//! | Pending, Forward(k)  | A(k) rejected                  | Compensating(k), call C(k)                      |
//! | Forward(k) past pivot| A(k) failed                    | retry A(k) forever (rejected: NeedsAttention)   |
//! | Pending, Forward(k)  | cancel, call in flight         | same phase, cancel recorded (CANCELLING)        |
//! | Pending, Forward(k)  | cancel, waiting for a retry    | Compensating(k), call C(k)                      |
//! | Compensating(j)      | C(j) succeeded                 | Compensating(next attempted below j), or Failed / Cancelled, Finish |
//! | Compensating(j)      | C(j) failed, budget left       | same, retry C(j) after backoff                  |
//! | Compensating(j)      | C(j) failed, budget spent      | NeedsAttention, Finish                          |
//! | NeedsAttention       | operator retry                 | Compensating(j), fresh budget, call C(j)        |
//! | Pending, Forward(k)  | operator retry (retry waiting) | same, fresh budget, call A(k) now              |
//! | before pivot         | operator abort                 | as cancel, but ends Failed                      |
//! | Completed            | cancel / abort                 | refused (`Error::AlreadyCompleted`)             |
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

mod machine;
mod registry;
#[cfg(test)]
mod tests;

pub use machine::*;
pub use registry::Registry;
