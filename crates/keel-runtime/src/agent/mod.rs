//! Agent runs: a model-driven tool loop, journaled like a plan run.
//!
//! An agent run is a run whose first event holds an [`AgentSpec`] instead of a plan:
//! a task, the model, the tools offered, the limits. The runner drives it turn by
//! turn (`runner/agent.rs`): a **turn** asks the model through the gateway (its
//! policies, fallbacks and budgets, charged to the run's one budget), and each tool
//! call of the answer is a **step** that goes through everything a plan step does
//! (schema, approval, idempotency, the tool's pipeline, escalation).
//!
//! Everything the loop knows is in the journal, in step order: a turn is a step on
//! target `model:NAME` whose output holds the assistant message and what it was
//! charged; a tool call is a step named `turn-N.call-K` whose output is the tool's
//! result (or whose failure is its error). [`History::replay`] rebuilds the
//! conversation from those steps alone, so a drive after a crash asks the model only
//! for turns that never finished, and a tool call already completed answers from the
//! idempotency store instead of acting again.
//!
//! What the model is sent each turn is the history cut to `history_tokens`
//! ([`History::messages`]): the system prompt, the task and the latest exchanges are
//! kept; older exchanges (an assistant message with its tool answers, never split) are
//! dropped and summarised in one line, so a long run neither overflows the context
//! nor pays for its whole past on every turn.

pub mod correct;
pub mod shape;
pub mod stats;

use std::collections::BTreeMap;

use keel_journal::{RunSnapshot, StepView};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use correct::{CorrectionMode, Strategy};

/// The target of a turn's step: `model:NAME`.
pub const MODEL_TARGET_PREFIX: &str = "model:";

/// The target of an agent run's last step, which holds its answer or partial result.
pub const RESULT_TARGET: &str = "agent";

/// The most characters of one tool answer put in the history (the rest is cut, said so).
pub const MAX_TOOL_ANSWER_CHARS: usize = 16_000;

/// What a caller asks for: a task, and optionally the model, tools and limits
/// (`[agent]` gives the defaults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTask {
    /// What the agent should do, in words.
    pub task: String,
    /// The model (a `[models]` name).
    #[serde(default)]
    pub model: Option<String>,
    /// The most model turns.
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// The tools offered.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// The system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// The task's own check: a JSON Schema the `result` of every program the model
    /// writes must match (besides its tool's `result_schema`); a program whose result
    /// does not is a `code_error`, corrected like any other.
    #[serde(default)]
    pub result_schema: Option<Value>,
}

/// An agent run as recorded in its first event: every value resolved, so a resume
/// drives the same run whatever the config says by then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// The task.
    pub task: String,
    /// The model.
    pub model: String,
    /// The most model turns.
    pub max_turns: u32,
    /// The tools offered, by name.
    pub tools: Vec<String>,
    /// The system prompt, if any.
    pub system: Option<String>,
    /// The most tokens of history sent each turn.
    pub history_tokens: u64,
    /// Identical calls that pause the run (0: off).
    pub max_repeats: u32,
    /// How failed programs are corrected.
    #[serde(default)]
    pub correction: CorrectionMode,
    /// The most failed programs in a row before the run stops.
    #[serde(default = "default_code_attempts")]
    pub code_attempts: u32,
    /// Whether an error repeated unchanged stops the chain.
    #[serde(default = "yes")]
    pub stop_on_repeat: bool,
    /// What an answer in an unusual shape does.
    #[serde(default)]
    pub on_schema_drift: shape::DriftPolicy,
    /// The most tool calls of one turn carried out.
    #[serde(default = "default_calls_per_turn")]
    pub max_calls_per_turn: u32,
    /// What a correction loop that gives up does.
    #[serde(default)]
    pub on_unsolved: correct::Unsolved,
    /// The task's check of every program's `result` (a JSON Schema), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_schema: Option<Value>,
}

fn default_calls_per_turn() -> u32 {
    32
}

fn yes() -> bool {
    true
}

fn default_code_attempts() -> u32 {
    4
}

