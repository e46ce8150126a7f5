//! One step of a run: tickets, parameters, approval, idempotency, the pipeline,
//! escalation (see the module docs of [`super`] for the order and why).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::{
    AttemptOutcome, Budget, BudgetKind, CallError, Classified, Disposition, ErrorClass, Event, EventSink,
    Failure, Resume, RunScope,
};
use keel_journal::{ApprovalDecision, Claim, JournalEvent, RunSink, RunSnapshot, StepOutcome, TicketView};
use serde_json::{Value, json};
use tracing::Instrument;

use super::{Result, RunStatus, Runner, args_digest, idempotency_key, new_id};
use crate::config::{ExpiryOutcome, Mode};
use crate::plan::{Plan, PlanStep};
use crate::template::render_json;
use crate::tool::Tool;

/// Everything a step needs to know.
pub(super) struct StepCtx<'a> {
    pub(super) runner: &'a Runner,
    pub(super) run_id: &'a str,
    pub(super) plan: &'a Plan,
    pub(super) index: usize,
    /// The step's id (a plan's step id, or an agent's `turn-N.call-K`).
    pub(super) id: &'a str,
    pub(super) step: &'a PlanStep,
    /// The step's parameters are values, never templates (an agent's tool call: what a
    /// model wrote must not be able to read the run's context through `{{...}}`).
    pub(super) literal: bool,
    pub(super) snap: &'a RunSnapshot,
    pub(super) outputs: &'a BTreeMap<String, Value>,
    pub(super) deadline_at_ms: i64,
    pub(super) budget: &'a Arc<Budget>,
    pub(super) tally: &'a Arc<Mutex<Tally>>,
    /// The drive created the run (nothing of it happened before): no earlier holder
    /// can have claimed its calls' keys, so they are not claimed (the run's lease
    /// already keeps every other driver out, and a redrive after a crash claims them).
    pub(super) fresh: bool,
    /// The caller records the step's successful end with the run's own, in one
    /// transaction: [`StepEnd::Done`] hands its `step_finished` event over.
    pub(super) defer_end: bool,
    /// A check of the tool's answer before it is fed forward (an agent's shape check).
    pub(super) check_output: Option<&'a (dyn Fn(&Value) -> OutputVerdict + Sync)>,
    /// Journal the structure hash of the step's output beside it (an agent's call: its
    /// replay reads the usual shapes from the journal instead of recomputing them).
    pub(super) journal_shape: bool,
}

/// What a step's output check says.
pub(super) enum OutputVerdict {
    /// Feed it forward.
    Ok,
    /// Not as expected: the step fails with this failure, for the model to correct.
    Correct(Failure),
    /// Not as expected: a person looks first.
    Escalate(String),
}

/// What a drive's pipelines reported through their events.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Failed attempts per class (for escalation).
    pub(super) failures: HashMap<ErrorClass, u32>,
    /// Attempts started.
    pub(super) attempts: u32,
}

/// How a step ended.
pub(super) enum StepEnd {
    /// It succeeded with this output; with its `step_finished` event, unrecorded, when
    /// the step was told to leave it to the caller ([`StepCtx::defer_end`]).
    Done(Value, Option<JournalEvent>),
    /// A person said to skip it.
    Skipped,
    /// The run stops here (for now or for good).
    Stop(RunStatus),
}

/// Sends policy events to the journal and the observer, and counts failed attempts
/// per class for escalation.
#[derive(Debug)]
struct StepSink {
    journal: RunSink,
    observer: Arc<dyn super::Observer>,
    run_id: String,
    step: u32,
    tally: Arc<Mutex<Tally>>,
}

impl std::fmt::Debug for dyn super::Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl EventSink for StepSink {
    fn record(&self, event: &Event) {
        match event {
            Event::AttemptStarted { .. } => {
                self.tally.lock().unwrap_or_else(|e| e.into_inner()).attempts += 1
            }
            Event::AttemptEnded { outcome: AttemptOutcome::Failed(class), .. } => {
                *self.tally.lock().unwrap_or_else(|e| e.into_inner()).failures.entry(*class).or_default() +=
                    1;
            }
            _ => {}
        }
        self.journal.record(event);
        self.observer
            .event(&self.run_id, &JournalEvent::Policy { step: Some(self.step), event: event.clone() });
    }
}

