//! Driving an agent run: turns through the gateway, tool calls as steps (see
//! [`crate::agent`] for what the journal holds and why a resume repeats nothing).
//!
//! Each pass of the loop rebuilds the history from a fresh snapshot, then does one
//! thing: carries out the next unsettled tool call of the last turn, or asks the model
//! for the next turn, or ends the run. One thing per pass keeps every decision on what
//! the journal says (a ticket resolved meanwhile, a cancel), at the cost of a snapshot
//! read per call.
//!
//! What stops a run, and how:
//! - the model answers without a tool call: `completed`, its text the answer;
//! - `max_turns` turns: `failed` with the partial result (the last text and the tool
//!   outputs so far) in the `result` step;
//! - the run's budget (tokens, cost, attempts — charged by the gateway on every
//!   attempt, by tools on every call): a turn or a call that does not fit is refused
//!   before it is made, so the run overshoots by at most what the call in flight spent
//!   past its reservation; `failed` with `budget_exceeded` and the partial result;
//! - the deadline: `timed_out`; a person (approval, ticket): the run waits;
//! - the same tool with the same arguments `max_repeats` times (succeeded or not): a
//!   `loop_detected` ticket — agents loop on successful writes as often as on errors.
//!
//! A tool's failure is not the run's: it goes back to the model as the tool's answer
//! (class and message), and so do calls the model got wrong — an unknown tool,
//! arguments that are not a JSON object, arguments that do not match the schema —
//! each journaled as a failed step, so the model corrects itself with the error in
//! front of it. Escalation still applies: `escalate_after` failures of one class in the
//! run, or one a person must see, open a ticket.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{Budget, BudgetKind, ErrorClass, RunScope};
use keel_gateway::{CallContext, ChatRequest, Gateway};
use keel_journal::{JournalEvent, RunSnapshot, RunState, StepOutcome};
use serde_json::{Value, json};

use super::step::{self, OutputVerdict, StepCtx, StepEnd};
use super::{Error, Result, RunStatus, Runner, state_of};
use crate::agent::correct::{self, Strategy};
use crate::agent::{self, AgentSpec, History, PendingCall};

/// The temperature a `regenerate` turn asks for: a fresh program, not the last one.
const REGENERATE_TEMPERATURE: f64 = 0.8;
use crate::plan::{Plan, PlanStep};

/// What one pass did.
enum Pass {
    /// Go on with the next pass.
    Next,
    /// The run stops with this status (already journaled).
    Stop(RunStatus),
}

pub(super) async fn drive(
    r: &Runner,
    run_id: &str,
    snap: &RunSnapshot,
    spec: AgentSpec,
) -> Result<RunStatus> {
    let deadline_ms = snap.run.input["deadline_ms"].as_u64().unwrap_or(u64::MAX);
    let deadline_at_ms =
        snap.run.created_at_ms.saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX));
    let gateway = r.gateway()?;
    let budget = r.run_budget(run_id);
    // What earlier drives spent still counts: tool attempts and costs from the
    // journal's attempts and charges, model turns from what each turn recorded.
    let history = History::replay(snap, &HashSet::new(), &spec);
    let (tokens, cost, model_attempts) = history.charged;
    let _ = budget.charge(BudgetKind::Attempts, (snap.attempts.len() as u64).saturating_add(model_attempts));
    let _ = budget.charge(BudgetKind::Tokens, tokens);
    let tool_cost = if budget.limit(BudgetKind::CostMicros).is_some() {
        r.spent_cost(run_id, budget.name()).await?
    } else {
        0
    };
    let _ = budget.charge(BudgetKind::CostMicros, cost.saturating_add(tool_cost));

    // The task's own check of every program's result, as journaled with the task.
    let task_schema = match &spec.result_schema {
        Some(schema) => Some(
            crate::tool::code::compile_result_schema(schema)
                .map_err(|e| Error::Refused(format!("the task's result_schema is {e}")))?,
        ),
        None => None,
    };
    let tally = Arc::new(Mutex::new(super::step::Tally::default()));
    let mut handled = HashSet::new();
    loop {
        let snap = r.snapshot(run_id).await?;
        if snap.run.state == RunState::Cancelled {
            return Ok(RunStatus::Cancelled);
        }
        let history = History::replay(&snap, &handled, &spec);
        let now_ms = super::step::wall_ms(r.clock.wall());
        let pass = if let Some(call) = history.pending.first() {
            let ctx = CallCtx {
                r,
                run_id,
                snap: &snap,
                spec: &spec,
                history: &history,
                deadline_at_ms,
                budget: &budget,
                tally: &tally,
                task_schema: task_schema.as_deref(),
            };
            let (index, pass) = Box::pin(call_tool(ctx, call)).await?;
            handled.insert(index);
            pass
        } else if let Some(answer) = &history.answer {
            let result = json!({"status": "answered", "answer": answer, "turns": history.turns});
            finish(r, run_id, history.next_step, result, RunStatus::Completed).await?
        } else if history.turns >= spec.max_turns {
            let why = format!("the run reached its limit of {} turns", spec.max_turns);
            stop(r, run_id, &history, history.next_step, ErrorClass::LoopDetected, why).await?
        } else if now_ms >= deadline_at_ms {
            let why = "the run's deadline passed".to_owned();
            stop(r, run_id, &history, history.next_step, ErrorClass::DeadlineExceeded, why).await?
        } else {
            let left =
                Duration::from_millis(u64::try_from(deadline_at_ms.saturating_sub(now_ms)).unwrap_or(0));
            Box::pin(turn(r, run_id, &snap, &spec, &history, &gateway, &budget, left)).await?
        };
        if let Pass::Stop(status) = pass {
            return Ok(status);
        }
    }
}

