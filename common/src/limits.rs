//! The limits every server of the system puts on what a client may send,
//! as one set of flags ([`Limits`]) so that every server takes the same
//! ones, each answered with a clear status that changes nothing:
//!
//! - the largest request message a gRPC service decodes
//!   (`--max-message-bytes`, 1 MiB): a larger one is answered
//!   RESOURCE_EXHAUSTED before its handler runs ([`limit_messages!`] sets it
//!   on each generated server, with the largest reply it encodes,
//!   [`MAX_REPLY_BYTES`]; [`CallLimitsLayer`] gives tonic's refusal gRPC's
//!   code);
//! - concurrent streams per HTTP/2 connection (`--max-concurrent-streams`,
//!   256), advertised in the connection's SETTINGS: a client opens no more
//!   (tonic's queues the calls beyond it until a stream ends; a client that
//!   ignored the setting would get its extra streams refused with
//!   REFUSED_STREAM);
//! - a server-side deadline on every call (`--request-timeout`, 30 s,
//!   [`CallLimitsLayer`]): a call whose answer has not started by then
//!   is dropped and answered DEADLINE_EXCEEDED. It bounds the time until
//!   the response headers, so a server stream (WatchOrder) runs for as long
//!   as it has updates. A client's shorter `grpc-timeout` is honoured by
//!   tonic itself (answered CANCELLED "Timeout expired");
//! - the time and size of a request head on the HTTP port
//!   (`--http-header-timeout`, 5 s, and [`MAX_HTTP_HEADER_BYTES`]; see
//!   `probe`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Sleep;
use tonic::Status;
use tonic::codegen::http;

use crate::cli::parse_duration;

/// Default `--max-message-bytes`: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 1 << 20;
/// The smallest `--max-message-bytes` accepted.
pub const MIN_MAX_MESSAGE_BYTES: u32 = 1 << 10;
/// The largest reply a server encodes: 4 MiB, what gRPC clients accept by
/// default (a larger reply would not be decoded by them anyway). Replies
/// are bounded by the page sizes long before that.
pub const MAX_REPLY_BYTES: usize = 4 << 20;
/// Default `--max-concurrent-streams`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default `--request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--http-header-timeout`.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head (request line and headers) the HTTP port
/// reads; a longer one is answered 431.
pub const MAX_HTTP_HEADER_BYTES: usize = 8 * 1024;
/// The largest request body the HTTP port reads (the console's operator
/// requests are a few hundred bytes); a longer one is answered 413.
pub const MAX_HTTP_BODY_BYTES: usize = 64 * 1024;

/// The limits of one server's ports (the flags every server takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Largest request message a gRPC service decodes, in bytes; a larger
    /// one is answered RESOURCE_EXHAUSTED before anything reads it.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_MAX_MESSAGE_BYTES)..))]
    pub max_message_bytes: u32,

    /// Most concurrent streams (calls in progress) per HTTP/2 connection,
    /// advertised to clients, which queue the calls beyond it until one
    /// ends.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Longest a gRPC call may take on this server before it is dropped and
    /// answered DEADLINE_EXCEEDED (a client's shorter deadline is honoured
    /// too). It bounds the time until the answer starts: a stream such as
    /// WatchOrder runs for as long as it has updates.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// On the HTTP port (--http-listen): a connection whose request head
    /// (request line and headers, at most 8 KiB) has not arrived within
    /// this long is closed, and the answer must be taken within it too.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
        }
    }
}

impl Limits {
    /// Checks the values together; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_bytes < MIN_MAX_MESSAGE_BYTES {
            return Err(format!(
                "--max-message-bytes must be at least {MIN_MAX_MESSAGE_BYTES}"
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".to_owned());
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be positive".to_owned());
        }
        if self.http_header_timeout.is_zero() {
            return Err("--http-header-timeout must be positive".to_owned());
        }
        Ok(())
    }

    /// `--max-message-bytes` as the generated servers take it.
    pub fn message_bytes(&self) -> usize {
        usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX)
    }

    /// The layer of every call: its server-side deadline, and the status of
    /// a message over the limit.
    pub fn call_layer(&self) -> CallLimitsLayer {
        CallLimitsLayer::new(self.request_timeout)
    }
}

/// Sets the decoding limit (`--max-message-bytes`) and the encoding limit
/// ([`MAX_REPLY_BYTES`]) on a generated tonic server:
/// `limit_messages!(OrderServiceServer::new(api), limits)`.
#[macro_export]
macro_rules! limit_messages {
    ($server:expr, $limits:expr) => {
        $server
            .max_decoding_message_size($limits.message_bytes())
            .max_encoding_message_size($crate::limits::MAX_REPLY_BYTES)
    };
}

/// A tower layer for gRPC servers, around every call:
/// - a call whose response has not started within its limit is dropped and
///   answered DEADLINE_EXCEEDED, saying which flag sets the limit. One
///   method may have a longer limit of its own (the orchestrator's
///   Reconcile, which reads every saga);
/// - a request tonic refused for its size (it answers OUT_OF_RANGE
///   "decoded message length too large") is answered RESOURCE_EXHAUSTED
///   instead, gRPC's code for a message over a limit, which clients know.
///
/// Costs a timer and a header lookup per call, and no allocation.
#[derive(Debug, Clone, Copy)]
pub struct CallLimitsLayer {
    limit: Duration,
    longer: Option<LongerLimit>,
}

#[derive(Debug, Clone, Copy)]
struct LongerLimit {
    path: &'static str,
    limit: Duration,
    flag: &'static str,
}

