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
//!
//! Around the pure counting, the router keeps what needs the wall clock: triggers held
//! for a rule's quiet hours ([`quiet`]), the digest's tally ([`digest`]), and the
//! incidents' ids for the record ([`log`]).

pub mod config;
pub mod digest;
pub mod log;
pub mod quiet;
pub mod rules;
pub mod sink;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::{AttemptOutcome, BreakerState, Clock, ErrorClass, Event, EventSink, RefusalReason};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{Alerts, AlertsConfig, Rule, Severity, SinkKind};
use digest::Tally;
use log::LogTx;
pub use log::{AlertEntry, AlertLog, EntryKind};
use rules::{Change, Incidents};
use sink::{Action, Delivery, Queue};

/// Failures waiting for the router at most; past it they are dropped and counted.
pub const CHANNEL: usize = 8192;

enum Msg {
    Failure { at: Instant, class: ErrorClass, target: Arc<str> },
    Exhausted { class: ErrorClass, target: Arc<str> },
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
    /// Whether a digest counts exhausted retries.
    digest: bool,
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
        let msg = match (failure_of(event), event) {
            (Some((class, target)), _) => {
                Msg::Failure { at: self.clock.now(), class, target: target.clone() }
            }
            (
                None,
                Event::RetryRefused {
                    target, class, reason: RefusalReason::AttemptsExhausted { .. }, ..
                },
            ) if self.digest => Msg::Exhausted { class: *class, target: target.clone() },
            (None, _) => return,
        };
        if self.tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The router's tasks; [`shutdown`](Self::shutdown) stops them and lets the sinks
/// deliver what is queued and the log write what it holds.
#[derive(Debug)]
pub struct AlertTasks {
    tx: mpsc::Sender<Msg>,
    router: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    queues: Vec<(String, Arc<Queue>)>,
    log: Option<(LogTx, JoinHandle<()>)>,
}

impl AlertTasks {
    /// Deliveries dropped by full queues, by sink.
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.queues.iter().map(|(n, q)| (n.clone(), q.dropped.load(Ordering::Relaxed))).collect()
    }

    /// Entries the alert log dropped (its writer behind, or its store failing).
    pub fn log_dropped(&self) -> u64 {
        self.log.as_ref().map_or(0, |(tx, _)| tx.dropped())
    }

    /// Stops routing, then waits up to `grace` for the queued deliveries and the
    /// log's last writes.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.tx.send(Msg::Stop).await;
        let _ = self.router.await;
        let deadline = tokio::time::Instant::now() + grace;
        let all = futures_join(self.workers);
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            let left: usize = self.queues.iter().map(|(_, q)| q.len()).sum();
            tracing::warn!(target: "keel::alert", left, "alert deliveries still queued at shutdown");
        }
        if let Some((tx, task)) = self.log {
            // The workers' senders are gone with them (or abandoned): this was the last.
            drop(tx);
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(target: "keel::alert", "alert records still unwritten at shutdown");
            }
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Starts the router and one worker per sink on the current tokio runtime, with no
/// record kept ([`spawn_logged`] keeps one).
pub fn spawn(alerts: Alerts, clock: Arc<dyn Clock>) -> (Arc<AlertRouter>, AlertTasks) {
    start(alerts, clock, None, Vec::new())
}

/// An incident the record says is open (a process before this one opened it).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIncident {
    /// Its id in the record.
    pub id: String,
    /// Its rule's name.
    pub rule: String,
    /// Its key.
    pub key: String,
    /// The class that opened it.
    pub class: Option<ErrorClass>,
    /// Its target.
    pub target: Option<String>,
    /// Failures in the window when it opened.
    pub count: u32,
    /// Whether its trigger was still held for quiet hours (never sent).
    pub held: bool,
}

/// Starts the router and one worker per sink on the current tokio runtime; every
/// incident change and delivery outcome goes to `log`, through a writer task of its
/// own. Windows, quiet hours and digests are measured on `clock`; deliveries'
/// timeouts and backoff on tokio's.
///
/// `open` are the incidents the record holds open (from before a restart): each is
/// taken over (`adopted` in the record) as open from now, so it resolves — with a
/// resolve to its sinks — after a whole window without failures, and a trigger still
/// held stays held until its quiet hours end. One whose rule is gone is closed in the
/// record (`resolved`), sending nothing.
pub fn spawn_logged(
    alerts: Alerts,
    clock: Arc<dyn Clock>,
    log: Arc<dyn AlertLog>,
    open: Vec<OpenIncident>,
) -> (Arc<AlertRouter>, AlertTasks) {
    start(alerts, clock, Some(log), open)
}