/// Asks the model for the next turn and journals its answer (or the run's end).
#[allow(clippy::too_many_arguments)]
async fn turn(
    r: &Runner,
    run_id: &str,
    snap: &RunSnapshot,
    spec: &AgentSpec,
    history: &History,
    gateway: &Gateway,
    budget: &Arc<Budget>,
    left: Duration,
) -> Result<Pass> {
    let index = history.unfinished_turn.unwrap_or(history.next_step);
    let number = history.turns + 1;
    // After a failed program: stop, or choose how the model corrects it.
    let mut correction = None;
    if let Some(last) = history.code_failed_last.then(|| history.code_chain.last()).flatten() {
        // A person's answer to the ticket of a correction loop that gave up here
        // (`on_unsolved = "escalate"`): `retry` is one more round, whatever the checks
        // below would say.
        let mut retried = false;
        if let Some(ticket) = history.unfinished_turn.and_then(|i| step::latest_ticket(snap, i)) {
            if ticket.status == "open" {
                let ticket_id = ticket.ticket_id.clone();
                return end_pass(r, run_id, StepEnd::Stop(RunStatus::Escalated { ticket_id })).await;
            }
            let by = ticket.resolved_by.as_deref().unwrap_or("a person");
            let why = format!("{} (ticket {} answered by {by})", ticket.summary, ticket.ticket_id);
            match ticket.resolution.as_ref().and_then(|r| r["action"].as_str()).unwrap_or("") {
                "skip" => {
                    let mut result = partial(history, ErrorClass::CodeError, &why);
                    result["status"] = json!("partial");
                    return finish(r, run_id, history.next_step, result, RunStatus::Completed).await;
                }
                "abort" => {
                    return stop(r, run_id, history, history.next_step, ErrorClass::CodeError, why).await;
                }
                _ => retried = true,
            }
        }
        let give_up = |why: String| give_up(r, run_id, spec, history, index, number, why);
        let chain = &history.code_chain;
        let real: Vec<&agent::CodeFailure> = chain.iter().filter(|f| !f.resubmitted).collect();
        let repeated = real.len() >= 2 && {
            let (a, b) = (real[real.len() - 2], real[real.len() - 1]);
            a.kind == b.kind && a.first_line == b.first_line && !last.resubmitted
        };
        // The model resubmitting programs that already failed, twice in a row, whatever
        // it was told: it is stuck.
        let stuck = chain.len() >= 2 && chain[chain.len() - 2].resubmitted && last.resubmitted;
        if stuck && spec.stop_on_repeat && !retried {
            let why =
                format!("the model keeps resubmitting programs that already failed: {}", last.first_line);
            return give_up(why).await;
        }
        if repeated && spec.stop_on_repeat && !retried {
            let why = format!(
                "the same error twice in a row, the correction is not converging: {}",
                last.first_line
            );
            return give_up(why).await;
        }
        if chain.len() >= spec.code_attempts as usize && !retried {
            let why = format!("{} programs failed in a row; the last: {}", chain.len(), last.first_line);
            return give_up(why).await;
        }
        if !retried
            && recorded_strategy(history).is_none()
            && correct::hopeless(spec.correction, &r.gate, &last.kind)
        {
            let why = format!(
                "corrections of {} never succeeded here (the confidence gate refuses both strategies): {}",
                last.kind, last.first_line
            );
            return give_up(why).await;
        }
        let recorded = recorded_strategy(history);
        let last_strategy = history.last_strategy.as_ref().map(|(s, _)| *s);
        let strategy = match recorded {
            Some(s) => s,
            None => {
                let costs = r.correction_costs().await?;
                correct::choose(spec.correction, &r.gate, costs, &last.kind, last_strategy, last.resubmitted)
            }
        };
        correction = Some((strategy, last));
    }
    let mut input = json!({"turn": number});
    if let Some((strategy, failure)) = &correction {
        input["strategy"] = json!(strategy.as_str());
        input["after_kind"] = json!(failure.kind);
        input["after"] = json!(failure.step_name);
        if *strategy == Strategy::Regenerate {
            input["hint"] = json!(format!(
                "[keel] A previous program for this task failed with `{}`. Write a fresh program for the task \
                 (do not reuse the failed one).",
                failure.first_line
            ));
        }
    }
    r.record(
        run_id,
        JournalEvent::StepStarted {
            step: index,
            name: format!("turn-{number}"),
            target: format!("{}{}", agent::MODEL_TARGET_PREFIX, spec.model),
            input: input.clone(),
        },
    )
    .await?;
    // The history as this turn sees it: a regenerating turn takes the failed exchange
    // out of view (replayed from the input just journaled, so a resume agrees).
    let mut seen = history.clone();
    if let Some((Strategy::Regenerate, _)) = &correction {
        seen.elide_chain(input["hint"].as_str().unwrap_or(""));
    }
    let (messages, dropped) = seen.messages(spec);
    let mut body = json!({"model": spec.model, "messages": messages});
    if let Some((Strategy::Regenerate, _)) = &correction {
        body["temperature"] = json!(REGENERATE_TEMPERATURE);
    }
    if dropped > 0 {
        tracing::debug!(run = %run_id, dropped, "history cut to history_tokens");
    }
    let tools = spec.tool_specs(&r.config);
    if !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    let req = ChatRequest::from_value(&body).map_err(|f| Error::Refused(f.to_string()))?;
    // The call is journaled under the run (its `model_called`, retries, fallbacks);
    // the run's budget is the scope's; its loop guard and turn limit are the agent's
    // own (a repeat opens a ticket), so the gateway applies none of its own.
    let ctx = CallContext { api_key: None, run: Some(run_id.to_owned()), caller_checks_tools: true };
    let before = [BudgetKind::Tokens, BudgetKind::CostMicros, BudgetKind::Attempts].map(|k| budget.used(k));
    let mut scope = RunScope::new().with_budget(budget.clone());
    if let Some(at) = keel_core::clock::deadline_after(r.clock.now(), left) {
        scope = scope.with_deadline(at);
    }
    let answered = scope.run(gateway.complete(&req, &ctx)).await;
    let after = [BudgetKind::Tokens, BudgetKind::CostMicros, BudgetKind::Attempts].map(|k| budget.used(k));
    let charged = json!({
        "tokens": after[0].saturating_sub(before[0]),
        "cost_micros": after[1].saturating_sub(before[1]),
        "attempts": after[2].saturating_sub(before[2]),
    });
    match answered {
        Ok(done) => {
            let answer = done.json().unwrap_or(Value::Null);
            let mut message = answer["choices"][0]["message"].clone();
            if !message.is_object() {
                message = json!({"role": "assistant", "content": ""});
            }
            let output = json!({
                "message": message,
                "model": done.model.as_ref(),
                "usage": {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens},
                "charged": charged,
                "fallback": done.fallback,
                "corrections": done.corrections,
            });
            r.record(
                run_id,
                JournalEvent::StepFinished {
                    step: index,
                    outcome: StepOutcome::Succeeded { output, shape: None },
                },
            )
            .await?;
            Ok(Pass::Next)
        }
        Err(e) => {
            let message = e.message.clone();
            r.record(
                run_id,
                JournalEvent::StepFinished {
                    step: index,
                    outcome: StepOutcome::Failed { class: e.class, message: message.clone() },
                },
            )
            .await?;
            // The run stops with what it has; the turn's failure says why.
            stop(r, run_id, history, index + 1, e.class, format!("turn {number}: {message}")).await
        }
    }
}