pub(super) fn wall_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The latest ticket about step `index`.
pub(super) fn latest_ticket(snap: &RunSnapshot, index: u32) -> Option<&TicketView> {
    snap.tickets.iter().filter(|t| t.step == Some(index)).max_by_key(|t| t.opened_at_ms)
}

impl StepCtx<'_> {
    fn id(&self) -> &str {
        self.id
    }

    async fn record(&self, event: JournalEvent) -> Result<u64> {
        self.runner.record(self.run_id, event).await
    }

    /// Records that the step starts with `params` on `tool`.
    pub(super) async fn started(&self, tool: &str, params: &Value) -> Result<u64> {
        self.starting(tool, params).durable().await
    }

    /// Hands the writer the step's start with `params` on `tool`, without waiting for
    /// it to be durable.
    fn starting(&self, tool: &str, params: &Value) -> super::Pending<'_> {
        self.runner.submit(
            self.run_id,
            JournalEvent::StepStarted {
                step: self.index as u32,
                name: self.id().to_owned(),
                target: tool.to_owned(),
                input: params.clone(),
            },
        )
    }

    async fn fail(&self, class: ErrorClass, message: String) -> Result<StepEnd> {
        self.record(JournalEvent::StepFinished {
            step: self.index as u32,
            outcome: StepOutcome::Failed { class, message: message.clone() },
        })
        .await?;
        Ok(StepEnd::Stop(if class == ErrorClass::DeadlineExceeded {
            RunStatus::TimedOut
        } else {
            RunStatus::Failed { class, message }
        }))
    }

    /// Opens a ticket with the context package and stops the run.
    pub(super) async fn escalate(
        &self,
        tool: &Tool,
        params: &Value,
        class: ErrorClass,
        message: &str,
        attempts: u32,
    ) -> Result<StepEnd> {
        let ticket_id = new_id("tkt");
        let suggestion = match class.default_disposition() {
            Disposition::Retry => "the target kept failing: retry once it has recovered, or skip this step",
            Disposition::Terminal => {
                "retrying the same call cannot help: retry with new parameters, skip, or abort"
            }
            Disposition::Correct => "the call's input was wrong: retry with corrected parameters",
            Disposition::Fallback => "try another route: retry with new parameters, or skip",
            Disposition::Escalate => "the run repeats itself: abort, or skip this step",
        };
        let context = json!({
            "input": self.plan.input,
            "plan": self.plan.steps.iter().map(|s| json!({"id": s.id, "tool": s.tool})).collect::<Vec<_>>(),
            "steps_done": self.outputs,
            "failing_step": {"id": self.id(), "tool": tool.name.as_ref(), "params": params},
            "error": {"class": class, "message": message, "attempts": attempts},
            "suggestion": suggestion,
            "actions": ["retry", "retry_with_params", "skip", "abort"],
        });
        self.record(JournalEvent::StepFinished {
            step: self.index as u32,
            outcome: StepOutcome::Failed { class, message: message.to_owned() },
        })
        .await?;
        self.record(JournalEvent::TicketOpened {
            ticket_id: ticket_id.clone(),
            step: Some(self.index as u32),
            class,
            summary: format!("step `{}` ({}) failed: {class}: {message}", self.id(), tool.name),
            context,
        })
        .await?;
        Ok(StepEnd::Stop(RunStatus::Escalated { ticket_id }))
    }
}

