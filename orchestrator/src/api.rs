//! The gRPC edge: `saga.v1.OrderService`. Requests are parsed into domain
//! types here (nothing unchecked goes further in), and every error leaves
//! through the one `From<Error> for Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::domain::{Id, Items, MAX_ID_BYTES, bounded_text, new_id};
use proto::saga::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::executor::Executor;
use crate::saga::{Event, Registry, SagaState, Status as SagaStatus};
use crate::store::{
    JournalEntry, JournalKind, JournalOutcome, ListFilter, NewSaga, OrderItem, SagaRecord,
};

/// Longest cancel or abort reason accepted, in bytes.
const MAX_REASON_BYTES: usize = 512;
const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 1000;
/// How often WatchOrder re-reads a saga that this replica does not drive.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// The protobuf form of a status.
pub fn status_pb(status: SagaStatus) -> pb::OrderStatus {
    match status {
        SagaStatus::Pending => pb::OrderStatus::Pending,
        SagaStatus::ReservingInventory => pb::OrderStatus::ReservingInventory,
        SagaStatus::ChargingPayment => pb::OrderStatus::ChargingPayment,
        SagaStatus::Shipping => pb::OrderStatus::Shipping,
        SagaStatus::Completed => pb::OrderStatus::Completed,
        SagaStatus::Compensating => pb::OrderStatus::Compensating,
        SagaStatus::Failed => pb::OrderStatus::Failed,
        SagaStatus::Cancelling => pb::OrderStatus::Cancelling,
        SagaStatus::Cancelled => pb::OrderStatus::Cancelled,
        SagaStatus::NeedsAttention => pb::OrderStatus::NeedsAttention,
    }
}

/// A status filter from protobuf; UNSPECIFIED means none.
pub fn status_filter(value: i32) -> Result<Option<SagaStatus>, Error> {
    let status = pb::OrderStatus::try_from(value)
        .map_err(|_| Error::invalid(format!("status {value} is not an OrderStatus")))?;
    Ok(match status {
        pb::OrderStatus::Unspecified => None,
        other => SagaStatus::parse(other.as_str_name()),
    })
}

/// Seconds since the epoch as a protobuf timestamp.
pub fn timestamp(seconds: f64) -> prost_types::Timestamp {
    let whole = seconds.floor();
    prost_types::Timestamp {
        seconds: whole as i64,
        nanos: ((seconds - whole) * 1e9) as i32,
    }
}

/// Parses a page size (0 means the default).
pub fn page_size(value: i32) -> Result<i64, Error> {
    match value {
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        n @ 1..=MAX_PAGE_SIZE => Ok(i64::from(n)),
        n => Err(Error::invalid(format!(
            "page size {n} must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})"
        ))),
    }
}

/// Parses a page token (the last order id of the previous page); anything
/// that is not an order id is refused rather than read as an empty page.
pub fn page_token(token: String) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let is_order_id = token.strip_prefix("ord_").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !is_order_id {
        return Err(Error::invalid(
            "page_token is not a token this server gave out; pass next_page_token as it came",
        ));
    }
    Ok(Some(token))
}

/// An optional id filter: empty means none.
fn optional_id(field: &str, value: String) -> Result<Option<String>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        Ok(Some(Id::parse(field, value)?.into_inner()))
    }
}

