//! Counters of the gateway, per model, for `/metrics`.
//!
//! Counting must cost nothing on the hot path: each model has a fixed set of atomic
//! counters, incremented without a lock. [`Gateway::metrics`](crate::Gateway::metrics)
//! takes a [`MetricsSnapshot`], which the server renders with
//! [`MetricsSnapshot::render_prometheus`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_core::event::{Event, EventSink};
use keel_core::{BreakerState, ErrorClass};
use serde::Serialize;

const CLASSES: usize = ErrorClass::ALL.len();

fn class_index(class: ErrorClass) -> usize {
    ErrorClass::ALL.iter().position(|c| *c == class).unwrap_or(0)
}

/// One model's counters.
#[derive(Debug, Default)]
pub(crate) struct ModelCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) attempts: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) fallbacks_from: AtomicU64,
    pub(crate) corrections: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) completion_tokens: AtomicU64,
    pub(crate) cost_micros: AtomicU64,
    pub(crate) malformed_chunks: AtomicU64,
    pub(crate) finalised_without_done: AtomicU64,
    pub(crate) rescued_prefill: AtomicU64,
    pub(crate) rescued_splice: AtomicU64,
    pub(crate) prefill_restarts: AtomicU64,
    pub(crate) rescue_failed: AtomicU64,
    pub(crate) attempt_failures: [AtomicU64; CLASSES],
    pub(crate) request_failures: [AtomicU64; CLASSES],
}

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl ModelCounters {
    pub(crate) fn attempt_failed(&self, class: ErrorClass) {
        bump(&self.attempt_failures[class_index(class)], 1);
    }

    pub(crate) fn request_failed(&self, class: ErrorClass) {
        bump(&self.request_failures[class_index(class)], 1);
    }
}

/// A copy of one model's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelMetrics {
    /// Requests that named this model.
    pub requests: u64,
    /// Answers this model gave (its own requests and those it took over).
    pub answered: u64,
    /// Attempts made on this model.
    pub attempts: u64,
    /// Retries scheduled on this model.
    pub retries: u64,
    /// Times a call left this model for a fallback.
    pub fallbacks_from: u64,
    /// Correction retries (an invalid answer sent back to the model).
    pub corrections: u64,
    /// Prompt tokens charged for this model's attempts (see [`crate::charges`]).
    pub prompt_tokens: u64,
    /// Completion tokens charged for this model's attempts.
    pub completion_tokens: u64,
    /// Cost charged for this model's attempts, in micro-dollars.
    pub cost_micros: u64,
    /// Stream chunks that were not valid JSON, skipped.
    pub malformed_chunks: u64,
    /// Streams that ended without `[DONE]` and were finalised by Keel.
    pub finalised_without_done: u64,
    /// Cut streams continued on this model from the partial answer (prefill).
    pub rescued_prefill: u64,
    /// Cut streams regenerated on this model and spliced.
    pub rescued_splice: u64,
    /// Prefill continuations on this model that restarted the answer instead (the
    /// repeated text was dropped; later rescues on it splice).
    pub prefill_restarts: u64,
    /// Cut streams of this model that could not be rescued (ended with an error event).
    pub rescue_failed: u64,
    /// Failed attempts by class.
    pub attempt_failures: BTreeMap<ErrorClass, u64>,
    /// Requests that failed, by class, counted on the model the agent named.
    pub request_failures: BTreeMap<ErrorClass, u64>,
    /// The breaker's state.
    pub breaker: Option<BreakerState>,
}

/// All models' counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// By model name.
    pub models: BTreeMap<String, ModelMetrics>,
    /// The budgets: each API key's (`key:NAME`), and every run's summed as `runs`.
    pub budgets: BTreeMap<String, BudgetMetrics>,
}

/// One budget's gauges (or the sum of several), by kind (`tokens`, `cost_micros`,
/// `attempts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct BudgetMetrics {
    /// Charged so far, reservations in flight included.
    pub used: BTreeMap<&'static str, u64>,
    /// The limits set.
    pub limit: BTreeMap<&'static str, u64>,
    /// Reserved by calls in flight.
    pub reserved: BTreeMap<&'static str, u64>,
    /// Charges and reservations refused.
    pub refusals: u64,
    /// Whether new calls wait for the calls in flight after an overshoot.
    pub held: bool,
}