/// Runs one step (see the module docs).
pub(super) async fn run_step(ctx: StepCtx<'_>) -> Result<StepEnd> {
    let r = ctx.runner;
    let index = ctx.index as u32;
    let Some(tool) = r.config.tools.get(&ctx.step.tool).cloned() else {
        return ctx.fail(ErrorClass::InvalidRequest, format!("no tool named `{}`", ctx.step.tool)).await;
    };

    // A person's answer to this step's last ticket.
    let mut params_override = None;
    if let Some(ticket) = latest_ticket(ctx.snap, index) {
        if ticket.status == "open" {
            return Ok(StepEnd::Stop(RunStatus::Escalated { ticket_id: ticket.ticket_id.clone() }));
        }
        // A resolution stays in force for the step: `retry` with parameters replaces
        // the plan's for every later drive, so an approval of the old arguments can
        // never cover the new ones.
        let resolution = ticket.resolution.clone().unwrap_or(Value::Null);
        match resolution["action"].as_str().unwrap_or("") {
            "skip" => {
                ctx.record(JournalEvent::StepFinished {
                    step: index,
                    outcome: StepOutcome::Skipped {
                        reason: format!("skipped by {}", ticket.resolved_by.as_deref().unwrap_or("a person")),
                    },
                })
                .await?;
                return Ok(StepEnd::Skipped);
            }
            "abort" => return Ok(StepEnd::Stop(RunStatus::Cancelled)),
            _ => params_override = resolution.get("params").filter(|p| !p.is_null()).cloned(),
        }
    }

    // Parameters.
    let steps_ctx: serde_json::Map<String, Value> =
        ctx.outputs.iter().map(|(k, v)| (k.clone(), json!({ "output": v }))).collect();
    let context = json!({ "input": ctx.plan.input, "steps": steps_ctx });
    let params = match params_override {
        Some(p) => p,
        None if ctx.literal => ctx.step.params.clone(),
        None => match render_json(&ctx.step.params, &context) {
            Ok(p) => p,
            Err(e) => return ctx.fail(ErrorClass::InvalidRequest, e.to_string()).await,
        },
    };
    if let Err(f) = tool.check_params(&params) {
        ctx.started(&tool.name, &params).await?;
        return ctx.fail(f.class, f.message).await;
    }
    let now_ms = wall_ms(r.clock.wall());
    if now_ms >= ctx.deadline_at_ms {
        return ctx.fail(ErrorClass::DeadlineExceeded, "the run's deadline passed".into()).await;
    }

    // Approval, bound to the tool and the digest of these arguments.
    let mode: Mode = serde_json::from_value(ctx.snap.run.input["mode"].clone()).unwrap_or(r.config.run.mode);
    if tool.needs_approval(&params, mode) {
        let digest = args_digest(&tool.name, &params);
        if let Some(stop) = approval_gate(&ctx, &tool, &params, &digest, now_ms, true).await? {
            return Ok(stop);
        }
    }

    let key = idempotency_key(ctx.run_id, ctx.id(), &tool.name, &params);

    // Scope fallback: a large batch runs a canary of one item, then waits for a
    // person to confirm the rest.
    let canary = match (tool.canary_above, tool.batch_len(&params), tool.batch_param.as_deref()) {
        (Some(limit), Some(len), Some(batch)) if len > limit => Some(batch),
        _ => None,
    };
    // A write-like tool's step is durably started before it acts. A read-only one's
    // start is committed while it answers (it has no effect to account for), and is
    // durable before anything later of the step is recorded.
    let start = ctx.starting(&tool.name, &params);
    let started = if tool.write || canary.is_some() {
        start.durable().await?;
        None
    } else {
        Some(start.committing())
    };
    if let Some(batch) = canary {
        let items =
            crate::template::lookup(&params, batch).and_then(Value::as_array).cloned().unwrap_or_default();
        let mut canary = params.clone();
        canary[batch] = Value::Array(items[..1].to_vec());
        let canary_out = match call_once(&ctx, &tool, &canary, &format!("{key}/canary"), now_ms, None).await?
        {
            Ok(out) => out,
            Err(stop) => return Ok(stop),
        };
        let digest = args_digest(&format!("{}#rest-after-canary", tool.name), &params);
        if let Some(stop) = approval_gate(&ctx, &tool, &params, &digest, now_ms, false).await? {
            return Ok(stop);
        }
        let mut rest = params.clone();
        rest[batch] = Value::Array(items[1..].to_vec());
        let rest_out = match call_once(&ctx, &tool, &rest, &format!("{key}/rest"), now_ms, None).await? {
            Ok(out) => out,
            Err(stop) => return Ok(stop),
        };
        return finish_ok(&ctx, json!({ "canary": canary_out, "rest": rest_out })).await;
    }

    match call_once(&ctx, &tool, &params, &key, now_ms, started).await? {
        Ok(output) => finish_ok(&ctx, output).await,
        Err(stop) => Ok(stop),
    }
}

