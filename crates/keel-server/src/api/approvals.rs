//! `/api/approvals`: list, show with context, approve or reject (approver role).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use keel_core::ErrorClass;
use keel_runtime::config::Role;
use keel_runtime::inbox::{self, ApprovalItem};
use serde::Deserialize;

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// A decision's optional comment.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Why, for the journal.
    #[serde(default)]
    pub comment: Option<String>,
}

/// Every approval, pending first.
///
/// # Errors
/// The journal's.
pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<ApprovalItem>>, ApiError> {
    Ok(Json(inbox::approvals(&*s.journal).await?))
}

/// One approval with its run and step (the exact arguments).
///
/// # Errors
/// `not_found`.
pub async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<ApprovalItem>, ApiError> {
    Ok(Json(inbox::approval(&*s.journal, &id).await?))
}

async fn decide(
    s: AppState,
    caller: Caller,
    id: String,
    approve: bool,
    d: Decision,
) -> Result<Json<ApprovalItem>, ApiError> {
    caller.require(&[Role::Approver])?;
    let by = match d.comment.filter(|c| !c.trim().is_empty()) {
        Some(c) => format!("{} ({c})", caller.name),
        None => caller.name.clone(),
    };
    let item = inbox::decide(&*s.journal, &id, approve, &by, s.clock.wall()).await?;
    tracing::info!(
        target: "keel::decision", run = %item.approval.run_id, approval = %id, decision = %item.approval.status,
        by = %caller.name, "approval decided"
    );
    s.wake.notify_one();
    Ok(Json(item))
}

/// Approves.
///
/// # Errors
/// `forbidden` without the approver role; `invalid_request` when not pending or expired.
pub async fn approve(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApprovalItem>, ApiError> {
    decide(s, caller, id, true, parse(body)?).await
}

/// Rejects.
///
/// # Errors
/// As [`approve`].
pub async fn reject(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApprovalItem>, ApiError> {
    decide(s, caller, id, false, parse(body)?).await
}

/// The optional body: none, or a [`Decision`]; too large a body in `/api`'s shape.
fn parse(body: Result<Bytes, BytesRejection>) -> Result<Decision, ApiError> {
    let body = body.map_err(|r| {
        let mut e = ApiError::new(ErrorClass::InvalidRequest, format!("the request body: {}", r.body_text()));
        if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            e.message = format!("the request body is too large: {}", r.body_text());
            e.status = Some(axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        }
        e
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Decision::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorClass::InvalidRequest, format!("bad JSON body: {e}")))
}
