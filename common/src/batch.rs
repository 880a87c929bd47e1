//! Group commit: many concurrent requests, one database transaction.
//!
//! A durable write costs a round trip, a statement and a WAL flush whatever
//! its size, and on a small machine those fixed costs, not the rows, are
//! what limit throughput. A [`Batcher`] queues the requests of concurrent
//! callers; each of its workers takes everything queued (up to a bound) and
//! hands it to one `flush` call, which writes it all at once and answers
//! every caller. Nothing waits for a batch to fill: a worker flushes what is
//! there the moment it is free, so a lone request goes out at once and
//! batches grow only while an earlier flush is in progress, exactly as
//! commits pile up behind a flush in a database's own group commit.

use std::future::Future;
use std::sync::Arc;

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A queued request: the request, where to answer, and the caller's span
/// (only when tracing is on), which the batch's span links to.
type Queued<T, R> = (T, oneshot::Sender<R>, Option<SpanContext>);

/// A queue in front of a batch operation. Cloning shares the queue.
pub struct Batcher<T, R> {
    queue: mpsc::Sender<Queued<T, R>>,
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field(
                "queued",
                &(self.queue.max_capacity() - self.queue.capacity()),
            )
            .finish()
    }
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

/// The batch's worker is gone (its runtime shut down, or `flush` panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch writer stopped")]
pub struct Stopped;

impl<T, R> Batcher<T, R> {
    /// Requests queued that no worker has taken yet: they wait for a
    /// worker (and its database connection) to be free. Read from the
    /// queue itself, so it costs the writers nothing.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

impl<T, R> Batcher<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// Starts `workers` tasks that each flush up to `max_batch` queued
    /// requests at a time. `flush` gets the requests in arrival order and
    /// returns one answer per request, in the same order. The workers stop
    /// when the last clone of the batcher is dropped. Needs a Tokio runtime.
    pub fn new<F, Fut>(max_batch: usize, workers: usize, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self::named("batch", "default", max_batch, workers, flush)
    }

    /// [`Batcher::new`], recording each flush's size and duration in the
    /// histograms `{prefix}_batch_size` and `{prefix}_batch_commit_seconds`,
    /// labelled `writer`.
    pub fn named<F, Fut>(
        prefix: &str,
        writer: &'static str,
        max_batch: usize,
        workers: usize,
        flush: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let size_metric: Arc<str> = format!("{prefix}_batch_size").into();
        let commit_metric: Arc<str> = format!("{prefix}_batch_commit_seconds").into();
        let max_batch = max_batch.max(1);
        let (queue, receiver) = mpsc::channel::<Queued<T, R>>(max_batch * workers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let flush = Arc::new(flush);
        for _ in 0..workers.max(1) {
            let receiver = receiver.clone();
            let flush = flush.clone();
            let (size_metric, commit_metric) = (size_metric.clone(), commit_metric.clone());
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(max_batch);
                loop {
                    {
                        // One worker collects at a time, so the others keep
                        // flushing while it waits for the next request.
                        let mut receiver = receiver.lock().await;
                        if receiver.recv_many(&mut batch, max_batch).await == 0 {
                            return; // every sender is gone
                        }
                    }
                    let mut requests = Vec::with_capacity(batch.len());
                    let mut answers = Vec::with_capacity(batch.len());
                    let mut callers = Vec::new();
                    for (request, answer, caller) in batch.drain(..) {
                        requests.push(request);
                        answers.push(answer);
                        callers.extend(caller);
                    }
                    let labels = [("writer", writer)];
                    crate::metrics::observe(
                        &size_metric,
                        &labels,
                        requests.len() as f64,
                        crate::metrics::SIZES,
                    );
                    // With tracing on, the write is a span of its own (one
                    // batch serves many traces), linked to each caller's.
                    let span = if crate::telemetry::enabled() {
                        let span = tracing::info_span!("db.batch", rows = requests.len());
                        for caller in callers {
                            span.add_link(caller);
                        }
                        span
                    } else {
                        tracing::Span::none()
                    };
                    let began = std::time::Instant::now();
                    let results = flush(requests).instrument(span).await;
                    crate::metrics::observe(
                        &commit_metric,
                        &labels,
                        began.elapsed().as_secs_f64(),
                        crate::metrics::SECONDS,
                    );
                    debug_assert_eq!(results.len(), answers.len());
                    for (answer, result) in answers.into_iter().zip(results) {
                        // The caller may have given up (its call was cancelled).
                        let _ = answer.send(result);
                    }
                }
            });
        }
        Self { queue }
    }

    /// Queues `request` and waits for its answer.
    pub async fn submit(&self, request: T) -> Result<R, Stopped> {
        let (answer, result) = oneshot::channel();
        let caller = crate::telemetry::enabled()
            .then(|| {
                let context = tracing::Span::current().context();
                let caller = context.span().span_context().clone();
                caller.is_valid().then_some(caller)
            })
            .flatten();
        self.queue
            .send((request, answer, caller))
            .await
            .map_err(|_| Stopped)?;
        result.await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn answers_each_request_in_order_and_batches_what_queues_up() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let batcher = {
            let (flushes, largest) = (flushes.clone(), largest.clone());
            Batcher::new(16, 1, move |batch: Vec<u32>| {
                flushes.fetch_add(1, Ordering::SeqCst);
                largest.fetch_max(batch.len(), Ordering::SeqCst);
                async move {
                    // A slow write: the requests behind it pile up.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    batch.into_iter().map(|n| n * 10).collect::<Vec<_>>()
                }
            })
        };
        let calls: Vec<_> = (0..40u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.submit(n).await) })
            })
            .collect();
        for call in calls {
            let (n, answer) = call.await.unwrap();
            assert_eq!(answer, Ok(n * 10));
        }
        assert!(largest.load(Ordering::SeqCst) > 1, "nothing was batched");
        assert!(
            largest.load(Ordering::SeqCst) <= 16,
            "a batch exceeded its bound"
        );
        assert!(flushes.load(Ordering::SeqCst) < 40);
    }

    #[tokio::test]
    async fn a_lone_request_is_flushed_at_once() {
        let batcher = Batcher::new(64, 2, |batch: Vec<u8>| async move { batch });
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), batcher.submit(7))
            .await
            .expect("a single request waited for a batch to fill");
        assert_eq!(answer, Ok(7));
    }

    #[tokio::test]
    async fn a_panicking_flush_fails_its_callers_instead_of_hanging_them() {
        let batcher = Batcher::new(4, 1, |_: Vec<u8>| async move {
            panic!("flush failed");
            #[allow(unreachable_code)]
            Vec::<u8>::new()
        });
        assert_eq!(batcher.submit(1).await, Err(Stopped));
    }
}