impl AgentSpec {
    /// Resolves `task` against `config`'s `[agent]`, `[models]` and `[tools]`.
    ///
    /// # Errors
    /// What is wrong, in words: an empty task, no model, an unknown model or tool, a
    /// turn limit out of range.
    pub fn resolve(task: &AgentTask, config: &Config) -> Result<AgentSpec, String> {
        if task.task.trim().is_empty() {
            return Err("the task is empty".to_owned());
        }
        if task.task.len() > 1_000_000 {
            return Err("the task is longer than 1,000,000 bytes".to_owned());
        }
        let a = &config.agent;
        let model = match task.model.clone().or_else(|| a.model.clone()) {
            Some(m) => m,
            None if config.models.len() == 1 => config.models.keys().next().cloned().unwrap_or_default(),
            None if config.models.is_empty() => {
                return Err("no model: an agent run needs a `[models.NAME]` in the config".to_owned());
            }
            None => {
                let known: Vec<&str> = config.models.keys().map(String::as_str).collect();
                return Err(format!(
                    "which model? set `[agent] model` or pass one (known: {})",
                    known.join(", ")
                ));
            }
        };
        if !config.models.contains_key(&model) {
            let known: Vec<&str> = config.models.keys().map(String::as_str).collect();
            return Err(format!("no model `{model}` (known: {})", known.join(", ")));
        }
        let max_turns = task.max_turns.unwrap_or(a.max_turns);
        if !(1..=10_000).contains(&max_turns) {
            return Err(format!("max_turns {max_turns} is out of range 1–10,000"));
        }
        let tools = match task.tools.clone().or_else(|| a.tools.clone()) {
            Some(t) => t,
            None => config.tools.keys().cloned().collect(),
        };
        if let Some(unknown) = tools.iter().find(|t| !config.tools.contains_key(*t)) {
            return Err(format!("no tool named `{unknown}`"));
        }
        if let Some(schema) = &task.result_schema {
            crate::tool::code::compile_result_schema(schema)
                .map_err(|e| format!("the result_schema is {e}"))?;
        }
        Ok(AgentSpec {
            task: task.task.clone(),
            model,
            max_turns,
            tools,
            system: task.system.clone().or_else(|| a.system.clone()),
            history_tokens: a.history_tokens,
            max_repeats: a.max_repeats,
            correction: a.correction,
            code_attempts: a.code_attempts,
            stop_on_repeat: a.stop_on_repeat,
            on_schema_drift: a.on_schema_drift,
            max_calls_per_turn: a.max_calls_per_turn,
            on_unsolved: a.on_unsolved,
            result_schema: task.result_schema.clone(),
        })
    }

    /// The spec of an agent run, from its first event's input (`None` for a plan run).
    pub fn of_run(input: &Value) -> Option<Result<AgentSpec, String>> {
        let spec = input.get("agent")?;
        Some(serde_json::from_value(spec.clone()).map_err(|e| e.to_string()))
    }

    /// The tools as the model is offered them (OpenAI's `tools`), with their schemas.
    pub fn tool_specs(&self, config: &Config) -> Vec<Value> {
        self.tools
            .iter()
            .filter_map(|name| config.tools.get(name))
            .map(|t| {
                let parameters = t.params_schema.clone().unwrap_or_else(|| json!({"type": "object"}));
                json!({"type": "function", "function": {
                    "name": t.name.as_ref(), "description": t.description, "parameters": parameters}})
            })
            .collect()
    }
}

/// The name of the step of call `k` (1-based) of turn `n`.
pub fn call_step_name(turn: u32, k: usize) -> String {
    format!("turn-{turn}.call-{k}")
}

/// A tool call of a turn, as the model wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCall {
    /// The step name it is journaled under.
    pub step_name: String,
    /// The call id the tool answer refers to.
    pub call_id: String,
    /// The function name.
    pub name: String,
    /// The arguments, as written (maybe not JSON).
    pub arguments: String,
    /// The journal step, if one was started for it.
    pub step: Option<u32>,
}

/// One exchange: an assistant message and the tool answers to its calls.
#[derive(Debug, Clone, Default)]
struct Exchange {
    messages: Vec<Value>,
    calls: Vec<String>,
    /// Taken out of view by a `regenerate` turn: this line stands in for it.
    elided: Option<String>,
}

/// A program that failed, as the journal says.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeFailure {
    /// Its step.
    pub step_name: String,
    /// The error's kind (`KeyError`).
    pub kind: String,
    /// The error's first line.
    pub first_line: String,
    /// It was a program that had failed before, not run again.
    pub resubmitted: bool,
    /// The tool it was written for.
    pub tool: String,
    /// The program.
    pub program: String,
    /// The error's whole message.
    pub message: String,
}

/// The prefix of the error of a program not run because it failed before.
pub const RESUBMITTED: &str = "the program is identical to one that already failed";

/// The `program` of a code call's arguments, if it is one.
pub fn program_of(args: &Value) -> Option<&str> {
    args.get("program").and_then(Value::as_str)
}

