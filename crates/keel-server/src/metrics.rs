//! Prometheus metrics, fed by the runner's events.
//!
//! The recorder is the server's own (not the process-global one), so several servers
//! in one process (tests) do not share counters.

use std::collections::HashMap;
use std::sync::Mutex;

use keel_core::{AttemptOutcome, BreakerState, Event};
use keel_journal::{JournalEvent, RunState};
use keel_runtime::runner::Observer;
use metrics::{Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::sync::broadcast;

const META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// The server's metrics and its change feed.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    started: Mutex<HashMap<String, tokio::time::Instant>>,
    changes: broadcast::Sender<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect::<Vec<_>>())
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0])
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(HTTP_DURATION.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0,
                    ],
                )
            })
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        describe(&recorder);
        keel_gateway::MetricsSnapshot::describe(&recorder);
        let handle = recorder.handle();
        let (changes, _) = broadcast::channel(256);
        Self { recorder, handle, started: Mutex::default(), changes }
    }

    /// Adds 1 to a counter.
    pub fn count(&self, name: &'static str, labels: &[(&'static str, String)]) {
        self.recorder.register_counter(&key(name, labels), &META).increment(1);
    }

    /// Counts one HTTP request and records its latency, by route pattern (never the
    /// path: ids stay out, and the series stay few), method and status.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: std::time::Duration) {
        let labels =
            [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
        self.recorder.register_counter(&key("keel_http_requests_total", &labels), &META).increment(1);
        self.recorder
            .register_histogram(&key(HTTP_DURATION, &labels[1..2]), &META)
            .record(elapsed.as_secs_f64());
    }

    /// Sets a gauge.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)], value: f64) {
        self.recorder.register_gauge(&key(name, labels), &META).set(value);
    }

    /// The registry, for series counted elsewhere and written in at scrape time
    /// (the gateway's).
    pub fn recorder(&self) -> &PrometheusRecorder {
        &self.recorder
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Run ids whose state changed, as they change (the inbox's live feed).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The HTTP request latency histogram (buckets of its own: requests take
/// milliseconds, runs minutes).
const HTTP_DURATION: &str = "keel_http_request_duration_seconds";

/// Every series' `# HELP` (and unit): a series without one is a bug
/// (`tests/it/api.rs` checks the exposition).
pub const SERIES: &[(&str, &str)] = &[
    ("keel_calls_total", "Attempts made on each target (tools), by target."),
    ("keel_errors_total", "Failed attempts by target and error class."),
    ("keel_retries_total", "Retries scheduled by target and error class."),
    ("keel_breaker_state", "The target's circuit breaker: 0 closed, 1 half-open, 2 open."),
    ("keel_fallbacks_total", "Fallbacks taken, by the alternative left and the one tried."),
    ("keel_loops_total", "Calls stopped by the loop guard, by target."),
    ("keel_faults_injected_total", "Faults injected on purpose (drills), by target and fault."),
    ("keel_schema_drift_total", "Answers in a shape unlike the target's usual ones, by target."),
    ("keel_corrections_total", "Answers sent back to their target to correct, by target and class."),
    ("keel_budget_exceeded_total", "Charges a budget refused, by budget."),
    ("keel_http_requests_total", "HTTP requests served, by route pattern, method and status."),
    (HTTP_DURATION, "HTTP request latency by route pattern, in seconds."),
    ("keel_run_duration_seconds", "Wall time from a run's start to its end, in seconds."),
    ("keel_runs_total", "Runs that ended, by final state."),
    ("keel_run_takeovers_total", "Runs taken over from a holder whose lease expired."),
    ("keel_approvals_waiting", "Approvals waiting for a person."),
    ("keel_tickets_open", "Escalations (tickets) waiting for a person."),
    ("keel_incidents_open", "Alert incidents open (one per rule and key)."),
    ("keel_alert_failures_dropped", "Failures the alert router dropped because it was behind."),
];

fn describe(recorder: &PrometheusRecorder) {
    for (name, help) in SERIES {
        let unit = name.ends_with("_seconds").then_some(metrics::Unit::Seconds);
        if name.ends_with("_total") {
            recorder.describe_counter((*name).into(), unit, (*help).into());
        } else if name.ends_with("_seconds") {
            recorder.describe_histogram((*name).into(), unit, (*help).into());
        } else {
            recorder.describe_gauge((*name).into(), unit, (*help).into());
        }
    }
}

fn breaker_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

/// What a person should know of: held actions, escalations.
fn log_decision(run_id: &str, event: &JournalEvent) {
    match event {
        JournalEvent::ApprovalRequested { approval_id, tool, .. } => tracing::warn!(
            target: "keel::decision", run = run_id, approval = %approval_id, tool = %tool,
            "approval requested: the action waits for a person"
        ),
        JournalEvent::ApprovalDecided { approval_id, decision, by } => tracing::info!(
            target: "keel::decision", run = run_id, approval = %approval_id, decision = decision.as_str(), by = %by,
            "approval decided"
        ),
        JournalEvent::TicketOpened { ticket_id, class, .. } => tracing::warn!(
            target: "keel::decision", run = run_id, ticket = %ticket_id, class = class.as_str(),
            "ticket opened: the run escalated to a person"
        ),
        _ => {}
    }
}

impl Observer for Metrics {
    fn event(&self, run_id: &str, event: &JournalEvent) {
        match event {
            JournalEvent::Policy { event, .. } => match event {
                Event::AttemptEnded { target, outcome, .. } => {
                    let t = target.to_string();
                    self.count("keel_calls_total", &[("target", t.clone())]);
                    if let AttemptOutcome::Failed(class) = outcome {
                        self.count("keel_errors_total", &[("target", t), ("class", class.to_string())]);
                    }
                }
                Event::RetryScheduled { target, class, .. } => {
                    self.count(
                        "keel_retries_total",
                        &[("target", target.to_string()), ("class", class.to_string())],
                    );
                }
                Event::BreakerTransition { target, to, .. } => {
                    self.gauge("keel_breaker_state", &[("target", target.to_string())], breaker_value(*to));
                }
                Event::FallbackTaken { from, to, .. } => {
                    self.count("keel_fallbacks_total", &[("from", from.to_string()), ("to", to.to_string())]);
                }
                Event::LoopDetected { target, .. } => {
                    self.count("keel_loops_total", &[("target", target.to_string())])
                }
                Event::CorrectionRound { target, class, .. } => self.count(
                    "keel_corrections_total",
                    &[("target", target.to_string()), ("class", class.to_string())],
                ),
                Event::BudgetExceeded { budget, .. } => {
                    self.count("keel_budget_exceeded_total", &[("budget", budget.to_string())]);
                }
                Event::FaultInjected { target, fault, .. } => self.count(
                    "keel_faults_injected_total",
                    &[("target", target.to_string()), ("fault", format!("{fault:?}").to_lowercase())],
                ),
                Event::SchemaDrift { target, .. } => {
                    self.count("keel_schema_drift_total", &[("target", target.to_string())]);
                }
                Event::AttemptStarted { .. } | Event::RetryRefused { .. } | Event::BudgetCharged { .. } => {}
            },
            JournalEvent::RunStateChanged { state, .. } => {
                let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
                match state {
                    RunState::Running => {
                        started.entry(run_id.to_owned()).or_insert_with(tokio::time::Instant::now);
                    }
                    s if s.is_terminal() => {
                        if let Some(t0) = started.remove(run_id) {
                            self.recorder
                                .register_histogram(
                                    &key("keel_run_duration_seconds", &[("state", s.as_str().into())]),
                                    &META,
                                )
                                .record(t0.elapsed().as_secs_f64());
                        }
                        self.count("keel_runs_total", &[("state", s.as_str().into())]);
                    }
                    _ => {}
                }
                let _ = self.changes.send(run_id.to_owned());
            }
            JournalEvent::ApprovalRequested { .. }
            | JournalEvent::ApprovalDecided { .. }
            | JournalEvent::TicketOpened { .. }
            | JournalEvent::TicketResolved { .. }
            | JournalEvent::StepFinished { .. } => {
                log_decision(run_id, event);
                let _ = self.changes.send(run_id.to_owned());
            }
            JournalEvent::RunTakenOver { .. } => {
                self.count("keel_run_takeovers_total", &[]);
                let _ = self.changes.send(run_id.to_owned());
            }
            JournalEvent::RunCreated { .. }
            | JournalEvent::StepStarted { .. }
            | JournalEvent::ProgramRecorded { .. }
            | JournalEvent::ModelCalled { .. }
            | JournalEvent::AttemptAbandoned { .. } => {}
        }
    }
}
