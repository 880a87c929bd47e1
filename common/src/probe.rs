//! The HTTP port of every service (`--http-listen`): `GET /healthz` (the
//! process is alive: 200, 503 while stopping), `GET /readyz` (a JSON body
//! with the status of each dependency; 503 while not ready) and
//! `GET /metrics` (Prometheus text), and any further routes the service
//! gives it as an axum `Router` ([`Probes::routes`]: the orchestrator's web
//! console). HTTP/1.0-style, one request per connection: the head is read
//! here, under the limits below, then parsed (httparse) and, for a route,
//! handed with its body (`content-length` only, at most
//! [`MAX_HTTP_BODY_BYTES`], read within the same timeout; longer: 413) to
//! the router, whose answer is written back whole. Accept errors are
//! backed off and logged at most once a second ([`crate::listen`]). The
//! request head (request line and headers, up to the blank line) is read
//! within the header timeout (`--http-header-timeout`) or the connection
//! is closed unanswered, so a client that connects and sends nothing, or
//! trickles a partial request line, holds its socket for no longer; a head
//! longer than [`MAX_HTTP_HEADER_BYTES`] is answered 431 and closed. The
//! answer must be taken within the same timeout. With the server's TLS
//! ([`crate::tls`]) the port speaks HTTPS only, and the handshake has its
//! own bound ([`crate::tls::HANDSHAKE_TIMEOUT`]).
//!
//! Readiness is checked in the background ([`watch_readiness`]) every
//! second or so, not per request: a probe or a scrape never waits on a
//! dependency, and the gRPC health service follows the same result.

use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::limits::{MAX_HTTP_BODY_BYTES, MAX_HTTP_HEADER_BYTES};

/// One dependency's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What it is (`database`, `participant:inventory`, ...).
    pub name: String,
    /// Whether it answered as it should.
    pub ok: bool,
    /// What it answered, or why it did not.
    pub detail: String,
}

impl Check {
    /// A check named `name` from the result of probing it.
    pub fn of(name: impl Into<String>, result: Result<String, String>) -> Self {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Self {
            name: name.into(),
            ok,
            detail,
        }
    }
}

/// The latest readiness checks; not ready until the first check ran.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<Option<Vec<Check>>>,
}

impl Readiness {
    /// Nothing checked yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records the latest checks; true if every one passed.
    pub fn update(&self, checks: Vec<Check>) -> bool {
        let ready = checks.iter().all(|c| c.ok);
        *self.checks.lock().unwrap_or_else(|e| e.into_inner()) = Some(checks);
        ready
    }

