//! OpenTelemetry tracing across the four services, as real processes (the
//! built `orchestrator` and `participant` binaries, each its own service
//! name) exporting over OTLP/gRPC to a collector in this test: one saga is
//! one trace across all four, participant RPC spans are children of the
//! orchestrator's step-attempt spans, a saga resumed by another replica
//! after a crash stays in its trace, a caller's `traceparent` is
//! continued, and with tracing off nothing is exported.
//!
//! The binaries are the ones in the target directory: `cargo test
//! --workspace` builds them first; after changing the servers, a narrower
//! command needs `cargo build --workspace --bins` before it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::chaos::Binaries;
use harness::process::{Running, command, free_port, terminate, wait_until_serving};
use harness::{TestDb, fault, place_request, settled};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use proto::fault::v1::fault_injection_client::FaultInjectionClient;
use proto::inventory::v1::UpsertProductRequest;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::payment::v1::UpsertAccountRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{GetOrderStatusRequest, GetOrderStatusResponse, OrderStatus};
use tonic::transport::Channel;

const SETTLE: Duration = Duration::from_secs(30);

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    instance: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    /// The span ids it links to.
    links: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// An OTLP trace collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        instance: resource
                            .get("service.instance.id")
                            .cloned()
                            .unwrap_or_default(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        attributes: attributes(&span.attributes),
                        links: span.links.iter().map(|l| hex(&l.span_id)).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a port of its own; returns its URL.
    async fn start(&self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(url)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits (with a deadline) until the spans of `trace_id` satisfy `done`.
    async fn wait_trace(&self, trace_id: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let started = Instant::now();
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(
                started.elapsed() < SETTLE,
                "trace {trace_id} incomplete: {spans:#?}; all spans: {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What every child process must not inherit from the test's environment.
const CLEAR: &[&str] = &[
    "DATABASE_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
    "LOG_FORMAT",
];

/// The three participants and orchestrator replicas as processes, each on
/// a fresh database. Processes are listed before the databases so they
/// stop first.
struct Cluster {
    participants: Vec<Running>,
    binaries: Binaries,
    otlp: Option<String>,
    urls: [String; 3],
    orchestrator_db: TestDb,
    _participant_dbs: Vec<TestDb>,
}

/// A running orchestrator replica.
struct Replica {
    process: Running,
    orders: OrderServiceClient<Channel>,
}

impl Cluster {
    /// Starts the participants (fault injection on), exporting to `otlp`
    /// when given, and seeds a product and an account.
    /// `hint`: with tracing off, the collector's URL where only an
    /// exporter set up by mistake would look.
    async fn start(label: &str, otlp: Option<String>, hint: &str) -> Result<Self> {
        let binaries = Binaries::find(None)?;
        let mut participants = Vec::new();
        let mut dbs = Vec::new();
        let mut urls = Vec::new();
        for (name, service) in [
            ("inventory", "inventory.v1.InventoryService"),
            ("payment", "payment.v1.PaymentService"),
            ("fulfillment", "fulfillment.v1.FulfillmentService"),
        ] {
            let db = TestDb::create(&format!("{label}_{name}")).await?;
            let address = format!("127.0.0.1:{}", free_port());
            let mut args = vec![
                name.to_owned(),
                "--listen".into(),
                address.clone(),
                "--database-url".into(),
                db.url().to_owned(),
                "--fault-injection".into(),
            ];
            let mut cmd_env = vec![("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned())];
            match &otlp {
                Some(url) => args.extend(["--otlp-endpoint".into(), url.clone()]),
                // The exporter's own variable names the collector: an
                // exporter set up although tracing is off would use it.
                None => cmd_env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", hint.to_owned())),
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut cmd = command(
                binaries.path("participant").to_str().context("path")?,
                &args,
                CLEAR,
            );
            cmd.envs(cmd_env);
            let mut process = Running::start(cmd);
            let endpoint = format!("http://{address}");
            wait_until_serving(&mut process, &endpoint, service).await;
            participants.push(process);
            dbs.push(db);
            urls.push(endpoint);
        }
        let cluster = Self {
            participants,
            binaries,
            otlp,
            urls: [urls[0].clone(), urls[1].clone(), urls[2].clone()],
            orchestrator_db: TestDb::create(&format!("{label}_orchestrator")).await?,
            _participant_dbs: dbs,
        };
        InventoryServiceClient::connect(cluster.urls[0].clone())
            .await?
            .upsert_product(UpsertProductRequest {
                product_id: "widget".into(),
                name: "Widget".into(),
                price_cents: 250,
                stock: 100,
            })
            .await?;
        PaymentServiceClient::connect(cluster.urls[1].clone())
            .await?
            .upsert_account(UpsertAccountRequest {
                customer_id: "alice".into(),
                balance_cents: 100_000,
            })
            .await?;
        Ok(cluster)
    }

    /// Starts an orchestrator replica named `replica` (also its
    /// `service.instance.id`), logging JSON.
    async fn replica(&self, replica: &str, hint: &str) -> Result<Replica> {
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "serve".to_owned(),
            "--listen".into(),
            address.clone(),
            "--database-url".into(),
            self.orchestrator_db.url().to_owned(),
            "--inventory-url".into(),
            self.urls[0].clone(),
            "--payment-url".into(),
            self.urls[1].clone(),
            "--fulfillment-url".into(),
            self.urls[2].clone(),
            "--replica-id".into(),
            replica.into(),
            "--lease-ttl".into(),
            "1s".into(),
            "--poll-interval".into(),
            "100ms".into(),
            "--log-format".into(),
            "json".into(),
        ];
        let mut cmd_env = vec![
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("service.instance.id={replica}"),
            ),
        ];
        match &self.otlp {
            Some(url) => args.extend(["--otlp-endpoint".into(), url.clone()]),
            None => cmd_env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", hint.to_owned())),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = command(
            self.binaries
                .path("orchestrator")
                .to_str()
                .context("path")?,
            &args,
            CLEAR,
        );
        cmd.envs(cmd_env);
        let mut process = Running::start(cmd);
        let channel = wait_until_serving(
            &mut process,
            &format!("http://{address}"),
            "saga.v1.OrderService",
        )
        .await;
        Ok(Replica {
            process,
            orders: OrderServiceClient::new(channel),
        })
    }

    /// Stops every participant with SIGTERM (they flush their spans).
    async fn stop_participants(&mut self) -> Result<()> {
        for process in self.participants.drain(..) {
            stop(process).await?;
        }
        Ok(())
    }
}

/// SIGTERM, then waits for the exit (flushing spans on the way); returns
/// stderr.
async fn stop(mut process: Running) -> Result<String> {
    terminate(process.pid());
    let started = Instant::now();
    while process.exited().is_none() {
        if started.elapsed() > SETTLE {
            bail!("no exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _stdout, stderr) = process.finish();
    assert!(status.success(), "exit {status:?}: {stderr}");
    Ok(stderr)
}

async fn status(
    orders: &mut OrderServiceClient<Channel>,
    order_id: &str,
) -> Result<GetOrderStatusResponse> {
    Ok(orders
        .get_order_status(GetOrderStatusRequest {
            order_id: order_id.into(),
        })
        .await?
        .into_inner())
}

async fn wait_status(
    orders: &mut OrderServiceClient<Channel>,
    order_id: &str,
    done: impl Fn(OrderStatus) -> bool,
) -> Result<GetOrderStatusResponse> {
    let started = Instant::now();
    loop {
        let reply = status(orders, order_id).await?;
        if done(reply.status()) {
            return Ok(reply);
        }
        if started.elapsed() > SETTLE {
            bail!("order {order_id} still {:?}", reply.status());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn place(
    orders: &mut OrderServiceClient<Channel>,
    traceparent: Option<&str>,
) -> Result<String> {
    let mut request = tonic::Request::new(place_request("alice", &[("widget", 1)], ""));
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse()?);
    }
    Ok(orders.place_order(request).await?.into_inner().order_id)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn services(spans: &[Span]) -> BTreeSet<&str> {
    spans.iter().map(|s| s.service.as_str()).collect()
}

/// The participant RPC of each forward step, by service.
const STEP_RPCS: &[(&str, &str, &str)] = &[
    (
        "inventory",
        "reserve_inventory",
        "inventory.v1.InventoryService/Reserve",
    ),
    (
        "payment",
        "charge_payment",
        "payment.v1.PaymentService/Charge",
    ),
    (
        "fulfillment",
        "ship_order",
        "fulfillment.v1.FulfillmentService/Ship",
    ),
];

/// Each participant RPC span of `spans` is a child of an orchestrator
/// step-attempt span of its step, which is a child of a saga span.
fn assert_rpcs_under_step_attempts(spans: &[Span]) {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for (service, step, rpc) in STEP_RPCS {
        let calls: Vec<&Span> = spans
            .iter()
            .filter(|s| s.service == *service && s.name == *rpc)
            .collect();
        assert!(
            !calls.is_empty(),
            "no {rpc} span from {service}: {spans:#?}"
        );
        for call in calls {
            let parent = by_id
                .get(call.parent.as_str())
                .unwrap_or_else(|| panic!("{rpc}'s parent is not in the trace: {call:#?}"));
            assert_eq!(parent.service, "orchestrator", "{parent:#?}");
            assert_eq!(parent.name, format!("action {step}"), "{parent:#?}");
            assert_eq!(
                parent.attributes.get("step").map(String::as_str),
                Some(*step)
            );
            assert_eq!(
                parent.attributes.get("kind").map(String::as_str),
                Some("ACTION")
            );
            assert!(parent.attributes.contains_key("attempt"), "{parent:#?}");
            assert_eq!(
                parent.attributes.get("outcome").map(String::as_str),
                Some("SUCCEEDED"),
                "{parent:#?}"
            );
            assert_eq!(
                parent
                    .attributes
                    .get("rpc.grpc.status_code")
                    .map(String::as_str),
                Some("0"),
                "{parent:#?}"
            );
            let saga = by_id
                .get(parent.parent.as_str())
                .unwrap_or_else(|| panic!("the step's parent is not in the trace: {parent:#?}"));
            assert_eq!(saga.name, "saga", "{saga:#?}");
        }
    }
}

/// A complete trace: PlaceOrder, the saga, and the three forward steps
/// with their participant RPCs.
fn complete(spans: &[Span]) -> bool {
    !named(spans, "saga.v1.OrderService/PlaceOrder").is_empty()
        && !named(spans, "saga").is_empty()
        && STEP_RPCS.iter().all(|(service, step, rpc)| {
            spans
                .iter()
                .any(|s| s.service == *service && s.name == *rpc)
                && !named(spans, &format!("action {step}")).is_empty()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_one_trace_across_the_four_services_and_a_resumed_saga_stays_in_it() -> Result<()>
{
    let collector = Collector::default();
    let otlp = collector.start().await?;
    let mut cluster = Cluster::start("trace_on", Some(otlp.clone()), "").await?;
    let mut a = cluster.replica("a", "").await?;

    // One saga, no trace context from the caller: the trace starts at
    // PlaceOrder.
    let first = place(&mut a.orders, None).await?;
    let done = wait_status(&mut a.orders, &first, settled).await?;
    assert_eq!(done.status(), OrderStatus::Completed);
    assert_eq!(done.trace_id.len(), 32, "trace id {:?}", done.trace_id);
    let spans = collector.wait_trace(&done.trace_id, complete).await;
    assert_eq!(
        services(&spans),
        BTreeSet::from(["fulfillment", "inventory", "orchestrator", "payment"])
    );
    let placed = named(&spans, "saga.v1.OrderService/PlaceOrder");
    assert_eq!(placed.len(), 1, "{spans:#?}");
    assert_eq!(placed[0].parent, "", "PlaceOrder is the root");
    let sagas = named(&spans, "saga");
    assert_eq!(sagas.len(), 1, "{spans:#?}");
    assert_eq!(
        sagas[0].parent, placed[0].span_id,
        "the saga runs under PlaceOrder"
    );
    assert_rpcs_under_step_attempts(&spans);
    // Each participant's group-commit write is a span of its own, linked
    // to the RPC span (or a span under it) it served.
    for service in ["inventory", "payment", "fulfillment"] {
        let ours: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.service == service)
            .map(|s| s.span_id.as_str())
            .collect();
        let all = collector.spans();
        assert!(
            all.iter().any(|s| s.service == service
                && s.name == "db.batch"
                && s.links.iter().any(|l| ours.contains(l.as_str()))),
            "no {service} db.batch span linked to the trace: {all:#?}"
        );
    }

    // A caller's trace continues.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let second = place(
        &mut a.orders,
        Some(&format!("00-{caller_trace}-{caller_span}-01")),
    )
    .await?;
    let done = wait_status(&mut a.orders, &second, settled).await?;
    assert_eq!(done.trace_id, caller_trace);
    let spans = collector.wait_trace(caller_trace, complete).await;
    let placed = named(&spans, "saga.v1.OrderService/PlaceOrder");
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].parent, caller_span);
    assert_rpcs_under_step_attempts(&spans);

    // A crash mid-saga: replica a dies while Ship is in progress; replica
    // b takes the saga over and finishes it in the same trace.
    FaultInjectionClient::connect(cluster.urls[2].clone())
        .await?
        .set_fault(proto::fault::v1::SetFaultRequest {
            latency_ms: 3000,
            ..fault("Ship", "DELAY", tonic::Code::Ok, 1)
        })
        .await?;
    let third = place(&mut a.orders, None).await?;
    let shipping = wait_status(&mut a.orders, &third, |s| s == OrderStatus::Shipping).await?;
    let trace = shipping.trace_id.clone();
    assert_eq!(trace.len(), 32);
    // The spans a ended before it dies are exported within the batch delay.
    let before = collector
        .wait_trace(&trace, |spans| {
            !named(spans, "saga.v1.OrderService/PlaceOrder").is_empty()
                && !named(spans, "action charge_payment").is_empty()
        })
        .await;
    let placed = named(&before, "saga.v1.OrderService/PlaceOrder")[0].clone();
    drop(a); // SIGKILL
    let mut b = cluster.replica("b", "").await?;
    let done = wait_status(&mut b.orders, &third, settled).await?;
    assert_eq!(done.status(), OrderStatus::Completed);
    assert_eq!(
        done.trace_id, trace,
        "the trace id is the saga's, on any replica"
    );
    let spans = collector
        .wait_trace(&trace, |spans| {
            spans.iter().any(|s| s.instance == "b" && s.name == "saga")
                && spans.iter().any(|s| {
                    s.service == "fulfillment"
                        && s.name == "fulfillment.v1.FulfillmentService/Ship"
                        && spans
                            .iter()
                            .any(|p| p.instance == "b" && p.span_id == s.parent)
                })
        })
        .await;
    let resumed: Vec<&Span> = spans
        .iter()
        .filter(|s| s.instance == "b" && s.name == "saga")
        .collect();
    assert_eq!(resumed.len(), 1, "{spans:#?}");
    assert_eq!(
        resumed[0].parent, placed.span_id,
        "the resumed saga's span continues the stored context (PlaceOrder on a)"
    );
    assert!(
        spans.iter().any(|s| s.instance == "b"
            && s.name == "action ship_order"
            && s.parent == resumed[0].span_id),
        "{spans:#?}"
    );

    // JSON logs carry the trace of the span they are in.
    let stderr = stop(b.process).await?;
    let traced_line = stderr.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .is_some_and(|v| {
                v["trace_id"] == trace.as_str()
                    && v["span_id"].as_str().is_some_and(|s| s.len() == 16)
                    && v["message"] == "call finished"
            })
    });
    assert!(traced_line, "no JSON log line with trace {trace}: {stderr}");
    cluster.stop_participants().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_nothing_is_exported_and_orders_have_no_trace_id() -> Result<()> {
    let collector = Collector::default();
    let url = collector.start().await?;
    // No --otlp-endpoint; the collector is named only where an exporter
    // built by mistake would look (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
    let mut cluster = Cluster::start("trace_off", None, &url).await?;
    for process in &mut cluster.participants {
        assert!(process.exited().is_none());
    }
    let mut a = cluster.replica("a", &url).await?;
    let order = place(&mut a.orders, None).await?;
    let done = wait_status(&mut a.orders, &order, settled).await?;
    assert_eq!(done.status(), OrderStatus::Completed);
    assert_eq!(done.trace_id, "");
    // A caller's traceparent is kept with the order even so, so the order
    // can be found in the caller's trace.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let traced = place(
        &mut a.orders,
        Some(&format!("00-{caller_trace}-b7ad6b7169203331-01")),
    )
    .await?;
    let done = wait_status(&mut a.orders, &traced, settled).await?;
    assert_eq!(done.trace_id, caller_trace);
    let stderr = stop(a.process).await?;
    assert!(
        stderr
            .lines()
            .all(|line| serde_json::from_str::<serde_json::Value>(line).is_ok()),
        "--log-format json: {stderr}"
    );
    assert!(!stderr.contains("\"trace_id\""), "{stderr}");
    cluster.stop_participants().await?;
    assert!(
        collector.spans().is_empty(),
        "exported with tracing off: {:#?}",
        collector.spans()
    );
    Ok(())
}
