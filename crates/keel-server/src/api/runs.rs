//! `/api/runs`: start a plan run, list, show with its timeline, cancel, resume.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use keel_core::ErrorClass;
use keel_journal::RunView;
use keel_runtime::Plan;
use keel_runtime::config::Role;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};

/// `POST /api/runs`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The plan, as JSON (the shape of a plan file).
    #[schemars(with = "Value")]
    pub plan: Plan,
}

/// A run just started.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Started {
    /// Its id.
    pub run_id: String,
    /// Where to follow it.
    pub url: String,
}

/// Starts a run; the server's workers carry it out.
///
/// # Errors
/// `invalid_request` for a plan that does not fit the configuration.
pub async fn start(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<StartRun>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    caller.require(&[Role::Agent])?;
    let mut body = body;
    body.plan.fill_ids();
    body.plan
        .check(&s.config, std::path::Path::new("request"))
        .map_err(|e| ApiError::new(ErrorClass::InvalidRequest, e.problems.join("; ")))?;
    let run_id = s.runner.create(&body.plan).await?;
    s.wake.notify_waiters();
    s.wake.notify_one();
    let url = format!("/api/runs/{run_id}");
    Ok((StatusCode::CREATED, Json(Started { run_id, url })))
}

/// Every run, newest activity first.
///
/// # Errors
/// The journal's.
pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<RunView>>, ApiError> {
    let mut runs = Vec::new();
    for id in s.journal.run_ids().await? {
        if let Some(snap) = s.journal.snapshot(&id).await? {
            runs.push(snap.run);
        }
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.updated_at_ms));
    Ok(Json(runs))
}

/// One run: its state, steps, attempts, approvals, tickets and every event.
///
/// # Errors
/// `not_found`.
pub async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let export = s
        .journal
        .export_run(&id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorClass::NotFound, format!("no run `{id}`")))?;
    Ok(Json(serde_json::to_value(export).unwrap_or_default()))
}

/// Cancels a run.
///
/// # Errors
/// `invalid_request` for a run that already ended; `not_found`.
pub async fn cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Agent, Role::Approver])?;
    s.runner.cancel(&id, &caller.name).await?;
    Ok(Json(json!({"run_id": id, "state": "cancelled"})))
}

/// Asks the workers to carry a run on now.
///
/// # Errors
/// `not_found`; `invalid_request` for a run that ended.
pub async fn resume(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(&[Role::Agent, Role::Approver])?;
    let snap = s.runner.snapshot(&id).await?;
    if snap.run.state.is_terminal() {
        return Err(ApiError::new(ErrorClass::InvalidRequest, format!("run `{id}` already ended")));
    }
    s.journal
        .append(&[keel_journal::NewEvent::new(
            &id,
            keel_journal::JournalEvent::RunStateChanged {
                state: keel_journal::RunState::Running,
                reason: Some(format!("resumed by {}", caller.name)),
            },
        )])
        .await?;
    s.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(json!({"run_id": id, "state": "running"}))))
}
