//! `/api/tickets`: list, show with the context package, resolve with guidance.

use axum::Json;
use axum::extract::{Extension, Path, State};
use keel_core::ErrorClass;
use keel_runtime::config::Role;
use keel_runtime::inbox::{self, Guidance, TicketItem};
use serde::Deserialize;
use serde_json::Value;

use super::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};

/// `POST /api/tickets/{id}/resolve`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// `retry`, `skip` or `abort`.
    pub action: String,
    /// New parameters for `retry`.
    #[serde(default)]
    pub params: Option<Value>,
}

/// Every ticket, open first.
///
/// # Errors
/// The journal's.
pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<TicketItem>>, ApiError> {
    Ok(Json(inbox::tickets(&*s.journal).await?))
}

/// One ticket.
///
/// # Errors
/// `not_found`.
pub async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<TicketItem>, ApiError> {
    Ok(Json(inbox::ticket(&*s.journal, &id).await?))
}

/// Resolves a ticket; the workers carry the run on.
///
/// # Errors
/// `forbidden` without the approver role; `invalid_request` for an unknown action or
/// a ticket that is not open.
pub async fn resolve(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Resolve>,
) -> Result<Json<TicketItem>, ApiError> {
    caller.require(&[Role::Approver])?;
    let guidance = match body.action.as_str() {
        "retry" => Guidance::Retry { params: body.params },
        "skip" => Guidance::Skip,
        "abort" => Guidance::Abort,
        other => {
            return Err(ApiError::new(
                ErrorClass::InvalidRequest,
                format!("unknown action `{other}`: use retry, skip or abort"),
            ));
        }
    };
    let item = inbox::resolve(&*s.journal, &id, &guidance, &caller.name).await?;
    s.wake.notify_one();
    Ok(Json(item))
}