    /// Whether the latest checks all passed.
    pub fn is_ready(&self) -> bool {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|checks| checks.iter().all(|c| c.ok))
    }

    /// `{"ready": bool, "checks": [{"name", "ok", "detail"}]}`.
    pub fn json(&self, stopping: bool) -> String {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let ready = !stopping && checks.as_ref().is_some_and(|c| c.iter().all(|c| c.ok));
        let mut text = format!("{{\"ready\": {ready}");
        if stopping {
            text.push_str(", \"stopping\": true");
        }
        text.push_str(", \"checks\": [");
        for (i, check) in checks.iter().flatten().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            let _ = write!(
                text,
                "{{\"name\": {}, \"ok\": {}, \"detail\": {}}}",
                json_string(&check.name),
                check.ok,
                json_string(&check.detail)
            );
        }
        text.push_str("]}\n");
        text
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders the `/metrics` body (it may read gauges first).
pub type RenderMetrics =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// What the HTTP port serves.
#[derive(Clone)]
pub struct Probes {
    /// The latest readiness checks.
    pub readiness: Arc<Readiness>,
    /// True once the service stops.
    pub stopping: watch::Receiver<bool>,
    /// The metrics body.
    pub metrics: RenderMetrics,
    /// Routes served beside the probes (every path but `/healthz`,
    /// `/readyz` and `/metrics`); none: 404.
    pub routes: Option<axum::Router>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

/// Serves the probes and metrics until `probes.stopping` turns true; a
/// connection whose request head has not arrived within `header_timeout`
/// is closed unanswered. With `tls`, over TLS only (HTTPS; ALPN
/// `http/1.1`, client certificates as the server's TLS requires them),
/// each handshake in the connection's own task.
pub async fn serve_http(
    listener: TcpListener,
    probes: Probes,
    header_timeout: Duration,
    tls: Option<Arc<crate::tls::Server>>,
) {
    let mut stopping = probes.stopping.clone();
    let mut acceptor = crate::listen::Acceptor::new(listener, "http");
    loop {
        let stream = tokio::select! {
            stream = acceptor.accept() => stream,
            _ = stopping.wait_for(|stopping| *stopping) => return,
        };
        let probes = probes.clone();
        let tls = tls.as_ref().map(|tls| tls.acceptor(crate::tls::Port::Http));
        tokio::spawn(async move {
            let answered = match tls {
                None => answer(stream, &probes, header_timeout).await,
                Some(acceptor) => match crate::tls::handshake(&acceptor, stream).await {
                    Ok(stream) => answer(stream, &probes, header_timeout).await,
                    Err(error) => Err(error),
                },
            };
            if let Err(error) = answered {
                tracing::debug!(%error, "http request failed");
            }
        });
    }
}

/// Why no request head was read.
#[derive(Debug)]
enum HeadError {
    /// Longer than [`MAX_HTTP_HEADER_BYTES`] without the blank line.
    TooLarge,
    /// Not complete within the header timeout.
    TimedOut,
    /// The peer closed before the blank line, or the read failed.
    Io(std::io::Error),
}

/// Reads a request head up to and including the blank line that ends it,
/// all within `timeout` (one deadline for the whole head, however it
/// trickles in) and in at most [`MAX_HTTP_HEADER_BYTES`]. Returns the
/// buffer, the head's length in it and how much of it was filled (the
/// start of a body may have come with the head).
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<([u8; MAX_HTTP_HEADER_BYTES], usize, usize), HeadError> {
    let mut buffer = [0u8; MAX_HTTP_HEADER_BYTES];
    let mut filled = 0;
    let read = async {
        loop {
            if filled == buffer.len() {
                return Err(HeadError::TooLarge);
            }
            let read = stream
                .read(&mut buffer[filled..])
                .await
                .map_err(HeadError::Io)?;
            if read == 0 {
                return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            // The end may straddle two reads: look from 3 bytes back.
            let from = filled.saturating_sub(3);
            filled += read;
            if let Some(at) = buffer[from..filled]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                return Ok(from + at + 4);
            }
        }
    };
    let length = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| HeadError::TimedOut)??;
    Ok((buffer, length, filled))
}

/// Reads and drops what the peer still sends, for at most `timeout` and
/// 64 KiB: closing a socket with unread input resets the connection, and
/// the reset can destroy the answer before the peer reads it.
async fn drain<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(timeout, async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(read) => left = left.saturating_sub(read),
            }
        }
    })
    .await;
}

/// A complete answer: status line, headers, body.
fn response(code: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

async fn answer<S>(mut stream: S, probes: &Probes, header_timeout: Duration) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, length, filled) = match read_head(&mut stream, header_timeout).await {
        Ok(head) => head,
        Err(HeadError::TooLarge) => {
            let body = format!("the request head is longer than {MAX_HTTP_HEADER_BYTES} bytes\n");
            let answer = response(
                "431 Request Header Fields Too Large",
                PLAIN,
                body.as_bytes(),
            );
            send(&mut stream, &answer, header_timeout).await?;
            drain(&mut stream, header_timeout).await;
            return Ok(());
        }
        Err(HeadError::TimedOut) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request head within the header timeout",
            ));
        }
        Err(HeadError::Io(error)) => return Err(error),
    };
    let request = String::from_utf8_lossy(&head[..length]);
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target);
    let stopping = *probes.stopping.borrow();
    let (code, content_type, body) = match path {
        "/healthz" if stopping => ("503 Service Unavailable", TEXT, "stopping\n".to_owned()),
        "/healthz" => ("200 OK", TEXT, "ok\n".to_owned()),
        "/readyz" => {
            let code = if !stopping && probes.readiness.is_ready() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (code, JSON, probes.readiness.json(stopping))
        }
        "/metrics" => ("200 OK", TEXT, (probes.metrics)().await),
        _ => match &probes.routes {
            Some(routes) => {
                let answer = route(
                    &mut stream,
                    routes,
                    &head[..length],
                    &head[length..filled],
                    header_timeout,
                )
                .await?;
                return send(&mut stream, &answer, header_timeout).await;
            }
            None => (
                "404 Not Found",
                TEXT,
                "try /healthz, /readyz or /metrics\n".to_owned(),
            ),
        },
    };
    send(
        &mut stream,
        &response(code, content_type, body.as_bytes()),
        header_timeout,
    )
    .await
}

