//! The request log: one line per request, at target `keel::request` — method,
//! route (the pattern, not the path, so ids and secrets in paths stay out), status,
//! error class, the key's *name*, the run, and the time to the response's head.
//! Never a key, a header's value or a body.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use keel_core::ErrorClass;
use tokio::time::Instant;

use crate::auth::Caller;

/// The middleware.
pub async fn requests(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map_or("(no route)", MatchedPath::as_str).to_owned();
    let run = run_of(&req, &route);
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let class = resp
        .extensions()
        .get::<ErrorClass>()
        .map(|c| c.as_str())
        .or_else(|| resp.headers().get("x-keel-error-class").and_then(|v| v.to_str().ok()))
        .unwrap_or("-")
        .to_owned();
    let key = resp.extensions().get::<Caller>().map_or("-", |c| c.name.as_str());
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if status >= 500 {
        tracing::warn!(target: "keel::request", %method, %route, status, %class, key, run, ms, "request");
    } else {
        tracing::info!(target: "keel::request", %method, %route, status, %class, key, run, ms, "request");
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
