//! The runner: carries a plan's run out, failure-first, from the journal alone.
//!
//! A run's plan and input are its first event, so any process can pick it up: `keel
//! run` starts it, `keel runs resume` (after a crash, an approval or a ticket) and the
//! server's workers continue it. Driving a run takes its lease, reads what the journal
//! says is done, and goes on from the first unfinished step. Each step goes through:
//!
//! 1. its parameters, rendered from the input and earlier outputs, checked against the
//!    tool's schema (a bad call fails before anything runs);
//! 2. the approval rule: an approval is bound to the tool and the digest of the
//!    arguments; a pending one stops the drive (waiting holds no process), an expired
//!    one takes the configured outcome, a denied one fails the step;
//! 3. the idempotency store: a key from (run, step, tool, arguments); a completed key
//!    returns the stored result instead of acting again, which is what makes a crash
//!    and a resume safe;
//! 4. the tool's policy pipeline (retries, breaker, timeouts, the run's deadline and
//!    budget);
//! 5. escalation: after `escalate_after` failed attempts of one class in the run, or a
//!    failure a person must look at, a ticket with the context package stops the run
//!    until a person says retry, skip or abort.

mod agent;
mod keys;
mod observer;
mod status;
mod step;
#[cfg(test)]
mod tests;

pub use keys::{args_digest, idempotency_key, new_id};
pub use observer::{NullObserver, Observer, Observers, PolicySink, SentryObserver};
pub use status::RunStatus;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{Breaker, Budget, BudgetKind, Clock, ConfidenceGate, ErrorClass};
use keel_journal::{Journal, JournalEvent, JournalWriter, Lease, NewRun, RunSnapshot, RunState, StepOutcome};
use serde_json::{Value, json};

use crate::config::Config;
use crate::plan::Plan;

/// Why the runner could not do its job (as opposed to a run that failed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] keel_journal::Error),
    /// No such run.
    #[error("no run `{0}`")]
    UnknownRun(String),
    /// No such approval or ticket.
    #[error("no {0}")]
    NotFound(String),
    /// Another process holds the run's lease.
    #[error("run `{0}` is being worked by another process ({1})")]
    Busy(String, String),
    /// The run's first event does not hold a plan this runner can read.
    #[error("run `{0}` has no readable plan: {1}")]
    BadRun(String, String),
    /// Something the caller asked is not possible in the run's state.
    #[error("{0}")]
    Refused(String),
}

impl keel_core::Classified for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::Journal(e) => keel_core::Classified::class(e),
            Error::UnknownRun(_) | Error::NotFound(_) => ErrorClass::NotFound,
            Error::Busy(..) => ErrorClass::Conflict,
            Error::BadRun(..) | Error::Refused(_) => ErrorClass::InvalidRequest,
        }
    }
}

/// The runner's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Carries runs out. One per process; cheap to share.
pub struct Runner {
    config: Arc<Config>,
    journal: Arc<dyn Journal>,
    writer: JournalWriter,
    clock: Arc<dyn Clock>,
    owner: String,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    gate: Arc<ConfidenceGate>,
    observer: Arc<dyn Observer>,
    /// Runs being driven by a task of this process, with their lease once taken: the
    /// lease keeps other processes out, this keeps a second task of the same process
    /// (same lease owner) out, and every event appended to the run is fenced by it.
    driving: Mutex<HashMap<String, Option<Arc<Lease>>>>,
    /// The budgets (`[run].budget`) of the runs this process drives now, by run.
    run_budgets: Mutex<HashMap<String, Arc<Budget>>>,
    /// The last good result of tools with a cached fallback.
    results: crate::tool::ResultCache,
    /// The model gateway agent runs ask: the server's (one gate, one journal), or one
    /// built from the config on first use.
    gateway: std::sync::OnceLock<Arc<keel_gateway::Gateway>>,
    /// The answer shapes each tool was seen to give in this process (agent runs).
    shapes: crate::agent::shape::Seen,
    /// The tokens correction turns cost, per strategy and error kind (agent runs).
    costs: crate::agent::correct::TokenCosts,
    /// Fault injection set on this running process (`PUT /api/faults/{tool}`), in
    /// place of the tool's configured `fault`, for the calls that start from then on.
    faults: Mutex<HashMap<String, keel_core::FaultConfig>>,
}

/// Where events that belong to no run go (a tool breaker's transitions): the journal,
/// under the process's run, and the observers.
struct ProcessSink {
    journal: keel_journal::RunSink,
    observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for ProcessSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessSink")
    }
}

impl keel_core::EventSink for ProcessSink {
    fn record(&self, event: &keel_core::Event) {
        keel_core::EventSink::record(&self.journal, event);
        self.observer.event(
            keel_gateway::journal::GATEWAY_RUN,
            &JournalEvent::Policy { step: None, event: event.clone() },
        );
    }
}

/// Where a run budget's refusals go: the run's journal (fenced by the drive's lease)
/// and the observers (live view, /metrics, alerts). Its charges are not passed on:
/// each is already in the step's events (tool costs) or the turn's record (tokens),
/// and they would be most of a run's writes.
struct RunBudgetSink {
    journal: keel_journal::RunSink,
    observer: Arc<dyn Observer>,
    run_id: String,
}

