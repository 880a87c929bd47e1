//! The saga orchestrator for orders.
//!
//! Layout:
//! - [`saga`]: the pure state machine (no I/O, no clock).
//! - [`store`]: saga rows and their journal, behind a trait; PostgreSQL.
//! - [`error`]: the one error type and its mapping to `tonic::Status`.
//! - [`reconcile`]: sagas against the participants' records (merge join).

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
