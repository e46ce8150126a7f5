//! `/api/runs`: start a plan run (or an agent's run, with no plan), list, show with
//! its timeline, cancel, resume.
//!
//! A run started here belongs to the key that started it (`input.owner`): only that
//! key (or an admin) may name it in `X-Keel-Run` on `/v1`, so that each run's model
//! budget is Keel's to issue, not a header the caller makes up.

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

/// `POST /api/runs`: a plan for Keel to carry out, or no plan for an agent's own
/// run (a run handle: the agent names it in `X-Keel-Run` on its model calls).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The plan, as JSON (the shape of a plan file); none for an agent's run.
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub plan: Option<Plan>,
    /// What an agent's run is, for people (at most 200 characters).
    #[serde(default)]
    pub name: Option<String>,
    /// A task for Keel's own agent (`keel agent`): the model calls the config's tools
    /// until it answers, driven by the server's workers.
    #[serde(default)]
    pub task: Option<String>,
    /// The agent's model (default `[agent] model`).
    #[serde(default)]
    pub model: Option<String>,
    /// The agent's most model turns (default `[agent] max_turns`).
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// The tools the agent is offered (default `[agent] tools`, else all).
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// The task's check: a JSON Schema every program's `result` must match (a result
    /// that does not is a `code_error` the agent corrects).
    #[serde(default)]
    pub result_schema: Option<Value>,
}

/// The kind of an agent's run in its `input` (a run with no plan, not driven by Keel).
pub const AGENT_RUN: &str = "agent";

/// The key that started a run, if one did (`input.owner`).
pub fn owner(run: &RunView) -> Option<&str> {
    run.input.get("owner").and_then(Value::as_str)
}

fn is_agent_run(run: &RunView) -> bool {
    run.input.get("kind").and_then(Value::as_str) == Some(AGENT_RUN)
}

/// Whether `id` is the gateway's own run (where model calls with no `X-Keel-Run` and
/// the gateway's decisions are journaled): not a run anyone may list, cancel or resume.
pub fn is_internal(id: &str) -> bool {
    id == keel_gateway::journal::GATEWAY_RUN
}

fn not_a_run(id: &str) -> Option<ApiError> {
    is_internal(id).then(|| ApiError::new(ErrorClass::NotFound, format!("no run `{id}`")))
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
    if let Some(task) = body.task {
        if body.plan.is_some() || body.name.is_some() {
            return Err(ApiError::new(ErrorClass::InvalidRequest, "a `task` comes without `plan` or `name`"));
        }
        let task = keel_runtime::agent::AgentTask {
            task,
            model: body.model,
            max_turns: body.max_turns,
            tools: body.tools,
            system: None,
            result_schema: body.result_schema,
        };
        let run_id = s.runner.create_agent(&task, Some(&caller.name)).await?;
        s.wake.notify_waiters();
        s.wake.notify_one();
        let url = format!("/api/runs/{run_id}");
        return Ok((StatusCode::CREATED, Json(Started { run_id, url })));
    }
    if body.model.is_some()
        || body.max_turns.is_some()
        || body.tools.is_some()
        || body.result_schema.is_some()
    {
        return Err(ApiError::new(
            ErrorClass::InvalidRequest,
            "`model`, `max_turns`, `tools` and `result_schema` go with a `task`",
        ));
    }
    let Some(mut plan) = body.plan else {
        return start_agent_run(&s, &caller, body.name).await;
    };
    if body.name.is_some() {
        return Err(ApiError::new(
            ErrorClass::InvalidRequest,
            "`name` is for an agent's run; a plan has its own",
        ));
    }
    plan.fill_ids();
    plan.check(&s.config, std::path::Path::new("request"))
        .map_err(|e| ApiError::new(ErrorClass::InvalidRequest, e.problems.join("; ")))?;
    let run_id = s.runner.create_by(&plan, Some(&caller.name)).await?;
    s.wake.notify_waiters();
    s.wake.notify_one();
    let url = format!("/api/runs/{run_id}");
    Ok((StatusCode::CREATED, Json(Started { run_id, url })))
}

