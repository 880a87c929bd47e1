//! The saga orchestrator for orders.
//!
//! Layout (the plumbing it shares with the participants is in the `common`
//! crate; the admin CLI is the `sagactl` crate):
//! - [`saga`]: the pure state machine (no I/O, no clock), saga definitions
//!   as data (name, version, steps, pivot) and the [`saga::Registry`] of
//!   the definitions this binary knows.
//! - [`store`]: saga rows and their journal, behind a trait; PostgreSQL and
//!   SQLite; one commit plan both execute.
//! - [`executor`]: drives sagas: claims, calls, records outcomes, backoffs,
//!   leases, recovery; resolves each saga's definition from its row.
//! - [`clients`]: the participants' step adapters (one per participant, by
//!   name), the gRPC step calls, the per-participant call bound, and the
//!   record clients Reconcile uses.
//! - [`api`]: `saga.v1.OrderService` (PlaceOrder starts an `order` saga).
//! - [`admin`]: the handlers of `saga.v1.AdminService`.
//! - [`auth`]: who may call AdminService: the operator and read-only
//!   tokens, and the table of the role each RPC needs.
//! - [`reconcile`]: sagas against the participants' records (merge join).
//! - [`config`]: flags with env fallbacks, validated into settings.
//! - [`server`]: connecting the store and serving until shutdown.
//! - [`metrics`]: the metric names and what records them.
//! - [`telemetry`]: the HTTP port: `/healthz`, `/readyz` and `/metrics`.
//! - [`console`]: the web console on the HTTP port (`/ui`) and its JSON.
//! - `dev` (feature `dev`): the embedded mode, every service in one process
//!   on SQLite.
//! - [`error`]: the one error type and its mapping to `tonic::Status`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod clients;
pub mod config;
pub mod console;
#[cfg(feature = "dev")]
pub mod dev;
pub mod error;
pub mod executor;
pub mod metrics;
pub mod prune;
pub mod reconcile;
pub mod saga;
pub mod server;
pub mod store;
pub mod telemetry;

pub use error::Error;
