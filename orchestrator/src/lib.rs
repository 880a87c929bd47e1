//! The saga orchestrator for orders.
//!
//! Layout (the plumbing it shares with the participants is in the `common`
//! crate; the admin CLI is the `sagactl` crate):
//! - [`saga`]: the pure state machine (no I/O, no clock).
//! - [`store`]: saga rows and their journal, behind a trait; PostgreSQL and SQLite.
//! - [`executor`]: drives sagas: claims, calls, records, retries, leases, recovery.
//! - [`clients`]: the participant clients, one RPC per step, `Status` to outcome.
//! - [`api`]: `saga.v1.OrderService`, parsing at the edge.
//! - [`admin`]: `saga.v1.AdminService` and its bearer-token interceptor.
//! - [`reconcile`]: sagas against the participants' records (merge join).
//! - [`config`]: flags with env fallbacks, validated once into `Settings`.
//! - [`server`]: connect and migrate the store, serve until shutdown.
//! - [`telemetry`]: `/healthz` and `/metrics` on `--http-listen`.
//! - `dev` (feature `dev`): the embedded mode, every service in one process.
//! - [`error`]: the one error type and its mapping to `tonic::Status`.

pub mod admin;
pub mod api;
pub mod clients;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod error;
pub mod executor;
pub mod reconcile;
pub mod saga;
pub mod server;
pub mod store;
pub mod telemetry;

pub use error::Error;