/// An agent's run: journaled, owned by the caller's key, not driven by the workers
/// (it has no name in the journal's runs, which the workers skip).
async fn start_agent_run(
    s: &AppState,
    caller: &Caller,
    name: Option<String>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let label = name.unwrap_or_else(|| AGENT_RUN.to_owned());
    if label.chars().count() > 200 || label.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorClass::InvalidRequest,
            "`name`: at most 200 characters, no control characters",
        ));
    }
    let run_id = keel_runtime::runner::new_id("run");
    let input = json!({"kind": AGENT_RUN, "owner": caller.name, "label": label});
    s.journal
        .append(&[
            keel_journal::NewEvent::new(
                &run_id,
                keel_journal::JournalEvent::RunCreated { name: String::new(), input },
            ),
            keel_journal::NewEvent::new(
                &run_id,
                keel_journal::JournalEvent::RunStateChanged {
                    state: keel_journal::RunState::Running,
                    reason: Some(format!("an agent's run, started by {}", caller.name)),
                },
            ),
        ])
        .await?;
    let url = format!("/api/runs/{run_id}");
    Ok((StatusCode::CREATED, Json(Started { run_id, url })))
}

/// `GET /api/runs` query: a page of runs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The most runs (1–1000, default 100).
    #[serde(default)]
    pub limit: Option<u32>,
    /// The cursor of the next page (the previous answer's `x-keel-next-page`).
    #[serde(default)]
    pub before: Option<String>,
    /// Only runs in this state (`running`, `completed`...).
    #[serde(default)]
    pub state: Option<String>,
}

/// The header holding the next page's cursor, when there may be one.
pub const NEXT_PAGE: &str = "x-keel-next-page";

/// A page of runs, newest activity first (an indexed query: its cost does not grow with
/// the journal's history); the next page's cursor in `x-keel-next-page`.
///
/// # Errors
/// `invalid_request` for a bad query; the journal's.
pub async fn list(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(axum::http::HeaderMap, Json<Vec<RunView>>), ApiError> {
    let axum::extract::Query(q) = query
        .map_err(|e| ApiError::new(ErrorClass::InvalidRequest, format!("the query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=keel_journal::RunPage::MAX).contains(&limit) {
        return Err(ApiError::new(ErrorClass::InvalidRequest, "`limit`: 1 to 1000"));
    }
    let state = match q.state.as_deref() {
        None => None,
        Some(st) => Some(keel_journal::RunState::parse(st).ok_or_else(|| {
            ApiError::new(ErrorClass::InvalidRequest, format!("`state`: no run state `{st}`"))
        })?),
    };
    let before =
        match q.before.as_deref() {
            None => None,
            Some(c) => {
                let parsed =
                    c.split_once(':').and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())));
                Some(parsed.ok_or_else(|| {
                    ApiError::new(ErrorClass::InvalidRequest, "`before`: not a page cursor")
                })?)
            }
        };
    let page = keel_journal::RunPage { state, before, limit };
    let mut runs = s.journal.list_runs(&page).await?;
    let mut headers = axum::http::HeaderMap::new();
    if runs.len() as u32 == limit {
        if let Some(last) = runs.last() {
            let cursor = format!("{}:{}", last.updated_at_ms, last.run_id);
            if let Ok(v) = axum::http::HeaderValue::from_str(&cursor) {
                headers.insert(NEXT_PAGE, v);
            }
        }
    }
    runs.retain(|r| not_a_run(&r.run_id).is_none());
    for r in &mut runs {
        if r.name.is_empty() && is_agent_run(r) {
            r.name = r.input["label"].as_str().unwrap_or(AGENT_RUN).to_owned();
        }
    }
    Ok((headers, Json(runs)))
}

/// One run: its state, steps, attempts, approvals, tickets and every event.
///
/// # Errors
/// `not_found`.
pub async fn show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if let Some(e) = not_a_run(&id) {
        return Err(e);
    }
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
    if let Some(e) = not_a_run(&id) {
        return Err(e);
    }
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
    if let Some(e) = not_a_run(&id) {
        return Err(e);
    }
    let snap = s.runner.snapshot(&id).await?;
    if is_agent_run(&snap.run) {
        return Err(ApiError::new(
            ErrorClass::InvalidRequest,
            format!("run `{id}` is an agent's: Keel does not drive it"),
        ));
    }
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

/// `/v1`'s check of `X-Keel-Run`: the run must be one Keel issued to the calling key
/// (started by it through `POST /api/runs`; an admin may name any run), and not have
/// ended (a cancelled run's agent is stopped). A verified pair is trusted for
/// [`IssuedRuns::RECHECK`], so that a run's calls cost a journal read now and then.
#[derive(Debug)]
pub struct IssuedRuns {
    journal: std::sync::Arc<dyn keel_journal::Journal>,
    verified: std::sync::Mutex<std::collections::HashMap<(String, String), tokio::time::Instant>>,
}

