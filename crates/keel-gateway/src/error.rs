//! [`GatewayError`]: why a call through the gateway failed, and [`Shape`]: how each
//! inbound API says so.
//!
//! Every inbound API answers errors in its own shape with its own `type` values, so
//! that its official SDK raises the right exception (`RateLimitError`,
//! `BadRequestError`, `NotFoundError`...). Keel's own class rides along in an
//! extension field, `keel_class`, and in the `x-keel-error-class` header:
//!
//! - OpenAI (`/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`, `/v1/models`):
//!   `{"error": {"message", "type", "param", "code", "keel_class"}}`;
//! - Anthropic (`/v1/messages`): `{"type": "error", "error": {"type", "message",
//!   "keel_class"}}`.
//!
//! The mappings from [`ErrorClass`] are exhaustive matches: a new class must be
//! placed in every API's vocabulary.

use std::fmt;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use keel_core::{Classified, ErrorClass, Failure};

use crate::journal::ModelFailure;

/// A call that failed: its class (the original failure's, never masked by a
/// fallback's), a message, and every model's failure in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// What went wrong first.
    pub class: ErrorClass,
    /// In words, every model's failure included.
    pub message: String,
    /// Attempts made on every model.
    pub attempts: u32,
    /// Each model's failure, in order.
    pub failures: Vec<ModelFailure>,
    /// The delay an upstream asked for, passed on to the agent.
    pub retry_after: Option<Duration>,
}

impl GatewayError {
    /// An error before any model was called.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into(), attempts: 0, failures: Vec::new(), retry_after: None }
    }

    pub(crate) fn from_failure(f: Failure) -> Self {
        Self { retry_after: f.retry_after, ..Self::new(f.class, f.message) }
    }

    /// The HTTP status the agent sees.
    pub fn status(&self) -> StatusCode {
        status_of(self.class)
    }
}

/// The HTTP status of a final failure of `class`.
pub fn status_of(class: ErrorClass) -> StatusCode {
    match class {
        ErrorClass::InvalidRequest | ErrorClass::ContextOverflow | ErrorClass::Refusal => {
            StatusCode::BAD_REQUEST
        }
        ErrorClass::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorClass::Forbidden | ErrorClass::ApprovalDenied => StatusCode::FORBIDDEN,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Conflict | ErrorClass::LoopDetected => StatusCode::CONFLICT,
        ErrorClass::RateLimited | ErrorClass::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorClass::Timeout | ErrorClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Network
        | ErrorClass::ServerError
        | ErrorClass::EmptyOutput
        | ErrorClass::TruncatedOutput
        | ErrorClass::InvalidToolCall
        | ErrorClass::UnknownTool
        | ErrorClass::CodeError => StatusCode::BAD_GATEWAY,
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for GatewayError {}

impl Classified for GatewayError {
    fn class(&self) -> ErrorClass {
        self.class
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.response(Shape::Openai)
    }
}

impl GatewayError {
    /// The error as an answer of the API `shape` (its status, body and headers).
    pub fn response(self, shape: Shape) -> Response {
        let mut resp = shape.response(self.class, &self.message);
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.attempts.to_string()) {
            h.insert("x-keel-attempts", v);
        }
        if self.class == ErrorClass::BudgetExceeded {
            // The same call will be refused again: the official SDKs honour this and
            // do not re-send. Budgets count over the process's life and never refill,
            // so no `Retry-After` either (a rolling-window budget would send one).
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        } else if let Some(delay) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&delay.as_secs().max(1).to_string()) {
                h.insert(http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// The error vocabulary of one inbound API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// OpenAI's: chat completions, responses, embeddings, models.
    Openai,
    /// Anthropic's: messages.
    Anthropic,
}

impl Shape {
    /// The shape of the API served at `path` (Anthropic's for `/v1/messages`).
    pub fn for_path(path: &str) -> Self {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Self::Anthropic
        } else {
            Self::Openai
        }
    }

    /// The HTTP status of a failure of `class` in this API: the gateway's, except that
    /// Anthropic says `529` for overloaded.
    pub fn status(self, class: ErrorClass) -> StatusCode {
        match self {
            Self::Anthropic if class == ErrorClass::CircuitOpen => {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::Openai | Self::Anthropic => status_of(class),
        }
    }

    /// The error body of a failure of `class`.
    pub fn body(self, class: ErrorClass, message: &str) -> serde_json::Value {
        match self {
            Self::Openai => serde_json::json!({
                "error": {
                    "message": message,
                    "type": openai_type(class),
                    "param": null,
                    "code": openai_code(class),
                    "keel_class": class.as_str(),
                }
            }),
            Self::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": anthropic_type(class), "message": message, "keel_class": class.as_str()},
            }),
        }
    }

    /// The whole answer: the class's status, the body, `x-keel-error-class`.
    pub fn response(self, class: ErrorClass, message: &str) -> Response {
        self.response_with(self.status(class), class, message)
    }

    /// As [`response`](Self::response) with another status (413 for a body too large,
    /// 503 while shedding load).
    pub fn response_with(self, status: StatusCode, class: ErrorClass, message: &str) -> Response {
        let status = match (self, status) {
            (Self::Anthropic, StatusCode::SERVICE_UNAVAILABLE) => self.status(ErrorClass::CircuitOpen),
            _ => status,
        };
        let mut body = self.body(class, message);
        if self == Self::Anthropic && status == StatusCode::PAYLOAD_TOO_LARGE {
            body["error"]["type"] = "request_too_large".into();
        }
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert("x-keel-error-class", HeaderValue::from_static(class.as_str()));
        resp
    }
}

/// OpenAI's `error.type` for `class` (what its SDKs and agents switch on).
pub fn openai_type(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::InvalidRequest
        | ErrorClass::ContextOverflow
        | ErrorClass::Refusal
        | ErrorClass::NotFound
        | ErrorClass::Conflict
        | ErrorClass::LoopDetected => "invalid_request_error",
        ErrorClass::Unauthorized => "authentication_error",
        ErrorClass::Forbidden | ErrorClass::ApprovalDenied => "permission_error",
        ErrorClass::RateLimited => "rate_limit_error",
        ErrorClass::BudgetExceeded => "insufficient_quota",
        ErrorClass::Timeout
        | ErrorClass::DeadlineExceeded
        | ErrorClass::CircuitOpen
        | ErrorClass::Network
        | ErrorClass::ServerError
        | ErrorClass::EmptyOutput
        | ErrorClass::TruncatedOutput
        | ErrorClass::InvalidToolCall
        | ErrorClass::UnknownTool
        | ErrorClass::CodeError => "server_error",
    }
}