fn start(
    alerts: Alerts,
    clock: Arc<dyn Clock>,
    log: Option<Arc<dyn AlertLog>>,
    adopted: Vec<OpenIncident>,
) -> (Arc<AlertRouter>, AlertTasks) {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let log = log.map(log::start);
    let log_tx = log.as_ref().map(|(tx, _)| tx.clone()).unwrap_or_default();
    let queues: Vec<(String, Arc<Queue>)> =
        alerts.sinks.iter().map(|s| (s.name.clone(), Queue::new(s.queue))).collect();
    let delivery_clock: Arc<dyn Clock> = Arc::new(keel_core::TokioClock::new());
    let workers = alerts
        .sinks
        .iter()
        .zip(&queues)
        .map(|(s, (_, q))| {
            tokio::spawn(sink::worker(
                s.clone(),
                q.clone(),
                delivery_clock.clone(),
                clock.clone(),
                log_tx.clone(),
            ))
        })
        .collect();
    let open = Arc::new(AtomicUsize::new(0));
    let digest = alerts.digest.is_some();
    let mut state = Routing {
        sinks: queues.clone(),
        tally: alerts.digest.map(|d| (d, Tally::new(clock.wall()), clock.now())),
        incidents: Incidents::new(alerts.rules),
        held: HashMap::new(),
        ids: HashMap::new(),
        clock: clock.clone(),
        open: open.clone(),
        log: log_tx,
    };
    for incident in adopted {
        state.adopt(incident);
    }
    let router = tokio::spawn(route(state, rx, alerts.check_every));
    let handle = Arc::new(AlertRouter {
        tx: tx.clone(),
        clock,
        dropped: AtomicU64::new(0),
        open,
        injected: std::sync::Mutex::default(),
        pending: AtomicUsize::new(0),
        digest,
    });
    (handle, AlertTasks { tx, router, workers, queues, log })
}

/// A trigger held for quiet hours.
#[derive(Debug)]
struct Held {
    until: SystemTime,
    delivery: Delivery,
}

/// What the router task owns.
struct Routing {
    incidents: Incidents,
    sinks: Vec<(String, Arc<Queue>)>,
    /// Held triggers, by (rule, key).
    held: HashMap<(usize, String), Held>,
    /// Open incidents' ids, by (rule, key).
    ids: HashMap<(usize, String), String>,
    /// The digest, its tally, and when the period started (monotonic).
    tally: Option<(config::Digest, Tally, Instant)>,
    clock: Arc<dyn Clock>,
    open: Arc<AtomicUsize>,
    log: LogTx,
}

async fn route(mut state: Routing, mut rx: mpsc::Receiver<Msg>, check_every: Duration) {
    let mut interval = tokio::time::interval(check_every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None | Some(Msg::Stop) => break,
                Some(Msg::Failure { at, class, target }) => state.failure(at, class, &target),
                Some(Msg::Exhausted { class, target }) => state.exhausted(class, &target),
                Some(Msg::Check(ack)) => {
                    state.tick();
                    let _ = ack.send(state.incidents.open());
                }
            },
            _ = interval.tick() => state.tick(),
        }
    }
    for (_, q) in &state.sinks {
        q.close();
    }
}

fn wall_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

impl Routing {
    /// Takes over an incident open before a restart (see [`spawn_logged`]).
    fn adopt(&mut self, o: OpenIncident) {
        let wall = self.clock.wall();
        let Some(rule) = self.incidents.rules().iter().position(|r| r.name == o.rule) else {
            tracing::warn!(
                target: "keel::alert", rule = %o.rule, key = %o.key,
                "an open incident's rule is no longer configured: closed without a resolve"
            );
            self.log.send(AlertEntry {
                at: wall,
                incident: o.id,
                kind: EntryKind::Resolved,
                rule: o.rule,
                key: o.key,
                severity: Severity::Info,
                class: o.class,
                target: o.target,
                count: o.count,
                sink: None,
                action: None,
                detail: Some("its rule is no longer configured; nothing sent".to_owned()),
            });
            return;
        };
        self.incidents.adopt(self.clock.now(), rule, &o.key);
        self.open.store(self.incidents.open(), Ordering::Relaxed);
        let r = &self.incidents.rules()[rule];
        let d = delivery(r, Action::Trigger, o.key.clone(), o.class, o.target, o.count, o.id.clone());
        let detail = if o.held { "after a restart; its trigger is still held" } else { "after a restart" };
        self.record(&d, EntryKind::Adopted, Some(detail.to_owned()));
        if o.held {
            // Held until its quiet hours end: now, if they are over (or it is critical now).
            let until = r.held_until(wall).unwrap_or(wall);
            self.held.insert((rule, o.key.clone()), Held { until, delivery: d });
        }
        self.ids.insert((rule, o.key), o.id);
    }

    fn failure(&mut self, at: Instant, class: ErrorClass, target: &str) {
        let changes = self.incidents.observe(at, class, target);
        if changes.is_empty() && !self.incidents.covers(class, target) {
            if let Some((_, tally, _)) = &mut self.tally {
                tally.failure(class, target);
            }
        }
        self.apply(changes);
    }

    fn exhausted(&mut self, class: ErrorClass, target: &str) {
        if !self.incidents.covers(class, target) {
            if let Some((_, tally, _)) = &mut self.tally {
                tally.exhausted(class, target);
            }
        }
    }