/// The `result` in a code call's answer: the code tool's `result`, or a command tool's
/// JSON answer's (`json.result`); `None` when the answer holds none.
pub fn program_result(output: &Value) -> Option<&Value> {
    output.get("result").or_else(|| output.pointer("/json/result"))
}

/// The conversation of an agent run, rebuilt from its journal.
#[derive(Debug, Clone, Default)]
pub struct History {
    exchanges: Vec<Exchange>,
    /// Turns that finished.
    pub turns: u32,
    /// The calls of the last turn that are not settled yet, in order.
    pub pending: Vec<PendingCall>,
    /// The last turn's answer when it called no tool: the run's answer.
    pub answer: Option<String>,
    /// The next free step index.
    pub next_step: u32,
    /// A turn step started and never finished (a crash during the model call): its index.
    pub unfinished_turn: Option<u32>,
    /// What finished turns charged: tokens, cost (micro-dollars), attempts.
    pub charged: (u64, u64, u64),
    /// (tool, canonical arguments) of every tool step, for the repeat guard.
    pub signatures: BTreeMap<(String, String), u32>,
    /// The outputs of tool steps that succeeded, by step name (a ticket's context).
    pub outputs: BTreeMap<String, Value>,
    /// The last text the model wrote, if any (a stopped run's partial result).
    pub last_text: Option<String>,
    /// The programs that failed in a row since the last one that worked, in order.
    pub code_chain: Vec<CodeFailure>,
    /// Whether the latest exchange ended with a failed program (a correction is due).
    pub code_failed_last: bool,
    /// Every program that failed (normalized), with its error's first line.
    pub failed_programs: BTreeMap<String, String>,
    /// The correction strategy of the latest finished turn, and the kind it answered.
    pub last_strategy: Option<(Strategy, String)>,
    /// The strategies of the turns since the current chain of failed programs began.
    pub chain_strategies: Vec<Strategy>,
    /// The tokens the latest finished turn was charged.
    pub last_turn_tokens: u64,
    /// The programs that ended (ran or were refused) since the latest finished turn.
    pub programs_since_turn: u32,
    /// The input of the turn that never finished, if one did not.
    pub unfinished_input: Option<Value>,
    /// The exchange where the current chain of failed programs began.
    chain_start: Option<usize>,
    /// The shapes each tool answered with in this run (fingerprint → count).
    pub shapes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Whether a tool step is settled: its answer can go to the model. `redo` names the
/// steps that a person's ticket resolution sends back to the runner.
pub fn is_settled(view: &StepView, snap: &RunSnapshot) -> bool {
    match view.status.as_str() {
        "succeeded" | "skipped" => true,
        "failed" => {
            let ticket =
                snap.tickets.iter().filter(|t| t.step == Some(view.step)).max_by_key(|t| t.opened_at_ms);
            match ticket {
                None => true,
                // Open: the run waits for a person. Resolved after the failure: the
                // person's answer (retry, skip, abort) is the runner's to carry out.
                Some(t) if t.status == "open" => false,
                Some(t) => t.resolved_at_ms.is_some_and(|at| view.finished_at_ms.is_some_and(|f| f > at)),
            }
        }
        _ => false,
    }
}

/// What a settled tool step says to the model.
pub fn tool_answer(view: &StepView) -> String {
    let text = match view.status.as_str() {
        "succeeded" => match &view.output {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "null".to_owned(),
        },
        "skipped" => json!({"skipped": view.message}).to_string(),
        _ => {
            let hint = if view.error_class.as_deref() == Some(keel_core::ErrorClass::CodeError.as_str()) {
                "the program failed: fix it and call the tool again with the corrected program"
            } else {
                "the call failed; correct the arguments or choose another way"
            };
            json!({"error": {"class": view.error_class, "message": view.message, "hint": hint}}).to_string()
        }
    };
    cut(text, MAX_TOOL_ANSWER_CHARS)
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let total = text.len();
        text.truncate(end);
        text.push_str(&format!(" …[cut: {total} bytes in all]"));
    }
    text
}