/// The approval covering `digest` for this step: `None` when it is approved and the
/// step may act; otherwise how the step stops (waiting, denied, expired).
async fn approval_gate(
    ctx: &StepCtx<'_>,
    tool: &Tool,
    params: &Value,
    digest: &str,
    now_ms: i64,
    record_start: bool,
) -> Result<Option<StepEnd>> {
    let r = ctx.runner;
    let index = ctx.index as u32;
    let approval = ctx
        .snap
        .approvals
        .iter()
        .filter(|a| a.step == index && a.args_digest == digest)
        .max_by_key(|a| a.requested_at_ms);
    match approval.map(|a| (a, a.status.as_str())) {
        Some((_, "approved")) => Ok(None),
        Some((a, "denied")) => {
            let by = a.decided_by.clone().unwrap_or_default();
            ctx.fail(ErrorClass::ApprovalDenied, format!("{by} denied `{}`", tool.name)).await.map(Some)
        }
        Some((a, status)) if status == "expired" || a.expires_at_ms <= now_ms => {
            if status != "expired" {
                ctx.record(JournalEvent::ApprovalDecided {
                    approval_id: a.approval_id.clone(),
                    decision: ApprovalDecision::Expired,
                    by: "keel".into(),
                })
                .await?;
            }
            let message = format!("the approval for step `{}` expired", ctx.id());
            match r.config.approvals.on_expiry {
                ExpiryOutcome::Deny => ctx.fail(ErrorClass::ApprovalDenied, message).await.map(Some),
                ExpiryOutcome::Escalate => {
                    ctx.escalate(tool, params, ErrorClass::ApprovalDenied, &message, 0).await.map(Some)
                }
            }
        }
        Some((a, _pending)) => {
            Ok(Some(StepEnd::Stop(RunStatus::WaitingApproval { approval_id: a.approval_id.clone() })))
        }
        None => {
            let approval_id = new_id("apr");
            if record_start {
                ctx.started(&tool.name, params).await?;
            }
            let expires = r.config.approvals.expires_after;
            ctx.record(JournalEvent::ApprovalRequested {
                approval_id: approval_id.clone(),
                step: index,
                tool: tool.name.to_string(),
                args_digest: digest.to_owned(),
                expires_at_ms: now_ms.saturating_add(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
                // What the person is shown: exactly what the digest covers.
                args: params.clone(),
            })
            .await?;
            Ok(Some(StepEnd::Stop(RunStatus::WaitingApproval { approval_id })))
        }
    }
}

/// One call of `tool` with `params` under idempotency `key` and the tool's pipeline:
/// its output, or how the step stops. `started`: the step's start, still being
/// committed (made durable before anything after the call is recorded).
async fn call_once(
    ctx: &StepCtx<'_>,
    tool: &Arc<Tool>,
    params: &Value,
    key: &str,
    now_ms: i64,
    started: Option<super::Committing>,
) -> Result<Result<Value, StepEnd>> {
    let r = ctx.runner;
    let index = ctx.index as u32;
    // Idempotency: a completed key answers without acting again. Only a write-like
    // tool's call is claimed: a read-only one has no effect to keep from repeating (a
    // resumed drive asks it again), and its claim was two more writes per call.
    let token = if tool.write && !ctx.fresh {
        Some(match r.journal.claim(key).await? {
            Claim::Done(result) => return Ok(Ok(result)),
            Claim::Won(token) => token,
            // We hold the run's lease, so the claimer was an earlier holder of this run
            // that died mid-call: take its claim over. The tool sees the same
            // Idempotency-Key, so a call that did reach it is not repeated there either.
            Claim::InProgress { .. } => match r.journal.take_over_claim(key).await? {
                Claim::Done(result) => return Ok(Ok(result)),
                Claim::Won(token) => token,
                Claim::InProgress { .. } => {
                    return ctx
                        .fail(ErrorClass::Conflict, format!("idempotency key `{key}` is held"))
                        .await
                        .map(Err);
                }
            },
        })
    } else {
        None
    };

    // Where an earlier drive left this call: its attempts and what is left of its
    // backoff still count (a crash never grants a fresh set of attempts).
    let resume = resume_point(ctx, now_ms).await?;

    // The pipeline, under the run's deadline and budget.
    let sink = Arc::new(StepSink {
        journal: r.sink(ctx.run_id).step(index),
        observer: r.observer.clone(),
        run_id: ctx.run_id.to_owned(),
        step: index,
        tally: ctx.tally.clone(),
    });
    let pipeline = r.pipeline(tool, sink.clone());
    let left = Duration::from_millis(u64::try_from(ctx.deadline_at_ms.saturating_sub(now_ms)).unwrap_or(0));
    let mut scope = RunScope::new().with_budget(ctx.budget.clone());
    // A deadline past the clock's range is no deadline (a journaled `u64::MAX`).
    if let Some(at) = keel_core::clock::deadline_after(r.clock.now(), left) {
        scope = scope.with_deadline(at);
    }
    let clock = r.clock.clone();
    let breaker = pipeline.breaker().cloned();
    let span = tool_span(&tool.name, ctx.run_id, index);
    let budget = ctx.budget.clone();
    let result = Box::pin(
        scope
            .run(pipeline.call_resumed(resume, |_| {
                let (clock, sink, budget) = (clock.clone(), sink.clone(), budget.clone());
                async move {
                    let charged = tool.invoke_charged(params, &*clock, key).await;
                    if charged.cost_micros > 0 {
                        // Journaled, so a resumed run starts from what it already spent.
                        keel_core::event::emit(
                            &*sink,
                            Event::BudgetCharged {
                                budget: budget.name().clone(),
                                kind: BudgetKind::CostMicros,
                                amount: charged.cost_micros,
                                remaining: budget.remaining(BudgetKind::CostMicros),
                            },
                        );
                    }
                    charged.result
                }
            }))
            .instrument(span.clone()),
    )
    .await;
    if let Some(started) = started {
        started.durable().await?;
    }
    if let Err(e) = &result {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", e.class.as_str());
        span.record("keel.error_class", e.class.as_str());
        span.record("keel.disposition", e.disposition().as_str());
        span.record("keel.attempt", i64::from(e.attempts));
        if let Some(b) = &breaker {
            span.record("keel.breaker.state", b.state().as_str());
        }
    }
    drop(span);
    let result = match result {
        // Boxed: a second pipeline's future inside this one's would overflow small stacks.
        Err(e) => match Box::pin(fall_back(ctx, tool, params, key, &sink, e.class())).await {
            Some(output) => Ok(output),
            None => Err(e),
        },
        Ok(output) => {
            if tool.fallback.as_ref().is_some_and(|f| f.cached.is_some()) {
                r.results.put(&tool.name, params, &output, r.clock.wall());
            }
            Ok(output)
        }
    };
    match result {
        Ok(output) => {
            if let Some(token) = &token {
                r.journal.complete(token, &output).await?;
            }
            match ctx.check_output.map_or(OutputVerdict::Ok, |check| check(&output)) {
                OutputVerdict::Ok => Ok(Ok(output)),
                OutputVerdict::Correct(f) => ctx.fail(f.class, f.message).await.map(Err),
                OutputVerdict::Escalate(m) => {
                    ctx.escalate(tool, params, ErrorClass::InvalidToolCall, &m, 0).await.map(Err)
                }
            }
        }
        Err(e) => {
            if let Some(token) = &token {
                r.journal.release_claim(token).await?;
            }
            finish_err(ctx, tool, params, e).await.map(Err)
        }
    }
}

/// The tool's fallback for a call that failed with `class`: its twin's answer, else
/// its last good result while fresh; `None` when it has none or none answers. Each
/// fallback taken is a `fallback_taken` event of the step.
async fn fall_back(
    ctx: &StepCtx<'_>,
    tool: &Tool,
    params: &Value,
    key: &str,
    sink: &Arc<StepSink>,
    class: ErrorClass,
) -> Option<Value> {
    let r = ctx.runner;
    let fallback = tool.fallback.as_ref().filter(|f| f.applies(class))?;
    let taken = |to: &str| {
        keel_core::event::emit(
            &**sink,
            Event::FallbackTaken { from: tool.name.clone(), to: Arc::from(to), class },
        );
    };
    if let Some(twin) = fallback.twin.as_ref().and_then(|t| r.config.tools.get(&**t)) {
        if twin.check_params(params).is_ok() {
            let pipeline = r.pipeline(twin, sink.clone());
            let clock = r.clock.clone();
            let mut scope = RunScope::new().with_budget(ctx.budget.clone());
            let left = ctx.deadline_at_ms.saturating_sub(wall_ms(r.clock.wall()));
            if let Some(at) = keel_core::clock::deadline_after(
                r.clock.now(),
                Duration::from_millis(u64::try_from(left).unwrap_or(0)),
            ) {
                scope = scope.with_deadline(at);
            }
            let answered = scope
                .run(pipeline.call(|_| {
                    let clock = clock.clone();
                    async move { twin.invoke_charged(params, &*clock, key).await.result }
                }))
                .await;
            if let Ok(output) = answered {
                taken(&twin.name);
                return Some(output);
            }
        }
    }
    let fresh = fallback.cached?;
    let (output, age) = r.results.get(&tool.name, params, fresh, r.clock.wall())?;
    tracing::warn!(
        keel.target = %tool.name, keel.error_class = %class, age_ms = age.as_millis() as u64,
        "answered with the last good result"
    );
    taken(crate::tool::fallback::CACHE);
    Some(output)
}

/// The `execute_tool {tool}` span of one call of a step's tool (keel-telemetry's
/// `names` has the table). The call id is `{run}/{step}`.
fn tool_span(tool: &str, run_id: &str, step: u32) -> tracing::Span {
    keel_telemetry::names::execute_tool_span(tool, Some(&format!("{run_id}/{step}")))
}

/// Where the call in progress of this step stands in the journal, if an earlier drive
/// began it and stopped (a crash, a lost lease) before the step ended: the attempts it
/// made since the step's last end, the last one's failure, and what is left of the
/// backoff it was waiting out. A successful attempt or an approval request ends one
/// call of the step (a canary and its rest are two).
async fn resume_point(ctx: &StepCtx<'_>, now_ms: i64) -> Result<Resume> {
    let index = ctx.index as u32;
    let interrupted = ctx.snap.steps.iter().any(|s| s.step == index && s.status == "running")
        && ctx.snap.attempts.iter().any(|a| a.step == Some(index));
    if !interrupted {
        return Ok(Resume::default());
    }
    let journal = ctx.runner.journal();
    let mut resume = Resume::default();
    let mut retry_at_ms: Option<i64> = None;
    let mut after = 0;
    loop {
        let page = journal.events(ctx.run_id, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            match &e.event {
                JournalEvent::StepFinished { step, .. } | JournalEvent::ApprovalRequested { step, .. }
                    if *step == index =>
                {
                    (resume, retry_at_ms) = (Resume::default(), None);
                }
                JournalEvent::Policy { step: Some(step), event } if *step == index => match event {
                    Event::AttemptStarted { attempt, .. } => {
                        (resume.attempts, resume.class, retry_at_ms) = (*attempt, None, None);
                    }
                    Event::AttemptEnded { outcome: AttemptOutcome::Ok, .. } => {
                        (resume, retry_at_ms) = (Resume::default(), None);
                    }
                    Event::AttemptEnded { attempt, outcome: AttemptOutcome::Failed(class), .. } => {
                        (resume.attempts, resume.class) = (*attempt, Some(*class));
                    }
                    Event::RetryScheduled { delay, .. } => {
                        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                        retry_at_ms = Some(e.recorded_at_ms.saturating_add(delay));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if let Some(at) = retry_at_ms {
        resume.wait = Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0));
    }
    Ok(resume)
}

async fn finish_ok(ctx: &StepCtx<'_>, output: Value) -> Result<StepEnd> {
    let end = JournalEvent::StepFinished {
        step: ctx.index as u32,
        outcome: StepOutcome::Succeeded {
            output: output.clone(),
            shape: ctx.journal_shape.then(|| crate::agent::shape::fingerprint(&output)),
        },
    };
    if ctx.defer_end {
        return Ok(StepEnd::Done(output, Some(end)));
    }
    ctx.record(end).await?;
    Ok(StepEnd::Done(output, None))
}

async fn finish_err(
    ctx: &StepCtx<'_>,
    tool: &Tool,
    params: &Value,
    e: CallError<Failure>,
) -> Result<StepEnd> {
    let class = e.class();
    let full = e.to_string();
    // The class is reported beside the message; do not say it twice.
    let message = full.strip_prefix(&format!("{class}: ")).unwrap_or(&full).to_owned();
    if class == ErrorClass::DeadlineExceeded {
        return ctx.fail(class, message).await;
    }
    let seen = {
        let mut tally = ctx.tally.lock().unwrap_or_else(|p| p.into_inner());
        let n = tally.failures.entry(class).or_default();
        if e.attempts == 0 {
            // Refused before any attempt (breaker, budget, loop guard): one failure.
            *n += 1;
        }
        *n
    };
    // An agent's own mistakes (a program that failed, a call it got wrong) are its
    // correction loop's to bound (`[agent] code_attempts`, `max_turns`), not a person's.
    let corrects_itself = ctx.literal && class.default_disposition() == Disposition::Correct;
    if class.needs_person() || (!corrects_itself && seen >= ctx.runner.config.run.escalate_after.max(1)) {
        return ctx.escalate(tool, params, class, &message, e.attempts).await;
    }
    ctx.fail(class, message).await
}
