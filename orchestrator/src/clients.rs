//! The participant clients (the design's `participants` module): one thin
//! adapter per participant that turns a saga command into an RPC and the
//! RPC's `tonic::Status` into an [`Outcome`]. The error codes are the
//! protocol: transient codes are retried, everything else is a rejection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::error::Error;
use crate::saga::{Kind, Outcome, Registry, StepDef};
use crate::store::OrderItem;

/// One call the executor asks a participant to make.
#[derive(Debug, Clone, Copy)]
pub struct StepCall<'a> {
    /// The saga; the participant's idempotency key.
    pub saga_id: &'a str,
    /// The step, as its saga's definition has it (its participant names
    /// the adapter that makes the call).
    pub step: &'static StepDef,
    /// Action or compensation.
    pub kind: Kind,
    /// The paying customer.
    pub customer_id: &'a str,
    /// What was ordered.
    pub items: &'a [OrderItem],
    /// Outputs of the steps that succeeded so far.
    pub outputs: &'a BTreeMap<String, String>,
}

/// Calls participants for saga steps. A trait because it is a real
/// boundary: gRPC in production, in-process servers in tests.
#[tonic::async_trait]
pub trait StepCalls: Send + Sync + 'static {
    /// Makes the call and classifies how it ended. Never fails: every
    /// failure is an outcome the state machine decides on.
    async fn call(&self, call: StepCall<'_>) -> Outcome;

    /// Clients that read and compensate participants' records outside any
    /// step (Reconcile), on the same channels; None when this
    /// implementation does not talk to real participants.
    fn records(&self) -> Option<RecordClients> {
        None
    }
}

/// One participant's side of its steps: turns a step's action or
/// compensation into the participant's RPC, and its reply into the outputs
/// later steps (and the API) read. The error is the RPC's status, which
/// [`GrpcParticipants`] classifies; deadlines are its business too.
#[tonic::async_trait]
pub trait StepAdapter: Send + Sync + 'static {
    /// The step's action, e.g. Reserve.
    async fn act(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status>;
    /// The step's compensation, e.g. Release.
    async fn compensate(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status>;
}

/// Where the participants listen, and how to reach them.
#[derive(Debug, Clone)]
pub struct ParticipantUrls {
    /// inventory.v1.InventoryService.
    pub inventory: String,
    /// payment.v1.PaymentService.
    pub payment: String,
    /// fulfillment.v1.FulfillmentService.
    pub fulfillment: String,
    /// TLS for `https://` URLs (`--participant-ca`, `--client-cert`,
    /// `--client-key`); an https URL without it is an error.
    pub tls: Option<common::tls::Client>,
}

impl ParticipantUrls {
    /// The endpoint of `url`, the URL of participant `name`, with the TLS
    /// the URL asks for; not connected.
    pub fn endpoint(&self, name: &str, url: &str) -> Result<Endpoint, Error> {
        common::tls::endpoint(url, self.tls.as_ref(), crate::config::CLIENT_TLS_FLAGS.ca)
            .map_err(|e| Error::invalid(format!("--{name}-url: {e}")))
    }
}

/// [`StepCalls`] through one [`StepAdapter`] per participant (keyed by the
/// participant name the steps' definitions give), with a deadline per call.
#[derive(Clone)]
pub struct GrpcParticipants {
    adapters: HashMap<&'static str, Arc<dyn StepAdapter>>,
    records: Option<RecordClients>,
    timeout: Duration,
}

impl std::fmt::Debug for GrpcParticipants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut participants: Vec<_> = self.adapters.keys().collect();
        participants.sort();
        f.debug_struct("GrpcParticipants")
            .field("participants", &participants)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn channel(urls: &ParticipantUrls, name: &str, url: &str) -> Result<Channel, Error> {
    let endpoint = urls.endpoint(name, url)?;
    // Lazy: the orchestrator starts even while a participant is down; calls
    // made meanwhile fail UNAVAILABLE and are retried.
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

/// A request that tells the participant when to give up too, and carries
/// the step attempt's trace context (W3C `traceparent`) when tracing is on:
/// every step adapter builds its requests here.
fn with_deadline<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    common::telemetry::inject(request.metadata_mut());
    request
}

/// The order saga's inventory step: Reserve / Release.
#[derive(Debug, Clone)]
struct InventoryAdapter {
    client: inventory::inventory_service_client::InventoryServiceClient<Channel>,
    timeout: Duration,
}

#[tonic::async_trait]
impl StepAdapter for InventoryAdapter {
    async fn act(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let request = inventory::ReserveRequest {
            saga_id: call.saga_id.to_owned(),
            items: call
                .items
                .iter()
                .map(|i| inventory::Item {
                    product_id: i.product_id.clone(),
                    quantity: i.quantity,
                })
                .collect(),
        };
        let reply = self
            .client
            .clone()
            .reserve(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![
            ("reservation_id".into(), reply.reservation_id),
            (
                "total_amount_cents".into(),
                reply.total_amount_cents.to_string(),
            ),
        ])
    }

    async fn compensate(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let request = inventory::ReleaseRequest {
            saga_id: call.saga_id.to_owned(),
        };
        let reply = self
            .client
            .clone()
            .release(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![(
            "release".into(),
            reply.outcome().as_str_name().into(),
        )])
    }
}

/// The order saga's payment step: Charge / Refund.
#[derive(Debug, Clone)]
struct PaymentAdapter {
    client: payment::payment_service_client::PaymentServiceClient<Channel>,
    timeout: Duration,
}

#[tonic::async_trait]
impl StepAdapter for PaymentAdapter {
    async fn act(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let amount_cents = call
            .outputs
            .get("total_amount_cents")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| {
                Status::failed_precondition("no order total: the reservation has no output")
            })?;
        let request = payment::ChargeRequest {
            saga_id: call.saga_id.to_owned(),
            customer_id: call.customer_id.to_owned(),
            amount_cents,
        };
        let reply = self
            .client
            .clone()
            .charge(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![("charge_id".into(), reply.charge_id)])
    }

    async fn compensate(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let request = payment::RefundRequest {
            saga_id: call.saga_id.to_owned(),
        };
        let reply = self
            .client
            .clone()
            .refund(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![(
            "refund".into(),
            reply.outcome().as_str_name().into(),
        )])
    }
}