/// The journal in protobuf form, plus the call in flight if there is one.
pub fn history_pb(
    saga: &SagaRecord,
    registry: &Registry,
    journal: Vec<JournalEntry>,
) -> Vec<pb::JournalEntry> {
    let mut history: Vec<pb::JournalEntry> = journal
        .into_iter()
        .map(|entry| pb::JournalEntry {
            step: entry.step,
            kind: match entry.kind {
                JournalKind::Action => pb::StepKind::Action,
                JournalKind::Compensation => pb::StepKind::Compensation,
                JournalKind::Control => pb::StepKind::Control,
            }
            .into(),
            attempt: u32::try_from(entry.attempt).unwrap_or(0),
            outcome: match entry.outcome {
                JournalOutcome::Succeeded => pb::StepOutcome::Succeeded,
                JournalOutcome::RetryableFailure => pb::StepOutcome::RetryableFailure,
                JournalOutcome::Rejected => pb::StepOutcome::Rejected,
                JournalOutcome::Accepted => pb::StepOutcome::Accepted,
            }
            .into(),
            detail: entry.detail,
            started_at: Some(timestamp(entry.started_at)),
            finished_at: entry.finished_at.map(timestamp),
            rpc: entry.rpc,
            actor: entry.actor,
        })
        .collect();
    // The call the saga waits for is not journalled until it ends; show it.
    if let Some((definition, kind)) = saga.current_step(registry)
        && !saga.status.is_settled()
        && !saga.state.waiting_retry
    {
        {
            history.push(pb::JournalEntry {
                step: definition.name.to_owned(),
                kind: match kind {
                    crate::saga::Kind::Action => pb::StepKind::Action,
                    crate::saga::Kind::Compensation => pb::StepKind::Compensation,
                }
                .into(),
                attempt: saga.state.current_attempts() + 1,
                outcome: pb::StepOutcome::InFlight.into(),
                detail: String::new(),
                started_at: Some(timestamp(saga.updated_at)),
                finished_at: None,
                rpc: match kind {
                    crate::saga::Kind::Action => definition.action,
                    crate::saga::Kind::Compensation => definition.compensation,
                }
                .to_owned(),
                actor: saga.lease_owner.clone().unwrap_or_default(),
            });
        }
    }
    history
}

/// The protobuf form of an order's items.
pub fn items_pb(items: &[OrderItem]) -> Vec<pb::OrderItem> {
    items
        .iter()
        .map(|i| pb::OrderItem {
            product_id: i.product_id.clone(),
            quantity: i.quantity,
        })
        .collect()
}

/// `saga.v1.OrderService`.
#[derive(Debug, Clone)]
pub struct OrderApi {
    executor: Arc<Executor>,
}

impl OrderApi {
    /// The service over `executor`.
    pub fn new(executor: Arc<Executor>) -> Self {
        Self { executor }
    }

    async fn load(&self, order_id: String) -> Result<SagaRecord, Error> {
        let order_id = Id::parse("order_id", order_id)?;
        self.executor
            .store()
            .load(order_id.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no order {order_id}")))
    }

    /// `trace_parent`: the trace the saga belongs to (see
    /// `common::telemetry::traceparent_to_store`).
    async fn place(
        &self,
        request: pb::PlaceOrderRequest,
        trace_parent: Option<String>,
    ) -> Result<pb::PlaceOrderResponse, Error> {
        let ValidOrder {
            customer_id,
            items,
            idempotency_key,
        } = validate_place_order(request)?;
        let permit = match (self.executor.admit(), &idempotency_key) {
            (Ok(permit), _) => permit,
            // At the in-flight limit a replay is still answered: it starts
            // nothing.
            (Err(Error::ResourceExhausted(message)), Some(key)) => {
                let existing = self
                    .executor
                    .store()
                    .find_by_key(customer_id.as_str(), key)
                    .await?;
                return match existing {
                    Some(record) => replayed(record, key, &items),
                    None => {
                        common::metrics::count(crate::metrics::SHED, &[], 1);
                        Err(Error::ResourceExhausted(message))
                    }
                };
            }
            (Err(error @ Error::ResourceExhausted(_)), _) => {
                common::metrics::count(crate::metrics::SHED, &[], 1);
                return Err(error);
            }
            (Err(error), _) => return Err(error),
        };
        // PlaceOrder creates an order saga, under the current version.
        let definition = self
            .executor
            .config()
            .registry
            .current(ORDER)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "this replica knows no saga definition {ORDER:?}"
                ))
            })?;
        let saga = NewSaga {
            saga_id: new_id("ord"),
            idempotency_key,
            customer_id,
            items,
            definition,
            state: SagaState::new(definition),
            trace_parent,
        };
        let config = self.executor.config();
        let (record, created) = self
            .executor
            .store()
            .create(&saga, &config.replica_id, config.lease_ttl)
            .await?;
        if !created {
            let key = saga.idempotency_key.as_deref().unwrap_or_default();
            return replayed(record, key, &saga.items);
        }
        let response = pb::PlaceOrderResponse {
            order_id: record.saga_id.clone(),
            status: status_pb(record.status).into(),
        };
        tracing::info!(saga_id = %record.saga_id, customer_id = %record.customer_id, "order placed");
        common::metrics::count(
            crate::metrics::STARTED,
            &[("definition", definition.name)],
            1,
        );
        self.executor.spawn(record, permit);
        Ok(response)
    }
}