/// The strategy an unfinished turn journaled before a crash, if any.
fn recorded_strategy(history: &History) -> Option<Strategy> {
    history.unfinished_input.as_ref().and_then(|i| i["strategy"].as_str()).and_then(Strategy::parse)
}

/// Everything a tool call needs.
struct CallCtx<'a> {
    r: &'a Runner,
    run_id: &'a str,
    snap: &'a RunSnapshot,
    spec: &'a AgentSpec,
    history: &'a History,
    deadline_at_ms: i64,
    budget: &'a Arc<Budget>,
    tally: &'a Arc<Mutex<super::step::Tally>>,
    /// The task's `result_schema`, compiled.
    task_schema: Option<&'a jsonschema::Validator>,
}

impl CallCtx<'_> {
    /// Records whether the program written after the last turn's correction strategy
    /// worked: the gate learns which strategy pays off after which error kind.
    fn learn(&self, worked: bool) {
        if let Some((strategy, kind)) = &self.history.last_strategy {
            // What the turn cost, once per turn (as the journal's reader counts it).
            if self.history.programs_since_turn == 0 {
                self.r.costs.add(*strategy, kind, self.history.last_turn_tokens);
            }
            self.r.gate.record(&correct::gate_target(*strategy, kind), ErrorClass::CodeError, 2, worked);
            // Pooled over kinds too: a kind seen for the first time starts from it.
            self.r.gate.record(
                &correct::gate_target(*strategy, correct::ANY_KIND),
                ErrorClass::CodeError,
                2,
                worked,
            );
        }
    }
}