/// The order saga's fulfillment step: Ship / CancelShipment.
#[derive(Debug, Clone)]
struct FulfillmentAdapter {
    client: fulfillment::fulfillment_service_client::FulfillmentServiceClient<Channel>,
    timeout: Duration,
}

#[tonic::async_trait]
impl StepAdapter for FulfillmentAdapter {
    async fn act(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let request = fulfillment::ShipRequest {
            saga_id: call.saga_id.to_owned(),
            items: call
                .items
                .iter()
                .map(|i| fulfillment::Item {
                    product_id: i.product_id.clone(),
                    quantity: i.quantity,
                })
                .collect(),
        };
        let reply = self
            .client
            .clone()
            .ship(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![("shipment_id".into(), reply.shipment_id)])
    }

    async fn compensate(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let request = fulfillment::CancelShipmentRequest {
            saga_id: call.saga_id.to_owned(),
        };
        let reply = self
            .client
            .clone()
            .cancel_shipment(with_deadline(request, self.timeout))
            .await?
            .into_inner();
        Ok(vec![(
            "cancel_shipment".into(),
            reply.outcome().as_str_name().into(),
        )])
    }
}

impl GrpcParticipants {
    /// The adapters of the order saga's three participants (`inventory`,
    /// `payment`, `fulfillment`); `timeout` bounds every call.
    pub fn new(urls: &ParticipantUrls, timeout: Duration) -> Result<Self, Error> {
        let inventory = inventory::inventory_service_client::InventoryServiceClient::new(channel(
            urls,
            "inventory",
            &urls.inventory,
        )?);
        let payment = payment::payment_service_client::PaymentServiceClient::new(channel(
            urls,
            "payment",
            &urls.payment,
        )?);
        let fulfillment = fulfillment::fulfillment_service_client::FulfillmentServiceClient::new(
            channel(urls, "fulfillment", &urls.fulfillment)?,
        );
        let records = RecordClients {
            inventory: inventory.clone(),
            payment: payment.clone(),
            fulfillment: fulfillment.clone(),
            timeout,
        };
        Ok(Self::empty(timeout)
            .with_adapter(
                "inventory",
                Arc::new(InventoryAdapter {
                    client: inventory,
                    timeout,
                }),
            )
            .with_adapter(
                "payment",
                Arc::new(PaymentAdapter {
                    client: payment,
                    timeout,
                }),
            )
            .with_adapter(
                "fulfillment",
                Arc::new(FulfillmentAdapter {
                    client: fulfillment,
                    timeout,
                }),
            )
            .with_records(records))
    }

