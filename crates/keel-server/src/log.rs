//! The request log: one line per request, at target `keel::request` — method,
//! route (the pattern, not the path, so ids and secrets in paths stay out), status,
//! error class, the key's *name*, the run, and the time to the response's head.
//! Never a key, a header's value or a body.
//!
//! Each request is also a `SERVER` span (`{METHOD} {route}`), the parent of the
//! gateway's `chat` and the runner's `execute_tool` spans. An incoming W3C
//! `traceparent` is continued, and when spans are exported the answer names its
//! trace in `x-keel-trace-id`.
//!
//! Every answer carries a reference in `x-keel-reference` — the trace id when spans are
//! exported, else a fresh request id — and every error answer also in its JSON body
//! (`reference`, inside `error` for the OpenAI and Anthropic shapes): the id a user
//! hands to support, which the request's log line carries beside its run.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use keel_core::ErrorClass;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::Caller;

/// The middleware: the log line, the span, the reference, and the request's count
/// and latency in `/metrics` (by route pattern, method and status).
pub async fn requests(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<crate::metrics::Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map_or("(no route)", MatchedPath::as_str).to_owned();
    let run = run_of(&req, &route);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
        keel.error_class = Empty,
    );
    keel_telemetry::propagate::continue_trace(&span, req.headers());
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let class = resp
        .extensions()
        .get::<ErrorClass>()
        .map(|c| c.as_str())
        .or_else(|| resp.headers().get("x-keel-error-class").and_then(|v| v.to_str().ok()))
        .unwrap_or("-")
        .to_owned();
    let key = resp.extensions().get::<Caller>().map_or("-", |c| c.name.as_str()).to_owned();
    let elapsed = started.elapsed();
    metrics.request(method.as_str(), &route, status, elapsed);
    let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    span.record("http.response.status_code", i64::from(status));
    if class != "-" {
        span.record("keel.error_class", class.as_str());
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let trace = keel_telemetry::propagate::trace_id(&span);
    if let Some(id) = &trace {
        if let Ok(v) = HeaderValue::from_str(id) {
            resp.headers_mut().insert("x-keel-trace-id", v);
        }
    }
    let reference = trace.unwrap_or_else(|| keel_runtime::runner::new_id("req"));
    if let Ok(v) = HeaderValue::from_str(&reference) {
        resp.headers_mut().insert(REFERENCE, v);
    }
    if status >= 400 {
        resp = with_reference(resp, &reference).await;
    }
    let _in_span = span.enter();
    if status >= 500 {
        tracing::warn!(target: "keel::request", %method, %route, status, %class, key = %key, run, %reference, ms, "request");
    } else {
        tracing::info!(target: "keel::request", %method, %route, status, %class, key = %key, run, %reference, ms, "request");
    }
    resp
}

/// The header naming an answer's reference.
pub const REFERENCE: &str = "x-keel-reference";

/// The largest error body the reference is written into (error bodies are small; a
/// larger one is left as it is, its header still naming the reference).
const MAX_ERROR_BODY: usize = 64 << 10;

/// `resp` with `reference` in its JSON error body: inside `error` when the body has an
/// `error` object (OpenAI's and Anthropic's shapes), at the top otherwise (Keel's).
async fn with_reference(resp: Response, reference: &str) -> Response {
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    // Only a body whose size is known and small: anything else is passed on untouched
    // (its header still names the reference).
    let small =
        axum::body::HttpBody::size_hint(resp.body()).exact().is_some_and(|n| n <= MAX_ERROR_BODY as u64);
    if !is_json || !small {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let mut value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => return Response::from_parts(parts, axum::body::Body::from(bytes)),
    };
    match value.get_mut("error").and_then(serde_json::Value::as_object_mut) {
        Some(error) => {
            error.insert("reference".into(), reference.into());
        }
        None => {
            if let Some(top) = value.as_object_mut() {
                top.insert("reference".into(), reference.into());
            }
        }
    }
    let body = serde_json::to_vec(&value).unwrap_or_else(|_| bytes.to_vec());
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The run a request names: `X-Keel-Run` (the gateway), or the id of `/api/runs/{id}`.
fn run_of(req: &Request, route: &str) -> String {
    if let Some(r) = req.headers().get(keel_gateway::RUN_HEADER).and_then(|v| v.to_str().ok()) {
        return clean(r);
    }
    if route.starts_with("/api/runs/{id}") {
        if let Some(id) = req.uri().path().strip_prefix("/api/runs/").and_then(|p| p.split('/').next()) {
            return clean(id);
        }
    }
    "-".to_owned()
}

/// A caller's string as a log field: bounded, printable.
fn clean(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(80).collect()
}
