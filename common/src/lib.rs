//! Plumbing shared by the orchestrator and the participants, so that neither
//! depends on the other for it: what both parse, how both reach their
//! databases and serve their ports.
//!
//! Layout:
//! - [`batch`]: group commit, many concurrent writes in one transaction.
//! - [`cli`]: one-line flag errors, durations, secrets, logging, the shutdown
//!   signal.
//! - [`db`]: PostgreSQL pools (fail fast, bounded waits) and the SQLite pool.
//! - [`domain`]: validated input types and the system's input limits.
//! - [`error`]: the shared error type, database error classes, `tonic::Status`.
//! - [`grpc`]: health and reflection (v1 and v1alpha) for every server.
//! - [`limits`]: the limits every server takes: message size, streams per
//!   connection, request deadline, HTTP request heads.
//! - [`listen`]: accepting connections: back-off, rate-limited logs, idle close.
//! - [`metrics`]: in-process counters, gauges and histograms, Prometheus text.
//! - [`probe`]: the HTTP port: /healthz, /readyz (background checks), /metrics.
//! - [`telemetry`]: log format, OpenTelemetry tracing, W3C trace context.
//! - [`tls`]: TLS and mTLS: server flags, reloadable acceptors, SIGHUP,
//!   client configurations, development certificates.

pub mod batch;
pub mod cli;
pub mod db;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod probe;
pub mod telemetry;
pub mod tls;

pub use error::Error;
