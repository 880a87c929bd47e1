//! The saga orchestrator for orders.
//!
//! Layout:
//! - [`saga`]: the pure state machine (no I/O, no clock).
pub mod saga;