    /// No adapters yet; `timeout` bounds every call.
    pub fn empty(timeout: Duration) -> Self {
        Self {
            adapters: HashMap::new(),
            records: None,
            timeout,
        }
    }

    /// With `adapter` serving the steps of `participant` (replacing one
    /// registered before under that name).
    pub fn with_adapter(
        mut self,
        participant: &'static str,
        adapter: Arc<dyn StepAdapter>,
    ) -> Self {
        self.adapters.insert(participant, adapter);
        self
    }

    /// With the clients Reconcile uses.
    fn with_records(mut self, records: RecordClients) -> Self {
        self.records = Some(records);
        self
    }

    async fn send(&self, call: StepCall<'_>) -> Result<Vec<(String, String)>, Status> {
        let Some(adapter) = self.adapters.get(call.step.participant) else {
            // A deployment error (a definition names a participant this
            // replica has no client for): retried, so a fixed deploy
            // resumes the saga, until the budget is spent.
            return Err(Status::unavailable(format!(
                "no adapter for participant {:?} (step {})",
                call.step.participant, call.step.name
            )));
        };
        match call.kind {
            Kind::Action => adapter.act(call).await,
            Kind::Compensation => adapter.compensate(call).await,
        }
    }
}

#[tonic::async_trait]
impl StepCalls for GrpcParticipants {
    async fn call(&self, call: StepCall<'_>) -> Outcome {
        // The client does not enforce a deadline by itself, and a server
        // whose deadline passed answers CANCELLED: our own timer decides.
        let timed_out = || {
            Outcome::Retryable(format!(
                "DEADLINE_EXCEEDED: no answer within {:?}",
                self.timeout
            ))
        };
        let reply = tokio::time::timeout(self.timeout, self.send(call)).await;
        if common::telemetry::enabled() {
            // On the step attempt's span, which declares the field.
            let code = match &reply {
                Ok(Ok(_)) => Code::Ok,
                Ok(Err(status)) => status.code(),
                Err(_) => Code::DeadlineExceeded,
            };
            tracing::Span::current().record("rpc.grpc.status_code", code as i32);
        }
        match reply {
            Ok(Ok(outputs)) => Outcome::Succeeded(outputs),
            // The participant enforced the deadline we sent it (tonic says
            // CANCELLED "Timeout expired"): report it as the timeout it is.
            Ok(Err(status))
                if status.code() == Code::Cancelled && status.message().contains("Timeout") =>
            {
                timed_out()
            }
            Ok(Err(status)) => classify(&status),
            Err(_) => timed_out(),
        }
    }

    fn records(&self) -> Option<RecordClients> {
        self.records.clone()
    }
}

/// Calls in progress to one participant, by default: enough to keep a
/// participant busy, few enough for one HTTP/2 connection to carry.
pub const DEFAULT_MAX_CALLS: usize = 1000;

/// Bounds the calls in progress to each participant that a definition of
/// the registry names. A saga beyond the bound waits for a slot before its
/// call starts, and so before its deadline runs: with thousands of sagas in
/// flight against a slow participant, a waiting saga costs a few bytes
/// instead of an HTTP/2 stream and a call's buffers, and the participant's
/// connection carries no more streams than it can serve.
pub struct Bounded {
    inner: Arc<dyn StepCalls>,
    slots: BTreeMap<&'static str, Semaphore>,
}

impl std::fmt::Debug for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let free: BTreeMap<_, _> = self
            .slots
            .iter()
            .map(|(name, slots)| (name, slots.available_permits()))
            .collect();
        f.debug_struct("Bounded")
            .field("free", &free)
            .finish_non_exhaustive()
    }
}

