//! The chaos suite: the real binaries as processes, across real failure
//! domains, with the design's invariants checked from the databases at the
//! end. The `chaos` binary is a thin front for it; integration tests call
//! the same functions.
//!
//! Layout:
//! - [`proxy`] — the TCP fault proxy in front of every participant
//!   (latency, resets, black holes);
//! - [`postgres`] — the orchestrator's private instance (initdb, crash,
//!   base backup, restore), the participants' databases on the machine's
//!   server, and that server's restart (always left running);
//! - [`cluster`] — finding the binaries; services as child processes that
//!   can be SIGKILLed and restarted on the same port;
//! - [`workload`] — the catalog, the seeded order plan, the retrying client;
//! - [`faults`] — the fault kinds, the first round and random faults, the
//!   injector and recovery measurement;
//! - [`timeline`] — what happened, when;
//! - [`audit`] — invariants 1-5 from the databases;
//! - [`run`] — the random run and its summary;
//! - [`snapshot`] — the deterministic scenario: progress committed
//!   asynchronously lost in a power loss, then a cancel.

pub mod audit;
pub mod cluster;
pub mod faults;
pub mod postgres;
pub mod proxy;
pub mod run;
pub mod snapshot;
pub mod timeline;
pub mod workload;

pub use cluster::Binaries;

/// splitmix64: small, deterministic, good enough to pick orders and faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// An independent generator for another purpose, derived from this one.
    pub fn fork(&mut self) -> Self {
        Self(self.next_u64())
    }
}

/// A seed from the clock, for runs that do not name one.
pub fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