/// A PlaceOrder request that passed validation: what the saga records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    /// The paying customer, a valid id.
    pub customer_id: String,
    /// 1..=100 items with distinct products, in the order given.
    pub items: Vec<OrderItem>,
    /// The idempotency key, if one was given.
    pub idempotency_key: Option<String>,
}

/// Checks a PlaceOrder request against the input contract (`common::domain`):
/// the first field out of it is refused with INVALID_ARGUMENT naming it.
/// Pure: PlaceOrder calls it before anything is read or written.
pub fn validate_place_order(request: pb::PlaceOrderRequest) -> Result<ValidOrder, Error> {
    let customer_id = Id::parse("customer_id", request.customer_id)?;
    let items = Items::parse(
        request
            .items
            .into_iter()
            .map(|i| (i.product_id, i.quantity)),
    )?;
    let idempotency_key = match request.idempotency_key {
        key if key.is_empty() => None,
        key => Some(bounded_text("idempotency_key", key, MAX_ID_BYTES)?),
    };
    Ok(ValidOrder {
        customer_id: customer_id.into_inner(),
        items: items
            .as_slice()
            .iter()
            .map(|item| OrderItem {
                product_id: item.product_id.as_str().to_owned(),
                quantity: item.quantity.get(),
            })
            .collect(),
        idempotency_key,
    })
}

/// The saga type PlaceOrder starts.
pub const ORDER: &str = "order";

