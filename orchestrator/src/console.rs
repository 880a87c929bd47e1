//! The web console on the HTTP port (`/ui`): one page (HTML, JavaScript
//! and CSS embedded in the binary, no build step) and the JSON it reads,
//! under `/ui/api/`.
//!
//! The JSON endpoints are a thin face over [`AdminApi`]: each builds the
//! AdminService request, passes the caller's `authorization` header
//! through the same interceptor ([`AdminAuth`]) and calls the handler in
//! process, so the console lists, shows, retries and aborts exactly as
//! `sagactl` does — the same validation, the same roles (a read-only token
//! reads; retry and abort need the operator token), the same journal
//! entries. A `tonic::Status` becomes an HTTP status by the google.rpc
//! mapping ([`http_status`]) with a JSON body
//! `{"error": {"code": 404, "status": "NOT_FOUND", "message": ...}}`.
//!
//! | route | what |
//! |---|---|
//! | `GET /ui` | the page |
//! | `GET /ui/api/sagas?status=&customer_id=&product_id=&stuck=&page_size=&page_token=` | a page of sagas, newest first |
//! | `GET /ui/api/sagas/{id}` | one saga with its journal |
//! | `POST /ui/api/sagas/{id}/retry`, `/abort` | `{"operator": "...", "reason": "..."}` |
//! | `GET /ui/api/stats` | counts by status, in flight |
//!
//! Requests that change a saga must be `application/json` (a cross-site
//! form cannot send that without a CORS preflight, which is never
//! granted), and one that carries an `Origin` must come from this host:
//! with no token configured (the embedded mode) another site open in the
//! operator's browser cannot abort sagas. The page keeps the token the
//! operator types in `sessionStorage` (this tab only) and sends it as a
//! bearer token; the server keeps nothing.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proto::saga::v1 as pb;
use proto::saga::v1::admin_service_server::AdminService;
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::service::Interceptor;

use crate::admin::AdminApi;
use crate::auth::AdminAuth;

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The routes of the console, over the admin handlers and their token
/// check.
pub fn routes(admin: AdminApi, auth: AdminAuth) -> Router {
    Router::new()
        .route("/", get(|| async { redirect("/ui") }))
        .route(
            "/ui",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route("/ui/", get(|| async { redirect("/ui") }))
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/ui/api/sagas", get(list))
        .route("/ui/api/sagas/{id}", get(show))
        .route("/ui/api/sagas/{id}/retry", post(retry))
        .route("/ui/api/sagas/{id}/abort", post(abort))
        .route("/ui/api/stats", get(stats))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "try /ui, /healthz, /readyz or /metrics\n",
            )
        })
        .with_state(Console { admin, auth })
}

#[derive(Debug, Clone)]
struct Console {
    admin: AdminApi,
    auth: AdminAuth,
}

impl Console {
    /// `message` as an AdminService request from the caller of `headers`:
    /// their bearer token checked by the service's interceptor.
    fn request<T>(&self, headers: &HeaderMap, message: T) -> Result<tonic::Request<T>, ApiError> {
        let mut request = tonic::Request::new(());
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value =
                tonic::metadata::MetadataValue::try_from(value.as_bytes()).map_err(|_| {
                    tonic::Status::unauthenticated("the authorization header is not ASCII")
                })?;
            request.metadata_mut().insert("authorization", value);
        }
        let (metadata, extensions, ()) = self.auth.clone().call(request)?.into_parts();
        Ok(tonic::Request::from_parts(metadata, extensions, message))
    }
}

/// The google.rpc mapping of a gRPC code to an HTTP status
/// (`google/rpc/code.proto`).
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer: a gRPC status, or a request the console itself refuses.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self {
            status: http_status(status.code()),
            code: common::metrics::code_name(status.code()),
            message: status.message().to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "code": self.status.as_u16(),
            "status": self.code,
            "message": self.message,
        }});
        let mut response = (self.status, Json(body)).into_response();
        no_store(response.headers_mut());
        response
    }
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// A page asset, with headers that keep it from being framed, sniffed or
/// made to load scripts from anywhere else.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn answer(body: Value) -> Response {
    let mut response = Json(body).into_response();
    no_store(response.headers_mut());
    response
}

/// The status name without its prefix (`COMPLETED`), as sagactl prints it.
fn status_name(value: i32) -> &'static str {
    pb::OrderStatus::try_from(value)
        .unwrap_or(pb::OrderStatus::Unspecified)
        .as_str_name()
        .trim_start_matches("ORDER_STATUS_")
}

