//! `POST /api/tools/{name}/invoke`: one tool call for an external agent, under the
//! tool's policy, idempotency and approval rule.
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

use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_core::ErrorClass;
use keel_journal::RunState;
use keel_runtime::config::Role;
use keel_runtime::runner::{Error as RunnerError, args_digest, new_id};
use keel_runtime::{Plan, PlanStep, RunStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

/// The run id of the invocation whose (tool-scoped) idempotency key is `key`: the same
/// key gives the same run, in every process and after every restart.
pub fn invocation_run_id(key: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("keel/invoke\n{key}").as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("run-{hex}")
}

/// The key an invocation runs under: the header's (scoped to the tool), or for a
/// write-like tool one derived from its arguments, or none.
pub fn invocation_key(tool: &str, write: bool, header: Option<&str>, params: &Value) -> Option<String> {
    match header.map(str::trim) {
        Some(k) if !k.is_empty() => Some(format!("invoke/{tool}/{k}")),
        _ if write => Some(format!("invoke/{tool}/derived/{}", args_digest(tool, params))),
        _ => None,
    }
}

/// How long past its bound a request may take when the journal itself does not answer.
const GRACE: Duration = Duration::from_secs(1);

/// How often a request re-reads a run it does not drive, and retries a drive another
/// process held.
const POLL: Duration = Duration::from_millis(100);

/// Invokes a tool.
///
/// # Errors
/// `not_found` (no such tool), `invalid_request` (parameters), `forbidden` (role),
/// `conflict` (422: the key was used with other arguments), `timeout` (the journal did
/// not answer within `?wait`), and the call's own class with its attempts.
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
    let bound = q.wait.is_some().then(|| Instant::now() + wait);
    let Some(tool) = s.config.tools.get(&name).cloned() else {
        return Err(ApiError::new(ErrorClass::NotFound, format!("no tool named `{name}`")));
    };
    let params = if body.params.is_null() { json!({}) } else { body.params };
    if let Err(f) = tool.check_params(&params) {
        return Err(ApiError::new(f.class, f.message));
    }
    let header = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let key = invocation_key(&name, tool.write, header, &params);
    let run_id = key.as_deref().map_or_else(|| new_id("run"), invocation_run_id);
    let plan = Plan {
        name: Some(format!("invoke {name}")),
        input: params.clone(),
        deadline: None,
        steps: vec![PlanStep { id: Some(name.clone()), tool: name.clone(), params: params.clone() }],
    };
    let work = async {
        let created = s.runner.create_with_id(&run_id, &plan).await?;
        if !created {
            let snap = s.runner.snapshot(&run_id).await?;
            let step = &snap.run.input["plan"]["steps"][0];
            let same = step["tool"] == name.as_str()
                && args_digest(&name, &step["params"]) == args_digest(&name, &params);
            if !same {
                let mut e = ApiError::new(
                    ErrorClass::Conflict,
                    "this Idempotency-Key was used with other arguments; use a new key for a new call",
                );
                e.status = Some(StatusCode::UNPROCESSABLE_ENTITY);
                return Err(e);
            }
        }
        answer(&s, &run_id, wait, bound, created).await
    };
    match bound {
        None => work.await,
        Some(bound) => match tokio::time::timeout_at(bound + GRACE, work).await {
            Ok(answered) => answered,
            Err(_) => Err(ApiError::new(
                ErrorClass::Timeout,
                format!(
                    "no answer from the journal within the request's wait ({}); the storage may be \
                     unavailable — retry with the same Idempotency-Key",
                    humantime::format_duration(wait)
                ),
            )),
        },
    }
}