/// The answer to a PlaceOrder whose idempotency key the customer used
/// before: the first order, if the request is the same one; otherwise the
/// key is refused, and nothing is written.
fn replayed(
    record: SagaRecord,
    key: &str,
    items: &[OrderItem],
) -> Result<pb::PlaceOrderResponse, Error> {
    let sorted = |items: &[OrderItem]| {
        let mut items = items.to_vec();
        items.sort_by(|a, b| (&a.product_id, a.quantity).cmp(&(&b.product_id, b.quantity)));
        items
    };
    if sorted(&record.items) != sorted(items) {
        return Err(Error::invalid(format!(
            "idempotency_key {key:?} was already used by order {} with different items; \
             a new order needs a new key",
            record.saga_id
        )));
    }
    Ok(pb::PlaceOrderResponse {
        order_id: record.saga_id,
        status: status_pb(record.status).into(),
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOrderResponse, Status>> + Send>>;

/// A watched saga's status, reason and time, as stored; None when it is gone.
async fn watched_status(
    executor: &Executor,
    saga_id: &str,
) -> Result<Option<(SagaStatus, Option<String>, f64)>, Error> {
    Ok(executor
        .store()
        .load(saga_id)
        .await?
        .map(|saga| (saga.status, saga.state.failure_reason, saga.updated_at)))
}

#[tonic::async_trait]
impl pb::order_service_server::OrderService for OrderApi {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let trace_parent = common::telemetry::traceparent_to_store(request.metadata());
        Ok(Response::new(
            self.place(request.into_inner(), trace_parent).await?,
        ))
    }

    async fn get_order_status(
        &self,
        request: Request<pb::GetOrderStatusRequest>,
    ) -> Result<Response<pb::GetOrderStatusResponse>, Status> {
        let saga = self.load(request.into_inner().order_id).await?;
        let journal = self.executor.store().journal(&saga.saga_id).await?;
        Ok(Response::new(pb::GetOrderStatusResponse {
            history: history_pb(&saga, &self.executor.config().registry, journal),
            order_id: saga.saga_id.clone(),
            customer_id: saga.customer_id.clone(),
            items: items_pb(&saga.items),
            status: status_pb(saga.status).into(),
            failure_reason: saga.state.failure_reason.clone().unwrap_or_default(),
            total_amount_cents: saga.total_amount_cents(),
            created_at: Some(timestamp(saga.created_at)),
            updated_at: Some(timestamp(saga.updated_at)),
            cancel_requested: saga.state.cancel_requested(),
            trace_id: saga.trace_id(),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let request = request.into_inner();
        let order_id = Id::parse("order_id", request.order_id)?;
        let reason = bounded_text("reason", request.reason, MAX_REASON_BYTES)?;
        let detail = if reason.is_empty() {
            "cancel requested".to_owned()
        } else {
            format!("cancel requested: {reason}")
        };
        let event = Event::CancelRequested {
            reason: (!reason.is_empty()).then_some(reason),
        };
        let saga = self
            .executor
            .request(order_id.as_str(), &event, "cancel", "client", &detail)
            .await?;
        Ok(Response::new(pb::CancelOrderResponse {
            order_id: saga.saga_id,
            status: status_pb(saga.status).into(),
        }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let order_id = Id::parse("order_id", request.into_inner().order_id).map_err(Error::from)?;
        let executor = self.executor.clone();
        // Held by the stream's task: its end, however it ends, frees it.
        let slot = executor.watch_slot()?;
        // Watch before the first read, so no change can slip between. A
        // saga driven here has its latest status in the watch already (one
        // driven elsewhere may have an old one: it is read).
        let mut updates = executor.watch(order_id.as_str());
        let cached = updates
            .borrow_and_update()
            .clone()
            .filter(|_| executor.is_driving(order_id.as_str()));
        let first = match cached {
            Some(update) => (update.status, update.failure_reason, update.updated_at),
            None => match self.load(order_id.as_str().to_owned()).await {
                Ok(saga) => (saga.status, saga.state.failure_reason, saga.updated_at),
                Err(error) => {
                    drop(updates);
                    executor.unwatch(order_id.as_str());
                    return Err(error.into());
                }
            },
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let saga_id = order_id.into_inner();
            let message =
                |status: SagaStatus, reason: Option<String>, at: f64| pb::WatchOrderResponse {
                    order_id: saga_id.clone(),
                    status: status_pb(status).into(),
                    failure_reason: reason.unwrap_or_default(),
                    updated_at: Some(timestamp(at)),
                };
            let mut stopping = executor.stopping();
            let mut poll = tokio::time::interval(WATCH_POLL);
            // Ticks missed while a driver here kept the watch current are
            // not made up in a burst.
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut last, reason, at) = first;
            let mut open = tx.send(Ok(message(last, reason, at))).await.is_ok();
            while open && !last.is_settled() {
                // Who drives the saga is looked at again on every wake-up:
                // a driver here may stop without settling it (its lease was
                // taken over), and then it wakes this stream once.
                let read = tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let update = updates.borrow_and_update().clone();
                        match update {
                            // Driven here: the watch holds its latest
                            // status. A settled one is final wherever the
                            // driver is now (it was committed before it
                            // was published): no read for the last update.
                            Some(u) if u.status.is_settled() || executor.is_driving(&saga_id) => {
                                Ok(Some((u.status, u.failure_reason, u.updated_at)))
                            }
                            // A driver here stopped, or a request here
                            // changed a saga driven elsewhere: read it.
                            _ => watched_status(&executor, &saga_id).await,
                        }
                    }
                    // A saga driven by another replica: read it now and then.
                    _ = poll.tick(), if !executor.is_driving(&saga_id) => {
                        watched_status(&executor, &saga_id).await
                    }
                    _ = tx.closed() => break,
                    _ = crate::executor::stopped(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("the orchestrator is shutting down; watch again"))).await;
                        break;
                    }
                };
                let next = match read {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        break;
                    }
                };
                let (status, reason, at) = next;
                if status != last {
                    last = status;
                    open = tx.send(Ok(message(status, reason, at))).await.is_ok();
                }
            }
            drop(updates);
            executor.unwatch(&saga_id);
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let filter = ListFilter {
            status: status_filter(request.status)?,
            customer_id: optional_id("customer_id", request.customer_id)?,
            product_id: optional_id("product_id", request.product_id)?,
            before_id: page_token(request.page_token)?,
            limit: limit + 1,
            ..ListFilter::default()
        };
        let mut sagas = self.executor.store().list(&filter).await?;
        let next_page_token = if sagas.len() as i64 > limit {
            sagas.truncate(limit as usize);
            sagas.last().map(|s| s.saga_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListOrdersResponse {
            orders: sagas
                .iter()
                .map(|saga| pb::OrderSummary {
                    order_id: saga.saga_id.clone(),
                    customer_id: saga.customer_id.clone(),
                    status: status_pb(saga.status).into(),
                    total_amount_cents: saga.total_amount_cents(),
                    failure_reason: saga.state.failure_reason.clone().unwrap_or_default(),
                    created_at: Some(timestamp(saga.created_at)),
                    updated_at: Some(timestamp(saga.updated_at)),
                })
                .collect(),
            next_page_token,
        }))
    }
}
