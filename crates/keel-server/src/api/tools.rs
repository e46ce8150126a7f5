//! `POST /api/tools/{name}/invoke`: one tool call for an external agent, under the
//! tool's policy, idempotency and approval rule.
//!
//! Each invocation is a one-step run, so it is journaled, approvable and visible in
//! the inbox like any plan. The idempotency key (the `Idempotency-Key` header, or for
//! write-like tools one derived from the tool and its canonical arguments) maps to the
//! invocation's run: the same key answers from that run — its result, or "still
//! waiting for approval" — and never acts twice. A call that needs approval answers
//! 202 with the approval's id and a URL to poll, or waits up to `?wait=` for the
//! decision and the result.

use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_core::ErrorClass;
use keel_journal::{Claim, RunState};
use keel_runtime::config::Role;
use keel_runtime::runner::args_digest;
use keel_runtime::{Plan, PlanStep};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AppState, WaitQuery};
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};

/// The request body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Invoke {
    /// The tool's parameters (checked against its JSON Schema).
    #[serde(default)]
    pub params: Value,
}

/// A finished call.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Invoked {
    /// The invocation's run.
    pub run_id: String,
    /// The tool's output.
    pub output: Value,
    /// Attempts made.
    pub attempts: u32,
    /// Whether this answer was stored from an earlier call with the same key.
    pub replayed: bool,
}

/// A call waiting for a person.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Pending {
    /// The invocation's run.
    pub run_id: String,
    /// The approval to decide.
    pub approval_id: String,
    /// Poll this (or call again with the same `Idempotency-Key`).
    pub poll_url: String,
}

/// Invokes a tool.
///
/// # Errors
/// `not_found` (no such tool), `invalid_request` (parameters), `forbidden` (role), and
/// the call's own class with its attempts.
pub async fn invoke(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Invoke>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Agent])?;
    let wait = q.duration()?;
    let Some(tool) = s.config.tools.get(&name).cloned() else {
        return Err(ApiError::new(ErrorClass::NotFound, format!("no tool named `{name}`")));
    };
    let params = if body.params.is_null() { json!({}) } else { body.params };
    if let Err(f) = tool.check_params(&params) {
        return Err(ApiError::new(f.class, f.message));
    }
    let key = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) if !k.trim().is_empty() => Some(format!("invoke/{name}/{}", k.trim())),
        _ if tool.write => Some(format!("invoke/{name}/derived/{}", args_digest(&name, &params))),
        _ => None,
    };
    let plan = Plan {
        name: Some(format!("invoke {name}")),
        input: params.clone(),
        deadline: None,
        steps: vec![PlanStep { id: Some(name.clone()), tool: name.clone(), params: params.clone() }],
    };
    let Some(key) = key else {
        let run_id = s.runner.create(&plan).await?;
        return answer(&s, &run_id, wait, false, true).await;
    };
    match s.journal.claim_or_wait(&key, Duration::from_secs(10)).await? {
        Claim::Won(token) => {
            let run_id = s.runner.create(&plan).await?;
            s.journal.complete(&token, &json!({ "run_id": run_id })).await?;
            answer(&s, &run_id, wait, false, true).await
        }
        Claim::Done(stored) => {
            let run_id = stored["run_id"].as_str().unwrap_or_default().to_owned();
            answer(&s, &run_id, wait, true, false).await
        }
        Claim::InProgress { .. } => {
            Err(ApiError::new(ErrorClass::Conflict, "a call with this key is in progress"))
        }
    }
}

/// Answers from the invocation's run, driving it first when this request started it.
async fn answer(
    s: &AppState,
    run_id: &str,
    wait: Duration,
    replayed: bool,
    drive: bool,
) -> Result<Response, ApiError> {
    let give_up = tokio::time::Instant::now() + wait;
    if drive {
        match s.drives.drive(&s.runner, run_id).await {
            Ok(_) | Err(keel_runtime::runner::Error::Busy(..)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    loop {
        let snap = s.runner.snapshot(run_id).await?;
        let attempts = snap.attempts.len() as u32;
        let step = snap.steps.first();
        match snap.run.state {
            RunState::Completed => {
                let output = step.and_then(|st| st.output.clone()).unwrap_or(Value::Null);
                let body = Invoked { run_id: run_id.to_owned(), output, attempts, replayed };
                return Ok((StatusCode::OK, Json(body)).into_response());
            }
            RunState::Failed | RunState::TimedOut | RunState::Cancelled | RunState::Escalated => {
                let class = step
                    .and_then(|st| st.error_class.as_deref())
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(match snap.run.state {
                        RunState::TimedOut => ErrorClass::DeadlineExceeded,
                        _ => ErrorClass::ServerError,
                    });
                let message = step
                    .and_then(|st| st.message.clone())
                    .or_else(|| snap.run.reason.clone())
                    .unwrap_or_else(|| snap.run.state.as_str().to_owned());
                let mut e = ApiError::new(class, message);
                e.attempts = attempts;
                e.ticket_id =
                    snap.tickets.iter().rev().find(|t| t.status == "open").map(|t| t.ticket_id.clone());
                return Err(e);
            }
            RunState::WaitingApproval | RunState::Created | RunState::Running => {
                if tokio::time::Instant::now() >= give_up {
                    let pending = snap.approvals.iter().rev().find(|a| a.status == "pending");
                    let body = Pending {
                        run_id: run_id.to_owned(),
                        approval_id: pending.map(|a| a.approval_id.clone()).unwrap_or_default(),
                        poll_url: format!("/api/runs/{run_id}"),
                    };
                    return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
                }
                // A decision moves the run back to running; the workers carry it on.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
