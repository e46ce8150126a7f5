//! The HTTP surface, one handler per inbound API, each translating at the edge into
//! the gateway's one chat request and back (see [`crate::wire`]):
//!
//! - `POST /v1/chat/completions` — OpenAI chat completions, whole and SSE;
//! - `POST /v1/responses` — OpenAI's Responses API, stateless (`wire/responses.rs`);
//! - `POST /v1/messages` — Anthropic's Messages API (`wire/messages.rs`);
//! - `POST /v1/embeddings` — passed through to the model's upstream (`embeddings.rs`);
//! - `GET /v1/models`, `GET /v1/models/{id}`.
//!
//! Errors are in each API's own shape ([`Shape`]): Anthropic's for `/v1/messages`,
//! OpenAI's for the rest.
//!
//! Authentication is the server's: its auth layer inserts an [`ApiKeyId`] extension
//! into each request, whose budget the call is charged to. The header `X-Keel-Run`
//! names the run whose budget and loop guard apply. Every answer says who answered:
//! `x-keel-model`, `x-keel-attempts`, `x-keel-fallback` (`true` when a model other
//! than the one named answered); a whole answer adds `x-keel-corrections` and what
//! the call was charged, every attempt included (`x-keel-charged-tokens`,
//! `x-keel-charged-cost-micros`; a stream says it in its last chunk's `usage`);
//! errors add `x-keel-error-class`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::embeddings::EmbeddingsRequest;
use crate::error::{GatewayError, Shape};
use crate::gateway::{CallContext, Completion, Gateway};
use crate::stream::StreamResponse;
use crate::wire::chunks::{Reframe, reframe};
use crate::wire::{ChatRequest, messages, responses};

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
        .route("/v1/responses", post(responses_api))
        .route("/v1/messages", post(messages_api))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        // A wildcard: model names may hold slashes (`meta/llama-3`).
        .route("/v1/models/{*id}", get(model))
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

type RawBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// The body, unless it was refused (too large, unreadable) or the gateway sheds load:
/// then the answer, in the API's shape.
fn admitted(gateway: &Gateway, body: RawBody, shape: Shape) -> Result<Bytes, Box<Response>> {
    let body = match body {
        Ok(b) => b,
        // Too large (or unreadable) a body, in the API's error shape like every answer.
        Err(r) => {
            let message = format!("the request body: {}", r.body_text());
            return Err(Box::new(shape.response_with(
                r.status(),
                keel_core::ErrorClass::InvalidRequest,
                &message,
            )));
        }
    };
    if gateway.overloaded() {
        // Shed load before the journal's queue (and memory) grows: a 503 (Anthropic's
        // 529) with Retry-After, which the SDKs retry.
        let mut resp = shape.response_with(
            StatusCode::SERVICE_UNAVAILABLE,
            keel_core::ErrorClass::ServerError,
            "keel is overloaded: its journal is behind; retry shortly",
        );
        resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return Err(Box::new(resp));
    }
    Ok(body)
}

/// An SSE answer of a stream's frames (re-framed for the edge APIs).
fn sse_response(
    model: &str,
    attempts: u32,
    fallback: bool,
    body: impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    keel_headers(h, model, attempts, fallback);
    resp
}

/// A JSON answer of a whole call.
fn json_response(done: &Completion, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    keel_headers(h, &done.model, done.attempts, done.fallback);
    h.insert("x-keel-corrections", HeaderValue::from(done.corrections));
    // What the budgets were charged for this call, every attempt included; the body's
    // `usage` is the answering provider's own.
    h.insert("x-keel-charged-tokens", HeaderValue::from(done.charged_tokens));
    h.insert("x-keel-charged-cost-micros", HeaderValue::from(done.charged_cost_micros));
    resp
}

fn reframed<R: Reframe>(stream: StreamResponse, api: impl FnOnce(&str) -> R) -> Response {
    let api = api(&stream.model);
    let (model, attempts, fallback) = (stream.model.clone(), stream.attempts, stream.fallback);
    sse_response(&model, attempts, fallback, reframe(stream.body, api))
}