impl std::fmt::Debug for RunBudgetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunBudgetSink").field("run_id", &self.run_id).finish_non_exhaustive()
    }
}

impl keel_core::EventSink for RunBudgetSink {
    fn record(&self, event: &keel_core::Event) {
        if matches!(event, keel_core::Event::BudgetExceeded { .. }) {
            keel_core::EventSink::record(&self.journal, event);
            self.observer.event(&self.run_id, &JournalEvent::Policy { step: None, event: event.clone() });
        }
    }
}

/// Marks a run as driven by this process until dropped.
struct Driving<'a>(&'a Runner, String);

/// An event of a run handed to the journal's writer, not yet known to be durable.
struct Pending<'a> {
    runner: &'a Runner,
    run_id: &'a str,
    event: JournalEvent,
    ack: keel_journal::Ack,
}

impl Pending<'_> {
    /// Waits until the event is committed, then shows it to the observer (what is
    /// shown is already in the journal).
    ///
    /// # Errors
    /// The journal's.
    async fn durable(self) -> Result<u64> {
        let seq = self.ack.durable().await?;
        self.runner.observer.event(self.run_id, &self.event);
        Ok(seq)
    }

    /// Waits for the event in a task of its own, and shows it to the observer as soon
    /// as it is durable (a step's start is shown while the step runs, not after).
    fn committing(self) -> Committing {
        let (observer, run_id, event, ack) =
            (self.runner.observer.clone(), self.run_id.to_owned(), self.event, self.ack);
        Committing(tokio::spawn(async move {
            let seq = ack.durable().await?;
            observer.event(&run_id, &event);
            Ok(seq)
        }))
    }
}

/// A [`Pending`] event being waited for in the background.
struct Committing(tokio::task::JoinHandle<Result<u64>>);

impl Committing {
    /// Waits until the event is committed (and shown).
    ///
    /// # Errors
    /// The journal's.
    async fn durable(self) -> Result<u64> {
        match self.0.await {
            Ok(committed) => committed,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Journal(keel_journal::Error::WriterClosed)),
        }
    }
}

/// How a drive ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Drove {
    /// Where the run stands.
    pub status: RunStatus,
    /// For a plan's run that this drive completed: its last step's output and the
    /// attempts this drive made.
    pub completed: Option<(Value, u32)>,
}

