//! Fault injection: a registry of armed faults, a tower layer that applies
//! them to every call of the participant's service, and the
//! `fault.v1.FaultInjection` control service that arms them.
//!
//! The layer sits outside the gRPC handlers, so every RPC of every
//! participant gets the same three behaviours without the handlers knowing:
//! FAIL_BEFORE answers without calling the handler, FAIL_AFTER_COMMIT lets
//! the handler commit and then replaces its success with an error (the lost
//! reply), DELAY sleeps first.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use proto::fault::v1 as pb;
use proto::google::rpc::Code as RpcCode;
use tonic::codegen::{BoxFuture, http};
use tonic::{Code, Request, Response, Status};
use tower::{Layer, Service};

/// Longest latency a fault may add.
const MAX_LATENCY_MS: u32 = 600_000;

/// What an armed fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Answer the code; the handler is not called.
    FailBefore,
    /// Call the handler, then answer the code if it succeeded.
    FailAfterCommit,
    /// Sleep, then call the handler.
    Delay,
}

/// A fault armed on one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What it does.
    pub mode: FaultMode,
    /// The code answered by the FAIL_* modes.
    pub code: Code,
    /// Calls left to affect; None for no limit.
    pub remaining: Option<u32>,
    /// Share of calls affected, 1..=100.
    pub percent: u32,
    /// Latency added before handling or failing.
    pub latency: Duration,
}

/// The faults armed on one participant, keyed by method name.
#[derive(Debug)]
pub struct FaultRegistry {
    /// The gRPC service the faults apply to, e.g. `payment.v1.PaymentService`.
    service: &'static str,
    /// Its method names, e.g. `Charge`.
    methods: &'static [&'static str],
    armed: Mutex<BTreeMap<&'static str, Fault>>,
}

impl FaultRegistry {
    /// An empty registry for `service` and its `methods`.
    pub fn new(service: &'static str, methods: &'static [&'static str]) -> Self {
        Self {
            service,
            methods,
            armed: Mutex::new(BTreeMap::new()),
        }
    }

    fn armed(&self) -> MutexGuard<'_, BTreeMap<&'static str, Fault>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves a user-given RPC name ("charge", "Charge",
    /// "/payment.v1.PaymentService/Charge") to the method's canonical name.
    pub fn resolve(&self, rpc: &str) -> Option<&'static str> {
        let method = match rpc.trim_start_matches('/').rsplit_once('/') {
            Some((service, method)) if service == self.service => method,
            Some(_) => return None,
            None => rpc,
        };
        self.methods
            .iter()
            .copied()
            .find(|m| m.eq_ignore_ascii_case(method))
    }

    /// Arms `fault` on `method`, replacing what was armed there.
    pub fn arm(&self, method: &'static str, fault: Fault) {
        self.armed().insert(method, fault);
    }

    /// Disarms everything; returns how many faults were armed.
    pub fn clear(&self) -> usize {
        std::mem::take(&mut *self.armed()).len()
    }

    /// The faults armed now.
    pub fn list(&self) -> Vec<(&'static str, Fault)> {
        self.armed()
            .iter()
            .map(|(method, fault)| (*method, fault.clone()))
            .collect()
    }

    /// Decides whether the call to `path` is affected, consuming one unit of
    /// the fault's count if it is.
    fn decide(&self, path: &str) -> Option<Fault> {
        let (service, method) = path.trim_start_matches('/').split_once('/')?;
        if service != self.service {
            return None;
        }
        let mut armed = self.armed();
        let method = *armed.keys().find(|m| **m == method)?;
        let fault = armed.get_mut(method)?;
        if fault.percent < 100 && common::domain::random_u64() % 100 >= u64::from(fault.percent) {
            return None;
        }
        let hit = fault.clone();
        match &mut fault.remaining {
            Some(1) => {
                armed.remove(method);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(hit)
    }
}

/// Applies a registry's faults to the calls that pass through; with no
/// registry (fault injection off) it passes every call straight on.
#[derive(Debug, Clone, Default)]
pub struct FaultLayer {
    registry: Option<Arc<FaultRegistry>>,
}

impl FaultLayer {
    /// A layer applying `registry`, or nothing when it is None.
    pub fn new(registry: Option<Arc<FaultRegistry>>) -> Self {
        Self { registry }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            registry: self.registry.clone(),
        }
    }
}

/// The service [`FaultLayer`] wraps around the participant's routes.
#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    registry: Option<Arc<FaultRegistry>>,
}

impl<S, B, ResBody> Service<http::Request<B>> for FaultService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let fault = self
            .registry
            .as_ref()
            .and_then(|registry| registry.decide(request.uri().path()));
        let Some(fault) = fault else {
            return Box::pin(self.inner.call(request));
        };
        // The ready inner service is the one that must take the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            if !fault.latency.is_zero() {
                tokio::time::sleep(fault.latency).await;
            }
            match fault.mode {
                FaultMode::Delay => inner.call(request).await,
                FaultMode::FailBefore => {
                    tracing::info!(%path, code = ?fault.code, "injected fault: FAIL_BEFORE");
                    Ok(Status::new(fault.code, "injected fault: FAIL_BEFORE").into_http())
                }
                FaultMode::FailAfterCommit => {
                    let response = inner.call(request).await?;
                    // tonic answers errors trailers-only, with grpc-status in
                    // the headers; a response without it is a success whose
                    // body we now drop.
                    if response.headers().contains_key("grpc-status") {
                        return Ok(response);
                    }
                    tracing::info!(%path, code = ?fault.code, "injected fault: FAIL_AFTER_COMMIT");
                    Ok(Status::new(
                        fault.code,
                        "injected fault: FAIL_AFTER_COMMIT (the work was committed, the reply dropped)",
                    )
                    .into_http())
                }
            }
        })
    }
}

