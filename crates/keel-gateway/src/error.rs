//! [`GatewayError`]: why a call through the gateway failed, in OpenAI's error shape.

use std::fmt;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use keel_core::{Classified, ErrorClass, Failure};

use crate::journal::ModelFailure;
use crate::wire::error_body;

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
        let mut resp = (self.status(), axum::Json(error_body(self.class, &self.message))).into_response();
        let h = resp.headers_mut();
        h.insert("x-keel-error-class", HeaderValue::from_static(self.class.as_str()));
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