async fn chat(
    State(gateway): State<Arc<Gateway>>,
    key: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: RawBody,
) -> Response {
    let body = match admitted(&gateway, body, Shape::Openai) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let ctx = context(key, &headers);
    let req = match ChatRequest::parse(&body) {
        Ok(r) => r,
        Err(f) => return GatewayError::from_failure(f).into_response(),
    };
    if req.stream {
        return match gateway.stream(req, ctx).await {
            Ok(stream) => {
                let (model, attempts, fallback) = (stream.model.clone(), stream.attempts, stream.fallback);
                sse_response(&model, attempts, fallback, stream.into_stream())
            }
            Err(e) => e.into_response(),
        };
    }
    match gateway.complete(&req, &ctx).await {
        Ok(done) => json_response(&done, done.body.clone()),
        Err(e) => e.into_response(),
    }
}

async fn responses_api(
    State(gateway): State<Arc<Gateway>>,
    key: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: RawBody,
) -> Response {
    let shape = Shape::Openai;
    let body = match admitted(&gateway, body, shape) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let ctx = context(key, &headers);
    let req = match responses::parse(&body) {
        Ok(r) => r,
        Err(f) => return GatewayError::from_failure(f).response(shape),
    };
    let (id, created) = (gateway.new_id(), gateway.created());
    if req.chat.stream {
        let echo = req.echo;
        return match Box::pin(gateway.stream(req.chat, ctx)).await {
            Ok(stream) => {
                reframed(stream, |model| responses::ResponsesStream::new(echo, &id, created, model))
            }
            Err(e) => e.response(shape),
        };
    }
    match Box::pin(gateway.complete(&req.chat, &ctx)).await {
        Ok(done) => {
            let answer = responses::answer(&req.echo, &id, created, &done.model, &done.answer, done.usage);
            json_response(&done, answer.to_string().into_bytes())
        }
        Err(e) => e.response(shape),
    }
}

async fn messages_api(
    State(gateway): State<Arc<Gateway>>,
    key: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: RawBody,
) -> Response {
    let shape = Shape::Anthropic;
    let body = match admitted(&gateway, body, shape) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let ctx = context(key, &headers);
    let req = match messages::parse(&body) {
        Ok(r) => r,
        Err(f) => return GatewayError::from_failure(f).response(shape),
    };
    let id = gateway.new_id();
    if req.chat.stream {
        return match Box::pin(gateway.stream(req.chat, ctx)).await {
            Ok(stream) => reframed(stream, |model| messages::MessagesStream::new(&id, model)),
            Err(e) => e.response(shape),
        };
    }
    match Box::pin(gateway.complete(&req.chat, &ctx)).await {
        Ok(done) => match messages::answer(&id, &done.model, &done.answer, done.usage) {
            Ok(answer) => json_response(&done, answer.to_string().into_bytes()),
            Err(f) => GatewayError::from_failure(f).response(shape),
        },
        Err(e) => e.response(shape),
    }
}

async fn embeddings(
    State(gateway): State<Arc<Gateway>>,
    key: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: RawBody,
) -> Response {
    let body = match admitted(&gateway, body, Shape::Openai) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let ctx = context(key, &headers);
    let req = match EmbeddingsRequest::parse(&body) {
        Ok(r) => r,
        Err(f) => return GatewayError::from_failure(f).into_response(),
    };
    match Box::pin(gateway.embed(&req, &ctx)).await {
        Ok(done) => {
            let mut resp = Response::new(Body::from(done.body));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            keel_headers(h, &done.model, done.attempts, false);
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Anthropic's token counting: Keel has only its conservative estimate (bytes/3), not
/// a tokenizer, so it says so in Anthropic's shape rather than answer a wrong count.
async fn count_tokens() -> Response {
    Shape::Anthropic.response(
        keel_core::ErrorClass::NotFound,
        "Keel does not count tokens (it has no tokenizer); /v1/messages/count_tokens is not served",
    )
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "keel"})
}

async fn model(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    match gateway.model_names().find(|m| *m == id) {
        Some(m) => (StatusCode::OK, axum::Json(model_object(m))).into_response(),
        None => GatewayError::new(
            keel_core::ErrorClass::NotFound,
            format!(
                "The model `{id}` does not exist (known: {})",
                gateway.model_names().collect::<Vec<_>>().join(", ")
            ),
        )
        .into_response(),
    }
}

async fn models(State(gateway): State<Arc<Gateway>>) -> Response {
    let data: Vec<serde_json::Value> = gateway.model_names().map(model_object).collect();
    (StatusCode::OK, axum::Json(serde_json::json!({"object": "list", "data": data}))).into_response()
}
