//! Counters of the gateway, per model, for `/metrics`.
//!
//! Counting must cost nothing on the hot path: each model has a fixed set of atomic
//! counters, incremented without a lock. [`Gateway::metrics`](crate::Gateway::metrics)
//! takes a [`MetricsSnapshot`], which [`MetricsSnapshot::record`] writes into the
//! server's one `metrics` registry at scrape time: one exposition, one encoder, for
//! the server's series and the gateway's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_core::event::{Event, EventSink};
use keel_core::{BreakerState, ErrorClass};
use metrics::{Key, Label, Recorder};
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

/// A counter's name, help and reader.
type Counter = (&'static str, &'static str, fn(&ModelMetrics) -> u64);

/// The per-model counters, by series name.
const COUNTERS: [Counter; 14] = [
    ("keel_gateway_requests_total", "Requests that named the model.", |m| m.requests),
    ("keel_gateway_answers_total", "Answers the model gave.", |m| m.answered),
    ("keel_gateway_attempts_total", "Attempts made on the model.", |m| m.attempts),
    ("keel_gateway_retries_total", "Retries scheduled on the model.", |m| m.retries),
    ("keel_gateway_fallbacks_total", "Calls that left the model for a fallback.", |m| m.fallbacks_from),
    ("keel_gateway_corrections_total", "Invalid answers sent back to the model.", |m| m.corrections),
    ("keel_gateway_prompt_tokens_total", "Prompt tokens of the model's answers.", |m| m.prompt_tokens),
    ("keel_gateway_completion_tokens_total", "Completion tokens of the model's answers.", |m| {
        m.completion_tokens
    }),
    ("keel_gateway_malformed_chunks_total", "Malformed stream chunks skipped.", |m| m.malformed_chunks),
    ("keel_gateway_streams_finalised_total", "Streams that ended without [DONE], finalised.", |m| {
        m.finalised_without_done
    }),
    ("keel_gateway_stream_rescues_prefill_total", "Cut streams continued here with a prefill.", |m| {
        m.rescued_prefill
    }),
    ("keel_gateway_stream_rescues_splice_total", "Cut streams regenerated here and spliced.", |m| {
        m.rescued_splice
    }),
    (
        "keel_gateway_stream_prefill_restarts_total",
        "Prefill continuations here that restarted the answer.",
        |m| m.prefill_restarts,
    ),
    ("keel_gateway_stream_rescues_failed_total", "Cut streams that ended with an error event.", |m| {
        m.rescue_failed
    }),
];

/// A per-class counter's name, help and reader.
type ClassCounter = (&'static str, &'static str, fn(&ModelMetrics) -> &BTreeMap<ErrorClass, u64>);

const CLASS_COUNTERS: [ClassCounter; 2] = [
    ("keel_gateway_attempt_failures_total", "Failed attempts by class.", |m| &m.attempt_failures),
    ("keel_gateway_request_failures_total", "Failed requests by class.", |m| &m.request_failures),
];

/// A budget gauge's name, help and reader.
type BudgetGauge = (&'static str, &'static str, fn(&BudgetMetrics) -> &BTreeMap<&'static str, u64>);

const BUDGET_GAUGES: [BudgetGauge; 3] = [
    ("keel_gateway_budget_used", "Charged on the budget, reservations in flight included.", |b| &b.used),
    ("keel_gateway_budget_limit", "The budget's limit.", |b| &b.limit),
    ("keel_gateway_budget_reserved", "Reserved on the budget by calls in flight.", |b| &b.reserved),
];

const COST: &str = "keel_gateway_cost_dollars";
const BREAKER: &str = "keel_gateway_breaker_state";
const REFUSALS: &str = "keel_gateway_budget_refusals_total";
const HELD: &str = "keel_gateway_budget_held";

const META: metrics::Metadata<'static> = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect::<Vec<_>>())
}

impl MetricsSnapshot {
    /// Describes the gateway's series (`# HELP`) to `recorder`.
    pub fn describe(recorder: &dyn Recorder) {
        let counters =
            COUNTERS.iter().map(|(n, h, _)| (*n, *h)).chain(CLASS_COUNTERS.iter().map(|(n, h, _)| (*n, *h)));
        for (name, help) in counters.chain([(REFUSALS, "Calls and attempts the budget refused.")]) {
            recorder.describe_counter(name.into(), None, help.into());
        }
        let gauges = BUDGET_GAUGES.iter().map(|(n, h, _)| (*n, *h)).chain([
            (COST, "Cost charged for the model's attempts so far, in US dollars."),
            (BREAKER, "The model's breaker: 0 closed, 1 half-open, 2 open."),
            (HELD, "Whether the budget admits nothing until its calls in flight settle (1)."),
        ]);
        for (name, help) in gauges {
            recorder.describe_gauge(name.into(), None, help.into());
        }
    }

    /// Writes the snapshot into `recorder` — the server's one Prometheus registry,
    /// which renders it with the server's own series: counters set to their totals,
    /// gauges to their values, costs in dollars (budgets count micro-dollars), the
    /// breaker encoded as everywhere (`keel_breaker_state`).
    pub fn record(&self, recorder: &dyn Recorder) {
        for (model, m) in &self.models {
            let labels = [("model", model.as_str())];
            for (name, _, get) in COUNTERS {
                recorder.register_counter(&key(name, &labels), &META).absolute(get(m));
            }
            for (name, _, get) in CLASS_COUNTERS {
                for (class, n) in get(m) {
                    let labels = [("model", model.as_str()), ("class", class.as_str())];
                    recorder.register_counter(&key(name, &labels), &META).absolute(*n);
                }
            }
            recorder.register_gauge(&key(COST, &labels), &META).set(dollars(m.cost_micros));
            let breaker = match m.breaker {
                Some(BreakerState::Open) => 2.0,
                Some(BreakerState::HalfOpen) => 1.0,
                Some(BreakerState::Closed) | None => 0.0,
            };
            recorder.register_gauge(&key(BREAKER, &labels), &META).set(breaker);
        }
        for (budget, b) in &self.budgets {
            for (name, _, get) in BUDGET_GAUGES {
                for (kind, v) in get(b) {
                    let (kind, value) = if *kind == keel_core::BudgetKind::CostMicros.as_str() {
                        ("cost_dollars", dollars(*v))
                    } else {
                        (*kind, *v as f64)
                    };
                    let labels = [("budget", budget.as_str()), ("kind", kind)];
                    recorder.register_gauge(&key(name, &labels), &META).set(value);
                }
            }
            let labels = [("budget", budget.as_str())];
            recorder.register_counter(&key(REFUSALS, &labels), &META).absolute(b.refusals);
            recorder.register_gauge(&key(HELD, &labels), &META).set(f64::from(u8::from(b.held)));
        }
    }
}

/// Micro-dollars as dollars.
fn dollars(micros: u64) -> f64 {
    // Exact below 2^53 micro-dollars (9 billion dollars).
    micros as f64 / 1e6
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
            Event::CorrectionRound { target, .. } => {
                if let Some(c) = self.counters.get(target) {
                    bump(&c.corrections, 1);
                }
            }
            _ => {}
        }
        self.inner.record(event);
    }
}
