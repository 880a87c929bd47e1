//! The saga orchestrator (built in the next steps of the roadmap).