impl CallLimitsLayer {
    /// Every call within `limit` (`--request-timeout`).
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            longer: None,
        }
    }

    /// The method at `path` (`/package.Service/Method`) within `limit`
    /// instead, set by `flag`.
    pub fn with_longer(mut self, path: &'static str, limit: Duration, flag: &'static str) -> Self {
        self.longer = Some(LongerLimit { path, limit, flag });
        self
    }
}

impl<S> tower::Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimits {
            inner,
            layer: *self,
        }
    }
}

/// See [`CallLimitsLayer`].
#[derive(Debug, Clone)]
pub struct CallLimits<S> {
    inner: S,
    layer: CallLimitsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for CallLimits<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CallLimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (limit, flag) = match self.layer.longer {
            Some(longer) if request.uri().path() == longer.path => (longer.limit, longer.flag),
            _ => (self.layer.limit, "--request-timeout"),
        };
        CallLimitsFuture {
            inner: self.inner.call(request),
            sleep: tokio::time::sleep(limit),
            limit,
            flag,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`CallLimits`] call.
    #[derive(Debug)]
    pub struct CallLimitsFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        limit: Duration,
        flag: &'static str,
    }
}

impl<F, R, E> Future for CallLimitsFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    R: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(mut response) = this.inner.poll(cx) {
            if let Ok(response) = &mut response {
                too_large_is_resource_exhausted(response.headers_mut());
            }
            return Poll::Ready(response);
        }
        ready!(this.sleep.poll(cx));
        Poll::Ready(Ok(Status::deadline_exceeded(format!(
            "no answer within the server's limit of {:?} ({}); the call was dropped",
            this.limit, this.flag
        ))
        .into_http()))
    }
}

/// OUT_OF_RANGE "decoded message length too large" (tonic's answer to a
/// request over the decoding limit, trailers-only: in the headers) becomes
/// RESOURCE_EXHAUSTED; every other answer is left as it is.
fn too_large_is_resource_exhausted(headers: &mut http::HeaderMap) {
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    // As it travels: percent-encoded, spaces too.
    const TOO_LARGE: &[u8] = b"decoded%20message%20length%20too%20large";
    if out_of_range
        && headers.get("grpc-message").is_some_and(|message| {
            message
                .as_bytes()
                .windows(TOO_LARGE.len())
                .any(|w| w == TOO_LARGE)
        })
    {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        limits: Limits,
    }

    #[test]
    fn the_defaults_are_the_flags_defaults_and_valid() {
        let parsed = Flags::try_parse_from(["x"]).unwrap().limits;
        assert_eq!(parsed, Limits::default());
        assert_eq!(parsed.max_message_bytes, 1 << 20);
        assert_eq!(parsed.max_concurrent_streams, 256);
        assert_eq!(parsed.request_timeout, Duration::from_secs(30));
        assert_eq!(parsed.http_header_timeout, Duration::from_secs(5));
        assert_eq!(parsed.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for args in [
            ["x", "--max-message-bytes", "100"],
            ["x", "--max-concurrent-streams", "0"],
            ["x", "--request-timeout", "soon"],
        ] {
            assert!(Flags::try_parse_from(args).is_err(), "{args:?}");
        }
        let zero = Limits {
            request_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("--request-timeout"));
        let zero = Limits {
            http_header_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .contains("--http-header-timeout")
        );
    }

    /// A service answering after `delay`.
    #[derive(Clone)]
    struct Slow(Duration);

    impl tower::Service<http::Request<()>> for Slow {
        type Response = http::Response<String>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new("answered".to_owned()))
            })
        }
    }

    async fn call(layer: CallLimitsLayer, delay: Duration, path: &str) -> http::Response<String> {
        use tower::{Layer, ServiceExt};
        let request = http::Request::builder().uri(path).body(()).unwrap();
        layer.layer(Slow(delay)).oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_late_answer_is_deadline_exceeded_and_a_timely_one_passes() {
        let ms = Duration::from_millis;
        let layer =
            CallLimitsLayer::new(ms(300)).with_longer("/a.B/Long", ms(900), "--long-timeout");
        let on_time = call(layer, ms(50), "/a.B/Short").await;
        assert_eq!(on_time.body(), "answered");
        assert!(on_time.headers().get("grpc-status").is_none());

        let started = std::time::Instant::now();
        let late = call(layer, ms(5_000), "/a.B/Short").await;
        assert!(
            started.elapsed() < ms(2_000),
            "answered at the limit, not after the delay"
        );
        assert_eq!(late.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        let message = late.headers()["grpc-message"].to_str().unwrap().to_owned();
        assert!(message.contains("request-timeout"), "{message}");
        assert!(late.body().is_empty());

        // The method with a longer limit of its own.
        let long = call(layer, ms(500), "/a.B/Long").await;
        assert_eq!(long.body(), "answered");
        let too_long = call(layer, ms(5_000), "/a.B/Long").await;
        let message = too_long.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("long-timeout"), "{message}");
    }

    #[test]
    fn only_the_size_refusal_becomes_resource_exhausted() {
        let headers = |status: Status| Status::into_http::<()>(status).headers().clone();
        let mut too_large = headers(Status::out_of_range(
            "Error, decoded message length too large: found 2097169 bytes, the limit is: 1048576 bytes",
        ));
        too_large_is_resource_exhausted(&mut too_large);
        assert_eq!(too_large["grpc-status"], "8");
        let mut other = headers(Status::out_of_range("page 7 of 3"));
        too_large_is_resource_exhausted(&mut other);
        assert_eq!(other["grpc-status"], "11");
        let mut ok = http::HeaderMap::new();
        too_large_is_resource_exhausted(&mut ok);
        assert!(ok.is_empty());
    }
}
