//! The three participants of the order saga: inventory (Reserve / Release),
//! payment (Charge / Refund) and fulfillment (Ship / CancelShipment).
//!
//! Layout:
//! - [`batch`]: group commit, many concurrent writes in one transaction.
//! - [`cli`]: flag parsing, logging and signal helpers for the binaries.
//! - [`domain`]: validated input types and the system's input limits.
//! - [`inventory`], [`payment`], [`fulfillment`]: each a store trait with a
//!   PostgreSQL and a SQLite implementation (the SQL), and its gRPC face.
//! - `record`: the per-saga idempotency record and its tombstones.
//! - [`listen`]: accepting connections: accept errors backed off and
//!   logged rate-limited, silent connections closed.
//! - [`fault`]: fault injection (registry, tower layer, control service).
//! - [`server`]: database connection (the [`Backend`] chosen by the URL's
//!   scheme), migrations, and serving on a listener.
//! - [`error`]: the one error type and its mapping to `tonic::Status`.
//!
//! Every action is idempotent per saga_id and every compensation is safe to
//! run before its action: see the module docs of the stores.

pub mod batch;
pub mod cli;
pub mod domain;
pub mod error;
mod fast_path;
pub mod fault;
pub mod fulfillment;
pub mod inventory;
pub mod listen;
pub mod payment;
mod record;
pub mod server;

pub use error::Error;
pub use server::{
    Backend, Participant, ServeOptions, connect, connect_pool, connect_sqlite, serve,
};
