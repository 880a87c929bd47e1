//! The batch fast path and the exact single path, shared by the three
//! PostgreSQL stores: a batch statement applies the requests that succeed
//! cleanly, and every other request runs alone through the store's
//! single-request code, which gives the exact answer.

use std::collections::{HashMap, HashSet};

use tokio::task::JoinHandle;

use common::domain::new_id;
use common::error::Error;

/// A request's answer: from the batch, or from its single-path task. The
/// caller awaits the task, so the batch writer is free for the next batch
/// as soon as its statement has committed, and a request the batch applied
/// does not wait for the single-path requests of its batch.
#[derive(Debug)]
pub(crate) enum Answer<R> {
    Ready(Result<R, Error>),
    Single(JoinHandle<Result<R, Error>>),
}

impl<R> Answer<R> {
    pub(crate) async fn get(self) -> Result<R, Error> {
        match self {
            Self::Ready(result) => result,
            Self::Single(task) => task.await.unwrap_or_else(|error| {
                Err(Error::Database(sqlx::Error::Protocol(format!(
                    "single-path task failed: {error}"
                ))))
            }),
        }
    }
}

/// What a batch statement may apply: the first request of each saga, with
/// a new record id (`prefix`). A saga's later requests in the same batch
/// take the single path after it, and replay its result.
pub(crate) fn distinct<'a, Q>(
    requests: &'a [Q],
    saga_id: fn(&Q) -> &str,
    prefix: &str,
) -> Vec<(&'a Q, String)> {
    let mut seen = HashSet::with_capacity(requests.len());
    requests
        .iter()
        .filter(|request| seen.insert(saga_id(request)))
        .map(|request| (request, new_id(prefix)))
        .collect()
}

/// Answers, in request order: a request the batch applied (`applied`, by
/// saga id) gets its result; every other one, or every one when the batch
/// failed, a task of its own on the single path (`single`).
pub(crate) fn answers<Q, R>(
    what: &'static str,
    requests: &[Q],
    saga_id: fn(&Q) -> &str,
    applied: Result<HashMap<String, R>, Error>,
    single: impl Fn(&Q) -> JoinHandle<Result<R, Error>>,
) -> Vec<Answer<R>> {
    let mut applied = applied.unwrap_or_else(|error| {
        tracing::warn!(%error, what, "batch failed; every request takes the single path");
        HashMap::new()
    });
    tracing::debug!(
        what,
        size = requests.len(),
        applied = applied.len(),
        "batch"
    );
    requests
        .iter()
        // Removed on first use: a later request of the same saga takes the
        // single path.
        .map(|request| match applied.remove(saga_id(request)) {
            Some(result) => Answer::Ready(Ok(result)),
            None => Answer::Single(single(request)),
        })
        .collect()
}

/// The new record ids (from [`distinct`]) of the sagas a batch claimed, by
/// saga id.
pub(crate) fn claimed_ids<Q>(
    claimed: Vec<String>,
    batched: &[(&Q, String)],
    saga_id: fn(&Q) -> &str,
) -> HashMap<String, String> {
    let mut ids: HashMap<&str, &str> = batched
        .iter()
        .map(|(request, id)| (saga_id(request), id.as_str()))
        .collect();
    claimed
        .into_iter()
        .filter_map(|saga| {
            let id = ids.remove(saga.as_str())?.to_owned();
            Some((saga, id))
        })
        .collect()
}