/// Carries out one tool call of the last turn as a step; returns its step index.
async fn call_tool(c: CallCtx<'_>, call: &PendingCall) -> Result<(u32, Pass)> {
    let index = call.step.unwrap_or(c.history.next_step);
    let refuse = |class: ErrorClass, message: String, input: Value| async move {
        c.r.record(
            c.run_id,
            JournalEvent::StepStarted {
                step: index,
                name: call.step_name.clone(),
                target: call.name.clone(),
                input,
            },
        )
        .await?;
        c.r.record(
            c.run_id,
            JournalEvent::StepFinished { step: index, outcome: StepOutcome::Failed { class, message } },
        )
        .await?;
        Ok::<_, Error>((index, Pass::Next))
    };
    // Calls the model got wrong go back to it with what was wrong.
    if !c.spec.tools.iter().any(|t| t == &call.name) || !c.r.config.tools.contains_key(&call.name) {
        let message = format!("there is no tool `{}`; the tools are: {}", call.name, c.spec.tools.join(", "));
        return refuse(ErrorClass::UnknownTool, message, json!({"arguments": call.arguments})).await;
    }
    let args: Value = match serde_json::from_str::<Value>(if call.arguments.trim().is_empty() {
        "{}"
    } else {
        &call.arguments
    }) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => {
            let message = format!("the arguments of `{}` must be a JSON object, not {other}", call.name);
            return refuse(ErrorClass::InvalidToolCall, message, json!({"arguments": call.arguments})).await;
        }
        Err(e) => {
            let message = format!("the arguments of `{}` are not valid JSON: {e}", call.name);
            return refuse(ErrorClass::InvalidToolCall, message, json!({"arguments": call.arguments})).await;
        }
    };
    let tool = c.r.config.tools[&call.name].clone();
    if let Err(f) = tool.check_params(&args) {
        return refuse(ErrorClass::InvalidToolCall, f.message, args).await;
    }
    // A program that already failed is not run again: a failed attempt, and the next
    // turn switches strategy.
    if let Some(program) = agent::program_of(&args) {
        if let Some(error) = c.history.failed_programs.get(&correct::normalize(program)) {
            let message = format!("{}: {error}", agent::RESUBMITTED);
            c.learn(false);
            return refuse(ErrorClass::CodeError, message, args).await;
        }
    }
    let plan = Plan {
        name: Some("agent".into()),
        input: json!({"task": c.spec.task}),
        deadline: None,
        steps: Vec::new(),
    };
    let step = PlanStep { id: Some(call.step_name.clone()), tool: call.name.clone(), params: args.clone() };
    // The answer's shape against the tool's usual ones, before it is fed forward.
    let usual = c.r.shapes.usual(&call.name, c.history.shapes.get(&call.name));
    let sink = c.r.sink(c.run_id).step(index);
    let policy = c.spec.on_schema_drift;
    let is_code = agent::program_of(&args).is_some();
    let check = |out: &Value| {
        // A program that ran but fails the task's check is a `code_error`, as one that
        // fails its tool's `result_schema` is (the same check).
        if let Some(schema) = c.task_schema.filter(|_| is_code) {
            let result = agent::program_result(out).unwrap_or(&Value::Null);
            let printed = if out.get("result").is_some() { out["stdout"].as_str().unwrap_or("") } else { "" };
            if let Err(f) = crate::tool::code::check_result(schema, "the task's", result, printed) {
                return OutputVerdict::Correct(f);
            }
        }
        let fp = agent::shape::fingerprint(out);
        c.r.shapes.note(&call.name, &fp);
        if !agent::shape::is_drift(&fp, &usual) {
            return OutputVerdict::Ok;
        }
        let known: Vec<&str> = usual.keys().map(String::as_str).collect();
        keel_core::event::emit(
            &sink,
            keel_core::Event::SchemaDrift {
                target: Arc::from(call.name.as_str()),
                shape: Arc::from(fp.as_str()),
                usual: Arc::from(known.join(",")),
            },
        );
        let message = format!(
            "`{}` answered in a shape it never used before ({}), unlike its usual ones ({}): \
             check the call and its answer before using it",
            call.name,
            agent::shape::shape(out),
            known.join(", ")
        );
        match policy {
            agent::shape::DriftPolicy::Flag => OutputVerdict::Ok,
            agent::shape::DriftPolicy::Correct => {
                OutputVerdict::Correct(keel_core::Failure::new(ErrorClass::InvalidToolCall, message))
            }
            agent::shape::DriftPolicy::Escalate => OutputVerdict::Escalate(message),
        }
    };
    let ctx = StepCtx {
        runner: c.r,
        run_id: c.run_id,
        plan: &plan,
        index: index as usize,
        id: &call.step_name,
        step: &step,
        literal: true,
        snap: c.snap,
        outputs: &c.history.outputs,
        deadline_at_ms: c.deadline_at_ms,
        budget: c.budget,
        tally: c.tally,
        fresh: false,
        defer_end: false,
        check_output: Some(&check),
        journal_shape: true,
    };
    // The repeat guard: this call would be the `max_repeats`-th identical one. A
    // person who answered the ticket with `retry` lets it run.
    let seen = c
        .history
        .signatures
        .get(&(call.name.clone(), keel_core::canonical_json(&args)))
        .copied()
        .unwrap_or(0);
    let ruled = c.snap.tickets.iter().any(|t| t.step == Some(index));
    if c.spec.max_repeats > 0 && seen + 1 >= c.spec.max_repeats && call.step.is_none() && !ruled {
        let message = format!(
            "`{}` was called with these arguments {seen} times already in this run; \
             the agent is repeating itself",
            call.name
        );
        ctx.started(&tool.name, &args).await?;
        let end = ctx.escalate(&tool, &args, ErrorClass::LoopDetected, &message, 0).await?;
        return Ok((index, end_pass(c.r, c.run_id, end).await?));
    }
    let end = step::run_step(ctx).await?;
    if is_code {
        match &end {
            StepEnd::Done(..) => c.learn(true),
            StepEnd::Stop(RunStatus::Failed { class: ErrorClass::CodeError, .. }) => c.learn(false),
            _ => {}
        }
    }
    let pass = match end {
        StepEnd::Done(..) | StepEnd::Skipped => Pass::Next,
        // A tool's failure is an answer for the model, unless the run must stop.
        StepEnd::Stop(RunStatus::Failed { .. }) => Pass::Next,
        other => end_pass(c.r, c.run_id, other).await?,
    };
    Ok((index, pass))
}