/// OpenAI's `error.code` for `class`: its own codes where it has one, else Keel's class.
pub fn openai_code(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::ContextOverflow => "context_length_exceeded",
        ErrorClass::Refusal => "content_policy_violation",
        ErrorClass::RateLimited => "rate_limit_exceeded",
        ErrorClass::BudgetExceeded => "insufficient_quota",
        ErrorClass::NotFound => "model_not_found",
        ErrorClass::InvalidRequest
        | ErrorClass::Unauthorized
        | ErrorClass::Forbidden
        | ErrorClass::ApprovalDenied
        | ErrorClass::Conflict
        | ErrorClass::LoopDetected
        | ErrorClass::Timeout
        | ErrorClass::DeadlineExceeded
        | ErrorClass::CircuitOpen
        | ErrorClass::Network
        | ErrorClass::ServerError
        | ErrorClass::EmptyOutput
        | ErrorClass::TruncatedOutput
        | ErrorClass::InvalidToolCall
        | ErrorClass::UnknownTool
        | ErrorClass::CodeError => class.as_str(),
    }
}

/// Anthropic's `error.type` for `class`.
pub fn anthropic_type(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::InvalidRequest
        | ErrorClass::ContextOverflow
        | ErrorClass::Refusal
        | ErrorClass::Conflict
        | ErrorClass::LoopDetected => "invalid_request_error",
        ErrorClass::Unauthorized => "authentication_error",
        ErrorClass::Forbidden | ErrorClass::ApprovalDenied => "permission_error",
        ErrorClass::NotFound => "not_found_error",
        ErrorClass::RateLimited => "rate_limit_error",
        ErrorClass::BudgetExceeded => "billing_error",
        ErrorClass::Timeout | ErrorClass::DeadlineExceeded => "timeout_error",
        ErrorClass::CircuitOpen => "overloaded_error",
        ErrorClass::Network
        | ErrorClass::ServerError
        | ErrorClass::EmptyOutput
        | ErrorClass::TruncatedOutput
        | ErrorClass::InvalidToolCall
        | ErrorClass::UnknownTool
        | ErrorClass::CodeError => "api_error",
    }
}