impl BudgetMetrics {
    /// Adds `budget`'s gauges.
    pub fn add(&mut self, budget: &keel_core::Budget) {
        use keel_core::BudgetKind as K;
        for kind in [K::Tokens, K::CostMicros, K::Attempts] {
            let name = kind.as_str();
            *self.used.entry(name).or_default() += budget.used(kind);
            *self.reserved.entry(name).or_default() += budget.reserved(kind);
            if let Some(l) = budget.limit(kind) {
                *self.limit.entry(name).or_default() += l;
            }
        }
        self.refusals += budget.refusals();
        self.held |= budget.is_held();
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn by_class(counters: &[AtomicU64; CLASSES]) -> BTreeMap<ErrorClass, u64> {
    ErrorClass::ALL.iter().zip(counters).map(|(class, c)| (*class, load(c))).filter(|(_, n)| *n > 0).collect()
}

impl ModelCounters {
    pub(crate) fn snapshot(&self, breaker: Option<BreakerState>) -> ModelMetrics {
        ModelMetrics {
            requests: load(&self.requests),
            answered: load(&self.answered),
            attempts: load(&self.attempts),
            retries: load(&self.retries),
            fallbacks_from: load(&self.fallbacks_from),
            corrections: load(&self.corrections),
            prompt_tokens: load(&self.prompt_tokens),
            completion_tokens: load(&self.completion_tokens),
            cost_micros: load(&self.cost_micros),
            malformed_chunks: load(&self.malformed_chunks),
            finalised_without_done: load(&self.finalised_without_done),
            rescued_prefill: load(&self.rescued_prefill),
            rescued_splice: load(&self.rescued_splice),
            prefill_restarts: load(&self.prefill_restarts),
            rescue_failed: load(&self.rescue_failed),
            attempt_failures: by_class(&self.attempt_failures),
            request_failures: by_class(&self.request_failures),
            breaker,
        }
    }
}

/// A budget gauge's name, help and reader.
type BudgetGauge = (&'static str, &'static str, fn(&BudgetMetrics) -> &BTreeMap<&'static str, u64>);

/// A counter's name, help and reader.
type Counter = (&'static str, &'static str, fn(&ModelMetrics) -> u64);

impl MetricsSnapshot {
    /// The snapshot in Prometheus' text format, metric names prefixed `keel_gateway_`.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let simple: [Counter; 14] = [
            ("requests_total", "Requests that named the model.", |m| m.requests),
            ("answers_total", "Answers the model gave.", |m| m.answered),
            ("attempts_total", "Attempts made on the model.", |m| m.attempts),
            ("retries_total", "Retries scheduled on the model.", |m| m.retries),
            ("fallbacks_total", "Calls that left the model for a fallback.", |m| m.fallbacks_from),
            ("corrections_total", "Invalid answers sent back to the model.", |m| m.corrections),
            ("prompt_tokens_total", "Prompt tokens of the model's answers.", |m| m.prompt_tokens),
            ("completion_tokens_total", "Completion tokens of the model's answers.", |m| m.completion_tokens),
            ("malformed_chunks_total", "Malformed stream chunks skipped.", |m| m.malformed_chunks),
            ("streams_finalised_total", "Streams that ended without [DONE], finalised.", |m| {
                m.finalised_without_done
            }),
            ("stream_rescues_prefill_total", "Cut streams continued here with a prefill.", |m| {
                m.rescued_prefill
            }),
            ("stream_rescues_splice_total", "Cut streams regenerated here and spliced.", |m| {
                m.rescued_splice
            }),
            ("stream_prefill_restarts_total", "Prefill continuations here that restarted the answer.", |m| {
                m.prefill_restarts
            }),
            ("stream_rescues_failed_total", "Cut streams that ended with an error event.", |m| {
                m.rescue_failed
            }),
        ];
        for (name, help, get) in simple {
            let _ = writeln!(out, "# HELP keel_gateway_{name} {help}\n# TYPE keel_gateway_{name} counter");
            for (model, m) in &self.models {
                let _ = writeln!(out, "keel_gateway_{name}{{model=\"{model}\"}} {}", get(m));
            }
        }
        // Base units: dollars, not the micro-dollars budgets count in.
        let _ = writeln!(
            out,
            "# HELP keel_gateway_cost_dollars_total Cost of the model's answers in US dollars.\n# TYPE keel_gateway_cost_dollars_total counter"
        );
        for (model, m) in &self.models {
            let _ = writeln!(
                out,
                "keel_gateway_cost_dollars_total{{model=\"{model}\"}} {}",
                dollars(m.cost_micros)
            );
        }
        for (name, help, get) in [
            (
                "attempt_failures_total",
                "Failed attempts by class.",
                (|m| &m.attempt_failures) as fn(&ModelMetrics) -> &BTreeMap<ErrorClass, u64>,
            ),
            ("request_failures_total", "Failed requests by class.", |m| &m.request_failures),
        ] {
            let _ = writeln!(out, "# HELP keel_gateway_{name} {help}\n# TYPE keel_gateway_{name} counter");
            for (model, m) in &self.models {
                for (class, n) in get(m) {
                    let _ = writeln!(out, "keel_gateway_{name}{{model=\"{model}\",class=\"{class}\"}} {n}");
                }
            }
        }
        // One encoding of breaker state everywhere (as `keel_breaker_state`).
        let _ = writeln!(
            out,
            "# HELP keel_gateway_breaker_state The model's breaker: 0 closed, 1 half-open, 2 open.\n# TYPE keel_gateway_breaker_state gauge"
        );
        for (model, m) in &self.models {
            let v = match m.breaker {
                Some(BreakerState::Open) => "2",
                Some(BreakerState::HalfOpen) => "1",
                Some(BreakerState::Closed) | None => "0",
            };
            let _ = writeln!(out, "keel_gateway_breaker_state{{model=\"{model}\"}} {v}");
        }
        let gauges: [BudgetGauge; 3] = [
            ("budget_used", "Charged on the budget, reservations in flight included.", |b| &b.used),
            ("budget_limit", "The budget's limit.", |b| &b.limit),
            ("budget_reserved", "Reserved on the budget by calls in flight.", |b| &b.reserved),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP keel_gateway_{name} {help}\n# TYPE keel_gateway_{name} gauge");
            for (budget, b) in &self.budgets {
                let budget = escape(budget);
                for (kind, v) in get(b) {
                    if *kind == keel_core::BudgetKind::CostMicros.as_str() {
                        let _ = writeln!(
                            out,
                            "keel_gateway_{name}{{budget=\"{budget}\",kind=\"cost_dollars\"}} {}",
                            dollars(*v)
                        );
                    } else {
                        let _ =
                            writeln!(out, "keel_gateway_{name}{{budget=\"{budget}\",kind=\"{kind}\"}} {v}");
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP keel_gateway_budget_refusals_total Calls and attempts the budget refused.\n# TYPE keel_gateway_budget_refusals_total counter"
        );
        for (budget, b) in &self.budgets {
            let _ = writeln!(
                out,
                "keel_gateway_budget_refusals_total{{budget=\"{}\"}} {}",
                escape(budget),
                b.refusals
            );
        }
        let _ = writeln!(
            out,
            "# HELP keel_gateway_budget_held Whether the budget admits nothing until its calls in flight settle (1).\n# TYPE keel_gateway_budget_held gauge"
        );
        for (budget, b) in &self.budgets {
            let _ = writeln!(
                out,
                "keel_gateway_budget_held{{budget=\"{}\"}} {}",
                escape(budget),
                u8::from(b.held)
            );
        }
        out
    }
}

/// Micro-dollars as dollars.
fn dollars(micros: u64) -> f64 {
    // Exact below 2^53 micro-dollars (9 billion dollars).
    micros as f64 / 1e6
}

/// A label value with `\\`, `"` and newlines escaped (key names come from config).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Counts the pipeline's events (attempts, retries, failures) and passes them on.
#[derive(Debug)]
pub(crate) struct CountingSink {
    pub(crate) inner: Arc<dyn EventSink>,
    pub(crate) counters: BTreeMap<Arc<str>, Arc<ModelCounters>>,
}

impl EventSink for CountingSink {
    fn record(&self, event: &Event) {
        match event {
            Event::AttemptStarted { target, .. } => {
                if let Some(c) = self.counters.get(target) {
                    bump(&c.attempts, 1);
                }
            }
            Event::AttemptEnded { target, outcome: keel_core::AttemptOutcome::Failed(class), .. } => {
                if let Some(c) = self.counters.get(target) {
                    c.attempt_failed(*class);
                }
            }
            Event::RetryScheduled { target, .. } => {
                if let Some(c) = self.counters.get(target) {
                    bump(&c.retries, 1);
                }
            }
            _ => {}
        }
        self.inner.record(event);
    }
}