    /// The periodic check: resolves, held triggers whose quiet hours ended, the digest.
    fn tick(&mut self) {
        let changes = self.incidents.tick(self.clock.now());
        self.apply(changes);
        let wall = self.clock.wall();
        let due: Vec<(usize, String)> =
            self.held.iter().filter(|(_, h)| h.until <= wall).map(|(k, _)| k.clone()).collect();
        for k in due {
            if let Some(h) = self.held.remove(&k) {
                tracing::info!(
                    target: "keel::alert", rule = %h.delivery.rule, key = %h.delivery.key,
                    "quiet hours over; incident still open: trigger sent"
                );
                self.record(&h.delivery, EntryKind::Released, None);
                self.send(k.0, &h.delivery);
            }
        }
        self.digest();
    }

    fn digest(&mut self) {
        let now = self.clock.now();
        let Some((config, tally, since)) = &mut self.tally else { return };
        if now.saturating_duration_since(*since) < config.every {
            return;
        }
        *since = now;
        let wall = self.clock.wall();
        let Some(report) = tally.take(wall) else { return };
        let (every, index) = (config.every, config.sink);
        let delivery = Delivery {
            action: Action::Digest,
            rule: "digest".to_owned(),
            key: humantime::format_duration(every).to_string(),
            dedup_key: format!("keel/digest/{}", wall_ms(wall)),
            class: None,
            target: None,
            severity: Severity::Info,
            count: u32::try_from(report.failures() + report.exhausted()).unwrap_or(u32::MAX),
            window: every,
            incident: format!("digest@{}", wall_ms(wall)),
            digest: Some(Arc::new(report)),
        };
        self.push(index, delivery);
    }

    fn apply(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        // Before the deliveries: whoever sees one sees the count that caused it.
        self.open.store(self.incidents.open(), Ordering::Relaxed);
        let wall = self.clock.wall();
        for change in changes {
            match change {
                Change::Trigger { rule, key, class, target, count } => {
                    let r = &self.incidents.rules()[rule];
                    tracing::warn!(
                        target: "keel::alert", rule = %r.name, key = %key, keel.error_class = %class,
                        count, "incident opened"
                    );
                    if let Some((_, tally, _)) = &mut self.tally {
                        tally.told(class, &target);
                    }
                    let id = format!("keel/{}/{key}@{}", r.name, wall_ms(wall));
                    let d = delivery(
                        r,
                        Action::Trigger,
                        key.clone(),
                        Some(class),
                        Some(target),
                        count,
                        id.clone(),
                    );
                    let held = r.held_until(wall);
                    self.ids.insert((rule, key.clone()), id);
                    self.record(&d, EntryKind::Triggered, None);
                    match held {
                        Some(until) => {
                            let at = humantime::format_rfc3339_seconds(until).to_string();
                            tracing::info!(
                                target: "keel::alert", rule = %d.rule, key = %d.key, until = %at,
                                "quiet hours: trigger held"
                            );
                            self.record(&d, EntryKind::Held, Some(format!("until {at}")));
                            self.held.insert((rule, key), Held { until, delivery: d });
                        }
                        None => self.send(rule, &d),
                    }
                }
                Change::Resolve { rule, key } => {
                    let r = &self.incidents.rules()[rule];
                    tracing::info!(target: "keel::alert", rule = %r.name, key = %key, "incident resolved");
                    let id = self.ids.remove(&(rule, key.clone())).unwrap_or_default();
                    let d = delivery(r, Action::Resolve, key.clone(), None, None, 0, id);
                    if self.held.remove(&(rule, key)).is_some() {
                        // Its trigger was never sent: neither is its resolve.
                        self.record(&d, EntryKind::Cancelled, Some("resolved during quiet hours".into()));
                    } else {
                        self.record(&d, EntryKind::Resolved, None);
                        self.send(rule, &d);
                    }
                }
            }
        }
    }

    fn record(&self, d: &Delivery, kind: EntryKind, detail: Option<String>) {
        let mut e = sink::entry(d, "", kind, detail, self.clock.wall());
        e.sink = None;
        e.action = None;
        self.log.send(e);
    }

    /// `d` to each of its rule's sinks.
    fn send(&self, rule: usize, d: &Delivery) {
        for &i in &self.incidents.rules()[rule].sinks {
            self.push(i, d.clone());
        }
    }

    fn push(&self, sink: usize, d: Delivery) {
        let Some((name, q)) = self.sinks.get(sink) else { return };
        if let Some(gone) = q.push(d) {
            tracing::warn!(
                target: "keel::alert", sink = %name, rule = %gone.rule, key = %gone.key,
                action = gone.action.as_str(), "alert queue full: oldest delivery dropped"
            );
            self.log.send(sink::entry(&gone, name, EntryKind::Dropped, None, self.clock.wall()));
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
    incident: String,
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
        incident,
        digest: None,
    }
}