/// What [`IssuedRuns`] says of a named run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Issued,
    NotIssued,
    Ended(keel_journal::RunState),
}

impl IssuedRuns {
    /// How long a verified (key, run) pair is trusted before the run is read again.
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

    /// Over `journal`.
    pub fn new(journal: std::sync::Arc<dyn keel_journal::Journal>) -> Self {
        Self { journal, verified: std::sync::Mutex::default() }
    }

    async fn verdict(&self, caller: &Caller, run_id: &str) -> Result<Verdict, keel_journal::Error> {
        let pair = (caller.name.clone(), run_id.to_owned());
        let now = tokio::time::Instant::now();
        let fresh = |at: &tokio::time::Instant| now.saturating_duration_since(*at) < Self::RECHECK;
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&pair).is_some_and(fresh) {
            return Ok(Verdict::Issued);
        }
        if is_internal(run_id) {
            return Ok(Verdict::NotIssued);
        }
        let Some(snap) = self.journal.snapshot(run_id).await? else { return Ok(Verdict::NotIssued) };
        if caller.role != Role::Admin && owner(&snap.run) != Some(caller.name.as_str()) {
            return Ok(Verdict::NotIssued);
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if snap.run.state.is_terminal() {
            verified.remove(&pair);
            return Ok(Verdict::Ended(snap.run.state));
        }
        if verified.len() >= 100_000 {
            verified.retain(|_, at| fresh(at));
        }
        verified.insert(pair, now);
        Ok(Verdict::Issued)
    }
}

/// Why a named run may not be used.
#[derive(Debug)]
pub(crate) enum RunRefused {
    /// Not the caller's, not a run, or ended: a bad request.
    Invalid(String),
    /// The journal could not say.
    Unavailable(String),
}

impl IssuedRuns {
    /// Checks that `caller` may name `run_id` (in `X-Keel-Run`, header value `named`).
    pub(crate) async fn check(&self, caller: &Caller, named: Result<&str, ()>) -> Result<String, RunRefused> {
        let Ok(run_id) = named else {
            return Err(RunRefused::Invalid("X-Keel-Run is not a valid run id".to_owned()));
        };
        let shown: String = run_id.chars().filter(char::is_ascii_graphic).take(80).collect();
        match self.verdict(caller, run_id).await {
            Ok(Verdict::Issued) => Ok(run_id.to_owned()),
            Ok(Verdict::NotIssued) => {
                tracing::warn!(key = %caller.name, run = %shown, "call refused: the run was not issued to the key");
                Err(RunRefused::Invalid(format!(
                    "X-Keel-Run `{shown}` is not a run Keel issued to key `{}`: start one with POST /api/runs \
                     (with no plan for an agent's own run) and send its run_id",
                    caller.name
                )))
            }
            Ok(Verdict::Ended(state)) => {
                tracing::info!(key = %caller.name, run = %shown, state = state.as_str(), "call refused: the run ended");
                Err(RunRefused::Invalid(format!(
                    "run `{shown}` already ended ({}): it takes no more calls",
                    state.as_str()
                )))
            }
            Err(e) => Err(RunRefused::Unavailable(format!("cannot check the run: {e}"))),
        }
    }
}

/// The middleware (after the key's: it needs the [`Caller`]).
pub async fn require_issued_run(
    axum::extract::State(runs): axum::extract::State<std::sync::Arc<IssuedRuns>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let named = req.headers().get(keel_gateway::RUN_HEADER).map(|v| v.to_str().map(str::to_owned));
    let path = req.uri().path().to_owned();
    let (Some(caller), Some(named)) = (req.extensions().get::<Caller>().cloned(), named) else {
        return next.run(req).await;
    };
    match runs.check(&caller, named.as_deref().map_err(|_| ())).await {
        Ok(_) => next.run(req).await,
        Err(RunRefused::Invalid(message)) => {
            crate::auth::v1_error(&path, keel_core::ErrorClass::InvalidRequest, &message)
        }
        Err(RunRefused::Unavailable(message)) => keel_gateway::Shape::for_path(&path).response_with(
            StatusCode::SERVICE_UNAVAILABLE,
            keel_core::ErrorClass::ServerError,
            &message,
        ),
    }
}
