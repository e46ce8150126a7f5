//! Alert routing: failures, by class and target, counted over sliding windows; an
//! incident opened at a rule's threshold and resolved when its window clears; each
//! trigger and resolve delivered to PagerDuty (Events v2), Slack or a webhook.
//!
//! Why a router and not a sink per alert: the call path must never wait for, or be
//! slowed by, an alert. [`AlertRouter`] is a keel-core [`EventSink`] fed by the one
//! event path (the pipelines' events, as the journal and `/metrics` see them); its
//! `record` only pushes onto a bounded channel. The router task counts
//! ([`rules::Incidents`], pure) and hands changes to one queue per sink, which a
//! worker empties in order under keel-core's retry policy ([`sink`]).
//!
//! What counts as a failure: a failed attempt (its class), a breaker opening
//! (`circuit_open`), a budget refusal (`budget_exceeded`, the budget as target) and a
//! detected loop (`loop_detected`).

pub mod config;
pub mod rules;
pub mod sink;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use keel_core::{AttemptOutcome, BreakerState, Clock, ErrorClass, Event, EventSink};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{Alerts, AlertsConfig, Rule, Severity, SinkKind};
use rules::{Change, Incidents};
use sink::{Action, Delivery, Queue};

/// Failures waiting for the router at most; past it they are dropped and counted.
pub const CHANNEL: usize = 8192;

enum Msg {
    Failure { at: Instant, class: ErrorClass, target: Arc<str> },
    Check(oneshot::Sender<usize>),
    Stop,
}

/// The [`EventSink`] that feeds the router. Cheap to clone into every sink chain.
#[derive(Debug)]
pub struct AlertRouter {
    tx: mpsc::Sender<Msg>,
    clock: Arc<dyn Clock>,
    dropped: AtomicU64,
    open: Arc<AtomicUsize>,
    /// Injected faults whose attempt has not ended yet, by (target, attempt): their
    /// failures are drills, not incidents, and page nobody.
    injected: std::sync::Mutex<std::collections::HashMap<(Arc<str>, u32), u32>>,
    /// How many such attempts are pending: with none (no drill running), an attempt's
    /// end takes no lock.
    pending: AtomicUsize,
}

impl AlertRouter {
    /// Whether `event` is the failure of an attempt a fault was injected into (and
    /// forgets it). Concurrent calls of one target may swap which of their failures
    /// is skipped, never how many.
    fn drill(&self, event: &Event) -> bool {
        if matches!(event, Event::AttemptEnded { .. }) && self.pending.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut injected = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::FaultInjected { target, attempt, .. } => {
                if injected.len() < 10_000 {
                    *injected.entry((target.clone(), *attempt)).or_default() += 1;
                    self.pending.fetch_add(1, Ordering::AcqRel);
                }
                true
            }
            Event::AttemptEnded { target, attempt, .. } => {
                let key = (target.clone(), *attempt);
                let drill = match injected.get_mut(&key) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        true
                    }
                    Some(_) => {
                        injected.remove(&key);
                        true
                    }
                    None => false,
                };
                if drill {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
                drill
            }
            _ => false,
        }
    }
}

