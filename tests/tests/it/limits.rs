//! The limits on what clients send, each answered with a clear status that
//! changes nothing: the largest message, streams per HTTP/2 connection,
//! WatchOrder streams per orchestrator, the server-side request deadline
//! (which a WatchOrder stream outlives), and the HTTP port's request head.

use std::time::{Duration, Instant};

use harness::{
    System, delay, expect_code, http_get, spawn_participant, spawn_system, spawn_system_with,
};
use orchestrator::config::Settings;
use participants::{Participant, ServeOptions};
use proto::fault::v1::SetFaultRequest;
use proto::inventory::v1::{GetStockRequest, UpsertProductRequest};
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{
    GetOrderStatusRequest, OrderStatus, PlaceOrderRequest, WatchOrderRequest, WatchOrderResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

const SETTLE: Duration = Duration::from_secs(30);

/// A system with `adjust`ed settings, a product and a customer, in which
/// every saga's Ship is held for `ship_ms` (so sagas stay in flight).
async fn held_system(adjust: impl FnOnce(&mut Settings), ship_ms: u32) -> System {
    let system = spawn_system_with(|s| {
        s.step_timeout = Duration::from_secs(20);
        adjust(s);
    })
    .await
    .unwrap();
    system.seed_product("widget", 10, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    system
        .fault("fulfillment", delay("Ship", ship_ms))
        .await
        .unwrap();
    system
}

#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted_and_writes_nothing() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    let order = |customer_id: String| PlaceOrderRequest {
        customer_id,
        ..harness::place_request("alice", &[("widget", 1)], "")
    };

    // 2 MiB: refused before anything reads it.
    let message = expect_code(
        system
            .orders()
            .place_order(order("a".repeat(2 << 20)))
            .await,
        Code::ResourceExhausted,
    );
    assert!(message.contains("message length too large"), "{message}");
    // Under the 1 MiB limit it is decoded, and refused by the handler.
    expect_code(
        system
            .orders()
            .place_order(order("a".repeat(512 << 10)))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(system.saga_count().await.unwrap(), 0, "no saga was written");
    // The connection is still good for the next order.
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    system.wait_settled(&id, SETTLE).await.unwrap();

    // A participant has the same limit.
    let mut inventory = system.participants.inventory.inventory();
    expect_code(
        inventory
            .upsert_product(UpsertProductRequest {
                product_id: "big".into(),
                name: "n".repeat(2 << 20),
                price_cents: 1,
                stock: 1,
            })
            .await,
        Code::ResourceExhausted,
    );
    expect_code(
        inventory
            .get_stock(GetStockRequest {
                product_id: "big".into(),
            })
            .await,
        Code::NotFound,
    );
    system.audit().await.unwrap();
}

/// Opens a WatchOrder stream on `channel` in a task: reports its index on
/// `opened` once the server answered (headers and first update), then
/// holds the stream until `release` fires, and returns whether it ever
/// failed.
fn hold_watch(
    channel: Channel,
    order_id: String,
    index: usize,
    opened: mpsc::UnboundedSender<usize>,
    release: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    tokio::spawn(async move {
        let mut stream: Streaming<WatchOrderResponse> = OrderServiceClient::new(channel)
            .watch_order(WatchOrderRequest { order_id })
            .await?
            .into_inner();
        stream.message().await?;
        let _ = opened.send(index);
        let _ = release.await;
        Ok(())
    })
}

/// The value of an unlabelled gauge in a `/metrics` body.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_wait_for_one_to_end() {
    const LIMIT: u32 = 4;
    const STREAMS: usize = 6;
    // Every saga stays in flight while the streams are open.
    let system = held_system(|s| s.limits.max_concurrent_streams = LIMIT, 15_000).await;
    let mut ids = Vec::new();
    for _ in 0..STREAMS {
        ids.push(system.place("alice", &[("widget", 1)]).await.unwrap());
    }
    let orchestrator = system.orchestrator.as_ref().unwrap();
    // One connection; a first call makes sure the server's SETTINGS (with
    // its stream limit) have arrived.
    let channel = Endpoint::from_shared(orchestrator.endpoint().to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    OrderServiceClient::new(channel.clone())
        .get_order_status(GetOrderStatusRequest {
            order_id: ids[0].clone(),
        })
        .await
        .unwrap();

    let (opened_tx, mut opened) = mpsc::unbounded_channel();
    let mut releases = Vec::new();
    let mut tasks = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let (release, hold) = oneshot::channel();
        releases.push(Some(release));
        tasks.push(Some(hold_watch(
            channel.clone(),
            id.clone(),
            index,
            opened_tx.clone(),
            hold,
        )));
    }
    let mut open = Vec::new();
    while open.len() < LIMIT as usize {
        let index = tokio::time::timeout(Duration::from_secs(10), opened.recv())
            .await
            .expect("the first streams open")
            .unwrap();
        open.push(index);
    }
    // The rest wait: the client queues them (none is refused) while the
    // connection has LIMIT streams open...
    assert!(
        tokio::time::timeout(Duration::from_secs(1), opened.recv())
            .await
            .is_err(),
        "a stream beyond the limit of {LIMIT} opened"
    );
    // ...and the server sees no more than LIMIT.
    let (code, metrics) = http_get(orchestrator.http_address(), "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        gauge(&metrics, "saga_watch_streams"),
        Some(f64::from(LIMIT))
    );
    // Even a unary call on that connection waits for a free stream.
    let mut orders = OrderServiceClient::new(channel.clone());
    let waiting = tokio::spawn(async move {
        orders
            .get_order_status(GetOrderStatusRequest {
                order_id: String::new(),
            })
            .await
    });

    // Each stream that ends lets one waiting call in.
    for round in 0..(STREAMS - LIMIT as usize) {
        let done = open[round];
        let _ = releases[done].take().unwrap().send(());
        tasks[done].take().unwrap().await.unwrap().unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), opened.recv())
            .await
            .expect("a waiting stream opens once one ends")
            .unwrap();
        open.push(next);
    }
    let mut indices = open.clone();
    indices.sort_unstable();
    assert_eq!(indices, (0..STREAMS).collect::<Vec<_>>());
    assert!(!waiting.is_finished(), "still {LIMIT} streams open");
    for release in releases.iter_mut().filter_map(Option::take) {
        let _ = release.send(());
    }
    for task in tasks.into_iter().flatten() {
        task.await.unwrap().unwrap();
    }
    // Then the unary call goes through (answering as it should).
    expect_code(waiting.await.unwrap(), Code::InvalidArgument);

    system.clear_faults().await.unwrap();
    for id in &ids {
        system.wait_settled(id, SETTLE).await.unwrap();
    }
    system.audit().await.unwrap();
}

