//! Integration tests over real gRPC and real PostgreSQL, one binary. Each
//! test gets fresh databases and in-process servers from the `harness`.

mod admin;
mod cancel;
mod chaos;
mod console;
mod definitions;
mod faults;
mod fulfillment;
mod health;
mod inputs;
mod inventory;
mod limits;
mod orders;
mod outages;
mod payment;
mod reconcile;
mod recovery;
mod snapshot;
mod tls;
mod tracing;
mod validation;
mod wake;
mod watch;