impl From<RunStatus> for Drove {
    fn from(status: RunStatus) -> Self {
        Drove { status, completed: None }
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.driving.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
        self.0.run_budgets.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner for `config` on `journal`, loading the confidence gate's history.
    ///
    /// # Errors
    /// The journal's.
    pub async fn new(
        config: Arc<Config>,
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn Observer>,
    ) -> Result<Runner> {
        let gate = Arc::new(ConfidenceGate::new(config.defaults.gate.clone()));
        // The gate's history only sharpens retries: without it, the prior decides.
        match journal.load_gate_history().await {
            Ok(history) => gate.load(history),
            Err(e) => {
                tracing::warn!(error = %e, "the confidence gate's history cannot be read; using the prior")
            }
        }
        let writer = JournalWriter::spawn(journal.clone(), keel_journal::writer::DEFAULT_MAX_BATCH);
        let owner = format!("{}:{}", std::process::id(), new_id("owner"));
        Ok(Runner {
            config,
            journal,
            writer,
            clock,
            owner,
            breakers: Mutex::default(),
            gate,
            observer,
            driving: Mutex::default(),
            run_budgets: Mutex::default(),
            results: crate::tool::ResultCache::default(),
            gateway: std::sync::OnceLock::new(),
            shapes: crate::agent::shape::Seen::default(),
            costs: crate::agent::correct::TokenCosts::default(),
            faults: Mutex::default(),
        })
    }

    /// Gives agent runs `gateway` to ask (a server's own, sharing its gate and journal).
    /// Without it, the first agent run builds one from the config.
    pub fn set_gateway(&self, gateway: Arc<keel_gateway::Gateway>) {
        let _ = self.gateway.set(gateway);
    }

    /// The gateway agent runs ask.
    fn gateway(&self) -> Result<Arc<keel_gateway::Gateway>> {
        if let Some(g) = self.gateway.get() {
            return Ok(g.clone());
        }
        // Calls and decisions journaled by this runner's writer: under the agent's run
        // for its turns, the gateway's own run for the rest.
        let sink = keel_gateway::journal::DecisionsOnly(self.writer.sink(keel_gateway::journal::GATEWAY_RUN));
        let built = self
            .config
            .gateway_builder()
            .clock(self.clock.clone())
            .gate(self.gate.clone())
            .sink(Arc::new(sink))
            .journal(Arc::new(keel_gateway::WriterJournal::new(self.writer.clone())))
            .build()
            .map_err(|e| Error::Refused(format!("the model gateway cannot start: {e}")))?;
        Ok(self.gateway.get_or_init(|| Arc::new(built)).clone())
    }

    /// Records a new agent run of `task` (resolved against the config: a bad task
    /// touches nothing) and returns its id, recording the API key that started it.
    ///
    /// # Errors
    /// [`Error::Refused`] saying what is wrong with the task; the journal's.
    pub async fn create_agent(&self, task: &crate::agent::AgentTask, owner: Option<&str>) -> Result<String> {
        let spec = crate::agent::AgentSpec::resolve(task, &self.config).map_err(Error::Refused)?;
        let run_id = new_id("run");
        let deadline = self.config.run.deadline;
        let input = json!({
            "agent": spec,
            "input": {"task": spec.task},
            "deadline_ms": u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            "mode": self.config.run.mode,
            "owner": owner,
        });
        for event in [
            JournalEvent::RunCreated { name: "agent".to_owned(), input },
            JournalEvent::RunStateChanged { state: RunState::Running, reason: None },
        ] {
            self.record(&run_id, event).await?;
        }
        Ok(run_id)
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.journal
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// This runner's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Records a new run of `plan` (already checked) and returns its id. Nothing runs yet.
    ///
    /// # Errors
    /// The journal's.
    pub async fn create(&self, plan: &Plan) -> Result<String> {
        self.create_by(plan, None).await
    }

    /// Like [`create`](Self::create), recording the API key that started the run
    /// (`input.owner`, the key's name): only that key may name the run later (its
    /// model calls' `X-Keel-Run`).
    ///
    /// # Errors
    /// The journal's.
    pub async fn create_by(&self, plan: &Plan, owner: Option<&str>) -> Result<String> {
        let run_id = new_id("run");
        for event in self.creation(plan, owner) {
            self.record(&run_id, event).await?;
        }
        Ok(run_id)
    }

    /// Records a new run of `plan` under `run_id` unless a run with that id exists, in
    /// one transaction: `true` if this call created it. For ids derived from an
    /// idempotency key (`keel serve`'s invocations), so that the key's run is found by
    /// every retry, however the first try ended.
    ///
    /// # Errors
    /// The journal's.
    pub async fn create_with_id(&self, run_id: &str, plan: &Plan) -> Result<bool> {
        let events = self.creation(plan, None);
        // On a task of its own: a caller that gives up (a client hanging up) must not
        // cancel the transaction half-way — sqlx's SQLite driver can then leave the
        // one write connection inside a transaction, failing every later write.
        let (journal, id, first) = (self.journal.clone(), run_id.to_owned(), events.to_vec());
        let created = match tokio::spawn(async move { journal.create_run(&id, &first).await }).await {
            Ok(created) => created?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(Error::Journal(keel_journal::Error::WriterClosed)),
        };
        if created {
            for event in &events {
                self.observer.event(run_id, event);
            }
        }
        Ok(created)
    }

    /// Like [`create_with_id`](Self::create_with_id), and in the same transaction takes
    /// the new run's lease for this process: the run if this call created it (`None`:
    /// it existed), with the lease to [`drive_held`](Self::drive_held) it with at once
    /// (none if another process held a lease on the id already) and its snapshot.
    ///
    /// # Errors
    /// The journal's.
    pub async fn create_leased(&self, run_id: &str, plan: &Plan) -> Result<Option<NewRun>> {
        let events = self.creation(plan, None);
        // In the writer's next batch: runs created by concurrent calls commit together.
        // Queued, the creation is the writer's: a caller that gives up cancels nothing.
        let creation = keel_journal::Creation {
            run_id: run_id.to_owned(),
            events: events.to_vec(),
            lease: (self.owner.clone(), self.config.run.lease),
        };
        let created = self.writer.create(creation).await?;
        if created.is_some() {
            for event in &events {
                self.observer.event(run_id, event);
            }
        }
        Ok(created)
    }

    /// A new run's first events: its plan (and the key that started it), then `running`.
    fn creation(&self, plan: &Plan, owner: Option<&str>) -> [JournalEvent; 2] {
        let name = plan.name.clone().unwrap_or_else(|| "plan".to_owned());
        let deadline = plan.deadline.unwrap_or(self.config.run.deadline);
        let input = json!({
            "plan": plan,
            "input": plan.input,
            "deadline_ms": u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            "mode": self.config.run.mode,
            "owner": owner,
        });
        [
            JournalEvent::RunCreated { name, input },
            JournalEvent::RunStateChanged { state: RunState::Running, reason: None },
        ]
    }

    /// Appends one event durably, then shows it to the observer (what is shown is
    /// already in the journal).
    async fn record(&self, run_id: &str, event: JournalEvent) -> Result<u64> {
        self.submit(run_id, event).durable().await
    }

    /// Hands one event to the writer and returns at once: [`Pending::durable`] waits
    /// for it, then shows it to the observer.
    fn submit<'a>(&'a self, run_id: &'a str, event: JournalEvent) -> Pending<'a> {
        let new = keel_journal::NewEvent::new(run_id, event.clone()).fenced(self.fence(run_id));
        Pending { runner: self, run_id, event, ack: self.writer.submit_event(new) }
    }

    /// Records a drive's last events (`before`, then `last`) and gives its lease up, in
    /// one transaction; `released` says it was (the drive then has no lease to release).
    async fn record_last(
        &self,
        run_id: &str,
        before: Vec<JournalEvent>,
        last: JournalEvent,
        released: &AtomicBool,
    ) -> Result<u64> {
        let fence = self.fence(run_id);
        let releasing = fence.is_some();
        let events: Vec<JournalEvent> = before.into_iter().chain([last]).collect();
        let n = events.len();
        let group = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let event = keel_journal::NewEvent::new(run_id, e.clone()).fenced(fence.clone());
                if releasing && i + 1 == n { event.releasing() } else { event }
            })
            .collect();
        let seq = self.writer.submit_all(group).durable().await?;
        released.store(releasing, Ordering::Relaxed);
        for event in &events {
            self.observer.event(run_id, event);
        }
        Ok(seq)
    }