#[tokio::test]
async fn watch_streams_beyond_max_watches_are_refused_until_one_ends() {
    let system = held_system(|s| s.executor.max_watches = 2, 15_000).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(system.place("alice", &[("widget", 1)]).await.unwrap());
    }
    let watch = |id: &str| {
        let mut orders = system.orders();
        let request = WatchOrderRequest {
            order_id: id.to_owned(),
        };
        async move { orders.watch_order(request).await }
    };
    let first = watch(&ids[0]).await.unwrap().into_inner();
    let _second = watch(&ids[1]).await.unwrap().into_inner();
    let message = expect_code(watch(&ids[2]).await, Code::ResourceExhausted);
    assert!(
        message.contains("too many WatchOrder streams (2"),
        "{message}"
    );
    // A refused watch changes nothing: the saga goes on.
    assert_ne!(
        system.status(&ids[2]).await.unwrap().status(),
        OrderStatus::Failed
    );

    // A stream that ends frees its slot (the server notices the cancel).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        match watch(&ids[2]).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status}"),
        }
    };
    system.clear_faults().await.unwrap();
    let mut last = None;
    while let Some(update) = third.message().await.unwrap() {
        last = Some(update.status());
    }
    assert_eq!(last, Some(OrderStatus::Completed));
    for id in &ids {
        system.wait_settled(id, SETTLE).await.unwrap();
    }
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_watch_outlives_the_request_timeout() {
    let timeout = Duration::from_secs(1);
    let system = held_system(|s| s.limits.request_timeout = timeout, 3_000).await;
    let started = Instant::now();
    let id = system.place("alice", &[("widget", 1)]).await.unwrap();
    let mut stream = system
        .orders()
        .watch_order(WatchOrderRequest { order_id: id })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(update) = stream.message().await.expect("not cut off") {
        last = Some(update.status());
    }
    assert_eq!(last, Some(OrderStatus::Completed));
    assert!(
        started.elapsed() > 2 * timeout,
        "the stream lasted longer than the request timeout"
    );
    system.clear_faults().await.unwrap();
    system.audit().await.unwrap();
}