/// Hands one request to `routes`: parses the head, reads the body that
/// `content-length` announces (`early`: what came with the head) within
/// `timeout`, and renders the router's answer. Requests the port cannot
/// take are answered here: a malformed head 400, a chunked body 411, a
/// body over [`MAX_HTTP_BODY_BYTES`] 413.
async fn route<S: AsyncRead + Unpin>(
    stream: &mut S,
    routes: &axum::Router,
    head: &[u8],
    early: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    use axum::http;
    use tower::ServiceExt;

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let refuse = |code: &str, why: &str| Ok(response(code, PLAIN, format!("{why}\n").as_bytes()));
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                "431 Request Header Fields Too Large",
                "more than 64 request headers",
            );
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return refuse("400 Bad Request", "malformed request head");
        }
    }
    let mut request = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    let mut announced = 0usize;
    for header in parsed.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return refuse(
                "411 Length Required",
                "chunked request bodies are not accepted; send content-length",
            );
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                Some(length) => announced = length,
                None => return refuse("400 Bad Request", "content-length is not a number"),
            }
        }
        request = request.header(header.name, header.value);
    }
    if announced > MAX_HTTP_BODY_BYTES {
        return refuse(
            "413 Content Too Large",
            &format!("the request body is longer than {MAX_HTTP_BODY_BYTES} bytes"),
        );
    }
    let mut body = early[..early.len().min(announced)].to_vec();
    if body.len() < announced {
        let start = body.len();
        body.resize(announced, 0);
        tokio::time::timeout(timeout, stream.read_exact(&mut body[start..]))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no complete request body within the header timeout",
                )
            })??;
    }
    let request = match request.body(axum::body::Body::from(body)) {
        Ok(request) => request,
        Err(_) => return refuse("400 Bad Request", "malformed request head"),
    };
    let answer = match routes.clone().oneshot(request).await {
        Ok(answer) => answer,
        Err(never) => match never {},
    };
    let (parts, body) = answer.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(std::io::Error::other)?;
    let reason = parts.status.canonical_reason().unwrap_or("");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).into_bytes();
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes `response` and closes the sending side, within `timeout`: a peer
/// that does not take the answer does not hold the socket.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    tokio::time::timeout(timeout, async {
        stream.write_all(response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the answer was not taken"))?
}