/// Journals the run's state for a step's end that stops it.
async fn end_pass(r: &Runner, run_id: &str, end: StepEnd) -> Result<Pass> {
    match end {
        StepEnd::Done(..) | StepEnd::Skipped => Ok(Pass::Next),
        StepEnd::Stop(status) => {
            let (state, reason) = state_of(&status);
            r.record(run_id, JournalEvent::RunStateChanged { state, reason }).await?;
            Ok(Pass::Stop(status))
        }
    }
}

/// Ends the run with a `result` step holding `result`, then `status`.
async fn finish(r: &Runner, run_id: &str, at: u32, result: Value, status: RunStatus) -> Result<Pass> {
    r.record(
        run_id,
        JournalEvent::StepStarted {
            step: at,
            name: "result".into(),
            target: agent::RESULT_TARGET.into(),
            input: json!({}),
        },
    )
    .await?;
    r.record(
        run_id,
        JournalEvent::StepFinished {
            step: at,
            outcome: StepOutcome::Succeeded { output: result, shape: None },
        },
    )
    .await?;
    let (state, reason) = state_of(&status);
    r.record(run_id, JournalEvent::RunStateChanged { state, reason }).await?;
    Ok(Pass::Stop(status))
}

/// What a run that stops has: its last text and latest tool outputs, and why it stopped.
fn partial(history: &History, class: ErrorClass, why: &str) -> Value {
    json!({
        "status": "stopped",
        "class": class,
        "reason": why,
        "turns": history.turns,
        "last_text": history.last_text,
        "tool_outputs": history.outputs.iter().rev().take(20).collect::<BTreeMap<_, _>>(),
    })
}