#[tokio::test]
async fn a_call_slower_than_the_request_timeout_is_answered_at_the_timeout() {
    let timeout = Duration::from_millis(500);
    let participant = spawn_participant(
        Participant::Inventory,
        ServeOptions {
            fault_injection: true,
            limits: common::limits::Limits {
                request_timeout: timeout,
                ..Default::default()
            },
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    participant
        .faults()
        .set_fault(SetFaultRequest {
            latency_ms: 10_000,
            ..harness::fault("UpsertProduct", "DELAY", Code::Ok, 0)
        })
        .await
        .unwrap();
    let upsert = UpsertProductRequest {
        product_id: "widget".into(),
        name: "Widget".into(),
        price_cents: 10,
        stock: 1,
    };
    let started = Instant::now();
    let message = expect_code(
        participant.inventory().upsert_product(upsert.clone()).await,
        Code::DeadlineExceeded,
    );
    let took = started.elapsed();
    assert!(message.contains("--request-timeout"), "{message}");
    assert!(
        took >= timeout && took < Duration::from_secs(3),
        "answered after {took:?}, not at the {timeout:?} timeout nor after the delay"
    );
    // A client's shorter deadline is honoured (tonic answers CANCELLED).
    let mut request = tonic::Request::new(upsert);
    request.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let status = participant
        .inventory()
        .upsert_product(request)
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status}"
    );
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    // The handler never ran: nothing was written.
    expect_code(
        participant
            .inventory()
            .get_stock(GetStockRequest {
                product_id: "widget".into(),
            })
            .await,
        Code::NotFound,
    );
}

/// What the server sends on `stream` until it closes, and how long that
/// took (None: still open after `wait`).
async fn until_closed(
    stream: &mut tokio::net::TcpStream,
    wait: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let read = tokio::time::timeout(wait, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| (received, started.elapsed()))
}

#[tokio::test]
async fn the_http_port_closes_slow_request_heads_and_refuses_long_ones() {
    let timeout = Duration::from_millis(500);
    let system = spawn_system_with(|s| s.limits.http_header_timeout = timeout)
        .await
        .unwrap();
    let address = system.orchestrator.as_ref().unwrap().http_address();

    // A normal request works, even one that arrives in pieces.
    assert_eq!(http_get(address, "/healthz").await.0, 200);
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    for piece in ["GET /hea", "lthz HTTP/1.1\r\n", "host: x\r\n", "\r\n"] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (response, _) = until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(
        response.starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );

    // Silent, or a request line that stalls: closed at the header timeout,
    // unanswered.
    for sent in ["", "GET /healthz HTT"] {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(sent.as_bytes()).await.unwrap();
        let (response, took) = until_closed(&mut stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{sent:?}: still open after 5 s"));
        assert!(response.is_empty(), "{sent:?}: {response:?}");
        assert!(
            took >= timeout - Duration::from_millis(100),
            "{sent:?}: closed after {took:?}, before the timeout"
        );
    }
    // A slow loris that keeps sending, a byte at a time, is cut off too:
    // the timeout is for the whole head.
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    let mut cut_off = false;
    for byte in b"GET /healthz HTTP/1.1\r\nx-slow: "
        .iter()
        .cycle()
        .take(200)
    {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut probe)).await
        {
            assert!(matches!(read, Ok(0) | Err(_)), "answered a partial head");
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "a trickling head was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A head over 8 KiB: 431, then closed.
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (response, _) = until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{response}"
    );
    // And the port still serves.
    assert_eq!(http_get(address, "/healthz").await.0, 200);
}

