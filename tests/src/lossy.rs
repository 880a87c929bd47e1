//! A store that loses asynchronously committed writes, as a database does
//! when it crashes before flushing them (a power loss with
//! `synchronous_commit = off`, a failover to a replica that lagged).
//!
//! Armed with [`LossyStore::lose_next`], it acknowledges the next `n`
//! commits that were allowed to skip the flush ([`Commit::durable`] false)
//! and writes nothing: the writer believes its version moved on, the
//! database still holds the earlier one, and the writer's next commit
//! finds the older row, as after the crash.
//!
//! Armed with [`LossyStore::break_after_next`], it writes the next `n`
//! commits and then answers with a connection error, as when the link to
//! the database breaks after a commit and before its answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrator::Error;
use orchestrator::store::{
    Commit, JournalEntry, ListFilter, NewSaga, SagaBrief, SagaRecord, SagaStore, Stats,
};

/// A [`SagaStore`] that drops armed asynchronous commits.
pub struct LossyStore {
    inner: Arc<dyn SagaStore>,
    to_lose: AtomicU32,
    lost: AtomicU32,
    to_break: AtomicU32,
}

impl LossyStore {
    /// Wraps `inner`; loses nothing until armed.
    pub fn new(inner: Arc<dyn SagaStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            to_lose: AtomicU32::new(0),
            lost: AtomicU32::new(0),
            to_break: AtomicU32::new(0),
        })
    }

    /// Loses the next `n` asynchronous commits.
    pub fn lose_next(&self, n: u32) {
        self.to_lose.store(n, Ordering::SeqCst);
    }

    /// Writes the next `n` commits, then answers each with an error.
    pub fn break_after_next(&self, n: u32) {
        self.to_break.store(n, Ordering::SeqCst);
    }

    /// Asynchronous commits lost so far.
    pub fn lost(&self) -> u32 {
        self.lost.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl SagaStore for LossyStore {
    async fn create(
        &self,
        saga: &NewSaga,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<(SagaRecord, bool), Error> {
        self.inner.create(saga, owner, lease_ttl).await
    }

    async fn load(&self, saga_id: &str) -> Result<Option<SagaRecord>, Error> {
        self.inner.load(saga_id).await
    }

    async fn commit(&self, commit: Commit<'_>) -> Result<Option<i64>, Error> {
        if !commit.durable
            && self
                .to_lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.lost.fetch_add(1, Ordering::SeqCst);
            // Acknowledged, never written.
            return Ok(Some(commit.expected_version + 1));
        }
        let broken = self
            .to_break
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let written = self.inner.commit(commit).await?;
        if broken {
            let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "link broke");
            return Err(Error::Database(sqlx::Error::Io(reset)));
        }
        Ok(written)
    }

    async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease_ttl: Duration,
    ) -> Result<Vec<SagaRecord>, Error> {
        self.inner.claim_due(owner, limit, lease_ttl).await
    }

    async fn claim(
        &self,
        saga_id: &str,
        owner: &str,
        lease_ttl: Duration,
    ) -> Result<Option<SagaRecord>, Error> {
        self.inner.claim(saga_id, owner, lease_ttl).await
    }

    async fn renew_leases(
        &self,
        owner: &str,
        saga_ids: &[String],
        lease_ttl: Duration,
    ) -> Result<Vec<String>, Error> {
        self.inner.renew_leases(owner, saga_ids, lease_ttl).await
    }

    async fn release_leases(&self, owner: &str) -> Result<u64, Error> {
        self.inner.release_leases(owner).await
    }

    async fn take_wakes(&self, owner: &str) -> Result<Vec<String>, Error> {
        self.inner.take_wakes(owner).await
    }

    async fn journal(&self, saga_id: &str) -> Result<Vec<JournalEntry>, Error> {
        self.inner.journal(saga_id).await
    }

    async fn append_journal(&self, saga_id: &str, entries: &[JournalEntry]) -> Result<(), Error> {
        self.inner.append_journal(saga_id, entries).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, Error> {
        self.inner.list(filter).await
    }

    async fn stats(&self) -> Result<Stats, Error> {
        self.inner.stats().await
    }

    async fn ready(&self) -> Result<String, String> {
        self.inner.ready().await
    }

    fn pool_state(&self) -> Option<(u32, u32, u32)> {
        self.inner.pool_state()
    }

    async fn sagas_by_id(&self, after: &str, limit: i64) -> Result<Vec<SagaBrief>, Error> {
        self.inner.sagas_by_id(after, limit).await
    }

    async fn find_by_key(
        &self,
        customer_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<SagaRecord>, Error> {
        self.inner.find_by_key(customer_id, idempotency_key).await
    }

    async fn prune_finished(&self, before: f64, limit: i64) -> Result<u64, Error> {
        self.inner.prune_finished(before, limit).await
    }

    async fn oldest_finished(&self) -> Result<Option<f64>, Error> {
        self.inner.oldest_finished().await
    }

    async fn finished_page(
        &self,
        before: f64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SagaRecord>, Error> {
        self.inner.finished_page(before, after, limit).await
    }
}