/// Answers from the invocation's run: drives it (in a task of its own) while nobody
/// else does, and reads its state until it ends, waits for a person, or the bound
/// passes. `fresh`: this request created the run (drive it before reading it).
async fn answer(
    s: &AppState,
    run_id: &str,
    wait: Duration,
    bound: Option<Instant>,
    fresh: bool,
) -> Result<Response, ApiError> {
    let person_until = Instant::now() + wait;
    let replayed = !fresh;
    let mut drive = fresh.then(|| spawn_drive(s, run_id));
    // Drives start at most once per POLL: a run held elsewhere is not hammered.
    let mut next_drive = Instant::now() + if fresh { POLL } else { Duration::ZERO };
    loop {
        if let Some(handle) = drive.as_mut() {
            // Only the drive moves the run on: nothing to read until it ends.
            let joined = match bound {
                Some(b) => tokio::time::timeout_at(b, handle).await.ok(),
                None => Some(handle.await),
            };
            if let Some(joined) = joined {
                drive = None;
                match joined {
                    Ok(Ok(_)) => {}
                    // Another task or process holds the run (or took it over from this
                    // one): read it, and try again later (that holder may die too).
                    Ok(Err(e)) if held_elsewhere(&e) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(e) => {
                        return Err(ApiError::new(ErrorClass::ServerError, format!("the drive failed: {e}")));
                    }
                }
            }
        }
        let snap = s.runner.snapshot(run_id).await?;
        let attempts = snap.attempts.len() as u32;
        let step = snap.steps.first();
        let now = Instant::now();
        let out_of_time = bound.is_some_and(|b| now >= b);
        let pending = |state: &str| Pending {
            run_id: run_id.to_owned(),
            state: state.to_owned(),
            approval_id: None,
            ticket_id: None,
            poll_url: format!("/api/runs/{run_id}"),
            replayed,
        };
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
            RunState::WaitingApproval => {
                let approval = snap.approvals.iter().rev().find(|a| a.status == "pending");
                if let Some(approval) = approval.filter(|_| now >= person_until) {
                    let body = Pending {
                        approval_id: Some(approval.approval_id.clone()),
                        ..pending("waiting_approval")
                    };
                    return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
                }
                // Waiting for the decision (or decided a moment ago: about to move on).
            }
            RunState::Created | RunState::Running => {
                if out_of_time || past_deadline(s, &snap) {
                    return Ok((StatusCode::ACCEPTED, Json(pending("running"))).into_response());
                }
                if drive.is_none() && now >= next_drive {
                    drive = Some(spawn_drive(s, run_id));
                    next_drive = now + POLL;
                    continue;
                }
            }
        }
        if out_of_time {
            // Out of time with the run just moving on from a decision.
            return Ok((StatusCode::ACCEPTED, Json(pending(snap.run.state.as_str()))).into_response());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a drive ended because someone else works the run: its lease was held, or
/// lost to a process that took the run over. The run goes on; the request answers
/// from it.
fn held_elsewhere(e: &RunnerError) -> bool {
    match e {
        RunnerError::Busy(..) => true,
        RunnerError::Journal(j) => {
            matches!(j, keel_journal::Error::LeaseLost { .. })
                || matches!(j, keel_journal::Error::Batch(inner) if matches!(**inner, keel_journal::Error::LeaseLost { .. }))
        }
        _ => false,
    }
}

/// Drives `run_id` in a task of its own: a client hanging up must not stop a drive
/// half-way (it would hold the run's lease, unworked, until the lease expired).
fn spawn_drive(s: &AppState, run_id: &str) -> JoinHandle<Result<RunStatus, RunnerError>> {
    let (runner, drives, run) = (s.runner.clone(), s.drives.clone(), run_id.to_owned());
    tokio::spawn(async move { drives.drive(&runner, &run).await })
}

/// Whether the run's own deadline has passed (its holder, wherever it is, gives up).
fn past_deadline(s: &AppState, snap: &keel_journal::RunSnapshot) -> bool {
    let deadline_ms = snap.run.input["deadline_ms"].as_u64().unwrap_or(u64::MAX);
    let at = snap.run.created_at_ms.saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX));
    s.now_ms() > at
}
