//! Every policy decision as an [`Event`], delivered to an [`EventSink`].
//!
//! Keel never decides silently: an attempt, a retry and its reason, a refusal by the
//! gate, a breaker transition, a fallback, a budget charge and a detected loop each
//! become an event. The journal implements [`EventSink`] to make them durable; every
//! event is also emitted as a `tracing` event by [`emit`], so logs and traces see the
//! same decisions without a sink.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;
use crate::budget::BudgetKind;
use crate::class::ErrorClass;

/// Why a retry waits as long as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DelayReason {
    /// Exponential backoff with jitter.
    Backoff,
    /// The target's `Retry-After`.
    RetryAfter,
}

/// Why a retry was not made although the failure's class allows retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RefusalReason {
    /// `max_attempts` reached.
    AttemptsExhausted {
        /// The configured maximum.
        max_attempts: u32,
    },
    /// The confidence gate judged the retry unlikely to succeed.
    LowConfidence {
        /// The gate's score for this retry.
        score: f64,
        /// The threshold it fell below.
        threshold: f64,
    },
    /// The delay before the retry would pass the step's or run's deadline.
    DeadlineTooClose {
        /// The delay the retry needed.
        delay: Duration,
        /// Time left before the deadline.
        remaining: Duration,
    },
    /// The target's circuit breaker opened: a retry would fail fast.
    CircuitOpen,
    /// An attempt budget has no attempt left for the retry.
    BudgetExhausted {
        /// The budget's name.
        budget: String,
    },
    /// The target asked to wait longer than the configured cap.
    RetryAfterTooLong {
        /// What the target asked for.
        requested: Duration,
        /// The configured cap.
        cap: Duration,
    },
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::AttemptsExhausted { max_attempts } => {
                write!(f, "all {max_attempts} attempts used")
            }
            RefusalReason::LowConfidence { score, threshold } => {
                write!(f, "confidence {score:.2} is below the threshold {threshold:.2}")
            }
            RefusalReason::DeadlineTooClose { delay, remaining } => {
                write!(f, "a retry after {delay:?} would pass the deadline ({remaining:?} left)")
            }
            RefusalReason::CircuitOpen => f.write_str("the circuit breaker opened"),
            RefusalReason::BudgetExhausted { budget } => write!(f, "budget `{budget}` has no attempt left"),
            RefusalReason::RetryAfterTooLong { requested, cap } => {
                write!(f, "the target asked to wait {requested:?}, more than the cap of {cap:?}")
            }
        }
    }
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The attempt succeeded.
    Ok,
    /// The attempt failed with this class.
    Failed(ErrorClass),
}

/// One policy decision or observation.
///
/// Events name their target; the run and step they belong to are added by the sink
/// that records them (the journal knows which run it is writing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An attempt is about to call the target.
    AttemptStarted {
        /// The target called.
        target: Arc<str>,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// A fault was injected into this attempt on purpose (a drill, `fault` policy):
    /// the attempt's failure that follows is not a real incident.
    FaultInjected {
        /// The target.
        target: Arc<str>,
        /// The attempt it was injected into.
        attempt: u32,
        /// What was injected.
        fault: crate::fault::FaultKind,
    },
    /// A target answered in a shape (keys and types) unlike its usual ones: the
    /// cheapest sign that a bad intermediate result is about to be fed forward.
    SchemaDrift {
        /// The target.
        target: Arc<str>,
        /// The answer's shape fingerprint.
        shape: Arc<str>,
        /// The fingerprints it usually answers with, comma-separated.
        usual: Arc<str>,
    },
    /// An attempt finished.
    AttemptEnded {
        /// The target called.
        target: Arc<str>,
        /// 1 for the first attempt.
        attempt: u32,
        /// Success, or the failure's class.
        outcome: AttemptOutcome,
        /// How long the attempt took.
        #[serde(with = "humantime_serde")]
        latency: Duration,
    },
    /// A retry will be made after `delay`.
    RetryScheduled {
        /// The target called.
        target: Arc<str>,
        /// The attempt that failed.
        attempt: u32,
        /// Its class.
        class: ErrorClass,
        /// How long until the next attempt.
        #[serde(with = "humantime_serde")]
        delay: Duration,
        /// Where the delay comes from.
        reason: DelayReason,
    },
    /// A retry that the class would allow was not made.
    RetryRefused {
        /// The target called.
        target: Arc<str>,
        /// The attempt that failed.
        attempt: u32,
        /// Its class.
        class: ErrorClass,
        /// Why no retry.
        reason: RefusalReason,
    },
    /// A circuit breaker changed state.
    BreakerTransition {
        /// The target whose breaker it is.
        target: Arc<str>,
        /// The state before.
        from: BreakerState,
        /// The state after.
        to: BreakerState,
    },
    /// A fallback chain moved on to its next alternative.
    FallbackTaken {
        /// The alternative that failed.
        from: Arc<str>,
        /// The alternative tried next.
        to: Arc<str>,
        /// The failure that caused it.
        class: ErrorClass,
    },
    /// An answer with a mistake the target can see was sent back to it to correct
    /// (see [`crate::correct`]).
    CorrectionRound {
        /// The target asked again.
        target: Arc<str>,
        /// 1 for the first correction.
        round: u32,
        /// The mistake's class.
        class: ErrorClass,
    },
    /// A budget was charged.
    BudgetCharged {
        /// The budget's name (run, step, API key...).
        budget: Arc<str>,
        /// What was charged.
        kind: BudgetKind,
        /// How much.
        amount: u64,
        /// What is left of the limit, if the kind has one.
        remaining: Option<u64>,
    },
    /// A charge was refused: the budget would have been exceeded.
    BudgetExceeded {
        /// The budget's name.
        budget: Arc<str>,
        /// What was asked for.
        kind: BudgetKind,
        /// How much.
        requested: u64,
        /// What was left.
        remaining: u64,
    },
    /// The loop guard stopped a call.
    LoopDetected {
        /// The target of the stopped call.
        target: Arc<str>,
        /// What was detected, in words.
        reason: String,
    },
}