/// The correction loop gives up on the chain of failed programs: the run fails with
/// its partial result, or (`on_unsolved = "escalate"`) turn `number`'s step at `at`
/// fails with `why` and a ticket on it carries the context for a person, whose answer
/// the next drive carries out (see [`turn`]).
async fn give_up(
    r: &Runner,
    run_id: &str,
    spec: &AgentSpec,
    history: &History,
    at: u32,
    number: u32,
    why: String,
) -> Result<Pass> {
    let Some(last) = history.code_chain.last().filter(|_| spec.on_unsolved == correct::Unsolved::Escalate)
    else {
        return stop(r, run_id, history, at, ErrorClass::CodeError, why).await;
    };
    r.record(
        run_id,
        JournalEvent::StepStarted {
            step: at,
            name: format!("turn-{number}"),
            target: format!("{}{}", agent::MODEL_TARGET_PREFIX, spec.model),
            input: json!({"turn": number, "unsolved": why}),
        },
    )
    .await?;
    r.record(
        run_id,
        JournalEvent::StepFinished {
            step: at,
            outcome: StepOutcome::Failed { class: ErrorClass::CodeError, message: why.clone() },
        },
    )
    .await?;
    let strategies: Vec<&str> = history.chain_strategies.iter().map(|s| s.as_str()).collect();
    let context = json!({
        "input": {"task": spec.task},
        "task": spec.task,
        "failing_step": {"id": last.step_name, "tool": last.tool, "params": {"program": last.program}},
        "last_program": last.program,
        "error": {"class": ErrorClass::CodeError, "message": last.message, "attempts": history.code_chain.len()},
        "why": why,
        "strategies_tried": strategies,
        "steps_done": history.outputs,
        "suggestion": "the model could not correct its program: retry for one more correction round, \
                       skip to finish the run with its partial result, or abort",
        "actions": ["retry", "skip", "abort"],
    });
    let ticket_id = super::new_id("tkt");
    r.record(
        run_id,
        JournalEvent::TicketOpened {
            ticket_id: ticket_id.clone(),
            step: Some(at),
            class: ErrorClass::CodeError,
            summary: format!("the correction of a failed program gave up: {why}"),
            context,
        },
    )
    .await?;
    end_pass(r, run_id, StepEnd::Stop(RunStatus::Escalated { ticket_id })).await
}

/// Stops the run cleanly: the partial result kept, the reason said.
async fn stop(
    r: &Runner,
    run_id: &str,
    history: &History,
    at: u32,
    class: ErrorClass,
    why: String,
) -> Result<Pass> {
    let partial = partial(history, class, &why);
    let status = if class == ErrorClass::DeadlineExceeded {
        RunStatus::TimedOut
    } else {
        RunStatus::Failed { class, message: why }
    };
    finish(r, run_id, at, partial, status).await
}
