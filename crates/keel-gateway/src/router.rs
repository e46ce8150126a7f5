//! The HTTP surface: `POST /v1/chat/completions` and `GET /v1/models`, OpenAI-compatible.
//!
//! Authentication is the server's: its auth layer inserts an [`ApiKeyId`] extension
//! into each request, whose budget the call is charged to. The header `X-Keel-Run`
//! names the run whose budget and loop guard apply. Every answer says who answered:
//! `x-keel-model`, `x-keel-attempts`, `x-keel-fallback` (`true` when a model other
//! than the one named answered); errors add `x-keel-error-class`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::error::GatewayError;
use crate::gateway::{CallContext, Gateway};
use crate::wire::ChatRequest;

/// The header naming the run a call belongs to.
pub const RUN_HEADER: &str = "x-keel-run";

/// The id of the API key a request was authenticated with; the server's auth layer
/// inserts it as a request extension (`req.extensions_mut().insert(ApiKeyId(..))`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiKeyId(pub String);

/// The gateway's routes, to mount in `keel serve` (or serve alone).
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(32 << 20))
        .with_state(gateway)
}

fn context(key: Option<Extension<ApiKeyId>>, headers: &HeaderMap) -> CallContext {
    CallContext {
        api_key: key.map(|Extension(ApiKeyId(k))| k),
        run: headers
            .get(RUN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .filter(|r| !r.is_empty()),
        caller_checks_tools: false,
    }
}

fn keel_headers(h: &mut HeaderMap, model: &str, attempts: u32, fallback: bool) {
    if let Ok(v) = HeaderValue::from_str(model) {
        h.insert("x-keel-model", v);
    }
    h.insert("x-keel-attempts", HeaderValue::from(attempts));
    h.insert("x-keel-fallback", HeaderValue::from_static(if fallback { "true" } else { "false" }));
}

async fn chat(
    State(gateway): State<Arc<Gateway>>,
    key: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Too large (or unreadable) a body, in OpenAI's error shape like every answer.
        Err(r) => {
            let failure = keel_core::Failure::new(
                keel_core::ErrorClass::InvalidRequest,
                format!("the request body: {}", r.body_text()),
            );
            let mut resp = GatewayError::from_failure(failure).into_response();
            *resp.status_mut() = r.status();
            return resp;
        }
    };
    if gateway.overloaded() {
        // Shed load before the journal's queue (and memory) grows: a 503 with
        // Retry-After, which the OpenAI SDKs retry.
        let failure = keel_core::Failure::new(
            keel_core::ErrorClass::ServerError,
            "keel is overloaded: its journal is behind; retry shortly",
        );
        let mut resp = GatewayError::from_failure(failure).into_response();
        *resp.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return resp;
    }
    let ctx = context(key, &headers);
    let req = match ChatRequest::parse(&body) {
        Ok(r) => r,
        Err(f) => return GatewayError::from_failure(f).into_response(),
    };
    if req.stream {
        return match gateway.stream(req, ctx).await {
            Ok(stream) => {
                let (model, attempts, fallback) = (stream.model.clone(), stream.attempts, stream.fallback);
                let mut resp = Response::new(Body::from_stream(stream.into_stream()));
                let h = resp.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                keel_headers(h, &model, attempts, fallback);
                resp
            }
            Err(e) => e.into_response(),
        };
    }
    match gateway.complete(&req, &ctx).await {
        Ok(done) => {
            let mut resp = Response::new(Body::from(done.body));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            keel_headers(h, &done.model, done.attempts, done.fallback);
            h.insert("x-keel-corrections", HeaderValue::from(done.corrections));
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn models(State(gateway): State<Arc<Gateway>>) -> Response {
    let data: Vec<serde_json::Value> = gateway
        .model_names()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "keel"}))
        .collect();
    (StatusCode::OK, axum::Json(serde_json::json!({"object": "list", "data": data}))).into_response()
}