/// Runs `check` now and then every `every` until `stopping` turns true,
/// recording the result in `readiness`. The gRPC health of the server as a
/// whole (service `""`, what a probe asks by default) follows readiness:
/// SERVING when every check passed, as `/readyz` answers 200. Each of
/// `services` is SERVING when the checks that `gate` selects passed (what
/// that service needs to take calls), NOT_SERVING otherwise.
pub async fn watch_readiness<F, Fut>(
    readiness: Arc<Readiness>,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    every: Duration,
    mut stopping: watch::Receiver<bool>,
    gate: fn(&Check) -> bool,
    check: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Vec<Check>>,
{
    let status = |serving: bool| {
        if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let (mut serving, mut ready) = (None, None);
    loop {
        let checks = check().await;
        let healthy = checks.iter().filter(|c| gate(c)).all(|c| c.ok);
        let all_ok = checks.iter().all(|c| c.ok);
        for failed in checks.iter().filter(|c| !c.ok) {
            tracing::debug!(check = %failed.name, detail = %failed.detail, "not ready");
        }
        readiness.update(checks);
        if *stopping.borrow() {
            return;
        }
        if serving != Some(healthy) {
            if serving.is_some() {
                tracing::info!(serving = healthy, "serving changed");
            }
            crate::grpc::set_health(&reporter, &services, status(healthy)).await;
            serving = Some(healthy);
        }
        if ready != Some(all_ok) {
            if ready.is_some() {
                tracing::info!(ready = all_ok, "readiness changed");
            }
            reporter.set_service_status("", status(all_ok)).await;
            ready = Some(all_ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// A gRPC health Check of the server at the end of `channel`, as a whole
/// (service `""`), within `timeout`: `Ok("SERVING")` or why not.
pub async fn grpc_health(
    channel: tonic::transport::Channel,
    timeout: Duration,
) -> Result<String, String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(request)).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(response)) => {
            let status = response.into_inner().status();
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
                Ok("SERVING".to_owned())
            } else {
                Err(status.as_str_name().to_owned())
            }
        }
    }
}

/// A database readiness check: reachable, and migrated up to `latest`
/// (the last migration this build knows), read from sqlx's bookkeeping
/// table: one indexed row.
pub fn migrated(applied: Result<Option<i64>, sqlx::Error>, latest: i64) -> Result<String, String> {
    match applied {
        Err(error) => Err(format!("unreachable: {error}")),
        Ok(Some(version)) if version >= latest => Ok(format!("migrated to {version}")),
        Ok(version) => Err(format!(
            "migrated to {} of {latest}",
            version.map_or("nothing".to_owned(), |v| v.to_string())
        )),
    }
}

/// The query [`migrated`] reads: the last migration applied.
pub const MIGRATED_SQL: &str = "SELECT max(version) FROM _sqlx_migrations WHERE success";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_head_is_read_to_its_blank_line_within_bounds() {
        let timeout = Duration::from_millis(300);
        // In pieces, the blank line split across two writes.
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move { read_head(&mut server, timeout).await });
        for piece in ["GET /healthz HT", "TP/1.1\r\nhost: x\r", "\n\r", "\nbody"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (head, length, _) = reader.await.unwrap().unwrap();
        assert_eq!(&head[..length], b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");

        // Exactly the limit is read; one byte more is too large.
        for (size, fits) in [
            (MAX_HTTP_HEADER_BYTES, true),
            (MAX_HTTP_HEADER_BYTES + 1, false),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64 * 1024);
            let filler = "a".repeat(size - "GET / HTTP/1.1\r\nx: \r\n\r\n".len());
            let request = format!("GET / HTTP/1.1\r\nx: {filler}\r\n\r\n");
            assert_eq!(request.len(), size);
            client.write_all(request.as_bytes()).await.unwrap();
            let read = read_head(&mut server, timeout).await;
            match (fits, read) {
                (true, Ok((_, length, _))) => assert_eq!(length, size),
                (false, Err(HeadError::TooLarge)) => {}
                (_, other) => panic!("{size} bytes: {other:?}"),
            }
        }

        // A partial request line, then silence: timed out, at the timeout.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /hea").await.unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            read_head(&mut server, timeout).await,
            Err(HeadError::TimedOut)
        ));
        assert!(started.elapsed() >= timeout);
        // A peer that closes early.
        drop(client);
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        assert!(matches!(
            read_head(&mut server, timeout).await,
            Err(HeadError::Io(_))
        ));
    }

    #[test]
    fn readiness_json_names_each_check_and_escapes() {
        let readiness = Readiness::new();
        assert!(!readiness.is_ready());
        assert_eq!(
            readiness.json(false),
            "{\"ready\": false, \"checks\": []}\n"
        );
        readiness.update(vec![
            Check::of("database", Ok("migrated to 6".into())),
            Check::of("participant:payment", Err("said \"no\"".into())),
        ]);
        assert!(!readiness.is_ready());
        assert_eq!(
            readiness.json(false),
            "{\"ready\": false, \"checks\": [{\"name\": \"database\", \"ok\": true, \"detail\": \"migrated to 6\"}, \
             {\"name\": \"participant:payment\", \"ok\": false, \"detail\": \"said \\\"no\\\"\"}]}\n"
        );
        readiness.update(vec![Check::of("database", Ok(String::new()))]);
        assert!(readiness.is_ready());
        assert!(
            readiness
                .json(true)
                .starts_with("{\"ready\": false, \"stopping\": true")
        );
    }
}