    /// The lease this process drives `run_id` under, if it does.
    fn fence(&self, run_id: &str) -> Option<Arc<Lease>> {
        self.driving.lock().unwrap_or_else(|e| e.into_inner()).get(run_id).cloned().flatten()
    }

    /// The budget of run `run_id` (`[run].budget`), its refusals journaled in the run.
    fn run_budget(&self, run_id: &str) -> Arc<Budget> {
        let sink = RunBudgetSink {
            journal: self.sink(run_id),
            observer: self.observer.clone(),
            run_id: run_id.to_owned(),
        };
        let budget = Arc::new(Budget::new(format!("run:{run_id}"), &self.config.run.budget, Arc::new(sink)));
        self.run_budgets.lock().unwrap_or_else(|e| e.into_inner()).insert(run_id.to_owned(), budget.clone());
        budget
    }

    /// The budgets of the runs this process drives now (`[run].budget`: balance, in
    /// flight, refusals), while their drive lasts.
    pub fn run_budgets(&self) -> Vec<Arc<Budget>> {
        self.run_budgets.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// A sink for `run_id`'s policy events, fenced like [`record`](Self::record).
    fn sink(&self, run_id: &str) -> keel_journal::RunSink {
        self.writer.sink(run_id).fenced(self.fence(run_id))
    }

    /// The process's confidence gate (its history loaded from the journal): give it
    /// to every pipeline of the process, so that one gate learns and is saved.
    pub fn gate(&self) -> &Arc<ConfidenceGate> {
        &self.gate
    }

    /// What correction turns cost in tokens, per strategy and error kind: the journal's
    /// latest agent runs, read once per process ([`crate::agent::stats::scan_recent`]),
    /// then what this process sees.
    ///
    /// # Errors
    /// The journal's, reading its history the first time.
    pub async fn correction_costs(&self) -> Result<&crate::agent::correct::TokenCosts> {
        if !self.costs.is_seeded() {
            let stats =
                crate::agent::stats::scan_recent(&*self.journal, crate::agent::correct::COST_HISTORY_RUNS)
                    .await?;
            self.costs.seed(&stats);
        }
        Ok(&self.costs)
    }

    /// Saves what the gate learned since the last save; on failure keeps it for the
    /// next one and says so (the history is advice, so a run never fails for it).
    /// Drives save at their end; a server also saves now and then, and at shutdown.
    pub async fn save_gate(&self) {
        let records = self.gate.take_unsaved();
        if records.is_empty() {
            return;
        }
        if let Err(e) = self.journal.add_gate_outcomes(&records).await {
            tracing::warn!(error = %e, rows = records.len(), "the confidence gate's history was not saved; will retry");
            self.gate.restore_unsaved(records);
        }
    }

    /// Sets (or with `None` clears) the fault injection of `tool` on this running
    /// process: calls that start from now on draw faults from `fault` instead of the
    /// tool's configured policy. Injected faults are marked in their events (a drill is
    /// not an incident: no alert, no page).
    ///
    /// # Errors
    /// The tool is unknown, or a value is out of range (by key).
    pub fn set_fault(&self, tool: &str, fault: Option<keel_core::FaultConfig>) -> Result<(), Error> {
        if !self.config.tools.contains_key(tool) {
            return Err(Error::Refused(format!("no tool named `{tool}`")));
        }
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        match fault {
            Some(f) => {
                f.validate().map_err(|errors| {
                    Error::Refused(
                        errors
                            .iter()
                            .map(|e| format!("{}: {}", e.key, e.message))
                            .collect::<Vec<_>>()
                            .join("; "),
                    )
                })?;
                faults.insert(tool.to_owned(), f);
            }
            None => {
                faults.remove(tool);
            }
        }
        Ok(())
    }

    /// The fault injection set on this process, by tool.
    pub fn faults(&self) -> std::collections::BTreeMap<String, keel_core::FaultConfig> {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The policy pipeline of one call of `tool`: its policy (with the fault
    /// injection set on this process, if any), this process's breaker of the tool
    /// (unless the tool's policy turns breakers off) and the shared gate.
    fn pipeline(&self, tool: &crate::tool::Tool, sink: Arc<dyn keel_core::EventSink>) -> keel_core::Pipeline {
        let mut policy = tool.policy.clone();
        if let Some(f) = self.faults.lock().unwrap_or_else(|e| e.into_inner()).get(&*tool.name) {
            policy.fault = f.clone();
        }
        let builder = keel_core::Pipeline::builder(tool.name.clone(), policy)
            .clock(self.clock.clone())
            .sink(sink)
            .gate(self.gate.clone());
        match tool.policy.breaker.enabled {
            true => builder.breaker(self.breaker(tool)).build(),
            false => builder.build(),
        }
    }

    /// What the run's earlier drives charged its budget `name` in tool costs.
    async fn spent_cost(&self, run_id: &str, name: &str) -> Result<u64> {
        let (mut spent, mut after) = (0u64, 0);
        loop {
            let page = self.journal.events(run_id, after, 1000).await?;
            let Some(last) = page.last() else { return Ok(spent) };
            after = last.seq;
            for e in &page {
                if let JournalEvent::Policy {
                    event:
                        keel_core::Event::BudgetCharged { budget, kind: BudgetKind::CostMicros, amount, .. },
                    ..
                } = &e.event
                {
                    if &**budget == name {
                        spent = spent.saturating_add(*amount);
                    }
                }
            }
        }
    }

    fn breaker(&self, tool: &crate::tool::Tool) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        breakers
            .entry(tool.name.to_string())
            .or_insert_with(|| {
                // A tool's breaker outlives any one run: its transitions are the
                // process's, journaled under the process's own run (the gateway's)
                // and shown to the observers (live view, /metrics, alerts, inbox).
                let sink = ProcessSink {
                    journal: self.writer.sink(keel_gateway::journal::GATEWAY_RUN),
                    observer: self.observer.clone(),
                };
                Arc::new(Breaker::new(
                    tool.name.clone(),
                    tool.policy.breaker.clone(),
                    self.clock.clone(),
                    Arc::new(sink),
                ))
            })
            .clone()
    }

    /// The state of every tool breaker of this process, by tool.
    pub fn breaker_states(&self) -> Vec<(String, keel_core::BreakerState)> {
        let breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        breakers.iter().map(|(name, b)| (name.clone(), b.state())).collect()
    }

    /// The run's current state from the journal.
    ///
    /// # Errors
    /// [`Error::UnknownRun`], or the journal's.
    pub async fn snapshot(&self, run_id: &str) -> Result<RunSnapshot> {
        self.journal.snapshot(run_id).await?.ok_or_else(|| Error::UnknownRun(run_id.to_owned()))
    }

    /// Drives `run_id` as far as it can go: to its end, or to a person.
    ///
    /// # Errors
    /// [`Error::Busy`] when another live process holds the run; journal errors.
    ///
    /// # Cancel safety
    /// Dropping the future stops at an arbitrary point; everything acknowledged is in
    /// the journal, and a later drive resumes without repeating a completed side effect.
    pub async fn drive(&self, run_id: &str) -> Result<RunStatus> {
        Ok(self.drive_from(run_id, None).await?.status)
    }

    /// Like [`drive`](Self::drive), for a run this process created with its lease
    /// ([`create_leased`](Self::create_leased)): `snapshot` is the run as created, and
    /// the drive starts from it without reading the journal. Nothing of the run has
    /// happened, so its write-like calls are not claimed first (the lease keeps every
    /// other driver out, and a redrive after a crash claims them).
    ///
    /// # Errors
    /// As [`drive`](Self::drive).
    pub async fn drive_held(&self, run_id: &str, lease: Lease, snapshot: RunSnapshot) -> Result<Drove> {
        self.drive_from(run_id, Some((lease, snapshot))).await
    }

    async fn drive_from(&self, run_id: &str, held: Option<(Lease, RunSnapshot)>) -> Result<Drove> {
        {
            let mut driving = self.driving.lock().unwrap_or_else(|e| e.into_inner());
            if driving.contains_key(run_id) {
                return Err(Error::Busy(
                    run_id.to_owned(),
                    "another task of this process drives it".to_owned(),
                ));
            }
            driving.insert(run_id.to_owned(), None);
        }
        let _driving = Driving(self, run_id.to_owned());
        let ttl = self.config.run.lease;
        let (lease, created) = match held {
            Some((lease, snapshot)) => (lease, Some(snapshot)),
            None => match self.journal.acquire_lease(run_id, &self.owner, ttl).await? {
                Some(lease) => (lease, None),
                None => return Err(Error::Busy(run_id.to_owned(), "its lease is held".to_owned())),
            },
        };
        self.driving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run_id.to_owned(), Some(Arc::new(lease.clone())));
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        let renew = self.spawn_renewal(lease.clone(), ttl, lost_tx);
        // A holder that lost its lease (it stalled past it and another process took
        // the run) stops at once; its appends are refused by the fence meanwhile.
        // Boxed: a step's future is large, and callers' stacks are not (test threads).
        // The drive's span: the parent of its steps' `execute_tool` spans.
        let span = tracing::info_span!(
            "run",
            otel.name = "run",
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty,
            keel.run.id = run_id,
            keel.run.status = tracing::field::Empty,
        );
        let released = AtomicBool::new(false);
        let leased = tracing::Instrument::instrument(
            self.drive_leased(run_id, &lease, &released, created),
            span.clone(),
        );
        let result = tokio::select! {
            r = Box::pin(leased) => r,
            Ok(()) = lost_rx => Err(Error::Busy(
                run_id.to_owned(),
                "its lease was lost while this process drove it; another process took the run over".to_owned(),
            )),
        };
        renew.abort();
        match &result {
            Ok(drove) => {
                span.record("keel.run.status", tracing::field::debug(&drove.status));
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
        drop(span);
        // The lease is given up and the gate saved even when the flush failed (after a
        // storage outage the run must not stay held until its lease expires).
        let flushed = self.writer.flush_run(run_id).await;
        self.save_gate().await;
        if !released.load(Ordering::Relaxed) {
            if let Err(e) = self.journal.release_lease(&lease).await {
                tracing::warn!(run = %run_id, error = %e, "the run's lease was not released; it expires by itself");
            }
        }
        flushed?;
        result
    }

    /// Like [`drive`](Self::drive), first waiting up to `patience` for a lease held by
    /// a process that died to expire.
    ///
    /// # Errors
    /// As [`drive`](Self::drive).
    pub async fn drive_when_free(&self, run_id: &str, patience: Duration) -> Result<RunStatus> {
        let give_up = tokio::time::Instant::now() + patience;
        loop {
            match self.drive(run_id).await {
                Err(Error::Busy(..)) if tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    fn spawn_renewal(
        &self,
        lease: Lease,
        ttl: Duration,
        lost: tokio::sync::oneshot::Sender<()>,
    ) -> tokio::task::JoinHandle<()> {
        let journal = self.journal.clone();
        tokio::spawn(async move {
            let mut lease = lease;
            loop {
                tokio::time::sleep(ttl / 3).await;
                match journal.renew_lease(&lease, ttl).await {
                    Ok(l) => lease = l,
                    Err(e @ keel_journal::Error::LeaseLost { .. }) => {
                        tracing::warn!(run = %lease.run_id, error = %e, "lease lost: stopping the drive");
                        let _ = lost.send(());
                        return;
                    }
                    // The lease may still be held: keep trying while it lasts.
                    Err(e) => {
                        tracing::warn!(run = %lease.run_id, error = %e, "lease renewal failed; retrying")
                    }
                }
            }
        })
    }

    /// Journals a takeover: who took the run from whom, and the attempts the earlier
    /// holder started and never ended, closed as abandoned.
    async fn note_takeover(&self, run_id: &str, lease: &Lease, snap: &RunSnapshot) -> Result<()> {
        if let Some(from) = &lease.taken_from {
            self.record(
                run_id,
                JournalEvent::RunTakenOver {
                    by: self.owner.clone(),
                    from: Some(from.clone()),
                    epoch: lease.epoch,
                },
            )
            .await?;
        }
        for a in snap.attempts.iter().filter(|a| a.ended_at_ms.is_none()) {
            self.record(
                run_id,
                JournalEvent::AttemptAbandoned { step: a.step, target: a.target.clone(), attempt: a.attempt },
            )
            .await?;
        }
        Ok(())
    }

    /// `created`: the run as this process created it (nothing to read back).
    async fn drive_leased(
        &self,
        run_id: &str,
        lease: &Lease,
        released: &AtomicBool,
        created: Option<RunSnapshot>,
    ) -> Result<Drove> {
        let fresh = created.is_some();
        let snap = match created {
            Some(snap) => snap,
            None => self.snapshot(run_id).await?,
        };
        if let Some(done) = final_status(&snap) {
            return Ok(done.into());
        }
        self.note_takeover(run_id, lease, &snap).await?;
        if let Some(spec) = crate::agent::AgentSpec::of_run(&snap.run.input) {
            let spec = spec.map_err(|e| Error::BadRun(run_id.to_owned(), e))?;
            if snap.run.state != RunState::Running {
                self.record(run_id, JournalEvent::RunStateChanged { state: RunState::Running, reason: None })
                    .await?;
            }
            // The agent's span (OpenTelemetry GenAI's `invoke_agent`), inside the run's.
            let span = tracing::info_span!(
                "invoke_agent",
                otel.name = %format_args!("invoke_agent {}", spec.model),
                otel.kind = "internal",
                gen_ai.operation.name = "invoke_agent",
                gen_ai.request.model = %spec.model,
                gen_ai.conversation.id = run_id,
            );
            let drive = tracing::Instrument::instrument(agent::drive(self, run_id, &snap, spec), span);
            return Box::pin(drive).await.map(Drove::from);
        }
        let plan: Plan = serde_json::from_value(snap.run.input["plan"].clone())
            .map_err(|e| Error::BadRun(run_id.to_owned(), e.to_string()))?;
        let deadline_ms = snap.run.input["deadline_ms"].as_u64().unwrap_or(u64::MAX);
        let deadline_at_ms =
            snap.run.created_at_ms.saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX));
        if snap.run.state != RunState::Running {
            self.record(run_id, JournalEvent::RunStateChanged { state: RunState::Running, reason: None })
                .await?;
        }
        let mut outputs: BTreeMap<String, Value> = BTreeMap::new();
        let tally = Arc::new(Mutex::new(step::Tally::default()));
        let budget = self.run_budget(run_id);
        // Attempts made before a crash or a pause still count against the run.
        let _ = budget.charge(BudgetKind::Attempts, snap.attempts.len() as u64);
        // So do the tool costs it spent (journaled as the run budget's charges).
        if budget.limit(BudgetKind::CostMicros).is_some() && !fresh {
            let _ = budget.charge(BudgetKind::CostMicros, self.spent_cost(run_id, budget.name()).await?);
        }
        // The snapshot read at the start serves the first step, if this drive has
        // recorded nothing since (no takeover, no state change); later steps read afresh.
        let untouched = lease.taken_from.is_none()
            && snap.attempts.iter().all(|a| a.ended_at_ms.is_some())
            && snap.run.state == RunState::Running;
        let mut unread = untouched.then(|| snap.clone());
        // The last step's successful end, committed with the run's.
        let mut end = None;
        for (index, step) in plan.steps.iter().enumerate() {
            let id = plan.step_id(index).to_owned();
            let view = snap.steps.iter().find(|s| s.step as usize == index);
            if let Some(output) = view.and_then(finished_output) {
                outputs.insert(id, output);
                continue;
            }
            if view.is_some_and(|v| v.status == "skipped") {
                outputs.insert(id, Value::Null);
                continue;
            }
            // Someone may have cancelled the run while we worked.
            let now = match unread.take() {
                Some(snap) => snap,
                None => self.snapshot(run_id).await?,
            };
            if now.run.state == RunState::Cancelled {
                return Ok(RunStatus::Cancelled.into());
            }
            let ctx = step::StepCtx {
                runner: self,
                run_id,
                plan: &plan,
                index,
                id: &id,
                step,
                literal: false,
                snap: &now,
                outputs: &outputs,
                deadline_at_ms,
                budget: &budget,
                tally: &tally,
                fresh,
                defer_end: index + 1 == plan.steps.len(),
                check_output: None,
                journal_shape: false,
            };
            // Boxed: a step's future (pipeline, tool transport, spans) is large for a 2 MiB stack.
            match Box::pin(step::run_step(ctx)).await? {
                step::StepEnd::Done(output, deferred) => {
                    end = deferred;
                    outputs.insert(id, output);
                }
                step::StepEnd::Skipped => {
                    outputs.insert(id, Value::Null);
                }
                step::StepEnd::Stop(status) => {
                    let (state, reason) = state_of(&status);
                    if now.run.state != state || status.is_final() {
                        let changed = JournalEvent::RunStateChanged { state, reason };
                        self.record_last(run_id, Vec::new(), changed, released).await?;
                    }
                    return Ok(status.into());
                }
            }
        }
        let completed = JournalEvent::RunStateChanged { state: RunState::Completed, reason: None };
        self.record_last(run_id, end.into_iter().collect(), completed, released).await?;
        let attempts = tally.lock().unwrap_or_else(|e| e.into_inner()).attempts;
        let last = plan.steps.len().checked_sub(1).map(|i| plan.step_id(i));
        let output = last.and_then(|id| outputs.remove(id)).unwrap_or(Value::Null);
        Ok(Drove { status: RunStatus::Completed, completed: Some((output, attempts)) })
    }

    /// Cancels a run that has not ended.
    ///
    /// # Errors
    /// [`Error::Refused`] for a run that already ended; journal errors.
    pub async fn cancel(&self, run_id: &str, by: &str) -> Result<()> {
        let snap = self.snapshot(run_id).await?;
        if snap.run.state.is_terminal() {
            return Err(Error::Refused(format!(
                "run `{run_id}` already ended ({})",
                snap.run.state.as_str()
            )));
        }
        self.record(
            run_id,
            JournalEvent::RunStateChanged {
                state: RunState::Cancelled,
                reason: Some(format!("cancelled by {by}")),
            },
        )
        .await?;
        Ok(())
    }

    /// Flushes buffered events.
    ///
    /// # Errors
    /// The journal's.
    pub async fn flush(&self) -> Result<()> {
        Ok(self.writer.flush().await?)
    }
}

/// The run state a status is journaled as, with its reason.
fn state_of(status: &RunStatus) -> (RunState, Option<String>) {
    match status {
        RunStatus::Failed { class, message } => (RunState::Failed, Some(format!("{class}: {message}"))),
        RunStatus::WaitingApproval { approval_id } => (RunState::WaitingApproval, Some(approval_id.clone())),
        RunStatus::Escalated { ticket_id } => (RunState::Escalated, Some(ticket_id.clone())),
        RunStatus::TimedOut => (RunState::TimedOut, Some("the run's deadline passed".into())),
        RunStatus::Cancelled => (RunState::Cancelled, None),
        RunStatus::Completed => (RunState::Completed, None),
    }
}

/// The output of a step the journal says succeeded.
fn finished_output(view: &keel_journal::StepView) -> Option<Value> {
    (view.status == "succeeded").then(|| view.output.clone().unwrap_or(Value::Null))
}

/// The status of a run that has already ended.
fn final_status(snap: &RunSnapshot) -> Option<RunStatus> {
    match snap.run.state {
        RunState::Completed => Some(RunStatus::Completed),
        RunState::Cancelled => Some(RunStatus::Cancelled),
        RunState::TimedOut => Some(RunStatus::TimedOut),
        RunState::Failed => Some(RunStatus::Failed {
            class: snap
                .steps
                .iter()
                .rev()
                .find_map(|s| s.error_class.as_deref().and_then(|c| c.parse().ok()))
                .unwrap_or(ErrorClass::ServerError),
            message: snap.run.reason.clone().unwrap_or_default(),
        }),
        RunState::Created | RunState::Running | RunState::WaitingApproval | RunState::Escalated => None,
    }
}

/// Shows a step outcome's class, for callers that print it.
pub fn outcome_class(outcome: &StepOutcome) -> Option<ErrorClass> {
    match outcome {
        StepOutcome::Failed { class, .. } => Some(*class),
        StepOutcome::Succeeded { .. } | StepOutcome::Skipped { .. } => None,
    }
}

impl Runner {
    /// Review-after-act: undoes a succeeded step by calling its tool's `undo` tool with
    /// the step's parameters plus `result` (the step's output). Journaled as a step of
    /// its own (`undo:<step>`), idempotent (undoing twice calls the undo tool once).
    ///
    /// # Errors
    /// [`Error::Refused`] when the step did not succeed or its tool has no undo tool;
    /// [`Error::Busy`] while another process works the run; journal errors. A failed
    /// undo call is returned as [`Error::Refused`] with its class and message.
    pub async fn undo(&self, run_id: &str, step_id: &str) -> Result<Value> {
        let snap = self.snapshot(run_id).await?;
        let Some(view) = snap.steps.iter().find(|s| s.name == step_id) else {
            return Err(Error::NotFound(format!("step `{step_id}` in run `{run_id}`")));
        };
        if view.status != "succeeded" {
            return Err(Error::Refused(format!(
                "step `{step_id}` is {}; only a succeeded step can be undone",
                view.status
            )));
        }
        let tool = self
            .config
            .tools
            .get(&view.target)
            .ok_or_else(|| Error::Refused(format!("no tool named `{}`", view.target)))?;
        let undo_name = tool
            .undo
            .clone()
            .ok_or_else(|| Error::Refused(format!("tool `{}` names no undo tool", tool.name)))?;
        let undo = self
            .config
            .tools
            .get(&undo_name)
            .cloned()
            .ok_or_else(|| Error::Refused(format!("no tool named `{undo_name}`")))?;
        let mut params = view.input.clone();
        if let Value::Object(map) = &mut params {
            map.insert("result".into(), view.output.clone().unwrap_or(Value::Null));
        }
        undo.check_params(&params).map_err(|f| Error::Refused(f.to_string()))?;
        let lease = self
            .journal
            .acquire_lease(run_id, &self.owner, self.config.run.lease)
            .await?
            .ok_or_else(|| Error::Busy(run_id.to_owned(), "its lease is held".into()))?;
        let index = snap.steps.iter().map(|s| s.step).max().unwrap_or(0) + 1;
        let name = format!("undo:{step_id}");
        let key = format!("{run_id}/undo/{step_id}");
        let result = async {
            self.record(
                run_id,
                JournalEvent::StepStarted {
                    step: index,
                    name: name.clone(),
                    target: undo_name.clone(),
                    input: params.clone(),
                },
            )
            .await?;
            let outcome = match self.journal.claim(&key).await? {
                keel_journal::Claim::Done(v) => Ok(v),
                keel_journal::Claim::InProgress { .. } => {
                    Err((ErrorClass::Conflict, "an undo is in progress".to_owned()))
                }
                keel_journal::Claim::Won(token) => {
                    let sink = self.sink(run_id).step(index);
                    let pipeline = self.pipeline(&undo, Arc::new(sink));
                    let clock = self.clock.clone();
                    match pipeline.call(|_| undo.invoke_with_key(&params, &*clock, &key)).await {
                        Ok(v) => {
                            self.journal.complete(&token, &v).await?;
                            Ok(v)
                        }
                        Err(e) => {
                            self.journal.release_claim(&token).await?;
                            Err((e.class, e.to_string()))
                        }
                    }
                }
            };
            let finished = match &outcome {
                Ok(v) => StepOutcome::Succeeded { output: v.clone(), shape: None },
                Err((class, message)) => StepOutcome::Failed { class: *class, message: message.clone() },
            };
            self.record(run_id, JournalEvent::StepFinished { step: index, outcome: finished }).await?;
            outcome.map_err(|(class, message)| Error::Refused(format!("the undo failed: {class}: {message}")))
        }
        .await;
        let _ = self.journal.release_lease(&lease).await;
        result
    }
}
