//! The three participants of the order saga: inventory (Reserve / Release),
//! payment (Charge / Refund) and fulfillment (Ship / CancelShipment).
//!
//! Layout (the plumbing they share with the orchestrator, such as domain
//! types, group commit, pools and listening, is in the `common` crate):
//! - [`inventory`], [`payment`], [`fulfillment`]: each a store trait with a
//!   PostgreSQL and a SQLite implementation (the SQL), and its gRPC face.
//! - `fast_path`: what the PostgreSQL stores share around their batches.
//! - `record`: the per-saga idempotency record and its tombstones.
//! - [`fault`]: fault injection (registry, tower layer, control service).
//! - [`rpc_metrics`]: a tower layer recording each RPC's latency and code.
//! - [`server`]: the [`Participant`]s, their databases ([`Backend`], chosen
//!   by the URL's scheme) and migrations, and serving on a listener.
//!
//! Every action is idempotent per saga_id and every compensation is safe to
//! run before its action: see the module docs of the stores.

mod fast_path;
pub mod fault;
pub mod fulfillment;
pub mod inventory;
pub mod payment;
mod record;
pub mod rpc_metrics;
pub mod server;

pub use server::{Backend, Participant, ServeOptions, connect, serve, serve_with_http};
