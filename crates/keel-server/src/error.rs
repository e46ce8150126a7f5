//! `/api`'s one error shape: `{class, message, retryable, attempts}` with the HTTP
//! status the class calls for — bad JSON and oversized bodies included.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_core::{Classified, Disposition, ErrorClass};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An API error.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(rename = "Error")]
pub struct ApiError {
    /// The error class (DESIGN.md's taxonomy).
    pub class: ErrorClass,
    /// What went wrong, for people.
    pub message: String,
    /// Whether sending the same request again may succeed.
    pub retryable: bool,
    /// Attempts made on the target, when a target was called.
    pub attempts: u32,
    /// The ticket opened for a person, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<String>,
    /// A status other than the class's (413 for an oversized body).
    #[serde(skip)]
    pub status: Option<StatusCode>,
}

impl ApiError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            retryable: class.default_disposition() == Disposition::Retry,
            attempts: 0,
            ticket_id: None,
            status: None,
        }
    }

    /// The HTTP status: the class's, unless overridden.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| status_for(self.class))
    }
}

/// The HTTP status that answers a failure of `class`.
pub fn status_for(class: ErrorClass) -> StatusCode {
    match class {
        ErrorClass::InvalidRequest
        | ErrorClass::InvalidToolCall
        | ErrorClass::UnknownTool
        | ErrorClass::ContextOverflow => StatusCode::BAD_REQUEST,
        ErrorClass::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorClass::Forbidden | ErrorClass::ApprovalDenied => StatusCode::FORBIDDEN,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Conflict | ErrorClass::LoopDetected => StatusCode::CONFLICT,
        ErrorClass::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorClass::BudgetExceeded => StatusCode::PAYMENT_REQUIRED,
        ErrorClass::Refusal | ErrorClass::CodeError => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorClass::Timeout | ErrorClass::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Network
        | ErrorClass::ServerError
        | ErrorClass::EmptyOutput
        | ErrorClass::TruncatedOutput => StatusCode::BAD_GATEWAY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, Json(&self)).into_response();
        // For the request log.
        resp.extensions_mut().insert(self.class);
        if self.class == ErrorClass::RateLimited {
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<keel_runtime::runner::Error> for ApiError {
    fn from(e: keel_runtime::runner::Error) -> Self {
        ApiError::new(e.class(), e.to_string())
    }
}

impl From<keel_journal::Error> for ApiError {
    fn from(e: keel_journal::Error) -> Self {
        ApiError::new(e.class(), e.to_string())
    }
}

/// A JSON body whose rejections (bad JSON, wrong content type, too large) answer in
/// [`ApiError`]'s shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(rejection_error(&rejection)),
        }
    }
}

fn rejection_error(r: &JsonRejection) -> ApiError {
    let too_large = r.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let mut e = ApiError::new(ErrorClass::InvalidRequest, r.body_text());
    if too_large {
        e.message = format!("the request body is too large: {}", r.body_text());
        e.status = Some(StatusCode::PAYLOAD_TOO_LARGE);
    }
    e
}