impl History {
    /// Rebuilds the conversation of `snap`. `handled` are tool steps this drive already
    /// carried out: settled whatever their ticket says.
    pub fn replay(snap: &RunSnapshot, handled: &std::collections::HashSet<u32>, spec: &AgentSpec) -> History {
        let mut h = History::default();
        let mut steps: Vec<&StepView> = snap.steps.iter().collect();
        steps.sort_by_key(|s| s.step);
        h.next_step = steps.last().map_or(0, |s| s.step + 1);
        let by_name: BTreeMap<&str, &StepView> = steps.iter().map(|s| (s.name.as_str(), *s)).collect();
        for view in &steps {
            if let Some(tool) = (!view.target.starts_with(MODEL_TARGET_PREFIX)
                && view.target != RESULT_TARGET)
                .then_some(&view.target)
            {
                let sig = (tool.clone(), keel_core::canonical_json(&view.input));
                *h.signatures.entry(sig).or_default() += 1;
                if view.status == "succeeded" {
                    let output = view.output.clone().unwrap_or(Value::Null);
                    // The hash journaled beside the answer; recomputed for older journals.
                    let fp = view.shape.clone().unwrap_or_else(|| shape::fingerprint(&output));
                    *h.shapes.entry(tool.clone()).or_default().entry(fp).or_default() += 1;
                    h.outputs.insert(view.name.clone(), output);
                }
                if let Some(program) = program_of(&view.input) {
                    h.code_step(view, program);
                }
                continue;
            }
            if !view.target.starts_with(MODEL_TARGET_PREFIX) {
                continue;
            }
            if view.status != "succeeded" {
                h.unfinished_turn = Some(view.step);
                h.unfinished_input = Some(view.input.clone());
                continue;
            }
            h.unfinished_turn = None;
            h.unfinished_input = None;
            h.turns += 1;
            h.code_failed_last = false;
            h.last_strategy = view.input["strategy"]
                .as_str()
                .and_then(Strategy::parse)
                .map(|s| (s, view.input["after_kind"].as_str().unwrap_or("error").to_owned()));
            if let Some((s, _)) = &h.last_strategy {
                h.chain_strategies.push(*s);
            }
            // A regenerating turn took the failed chain before it out of view.
            if h.last_strategy.as_ref().is_some_and(|(s, _)| *s == Strategy::Regenerate) {
                h.elide_chain(view.input["hint"].as_str().unwrap_or(""));
            }
            let out = view.output.clone().unwrap_or(Value::Null);
            let charged = &out["charged"];
            h.last_turn_tokens = charged["tokens"].as_u64().unwrap_or(0);
            h.programs_since_turn = 0;
            h.charged.0 = h.charged.0.saturating_add(charged["tokens"].as_u64().unwrap_or(0));
            h.charged.1 = h.charged.1.saturating_add(charged["cost_micros"].as_u64().unwrap_or(0));
            h.charged.2 = h.charged.2.saturating_add(charged["attempts"].as_u64().unwrap_or(0));
            let message = out["message"].clone();
            if let Some(text) = message["content"].as_str().filter(|t| !t.trim().is_empty()) {
                h.last_text = Some(text.to_owned());
            }
            let calls = message["tool_calls"].as_array().cloned().unwrap_or_default();
            // A later turn settles the calls of the one before, whatever their state:
            // every call gets an answer, or the conversation is not valid.
            if let Some(prev) = h.exchanges.last_mut() {
                for p in h.pending.drain(..) {
                    let answer = match p.step.and_then(|i| steps.iter().find(|s| s.step == i)) {
                        Some(step) => tool_answer(step),
                        None => json!({"error": {"message": "the call was not carried out"}}).to_string(),
                    };
                    prev.messages.push(json!({"role": "tool", "tool_call_id": p.call_id, "content": answer}));
                }
            }
            let mut ex = Exchange { messages: vec![message.clone()], calls: Vec::new(), elided: None };
            h.answer = None;
            if calls.is_empty() {
                h.answer = Some(message["content"].as_str().unwrap_or("").to_owned());
            }
            for (k, call) in calls.iter().enumerate() {
                let name = call_step_name(h.turns, k + 1);
                let call_id = call["id"].as_str().unwrap_or("").to_owned();
                let fname = call["function"]["name"].as_str().unwrap_or("").to_owned();
                ex.calls.push(fname.clone());
                // Past the turn's cap, a call is answered, never run.
                if k >= spec.max_calls_per_turn as usize {
                    let refused = json!({"error": {"class": "loop_detected", "message": format!(
                        "not carried out: at most {} tool calls of one turn are", spec.max_calls_per_turn
                    )}});
                    ex.messages.push(
                        json!({"role": "tool", "tool_call_id": call_id, "content": refused.to_string()}),
                    );
                    continue;
                }
                match by_name.get(name.as_str()) {
                    Some(step) if handled.contains(&step.step) || is_settled(step, snap) => {
                        ex.messages.push(
                            json!({"role": "tool", "tool_call_id": call_id, "content": tool_answer(step)}),
                        );
                    }
                    step => h.pending.push(PendingCall {
                        step_name: name,
                        call_id,
                        name: fname,
                        arguments: call["function"]["arguments"].as_str().unwrap_or("").to_owned(),
                        step: step.map(|s| s.step),
                    }),
                }
            }
            h.exchanges.push(ex);
        }
        h
    }