/// One HTTP/2 frame as the raw client below reads it.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

async fn write_frame(
    tcp: &mut tokio::net::TcpStream,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) {
    let length = u32::try_from(payload.len()).unwrap();
    let mut bytes = length.to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    tcp.write_all(&bytes).await.unwrap();
}

async fn read_frame(stream: &mut tokio::net::TcpStream) -> Frame {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.unwrap();
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// A gRPC request's header block, every field a literal without indexing
/// (HPACK's plainest form, no Huffman), so no encoder is needed.
fn grpc_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend(value.as_bytes());
    }
    block
}

/// A client that does not honour the server's stream limit (tonic's does,
/// by queueing, as the test above shows) gets the streams beyond it reset
/// with REFUSED_STREAM, which tells it the request was not processed: the
/// order it carried is not placed, and the connection and its other
/// streams carry on.
#[tokio::test]
async fn a_client_ignoring_the_stream_limit_is_refused_and_nothing_is_written() {
    use prost::Message as _;
    const LIMIT: u32 = 4;
    let system = spawn_system_with(|s| s.limits.max_concurrent_streams = LIMIT)
        .await
        .unwrap();
    system.seed_product("widget", 10, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    let orchestrator = system.orchestrator.as_ref().unwrap();
    let address = orchestrator
        .endpoint()
        .trim_start_matches("http://")
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    write_frame(&mut tcp, FRAME_SETTINGS, 0, 0, &[]).await;
    // The server's SETTINGS announce the limit; acknowledging them puts
    // it in force.
    let settings = loop {
        let frame = read_frame(&mut tcp).await;
        if frame.kind == FRAME_SETTINGS && frame.flags & FLAG_ACK == 0 {
            break frame.payload;
        }
    };
    let announced = settings.chunks_exact(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(announced, Some(LIMIT), "the server announces its limit");
    write_frame(&mut tcp, FRAME_SETTINGS, FLAG_ACK, 0, &[]).await;

    // LIMIT streams held open: their request bodies never come.
    for index in 0..LIMIT {
        write_frame(
            &mut tcp,
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            1 + 2 * index,
            &grpc_headers("/saga.v1.OrderService/GetOrderStatus"),
        )
        .await;
    }
    // One more, a whole PlaceOrder, without waiting for a stream to end.
    let beyond = 1 + 2 * LIMIT;
    write_frame(
        &mut tcp,
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        beyond,
        &grpc_headers("/saga.v1.OrderService/PlaceOrder"),
    )
    .await;
    let message = harness::place_request("alice", &[("widget", 1)], "").encode_to_vec();
    let mut body = vec![0u8];
    body.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend(message);
    write_frame(&mut tcp, FRAME_DATA, FLAG_END_STREAM, beyond, &body).await;
    write_frame(&mut tcp, FRAME_PING, 0, 0, b"stillup!").await;

    // The stream beyond the limit is refused; the connection stays up
    // (the ping is answered, no GOAWAY) and the held streams stay open.
    let mut refused = None;
    let mut ponged = false;
    tokio::time::timeout(Duration::from_secs(10), async {
        while refused.is_none() || !ponged {
            let frame = read_frame(&mut tcp).await;
            match frame.kind {
                FRAME_RST_STREAM => {
                    let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                    assert_eq!(
                        frame.stream, beyond,
                        "only the stream beyond the limit is reset (code {code})"
                    );
                    refused = Some(code);
                }
                FRAME_PING if frame.flags & FLAG_ACK != 0 => {
                    assert_eq!(frame.payload, b"stillup!");
                    ponged = true;
                }
                FRAME_GOAWAY => panic!("the server closed the connection"),
                _ => {}
            }
        }
    })
    .await
    .expect("the refusal and the ping's answer arrive");
    assert_eq!(refused, Some(REFUSED_STREAM));

    // Nothing was written: the refused PlaceOrder placed no order.
    let listed = system
        .admin()
        .list_sagas(proto::saga::v1::ListSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sagas.is_empty(), "{:?}", listed.sagas);
    assert_eq!(system.stock("widget").await.unwrap(), (100, 0));
}
