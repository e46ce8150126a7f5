//! `POST /api/tools/{name}/invoke`: one tool call for an external agent, under the
//! tool's policy, idempotency and approval rule. A thin adapter over
//! [`keel_runtime::invoke`], which owns the semantics; this maps its outcome to HTTP.
//!
//! Each invocation is a one-step run, so it is journaled, approvable and visible in
//! the inbox like any plan. The idempotency key (the `Idempotency-Key` header, or for
//! write-like tools one derived from the tool and its canonical arguments) *is* the
//! run's identity: the run id is derived from the key, and the run is created "if
//! absent" in one transaction with its first events. So a retry always finds the
//! key's run — whether the first request finished, hung up, or its server was killed
//! between any two instructions — and answers from it: waiting for it, replaying its
//! result, or reporting its state. Nothing acts twice, and no claim is left "in
//! progress" to time out. The same key with other arguments is refused (422,
//! `conflict`), never answered with the first call's result.
//!
//! The run is driven by a task of its own, so a client hanging up does not stop it
//! half-way. Without `?wait=`, the request waits while the run is worked (up to the
//! run's deadline) but not for a person: a call that needs approval answers 202 with
//! the approval's id and a URL to poll. With `?wait=`, the request answers within
//! that bound whatever happens: the result, the error, or 202 with the run's state
//! (`waiting_approval` and its approval, `escalated` and its ticket, or `running`).

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_core::{Classified as _, ErrorClass, RunScope};
use keel_runtime::config::Role;
use keel_runtime::{Call, InvokeError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::runs::{IssuedRuns, RunRefused};
use super::{AppState, WaitQuery};
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};

pub use keel_runtime::invoke::{invocation_key, invocation_run_id};

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

/// A call not finished within the request's bound: waiting for a person, or still
/// being worked (by this server or another instance).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Pending {
    /// The invocation's run.
    pub run_id: String,
    /// The run's state: `waiting_approval`, `escalated` or `running`.
    pub state: String,
    /// The approval to decide, when the run waits for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// The ticket a person must answer, when the run escalated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<String>,
    /// Poll this (or call again with the same `Idempotency-Key`).
    pub poll_url: String,
    /// Whether the run was started by an earlier call with the same key.
    pub replayed: bool,
}

/// Invokes a tool.
///
/// # Errors
/// `not_found` (no such tool), `invalid_request` (parameters), `forbidden` (role),
/// `conflict` (422: the key was used with other arguments), `timeout` (the journal did
/// not answer within `?wait`), and the call's own class with its attempts.
pub async fn invoke(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(issued): Extension<std::sync::Arc<IssuedRuns>>,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Invoke>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Agent])?;
    let wait = q.duration()?;
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let call = Call {
        tool: name,
        params: body.params,
        key,
        wait: q.wait.is_some().then_some(wait),
        caller: Some(caller.name.clone()),
        minted: false,
    };
    // A call naming the agent's run (`X-Keel-Run`) is charged to that run's budget, the
    // one its model calls draw on: a tool's cost and attempts count with them.
    let scope = match headers.get(keel_gateway::RUN_HEADER) {
        None => RunScope::new(),
        Some(named) => {
            let run = issued.check(&caller, named.to_str().map_err(|_| ())).await.map_err(|r| match r {
                RunRefused::Invalid(m) => ApiError::new(ErrorClass::InvalidRequest, m),
                RunRefused::Unavailable(m) => ApiError::new(ErrorClass::ServerError, m),
            })?;
            match &s.gateway {
                Some(gateway) => gateway.run_scope(&run),
                None => RunScope::new(),
            }
        }
    };
    let outcome = scope.run(s.invoker().invoke(call)).await.map_err(api_error)?;
    respond(outcome)
}

/// An invocation's outcome as an HTTP answer: 200 with the output, 202 with the run's
/// state, or the call's error with its class, attempts and ticket.
fn respond(outcome: Outcome) -> Result<Response, ApiError> {
    let pending = |run_id: String, state: &str, replayed: bool| Pending {
        poll_url: format!("/api/runs/{run_id}"),
        run_id,
        state: state.to_owned(),
        approval_id: None,
        ticket_id: None,
        replayed,
    };
    match outcome {
        Outcome::Completed { run_id, output, attempts, replayed } => {
            Ok((StatusCode::OK, Json(Invoked { run_id, output, attempts, replayed })).into_response())
        }
        Outcome::WaitingApproval { run_id, approval_id, replayed } => {
            let body =
                Pending { approval_id: Some(approval_id), ..pending(run_id, "waiting_approval", replayed) };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Outcome::Running { run_id, state, replayed } => {
            Ok((StatusCode::ACCEPTED, Json(pending(run_id, state.as_str(), replayed))).into_response())
        }
        Outcome::Failed { class, message, attempts, ticket_id, .. }
        | Outcome::Escalated { class, message, attempts, ticket_id, .. } => {
            let mut e = ApiError::new(class, message);
            e.attempts = attempts;
            e.ticket_id = ticket_id;
            Err(e)
        }
    }
}

/// An invocation that could not be made or answered, in the API's error shape.
fn api_error(e: InvokeError) -> ApiError {
    match e {
        InvokeError::InvalidParams(f) => ApiError::new(f.class, f.message),
        InvokeError::Runner(r) => r.into(),
        InvokeError::Conflict => {
            let mut e = ApiError::new(
                e.class(),
                "this Idempotency-Key was used with other arguments; use a new key for a new call",
            );
            e.status = Some(StatusCode::UNPROCESSABLE_ENTITY);
            e
        }
        InvokeError::Timeout(wait) => ApiError::new(
            e.class(),
            format!(
                "no answer from the journal within the request's wait ({}); the storage may be \
                 unavailable — retry with the same Idempotency-Key",
                humantime::format_duration(wait)
            ),
        ),
        other => ApiError::new(other.class(), other.to_string()),
    }
}