fn millis(at: Option<prost_types::Timestamp>) -> Value {
    at.map_or(Value::Null, |t| {
        json!(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
    })
}

fn summary_json(saga: &pb::SagaSummary) -> Value {
    json!({
        "saga_id": saga.saga_id,
        "status": status_name(saga.status),
        "customer_id": saga.customer_id,
        "current_step": saga.current_step,
        "attempts": saga.attempts,
        "last_error": saga.last_error,
        "stuck_reason": saga.stuck_reason,
        "lease_owner": saga.lease_owner,
        "created_at_ms": millis(saga.created_at),
        "updated_at_ms": millis(saga.updated_at),
        "progress_at_ms": millis(saga.progress_at),
        "next_attempt_at_ms": millis(saga.next_attempt_at),
    })
}

fn entry_json(entry: &pb::JournalEntry) -> Value {
    let outcome = pb::StepOutcome::try_from(entry.outcome)
        .unwrap_or(pb::StepOutcome::Unspecified)
        .as_str_name()
        .trim_start_matches("STEP_OUTCOME_");
    let kind = pb::StepKind::try_from(entry.kind)
        .unwrap_or(pb::StepKind::Unspecified)
        .as_str_name()
        .trim_start_matches("STEP_KIND_");
    // The gRPC code the participant answered: OK for a success; the
    // detail of a failure starts with it ("UNAVAILABLE: ...").
    let code = match outcome {
        "SUCCEEDED" => "OK",
        "RETRYABLE_FAILURE" | "REJECTED" => common::metrics::code_of(&entry.detail),
        _ => "",
    };
    json!({
        "step": entry.step,
        "kind": kind,
        "attempt": entry.attempt,
        "outcome": outcome,
        "code": code,
        "detail": entry.detail,
        "rpc": entry.rpc,
        "actor": entry.actor,
        "started_at_ms": millis(entry.started_at),
        "finished_at_ms": millis(entry.finished_at),
    })
}

#[derive(Debug, Deserialize)]
struct ListParams {
    status: Option<String>,
    customer_id: Option<String>,
    product_id: Option<String>,
    stuck: Option<String>,
    page_size: Option<String>,
    page_token: Option<String>,
}

async fn list(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let status = match params.status.as_deref().map(str::trim) {
        None | Some("") | Some("ANY") => 0,
        Some(name) => pb::OrderStatus::from_str_name(&format!("ORDER_STATUS_{name}"))
            .filter(|s| *s != pb::OrderStatus::Unspecified)
            .ok_or_else(|| ApiError::invalid(format!("status {name:?} is not an order status")))?
            .into(),
    };
    let stuck_only = match params.stuck.as_deref() {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "stuck must be true or false, not {other:?}"
            )));
        }
    };
    let limit = match params.page_size.as_deref() {
        None | Some("") => 0,
        Some(size) => size
            .parse()
            .map_err(|_| ApiError::invalid(format!("page_size {size:?} is not a number")))?,
    };
    let request = console.request(
        &headers,
        pb::ListSagasRequest {
            status,
            stuck_only,
            limit,
            page_token: params.page_token.unwrap_or_default(),
            customer_id: params.customer_id.unwrap_or_default().trim().to_owned(),
            product_id: params.product_id.unwrap_or_default().trim().to_owned(),
            ..Default::default()
        },
    )?;
    let page = console.admin.list_sagas(request).await?.into_inner();
    Ok(answer(json!({
        "sagas": page.sagas.iter().map(summary_json).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    })))
}

async fn show(
    State(console): State<Console>,
    headers: HeaderMap,
    Path(saga_id): Path<String>,
) -> Result<Response, ApiError> {
    let request = console.request(&headers, pb::GetSagaRequest { saga_id })?;
    let saga = console.admin.get_saga(request).await?.into_inner();
    let mut outputs: Vec<_> = saga.step_outputs.iter().collect();
    outputs.sort();
    Ok(answer(json!({
        "saga": saga.saga.as_ref().map(summary_json),
        "items": saga.items.iter().map(|i| json!({"product_id": i.product_id, "quantity": i.quantity})).collect::<Vec<_>>(),
        "total_amount_cents": saga.total_amount_cents,
        "failure_reason": saga.failure_reason,
        "step_outputs": outputs.into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "journal": saga.journal.iter().map(entry_json).collect::<Vec<_>>(),
        "cancel_requested": saga.cancel_requested,
        "version": saga.version,
        "idempotency_key": saga.idempotency_key,
        "trace_id": saga.trace_id,
        "finished_at_ms": millis(saga.finished_at),
    })))
}