impl Bounded {
    /// `inner`, with at most `max_calls` calls in progress to each
    /// participant the definitions of `registry` name.
    pub fn new(inner: Arc<dyn StepCalls>, max_calls: usize, registry: &Registry) -> Self {
        Self {
            inner,
            slots: registry
                .participants()
                .into_iter()
                .map(|name| (name, Semaphore::new(max_calls.max(1))))
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl StepCalls for Bounded {
    async fn call(&self, call: StepCall<'_>) -> Outcome {
        // Every participant of the registry's definitions has its slots;
        // a step of no known definition cannot come here.
        let _slot = match self.slots.get(call.step.participant) {
            // Never closed, so acquiring only waits.
            Some(slots) => slots.acquire().await.ok(),
            None => None,
        };
        self.inner.call(call).await
    }

    fn records(&self) -> Option<RecordClients> {
        self.inner.records()
    }
}

/// The participants' record RPCs, outside any saga step: listings, point
/// reads and compensations, each under the step deadline. What Reconcile
/// uses; cheap to clone (the channels are the step calls').
#[derive(Debug, Clone)]
pub struct RecordClients {
    inventory: inventory::inventory_service_client::InventoryServiceClient<Channel>,
    payment: payment::payment_service_client::PaymentServiceClient<Channel>,
    fulfillment: fulfillment::fulfillment_service_client::FulfillmentServiceClient<Channel>,
    timeout: Duration,
}

impl RecordClients {
    fn request<T>(&self, message: T) -> Request<T> {
        with_deadline(message, self.timeout)
    }

    /// Runs `call` under the deadline (the client does not enforce it).
    async fn within<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(reply) => reply.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// One page of the inventory's reservation records.
    pub async fn list_reservations(
        &self,
        page_token: String,
        page_size: i32,
    ) -> Result<inventory::ListReservationsResponse, Status> {
        let request = self.request(inventory::ListReservationsRequest {
            page_size,
            page_token,
        });
        self.within(self.inventory.clone().list_reservations(request))
            .await
    }

    /// One page of the payment participant's charge records.
    pub async fn list_charges(
        &self,
        page_token: String,
        page_size: i32,
    ) -> Result<payment::ListChargesResponse, Status> {
        let request = self.request(payment::ListChargesRequest {
            page_size,
            page_token,
        });
        self.within(self.payment.clone().list_charges(request))
            .await
    }

    /// One page of the fulfillment participant's shipment records.
    pub async fn list_shipments(
        &self,
        page_token: String,
        page_size: i32,
    ) -> Result<fulfillment::ListShipmentsResponse, Status> {
        let request = self.request(fulfillment::ListShipmentsRequest {
            page_size,
            page_token,
        });
        self.within(self.fulfillment.clone().list_shipments(request))
            .await
    }

    /// A saga's reservation record; None when the inventory has none.
    pub async fn reservation(
        &self,
        saga_id: &str,
    ) -> Result<Option<inventory::GetReservationResponse>, Status> {
        let request = self.request(inventory::GetReservationRequest {
            saga_id: saga_id.to_owned(),
        });
        absent_as_none(
            self.within(self.inventory.clone().get_reservation(request))
                .await,
        )
    }

    /// A saga's charge record; None when the payment participant has none.
    pub async fn charge(
        &self,
        saga_id: &str,
    ) -> Result<Option<payment::GetChargeResponse>, Status> {
        let request = self.request(payment::GetChargeRequest {
            saga_id: saga_id.to_owned(),
        });
        absent_as_none(self.within(self.payment.clone().get_charge(request)).await)
    }

    /// A saga's shipment record; None when the fulfillment participant has
    /// none.
    pub async fn shipment(
        &self,
        saga_id: &str,
    ) -> Result<Option<fulfillment::GetShipmentResponse>, Status> {
        let request = self.request(fulfillment::GetShipmentRequest {
            saga_id: saga_id.to_owned(),
        });
        absent_as_none(
            self.within(self.fulfillment.clone().get_shipment(request))
                .await,
        )
    }

    /// Release: puts a saga's reserved units back (idempotent).
    pub async fn release(&self, saga_id: &str) -> Result<inventory::ReleaseOutcome, Status> {
        let request = self.request(inventory::ReleaseRequest {
            saga_id: saga_id.to_owned(),
        });
        let reply = self.within(self.inventory.clone().release(request)).await?;
        Ok(reply.outcome())
    }

    /// Refund: credits a saga's charge back (idempotent).
    pub async fn refund(&self, saga_id: &str) -> Result<payment::RefundOutcome, Status> {
        let request = self.request(payment::RefundRequest {
            saga_id: saga_id.to_owned(),
        });
        let reply = self.within(self.payment.clone().refund(request)).await?;
        Ok(reply.outcome())
    }

    /// CancelShipment: cancels a saga's shipment (idempotent).
    pub async fn cancel_shipment(
        &self,
        saga_id: &str,
    ) -> Result<fulfillment::CancelOutcome, Status> {
        let request = self.request(fulfillment::CancelShipmentRequest {
            saga_id: saga_id.to_owned(),
        });
        let reply = self
            .within(self.fulfillment.clone().cancel_shipment(request))
            .await?;
        Ok(reply.outcome())
    }
}

/// A point read's NOT_FOUND as None.
fn absent_as_none<T>(reply: Result<T, Status>) -> Result<Option<T>, Status> {
    match reply {
        Ok(record) => Ok(Some(record)),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status),
    }
}

pub use common::metrics::code_name;

/// Transient codes are retried; everything else is a business rejection.
pub fn classify(status: &Status) -> Outcome {
    let detail = format!("{}: {}", code_name(status.code()), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        // A server whose deadline ran out answers CANCELLED: the outcome is
        // unknown, like a timeout.
        | Code::Cancelled => Outcome::Retryable(detail),
        _ => Outcome::Rejected(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes_are_retried_and_the_rest_rejected() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(
                matches!(classify(&Status::new(code, "x")), Outcome::Retryable(_)),
                "{code:?}"
            );
        }
        for code in [
            Code::FailedPrecondition,
            Code::NotFound,
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::PermissionDenied,
        ] {
            assert!(
                matches!(classify(&Status::new(code, "x")), Outcome::Rejected(_)),
                "{code:?}"
            );
        }
    }

    /// Counts the calls in progress; each waits until the test opens the
    /// gate.
    #[derive(Default)]
    struct Gated {
        in_progress: std::sync::atomic::AtomicUsize,
        peak: std::sync::atomic::AtomicUsize,
        started: std::sync::atomic::AtomicUsize,
        gate: tokio::sync::Notify,
        open: std::sync::atomic::AtomicBool,
    }

    #[tonic::async_trait]
    impl StepCalls for Gated {
        async fn call(&self, _: StepCall<'_>) -> Outcome {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.in_progress.fetch_add(1, SeqCst) + 1;
            self.peak.fetch_max(now, SeqCst);
            self.started.fetch_add(1, SeqCst);
            while !self.open.load(SeqCst) {
                let opened = self.gate.notified();
                if self.open.load(SeqCst) {
                    break;
                }
                opened.await;
            }
            self.in_progress.fetch_sub(1, SeqCst);
            Outcome::Succeeded(Vec::new())
        }
    }

    #[tokio::test]
    async fn bounded_calls_wait_for_a_slot_per_participant() {
        use std::sync::atomic::Ordering::SeqCst;
        let gated = Arc::new(Gated::default());
        // The order saga and a definition with a fourth participant: each
        // participant named is bounded on its own.
        static FOURTH: crate::saga::Definition = crate::saga::Definition {
            name: "fourth",
            version: 1,
            steps: &[StepDef {
                name: "audit",
                status: crate::saga::Status::ChargingPayment,
                participant: "auditor",
                action: "a",
                compensation: "c",
            }],
            pivot: 0,
        };
        let registry = Registry::new([&crate::saga::ORDER_SAGA, &FOURTH]).unwrap();
        let bounded = Arc::new(Bounded::new(gated.clone(), 3, &registry));
        let steps = crate::saga::ORDER_SAGA.steps;
        let outputs = BTreeMap::new();
        let call = |step: &'static StepDef| {
            let bounded = bounded.clone();
            let outputs = outputs.clone();
            tokio::spawn(async move {
                bounded
                    .call(StepCall {
                        saga_id: "s",
                        step,
                        kind: Kind::Action,
                        customer_id: "c",
                        items: &[],
                        outputs: &outputs,
                    })
                    .await
            })
        };
        // Ten calls to one participant, ten to the fourth, and one to
        // another.
        let mut calls: Vec<_> = (0..10).map(|_| call(&steps[2])).collect();
        calls.extend((0..10).map(|_| call(&FOURTH.steps[0])));
        calls.push(call(&steps[0]));
        // Every task has run as far as it can: the gate holds the calls
        // that got a slot, the rest wait for one.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gated.started.load(SeqCst),
            7,
            "3 to fulfillment, 3 to the auditor, 1 to inventory"
        );
        gated.open.store(true, SeqCst);
        gated.gate.notify_waiters();
        for call in calls {
            assert_eq!(call.await.unwrap(), Outcome::Succeeded(Vec::new()));
        }
        assert_eq!(gated.started.load(SeqCst), 21);
        assert_eq!(gated.peak.load(SeqCst), 7);
    }

    #[test]
    fn details_name_the_code_and_keep_the_message() {
        assert_eq!(
            classify(&Status::failed_precondition("out of stock: p1")),
            Outcome::Rejected("FAILED_PRECONDITION: out of stock: p1".into())
        );
    }
}