/// `fault.v1.FaultInjection` over a registry.
#[derive(Debug, Clone)]
pub struct FaultControl {
    registry: Arc<FaultRegistry>,
}

impl FaultControl {
    /// Controls `registry`.
    pub fn new(registry: Arc<FaultRegistry>) -> Self {
        Self { registry }
    }

    fn parse(&self, request: pb::SetFaultRequest) -> Result<(&'static str, Fault), Status> {
        let method = self.registry.resolve(&request.rpc).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown rpc {:?}; {} has: {}",
                request.rpc,
                self.registry.service,
                self.registry.methods.join(", ")
            ))
        })?;
        let mode = match pb::FaultMode::try_from(request.mode) {
            Ok(pb::FaultMode::FailBefore) => FaultMode::FailBefore,
            Ok(pb::FaultMode::FailAfterCommit) => FaultMode::FailAfterCommit,
            Ok(pb::FaultMode::Delay) => FaultMode::Delay,
            _ => {
                return Err(Status::invalid_argument(
                    "mode is required: FAIL_BEFORE, FAIL_AFTER_COMMIT or DELAY",
                ));
            }
        };
        let code = Code::from_i32(request.code);
        if mode != FaultMode::Delay
            && (code == Code::Ok || RpcCode::try_from(request.code).is_err())
        {
            return Err(Status::invalid_argument(
                "code must be a gRPC error code such as UNAVAILABLE (14) for a FAIL_* mode",
            ));
        }
        if request.percent > 100 {
            return Err(Status::invalid_argument(format!(
                "percent is {}; it must be between 0 (every call) and 100",
                request.percent
            )));
        }
        if request.latency_ms > MAX_LATENCY_MS {
            return Err(Status::invalid_argument(format!(
                "latency_ms is {}; the limit is {MAX_LATENCY_MS}",
                request.latency_ms
            )));
        }
        if mode == FaultMode::Delay && request.latency_ms == 0 {
            return Err(Status::invalid_argument("DELAY needs latency_ms > 0"));
        }
        Ok((
            method,
            Fault {
                mode,
                code,
                remaining: (request.count > 0).then_some(request.count),
                percent: if request.percent == 0 {
                    100
                } else {
                    request.percent
                },
                latency: Duration::from_millis(u64::from(request.latency_ms)),
            },
        ))
    }
}