impl AlertRouter {
    /// Incidents open now (as of the router's last change).
    pub fn open_incidents(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Failures dropped because the router was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Checks every open incident now (as the periodic check does) and answers how
    /// many are open after it; for tests and shutdown.
    pub async fn check(&self) -> Option<usize> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Check(tx)).await.ok()?;
        rx.await.ok()
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// The failure an event reports, if it reports one.
pub fn failure_of(event: &Event) -> Option<(ErrorClass, &Arc<str>)> {
    match event {
        Event::AttemptEnded { target, outcome: AttemptOutcome::Failed(class), .. } => Some((*class, target)),
        Event::BreakerTransition { target, to: BreakerState::Open, .. } => {
            Some((ErrorClass::CircuitOpen, target))
        }
        Event::BudgetExceeded { budget, .. } => Some((ErrorClass::BudgetExceeded, budget)),
        Event::LoopDetected { target, .. } => Some((ErrorClass::LoopDetected, target)),
        Event::AttemptStarted { .. }
        | Event::AttemptEnded { .. }
        | Event::RetryScheduled { .. }
        | Event::RetryRefused { .. }
        | Event::BreakerTransition { .. }
        | Event::FallbackTaken { .. }
        | Event::CorrectionRound { .. }
        | Event::BudgetCharged { .. }
        | Event::SchemaDrift { .. }
        | Event::FaultInjected { .. } => None,
    }
}

impl EventSink for AlertRouter {
    fn record(&self, event: &Event) {
        if matches!(event, Event::FaultInjected { .. } | Event::AttemptEnded { .. }) && self.drill(event) {
            return;
        }
        if let Some((class, target)) = failure_of(event) {
            let msg = Msg::Failure { at: self.clock.now(), class, target: target.clone() };
            if self.tx.try_send(msg).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The router's tasks; [`shutdown`](Self::shutdown) stops them and lets the sinks
/// deliver what is queued.
#[derive(Debug)]
pub struct AlertTasks {
    tx: mpsc::Sender<Msg>,
    router: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    queues: Vec<(String, Arc<Queue>)>,
}

impl AlertTasks {
    /// Deliveries dropped by full queues, by sink.
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.queues.iter().map(|(n, q)| (n.clone(), q.dropped.load(Ordering::Relaxed))).collect()
    }

    /// Stops routing, then waits up to `grace` for the queued deliveries.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.tx.send(Msg::Stop).await;
        let _ = self.router.await;
        let all = futures_join(self.workers);
        if tokio::time::timeout(grace, all).await.is_err() {
            let left: usize = self.queues.iter().map(|(_, q)| q.len()).sum();
            tracing::warn!(target: "keel::alert", left, "alert deliveries still queued at shutdown");
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Starts the router and one worker per sink on the current tokio runtime.
/// Windows are measured on `clock`; deliveries' timeouts and backoff on tokio's.
pub fn spawn(alerts: Alerts, clock: Arc<dyn Clock>) -> (Arc<AlertRouter>, AlertTasks) {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let queues: Vec<(String, Arc<Queue>)> =
        alerts.sinks.iter().map(|s| (s.name.clone(), Queue::new(s.queue))).collect();
    let delivery_clock: Arc<dyn Clock> = Arc::new(keel_core::TokioClock::new());
    let workers = alerts
        .sinks
        .iter()
        .zip(&queues)
        .map(|(s, (_, q))| tokio::spawn(sink::worker(s.clone(), q.clone(), delivery_clock.clone())))
        .collect();
    let sink_queues: Vec<Arc<Queue>> = queues.iter().map(|(_, q)| q.clone()).collect();
    let open = Arc::new(AtomicUsize::new(0));
    let router = tokio::spawn(route(
        Incidents::new(alerts.rules),
        rx,
        sink_queues,
        alerts.check_every,
        clock.clone(),
        open.clone(),
    ));
    let handle = Arc::new(AlertRouter {
        tx: tx.clone(),
        clock,
        dropped: AtomicU64::new(0),
        open,
        injected: std::sync::Mutex::default(),
        pending: AtomicUsize::new(0),
    });
    (handle, AlertTasks { tx, router, workers, queues })
}

async fn route(
    mut incidents: Incidents,
    mut rx: mpsc::Receiver<Msg>,
    queues: Vec<Arc<Queue>>,
    check_every: Duration,
    clock: Arc<dyn Clock>,
    open: Arc<AtomicUsize>,
) {
    let mut interval = tokio::time::interval(check_every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changes = tokio::select! {
            msg = rx.recv() => match msg {
                None | Some(Msg::Stop) => break,
                Some(Msg::Failure { at, class, target }) => incidents.observe(at, class, &target),
                Some(Msg::Check(ack)) => {
                    let changes = incidents.tick(clock.now());
                    open.store(incidents.open(), Ordering::Relaxed);
                    dispatch(&incidents, &queues, changes);
                    let _ = ack.send(incidents.open());
                    continue;
                }
            },
            _ = interval.tick() => incidents.tick(clock.now()),
        };
        if !changes.is_empty() {
            // Before the deliveries: whoever sees one sees the count that caused it.
            open.store(incidents.open(), Ordering::Relaxed);
            dispatch(&incidents, &queues, changes);
        }
    }
    for q in &queues {
        q.close();
    }
}

fn dispatch(incidents: &Incidents, queues: &[Arc<Queue>], changes: Vec<Change>) {
    for change in changes {
        let (rule_index, delivery) = match change {
            Change::Trigger { rule, key, class, target, count } => {
                let r = &incidents.rules()[rule];
                tracing::warn!(
                    target: "keel::alert", rule = %r.name, key = %key, keel.error_class = %class,
                    count, "incident opened"
                );
                (rule, delivery(r, Action::Trigger, key, Some(class), Some(target), count))
            }
            Change::Resolve { rule, key } => {
                let r = &incidents.rules()[rule];
                tracing::info!(target: "keel::alert", rule = %r.name, key = %key, "incident resolved");
                (rule, delivery(r, Action::Resolve, key, None, None, 0))
            }
        };
        for &i in &incidents.rules()[rule_index].sinks {
            if let Some(q) = queues.get(i) {
                q.push(delivery.clone());
            }
        }
    }
}

fn delivery(
    rule: &Rule,
    action: Action,
    key: String,
    class: Option<ErrorClass>,
    target: Option<String>,
    count: u32,
) -> Delivery {
    Delivery {
        action,
        dedup_key: format!("keel/{}/{key}", rule.name),
        rule: rule.name.clone(),
        key,
        class,
        target,
        severity: rule.severity,
        count,
        window: rule.window,
    }
}