    /// Takes every exchange of the current chain of failed programs out of view (the
    /// model regenerates from the task, not from its failed programs), `hint` standing
    /// in for them; the latest exchange when there is no chain.
    pub fn elide_chain(&mut self, hint: &str) {
        let start = self.chain_start.unwrap_or(self.exchanges.len().saturating_sub(1));
        for (i, ex) in self.exchanges.iter_mut().enumerate().skip(start) {
            ex.elided = Some(if i == start { hint.to_owned() } else { String::new() });
        }
    }

    /// Notes a code call's step (its outcome in the chain of failed programs).
    fn code_step(&mut self, view: &StepView, program: &str) {
        if view.status == "succeeded" || view.status == "failed" {
            self.programs_since_turn += 1;
        }
        match view.status.as_str() {
            "succeeded" => {
                self.code_chain.clear();
                self.chain_strategies.clear();
                self.code_failed_last = false;
                self.chain_start = None;
            }
            "failed" if view.error_class.as_deref() == Some(keel_core::ErrorClass::CodeError.as_str()) => {
                let message = view.message.clone().unwrap_or_default();
                let resubmitted = message.starts_with(RESUBMITTED);
                // A resubmission's message quotes the first failure's: its kind is that one's.
                let quoted = message.split_once(": ").map_or("", |(_, rest)| rest);
                let basis = if resubmitted { quoted } else { message.as_str() };
                let first_line = basis.lines().next().unwrap_or("").to_owned();
                if !resubmitted {
                    self.failed_programs.insert(correct::normalize(program), first_line.clone());
                }
                if self.chain_start.is_none() {
                    self.chain_start = Some(self.exchanges.len().saturating_sub(1));
                }
                self.code_chain.push(CodeFailure {
                    step_name: view.name.clone(),
                    kind: correct::error_kind(basis),
                    first_line,
                    resubmitted,
                    tool: view.target.clone(),
                    program: program.to_owned(),
                    message,
                });
                self.code_failed_last = true;
            }
            _ => {}
        }
    }

    /// The messages of the next turn: the system prompt, the task, and the latest
    /// exchanges that fit in `spec.history_tokens` (estimated at 3 bytes a token,
    /// which over-counts); what was dropped is said in one line after the task. The
    /// latest exchange is always kept, however large.
    pub fn messages(&self, spec: &AgentSpec) -> (Vec<Value>, usize) {
        let mut head = Vec::new();
        if let Some(system) = &spec.system {
            head.push(json!({"role": "system", "content": system}));
        }
        head.push(json!({"role": "user", "content": spec.task}));
        let tokens = |ms: &[Value]| ms.iter().map(|m| m.to_string().len() as u64 / 3 + 1).sum::<u64>();
        let mut budget = spec.history_tokens.saturating_sub(tokens(&head) + 40);
        let mut keep = 0;
        for ex in self.exchanges.iter().rev() {
            let cost = tokens(&ex.messages);
            if keep > 0 && cost > budget {
                break;
            }
            budget = budget.saturating_sub(cost);
            keep += 1;
        }
        let dropped = &self.exchanges[..self.exchanges.len() - keep];
        let mut messages = head;
        if !dropped.is_empty() {
            let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
            for c in dropped.iter().flat_map(|e| &e.calls) {
                *counts.entry(c.as_str()).or_default() += 1;
            }
            let calls: Vec<String> = counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
            let n: usize = dropped.iter().map(|e| e.messages.len()).sum();
            messages.push(json!({"role": "user", "content": format!(
                "[keel] {n} earlier messages of this run were dropped to stay under {} tokens; \
                 they called: {}.",
                spec.history_tokens,
                if calls.is_empty() { "no tools".to_owned() } else { calls.join(", ") }
            )}));
        }
        for ex in &self.exchanges[self.exchanges.len() - keep..] {
            match &ex.elided {
                Some(hint) if hint.is_empty() => {}
                Some(hint) => messages.push(json!({"role": "user", "content": hint})),
                None => messages.extend(ex.messages.iter().cloned()),
            }
        }
        (messages, dropped.len())
    }
}

#[cfg(test)]
mod tests;