impl Event {
    /// The event's type name as written in the journal (`retry_scheduled`).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::AttemptStarted { .. } => "attempt_started",
            Event::AttemptEnded { .. } => "attempt_ended",
            Event::FaultInjected { .. } => "fault_injected",
            Event::SchemaDrift { .. } => "schema_drift",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::RetryRefused { .. } => "retry_refused",
            Event::BreakerTransition { .. } => "breaker_transition",
            Event::FallbackTaken { .. } => "fallback_taken",
            Event::CorrectionRound { .. } => "correction_round",
            Event::BudgetCharged { .. } => "budget_charged",
            Event::BudgetExceeded { .. } => "budget_exceeded",
            Event::LoopDetected { .. } => "loop_detected",
        }
    }
}

/// Receives every event. The journal implements it to make them durable.
///
/// `record` is called on the hot path, inside policy code: it must not block. A durable
/// sink hands the event to a writer (a channel) and returns.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Records one event.
    fn record(&self, event: &Event);
}

/// A sink that drops events (tracing still sees them).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn record(&self, _event: &Event) {}
}

/// Several sinks, each recording every event in turn (the journal's and the alert
/// router's).
#[derive(Debug, Default, Clone)]
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn record(&self, event: &Event) {
        for sink in &self.0 {
            sink.record(event);
        }
    }
}

/// A sink that keeps events in memory: for tests and small tools.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl EventSink for MemorySink {
    fn record(&self, event: &Event) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(event.clone());
    }
}

/// Sends `event` to tracing and to `sink`.
pub fn emit(sink: &dyn EventSink, event: Event) {
    trace_event(&event);
    sink.record(&event);
}

fn trace_event(event: &Event) {
    match event {
        Event::AttemptStarted { target, attempt } => {
            tracing::debug!(keel.target = %target, keel.attempt = i64::from(*attempt), "attempt started");
        }
        Event::AttemptEnded { target, attempt, outcome, latency } => match outcome {
            AttemptOutcome::Ok => tracing::debug!(
                keel.target = %target, keel.attempt = i64::from(*attempt),
                latency_ms = latency.as_secs_f64() * 1e3, "attempt ok"
            ),
            AttemptOutcome::Failed(class) => tracing::info!(
                keel.target = %target, keel.attempt = i64::from(*attempt), keel.error_class = %class,
                latency_ms = latency.as_secs_f64() * 1e3, "attempt failed"
            ),
        },
        Event::RetryScheduled { target, attempt, class, delay, reason } => tracing::info!(
            keel.target = %target, keel.attempt = i64::from(*attempt), keel.error_class = %class,
            keel.retry.delay = delay.as_secs_f64(), delay_ms = delay.as_secs_f64() * 1e3,
            reason = ?reason, "retry scheduled"
        ),
        Event::RetryRefused { target, attempt, class, reason } => tracing::info!(
            keel.target = %target, keel.attempt = i64::from(*attempt), keel.error_class = %class,
            reason = %reason, "retry refused"
        ),
        Event::BreakerTransition { target, from, to } => tracing::warn!(
            keel.target = %target, from = ?from, to = ?to, keel.breaker.state = to.as_str(),
            "circuit breaker transition"
        ),
        Event::FallbackTaken { from, to, class } => tracing::warn!(
            keel.target = %from, fallback = %to, keel.fallback.from = %from, keel.fallback.to = %to,
            keel.error_class = %class, "fallback taken"
        ),
        Event::CorrectionRound { target, round, class } => tracing::info!(
            keel.target = %target, keel.correction.round = i64::from(*round), keel.error_class = %class,
            "correction round: the mistake is sent back"
        ),
        Event::BudgetCharged { budget, kind, amount, remaining } => tracing::trace!(
            budget = %budget, kind = ?kind, amount, remaining = ?remaining, "budget charged"
        ),
        Event::BudgetExceeded { budget, kind, requested, remaining } => tracing::warn!(
            budget = %budget, kind = ?kind, requested, remaining, "budget exceeded"
        ),
        Event::LoopDetected { target, reason } => {
            tracing::warn!(keel.target = %target, reason = %reason, "loop detected");
        }
        Event::FaultInjected { target, attempt, fault } => tracing::info!(
            keel.target = %target, keel.attempt = attempt, fault = ?fault, "fault injected"
        ),
        Event::SchemaDrift { target, shape, usual } => tracing::warn!(
            keel.target = %target, shape = %shape, usual = %usual, "an answer in an unusual shape"
        ),
    }
}
