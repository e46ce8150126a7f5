//! The request log: one line per request, at target `keel::request` — method,
//! route (the pattern, not the path, so ids and secrets in paths stay out), status,
//! error class, the key's *name*, the run, and the time to the response's head.
//! Never a key, a header's value or a body.
//!
//! Each request is also a `SERVER` span (`{METHOD} {route}`), the parent of the
//! gateway's `chat` and the runner's `execute_tool` spans. An incoming W3C
//! `traceparent` is continued, and when spans are exported the answer names its
//! trace in `x-keel-trace-id`, a reference a user can hand to support.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use keel_core::ErrorClass;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::Caller;

/// The middleware.
pub async fn requests(req: Request, next: Next) -> Response {
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
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.record("http.response.status_code", i64::from(status));
    if class != "-" {
        span.record("keel.error_class", class.as_str());
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(id) = keel_telemetry::propagate::trace_id(&span) {
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-keel-trace-id", v);
        }
    }
    let _in_span = span.enter();
    if status >= 500 {
        tracing::warn!(target: "keel::request", %method, %route, status, %class, key = %key, run, ms, "request");
    } else {
        tracing::info!(target: "keel::request", %method, %route, status, %class, key = %key, run, ms, "request");
    }
    resp
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
