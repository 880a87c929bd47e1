//! A tower layer on a participant's server that records every RPC's
//! latency and gRPC code by method: `participant_rpc_duration_seconds` and
//! `participant_rpc_total` (errors are the calls whose code is not OK). It
//! sits outside fault injection, so an injected failure counts as what the
//! caller saw.

use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;
use tonic::codegen::{BoxFuture, http};
use tower::{Layer, Service};

/// RPC durations, by method and code.
pub const RPC_SECONDS: &str = "participant_rpc_duration_seconds";
/// RPCs answered, by method and code.
pub const RPC_TOTAL: &str = "participant_rpc_total";

/// Declares the participant's metrics.
pub fn describe() {
    common::metrics::describe_histogram(
        RPC_SECONDS,
        "RPC durations until the response headers, by service, method and gRPC code.",
    );
    common::metrics::describe_counter(
        RPC_TOTAL,
        "RPCs answered, by service, method and gRPC code.",
    );
    common::metrics::describe_histogram(
        "participant_batch_size",
        "Rows per group-commit flush, by writer.",
    );
    common::metrics::describe_histogram(
        "participant_batch_commit_seconds",
        "Duration of one group-commit flush, by writer.",
    );
    common::metrics::describe_gauge(
        "participant_db_pool_connections",
        "Database pool connections, by state (in_use, idle).",
    );
}

/// Records each call's duration and code.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // A clone of the URI shares its bytes: no allocation per call.
        let uri = request.uri().clone();
        let began = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            let path = uri.path();
            // The probe and reflection services are not the participant's API.
            let (service, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or(("", path));
            if service.starts_with("grpc.") {
                return response;
            }
            // tonic answers errors trailers-only, with grpc-status in the
            // headers; a response without it is a success (or a failure in
            // the trailers of a stream, which these unary services do not
            // send).
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from_i32),
                Err(_) => Code::Internal,
            };
            let code = common::metrics::code_name(code);
            let labels = [("service", service), ("method", method), ("code", code)];
            common::metrics::observe(
                RPC_SECONDS,
                &labels,
                began.elapsed().as_secs_f64(),
                common::metrics::SECONDS,
            );
            common::metrics::count(RPC_TOTAL, &labels, 1);
            response
        })
    }
}