/// The body of retry and abort.
#[derive(Debug, Default, Deserialize)]
struct OperatorRequest {
    #[serde(default)]
    operator: String,
    #[serde(default)]
    reason: String,
}

/// Refuses a request that changes a saga from another site's page: its
/// `Origin`, when the browser sent one, must be this host.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().unwrap_or("");
    let own = host.is_some_and(|host| {
        origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            == Some(host)
    });
    if own {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!("requests from {origin} may not change sagas here"),
        ))
    }
}

/// The operator's request from a retry or abort: from this host, as JSON;
/// the operator named as the console's.
fn operator_request(
    headers: &HeaderMap,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<OperatorRequest, ApiError> {
    same_origin(headers)?;
    let Json(body) = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "INVALID_ARGUMENT",
            format!(
                "send a JSON body {{\"operator\": ..., \"reason\": ...}} as application/json: {}",
                rejection.body_text()
            ),
        )
    })?;
    let operator = match body.operator.trim() {
        "" => "console".to_owned(),
        name => format!("{name} (console)"),
    };
    Ok(OperatorRequest { operator, ..body })
}

fn operated(saga_id: String, status: i32, message: String) -> Response {
    answer(json!({
        "saga_id": saga_id,
        "status": status_name(status),
        "message": message,
    }))
}

async fn retry(
    State(console): State<Console>,
    headers: HeaderMap,
    Path(saga_id): Path<String>,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let OperatorRequest { operator, reason } = operator_request(&headers, body)?;
    let request = console.request(
        &headers,
        pb::RetrySagaRequest {
            saga_id,
            operator,
            reason,
        },
    )?;
    let reply = console.admin.retry_saga(request).await?.into_inner();
    Ok(operated(reply.saga_id, reply.status, reply.message))
}

async fn abort(
    State(console): State<Console>,
    headers: HeaderMap,
    Path(saga_id): Path<String>,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let OperatorRequest { operator, reason } = operator_request(&headers, body)?;
    let request = console.request(
        &headers,
        pb::AbortSagaRequest {
            saga_id,
            operator,
            reason,
        },
    )?;
    let reply = console.admin.abort_saga(request).await?.into_inner();
    Ok(operated(reply.saga_id, reply.status, reply.message))
}

async fn stats(State(console): State<Console>, headers: HeaderMap) -> Result<Response, ApiError> {
    let request = console.request(&headers, pb::StatsRequest {})?;
    let stats = console.admin.stats(request).await?.into_inner();
    let counts: HashMap<&str, i64> = stats
        .counts
        .iter()
        .map(|c| (status_name(c.status), c.count))
        .collect();
    Ok(answer(json!({
        "counts": counts,
        "in_flight": stats.in_flight,
        "started_last_minute": stats.started_last_minute,
        "finished_last_minute": stats.finished_last_minute,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_maps_to_the_google_rpc_http_status() {
        use tonic::Code;
        let table = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, http) in table {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
            assert_eq!(
                common::metrics::code_name(code),
                format!("{code:?}")
                    .chars()
                    .enumerate()
                    .flat_map(|(i, c)| {
                        let upper = c.to_ascii_uppercase();
                        if i > 0 && c.is_ascii_uppercase() {
                            vec!['_', upper]
                        } else {
                            vec![upper]
                        }
                    })
                    .collect::<String>()
            );
        }
    }

    #[test]
    fn only_this_hosts_pages_may_change_sagas() {
        let headers = |origin: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            if let Some(origin) = origin {
                headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
            }
            headers
        };
        assert!(same_origin(&headers(None)).is_ok());
        assert!(same_origin(&headers(Some("http://127.0.0.1:8080"))).is_ok());
        assert!(same_origin(&headers(Some("https://127.0.0.1:8080"))).is_ok());
        for foreign in ["http://evil.example", "http://127.0.0.1:9999", "null"] {
            let refused = same_origin(&headers(Some(foreign))).unwrap_err();
            assert_eq!(refused.status, StatusCode::FORBIDDEN, "{foreign}");
        }
    }
}
