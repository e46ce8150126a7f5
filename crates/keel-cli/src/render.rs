//! The human view: a live step list on a terminal (spinners with attempts, retries
//! and their delays, fallbacks, breaker changes), plain lines when piped.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use keel_core::{AttemptOutcome, Event};
use keel_journal::{JournalEvent, StepOutcome};
use keel_runtime::runner::Observer;

/// Prints a line to stdout; a closed pipe is ignored (the report path handles it).
pub(crate) fn print(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// Prints a line to stderr.
pub(crate) fn eprint(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Renders a run's events as they happen.
pub(crate) struct Live {
    tty: bool,
    quiet: bool,
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    names: HashMap<u32, String>,
    bars: HashMap<u32, ProgressBar>,
}

impl Live {
    /// A renderer: live on a terminal, plain lines otherwise, silent for `--json`.
    pub(crate) fn new(json: bool) -> Self {
        Self { tty: std::io::stdout().is_terminal(), quiet: json, state: Mutex::default() }
    }

    fn line(&self, state: &LiveState, step: Option<u32>, text: &str) {
        match step.and_then(|s| state.bars.get(&s)) {
            Some(bar) if self.tty => bar.println(text),
            _ => print(text),
        }
    }
}

/// One line for an agent's turn: the calls the model made (or the start of its answer)
/// and the tokens charged.
fn turn_summary(output: &serde_json::Value) -> String {
    let message = &output["message"];
    let calls: Vec<String> = message["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    let args = c["function"]["arguments"].as_str().unwrap_or("");
                    let args: String = args.chars().take(60).collect();
                    format!("{}({args})", c["function"]["name"].as_str().unwrap_or("?"))
                })
                .collect()
        })
        .unwrap_or_default();
    let what = if calls.is_empty() {
        let text: String = message["content"].as_str().unwrap_or("").chars().take(80).collect();
        format!("answers \"{}\"", text.replace('\n', " "))
    } else {
        format!("calls {}", calls.join(", "))
    };
    match output["charged"]["tokens"].as_u64() {
        Some(t) => format!("{what} · {t} tokens"),
        None => what,
    }
}

impl Observer for Live {
    fn event(&self, _run_id: &str, event: &JournalEvent) {
        if self.quiet {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            JournalEvent::StepStarted { step, name, target, .. } => {
                s.names.insert(*step, name.clone());
                if self.tty {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(100));
                    bar.set_message(format!("{name} → {target}"));
                    s.bars.insert(*step, bar);
                } else {
                    print(&format!("▸ {name} → {target}"));
                }
            }
            JournalEvent::StepFinished { step, outcome } => {
                let name = s.names.get(step).cloned().unwrap_or_else(|| format!("step {step}"));
                let text = match outcome {
                    // An agent's turn: what the model decided, and what it cost.
                    StepOutcome::Succeeded { output, .. }
                        if output.get("message").is_some() && output.get("charged").is_some() =>
                    {
                        format!("✓ {name}: {}", turn_summary(output))
                    }
                    StepOutcome::Succeeded { output, .. }
                        if name == "result" && output.get("status").is_some() =>
                    {
                        format!("✓ {name}: {}", output["status"].as_str().unwrap_or(""))
                    }
                    StepOutcome::Succeeded { .. } => format!("✓ {name}"),
                    StepOutcome::Failed { class, message } => format!("✗ {name}: {class}: {message}"),
                    StepOutcome::Skipped { reason } => format!("↷ {name}: {reason}"),
                };
                match s.bars.remove(step) {
                    Some(bar) => bar.finish_with_message(text.clone()),
                    None => print(&text),
                }
            }
            JournalEvent::ApprovalRequested { approval_id, step, tool, .. } => {
                let name = s.names.get(step).cloned().unwrap_or_default();
                if let Some(bar) = s.bars.remove(step) {
                    bar.finish_and_clear();
                }
                print(&format!("⏸ {name} ({tool}) waits for approval {approval_id}"));
                print(&format!("  decide with: keel approvals approve {approval_id}  (or reject)"));
            }
            JournalEvent::TicketOpened { ticket_id, summary, .. } => {
                print(&format!("⚑ ticket {ticket_id}: {summary}"));
                print(&format!("  answer with: keel tickets resolve {ticket_id} --action retry|skip|abort"));
            }
            JournalEvent::RunStateChanged { state: keel_journal::RunState::Running, .. } => {}
            JournalEvent::RunStateChanged { state, reason } => {
                let reason = reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                print(&format!("run {}{reason}", state.as_str()));
            }
            JournalEvent::Policy { step, event } => {
                let text = match event {
                    Event::AttemptEnded {
                        attempt, outcome: AttemptOutcome::Failed(class), latency, ..
                    } => Some(format!("  attempt {attempt}: {class} after {}", ms(*latency))),
                    Event::RetryScheduled { delay, reason, .. } => {
                        let why = match reason {
                            keel_core::DelayReason::Backoff => "backoff",
                            keel_core::DelayReason::RetryAfter => "Retry-After",
                        };
                        Some(format!("  retry in {} ({why})", ms(*delay)))
                    }
                    Event::RetryRefused { reason, .. } => Some(format!("  no retry: {reason}")),
                    Event::BreakerTransition { target, from, to } => {
                        Some(format!("  breaker {target}: {} → {}", from.as_str(), to.as_str()))
                    }
                    Event::FallbackTaken { from, to, class } => {
                        Some(format!("  fallback {from} → {to} ({class})"))
                    }
                    Event::CorrectionRound { target, round, class } => {
                        Some(format!("  {target}: correction {round} ({class} sent back)"))
                    }
                    Event::LoopDetected { reason, .. } => Some(format!("  loop detected: {reason}")),
                    Event::FaultInjected { target, attempt, fault } => Some(format!(
                        "  {target} attempt {attempt}: injected {fault:?} (a drill, not an incident)"
                    )),
                    Event::SchemaDrift { target, shape, .. } => {
                        Some(format!("  {target} answered in an unusual shape ({shape})"))
                    }
                    Event::BudgetExceeded { budget, kind, .. } => {
                        Some(format!("  budget {budget} exceeded ({})", kind.as_str()))
                    }
                    Event::AttemptStarted { attempt, .. } => {
                        if let (Some(bar), Some(name)) =
                            (step.and_then(|st| s.bars.get(&st)), step.and_then(|st| s.names.get(&st)))
                        {
                            bar.set_message(format!("{name}: attempt {attempt}"));
                        }
                        None
                    }
                    Event::AttemptEnded { .. } | Event::BudgetCharged { .. } => None,
                };
                if let Some(text) = text {
                    self.line(&s, *step, &text);
                }
            }
            JournalEvent::RunCreated { .. }
            | JournalEvent::ApprovalDecided { .. }
            | JournalEvent::TicketResolved { .. }
            | JournalEvent::ProgramRecorded { .. }
            | JournalEvent::ModelCalled { .. }
            | JournalEvent::AttemptAbandoned { .. } => {}
            JournalEvent::RunTakenOver { from, .. } => {
                let from = from.as_deref().unwrap_or("a process that stopped");
                print(&format!("↻ taken over from {from}"));
            }
        }
    }
}