fn fault_pb(method: &str, fault: &Fault) -> pb::Fault {
    pb::Fault {
        rpc: method.to_owned(),
        mode: match fault.mode {
            FaultMode::FailBefore => pb::FaultMode::FailBefore,
            FaultMode::FailAfterCommit => pb::FaultMode::FailAfterCommit,
            FaultMode::Delay => pb::FaultMode::Delay,
        }
        .into(),
        code: fault.code as i32,
        count: fault.remaining.unwrap_or(0),
        percent: fault.percent,
        latency_ms: u32::try_from(fault.latency.as_millis()).unwrap_or(u32::MAX),
    }
}

#[tonic::async_trait]
impl pb::fault_injection_server::FaultInjection for FaultControl {
    async fn set_fault(
        &self,
        request: Request<pb::SetFaultRequest>,
    ) -> Result<Response<pb::SetFaultResponse>, Status> {
        let (method, fault) = self.parse(request.into_inner())?;
        tracing::info!(rpc = method, ?fault, "fault armed");
        let armed = fault_pb(method, &fault);
        self.registry.arm(method, fault);
        Ok(Response::new(pb::SetFaultResponse { fault: Some(armed) }))
    }

    async fn clear_faults(
        &self,
        _request: Request<pb::ClearFaultsRequest>,
    ) -> Result<Response<pb::ClearFaultsResponse>, Status> {
        let cleared = self.registry.clear();
        tracing::info!(cleared, "faults cleared");
        Ok(Response::new(pb::ClearFaultsResponse {
            cleared: u32::try_from(cleared).unwrap_or(u32::MAX),
        }))
    }

    async fn list_faults(
        &self,
        _request: Request<pb::ListFaultsRequest>,
    ) -> Result<Response<pb::ListFaultsResponse>, Status> {
        Ok(Response::new(pb::ListFaultsResponse {
            faults: self
                .registry
                .list()
                .iter()
                .map(|(method, fault)| fault_pb(method, fault))
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> FaultRegistry {
        FaultRegistry::new("payment.v1.PaymentService", &["Charge", "Refund"])
    }

    fn fault(remaining: Option<u32>, percent: u32) -> Fault {
        Fault {
            mode: FaultMode::FailBefore,
            code: Code::Unavailable,
            remaining,
            percent,
            latency: Duration::ZERO,
        }
    }

    #[test]
    fn resolves_short_long_and_case_insensitive_names() {
        let r = registry();
        assert_eq!(r.resolve("charge"), Some("Charge"));
        assert_eq!(
            r.resolve("/payment.v1.PaymentService/Refund"),
            Some("Refund")
        );
        assert_eq!(r.resolve("inventory.v1.InventoryService/Charge"), None);
        assert_eq!(r.resolve("Reserve"), None);
    }

    #[test]
    fn count_limits_the_fault_then_disarms_it() {
        let r = registry();
        r.arm("Charge", fault(Some(2), 100));
        let path = "/payment.v1.PaymentService/Charge";
        assert!(r.decide(path).is_some());
        assert!(r.decide("/payment.v1.PaymentService/Refund").is_none());
        assert!(r.decide(path).is_some());
        assert!(r.decide(path).is_none());
        assert!(r.list().is_empty());
    }

    #[test]
    fn percent_affects_a_share_of_calls() {
        let r = registry();
        r.arm("Charge", fault(None, 30));
        let hits = (0..2000)
            .filter(|_| r.decide("/payment.v1.PaymentService/Charge").is_some())
            .count();
        // 600 expected; the bounds are many standard deviations wide.
        assert!((400..800).contains(&hits), "{hits} hits");
    }
}