/// One journal event in words, for `keel runs show`'s timeline.
pub(crate) fn describe(event: &JournalEvent) -> Option<String> {
    Some(match event {
        JournalEvent::RunCreated { name, .. } => format!("run created: {name}"),
        JournalEvent::RunStateChanged { state, reason } => match reason {
            Some(r) => format!("run {} ({r})", state.as_str()),
            None => format!("run {}", state.as_str()),
        },
        JournalEvent::StepStarted { step, name, target, input } => {
            format!("step {step} {name} → {target} {input}")
        }
        JournalEvent::StepFinished { step, outcome } => match outcome {
            StepOutcome::Succeeded { .. } => format!("step {step} succeeded"),
            StepOutcome::Failed { class, message } => format!("step {step} failed: {class}: {message}"),
            StepOutcome::Skipped { reason } => format!("step {step} skipped: {reason}"),
        },
        JournalEvent::ApprovalRequested { approval_id, tool, .. } => {
            format!("approval {approval_id} requested for {tool}")
        }
        JournalEvent::ApprovalDecided { approval_id, decision, by } => {
            format!("approval {approval_id} {} by {by}", decision.as_str())
        }
        JournalEvent::TicketOpened { ticket_id, class, .. } => format!("ticket {ticket_id} opened ({class})"),
        JournalEvent::TicketResolved { ticket_id, resolution, by } => {
            format!("ticket {ticket_id} resolved by {by}: {resolution}")
        }
        JournalEvent::ModelCalled { model, record } => {
            format!("model {model} answered by {} ({} attempts)", record["answered_by"], record["attempts"])
        }
        JournalEvent::ProgramRecorded { step, attempt, .. } => {
            format!("step {step} program of attempt {attempt} recorded")
        }
        JournalEvent::RunTakenOver { by, from, epoch } => match from {
            Some(from) => format!("run taken over by {by} from {from} (lease epoch {epoch})"),
            None => format!("run taken over by {by} (lease epoch {epoch})"),
        },
        JournalEvent::AttemptAbandoned { target, attempt, .. } => {
            format!("  {target} attempt {attempt}: abandoned (its process stopped)")
        }
        JournalEvent::Policy { event, .. } => match event {
            Event::AttemptStarted { .. } | Event::BudgetCharged { .. } => return None,
            Event::AttemptEnded { target, attempt, outcome, latency } => match outcome {
                AttemptOutcome::Ok => format!("  {target} attempt {attempt}: ok in {}", ms(*latency)),
                AttemptOutcome::Failed(class) => {
                    format!("  {target} attempt {attempt}: {class} after {}", ms(*latency))
                }
            },
            Event::RetryScheduled { delay, reason, .. } => format!("  retry in {} ({reason:?})", ms(*delay)),
            Event::RetryRefused { reason, .. } => format!("  no retry: {reason}"),
            Event::BreakerTransition { target, from, to } => {
                format!("  breaker {target}: {} → {}", from.as_str(), to.as_str())
            }
            Event::FallbackTaken { from, to, class } => format!("  fallback {from} → {to} ({class})"),
            Event::CorrectionRound { target, round, class } => {
                format!("  {target}: correction {round} ({class} sent back)")
            }
            Event::BudgetExceeded { budget, kind, .. } => {
                format!("  budget {budget} exceeded ({})", kind.as_str())
            }
            Event::LoopDetected { reason, .. } => format!("  loop detected: {reason}"),
            Event::FaultInjected { target, attempt, fault } => {
                format!("  {target} attempt {attempt}: injected {fault:?} (a drill, not an incident)")
            }
            Event::SchemaDrift { target, shape, usual } => {
                format!("  {target} answered in an unusual shape {shape} (usually {usual})")
            }
        },
    })
}
