//! One tool call for an external agent, under the tool's policy, idempotency and
//! approval rule — the one home of invocation semantics, shared by `keel serve`'s
//! `POST /api/tools/{name}/invoke` and its MCP server (`/mcp`, `keel mcp`), which are
//! adapters mapping an [`Outcome`] to their protocol.
//!
//! Each invocation is a one-step run, so it is journaled, approvable and visible in
//! the inbox like any plan. The idempotency key (the client's, or for write-like
//! tools one derived from the tool and its canonical arguments) *is* the run's
//! identity: the run id is derived from the key ([`invocation_run_id`]), and the run
//! is created "if absent" in one transaction with its first events. So a retry always
//! finds the key's run — whether the first request finished, hung up, or its process
//! was killed between any two instructions — and answers from it: waiting for it,
//! replaying its result, or reporting its state. Nothing acts twice, and no claim is
//! left "in progress" to time out. The same key with other arguments is refused
//! ([`InvokeError::Conflict`]), never answered with the first call's result.
//!
//! The run is driven by a task of its own, so a caller giving up does not stop it
//! half-way. Without a wait bound, [`Invoker::invoke`] waits while the run is worked
//! (up to the run's deadline) but not for a person: a call that needs approval answers
//! [`Outcome::WaitingApproval`] at once. With one, it answers within that bound
//! whatever happens: the result, the error, or the run's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{Classified, Clock, ErrorClass, Failure};
use keel_journal::{RunSnapshot, RunState};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::runner::{Drove, Error as RunnerError, args_digest, new_id};
use crate::{Plan, PlanStep, RunStatus, Runner};

/// How long past its bound a call may take when the journal itself does not answer.
const GRACE: Duration = Duration::from_secs(1);

/// How often a call re-reads a run it does not drive, and retries a drive another
/// process held.
const POLL: Duration = Duration::from_millis(100);

/// The run id of the invocation whose (tool-scoped) idempotency key is `key`: the same
/// key gives the same run, in every process and after every restart.
pub fn invocation_run_id(key: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("keel/invoke\n{key}").as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("run-{hex}")
}

/// The key an invocation runs under: the client's (scoped to the tool), or for a
/// write-like tool one derived from its canonical arguments, or none.
pub fn invocation_key(tool: &str, write: bool, client: Option<&str>, params: &Value) -> Option<String> {
    match client.map(str::trim) {
        Some(k) if !k.is_empty() => Some(format!("invoke/{tool}/{k}")),
        _ if write => Some(format!("invoke/{tool}/derived/{}", args_digest(tool, params))),
        _ => None,
    }
}

/// One call to make.
#[derive(Debug, Clone)]
pub struct Call {
    /// The tool's name in `keel.toml`.
    pub tool: String,
    /// Its parameters (`null` is `{}`), checked against its JSON Schema.
    pub params: Value,
    /// The client's idempotency key, if it passed one.
    pub key: Option<String>,
    /// The bound on the whole call, and how long to wait for a person. `None`: wait
    /// while the run is worked, not for a person.
    pub wait: Option<Duration>,
    /// Who calls (an API key's name, `"stdio"`): the loop guard counts each caller's
    /// calls apart. `None` is one anonymous caller.
    pub caller: Option<String>,
    /// The key was minted by the adapter for this call alone (not the client's): the
    /// call acts anew, so the loop guard counts it as it counts a call without a key.
    pub minted: bool,
}

/// The most callers whose recent calls the loop guard remembers; past it, the
/// oldest-made guards are forgotten.
const MAX_CALLERS: usize = 10_000;

/// The loop guard of each caller, shared by every [`Invoker`] of a process: a call
/// that would act anew (no idempotency key) with the same tool and arguments as too
/// many of the caller's recent calls (`[run] loop_guard`: `max_repeats` within
/// `window`) is refused as `loop_detected` before it runs. Calls with a key are
/// exempt: their repeats are answered from the first call and act once anyway. Kept
/// in the process's memory: on several instances each counts what it serves.
#[derive(Debug, Default)]
pub struct Callers(Mutex<HashMap<String, Arc<keel_core::LoopGuard>>>);

impl Callers {
    fn guard(&self, caller: &str, config: &keel_core::LoopGuardConfig) -> Arc<keel_core::LoopGuard> {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(caller) && map.len() >= MAX_CALLERS {
            if let Some(any) = map.keys().next().cloned() {
                map.remove(&any);
            }
        }
        map.entry(caller.to_owned())
            .or_insert_with(|| {
                // Only repeats: an external caller has no turns.
                let config = keel_core::LoopGuardConfig {
                    max_calls_per_turn: None,
                    max_turns_per_run: None,
                    ..config.clone()
                };
                Arc::new(keel_core::LoopGuard::new(config, Arc::new(keel_core::NullSink)))
            })
            .clone()
    }
}

/// How a call ended, or where it stands when the call returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The tool answered.
    Completed {
        /// The invocation's run.
        run_id: String,
        /// The tool's output.
        output: Value,
        /// Attempts made.
        attempts: u32,
        /// Whether this answer was stored from an earlier call with the same key.
        replayed: bool,
    },
    /// The call waits for a person's decision.
    WaitingApproval {
        /// The invocation's run.
        run_id: String,
        /// The approval to decide.
        approval_id: String,
        /// Whether the run was started by an earlier call with the same key.
        replayed: bool,
    },
    /// The call failed and a person was asked to step in.
    Escalated {
        /// The invocation's run.
        run_id: String,
        /// The failure's class.
        class: ErrorClass,
        /// What went wrong.
        message: String,
        /// Attempts made.
        attempts: u32,
        /// The open ticket, if any.
        ticket_id: Option<String>,
    },
    /// The call failed (or timed out, or was cancelled).
    Failed {
        /// The invocation's run.
        run_id: String,
        /// The failure's class.
        class: ErrorClass,
        /// What went wrong.
        message: String,
        /// Attempts made.
        attempts: u32,
        /// An open ticket on the run, if any.
        ticket_id: Option<String>,
    },
    /// Not finished within the bound: still worked (here or by another process), or
    /// just moving on from a decision.
    Running {
        /// The invocation's run.
        run_id: String,
        /// The run's state.
        state: RunState,
        /// Whether the run was started by an earlier call with the same key.
        replayed: bool,
    },
}

impl Outcome {
    /// The invocation's run.
    pub fn run_id(&self) -> &str {
        match self {
            Outcome::Completed { run_id, .. }
            | Outcome::WaitingApproval { run_id, .. }
            | Outcome::Escalated { run_id, .. }
            | Outcome::Failed { run_id, .. }
            | Outcome::Running { run_id, .. } => run_id,
        }
    }
}

/// Why a call could not be made or answered (as opposed to a call that failed).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No tool of that name.
    #[error("no tool named `{0}`")]
    UnknownTool(String),
    /// The parameters do not fit the tool's schema.
    #[error("{}", .0.message)]
    InvalidParams(Failure),
    /// The key was used with other arguments.
    #[error("this idempotency key was used with other arguments; use a new key for a new call")]
    Conflict,
    /// The journal did not answer within the call's bound.
    #[error(
        "no answer from the journal within the call's wait ({}); the storage may be unavailable — \
         retry with the same idempotency key",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
    /// The runner (or the journal under it) failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The task driving the run died.
    #[error("the drive failed: {0}")]
    DriveFailed(String),
    /// The caller made this call too often (see [`Callers`]); nothing ran.
    #[error("{0}: the call was not made; change the arguments or stop repeating it")]
    LoopDetected(keel_core::LoopDetected),
}

impl Classified for InvokeError {
    fn class(&self) -> ErrorClass {
        match self {
            InvokeError::UnknownTool(_) => ErrorClass::NotFound,
            InvokeError::InvalidParams(f) => f.class,
            InvokeError::Conflict => ErrorClass::Conflict,
            InvokeError::LoopDetected(_) => ErrorClass::LoopDetected,
            InvokeError::Timeout(_) => ErrorClass::Timeout,
            InvokeError::Runner(e) => e.class(),
            InvokeError::DriveFailed(_) => ErrorClass::ServerError,
        }
    }
}

/// Makes tool calls: one per process, cheap to share.
#[derive(Debug, Clone)]
pub struct Invoker {
    runner: Arc<Runner>,
    drives: Arc<Drives>,
    clock: Arc<dyn Clock>,
    callers: Arc<Callers>,
}

impl Invoker {
    /// An invoker driving runs with `runner`, one task per run at a time (`drives`,
    /// shared with whatever else drives runs in this process).
    pub fn new(runner: Arc<Runner>, drives: Arc<Drives>, clock: Arc<dyn Clock>) -> Self {
        Self { runner, drives, clock, callers: Arc::default() }
    }

    /// This invoker with the process's loop guards (shared by every invoker made for
    /// a request).
    #[must_use]
    pub fn with_callers(mut self, callers: Arc<Callers>) -> Self {
        self.callers = callers;
        self
    }

    /// The runner.
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// Calls a tool: claims its key's run (creating it if absent), drives it, and
    /// answers from it.
    ///
    /// # Errors
    /// [`InvokeError`]: the call could not be made or answered. A tool that failed is
    /// an `Ok` [`Outcome::Failed`].
    pub async fn invoke(&self, call: Call) -> Result<Outcome, InvokeError> {
        let bound = call.wait.map(|w| Instant::now() + w);
        let wait = call.wait.unwrap_or(Duration::ZERO);
        let name = call.tool;
        let Some(tool) = self.runner.config().tools.get(&name).cloned() else {
            return Err(InvokeError::UnknownTool(name));
        };
        let params = if call.params.is_null() { json!({}) } else { call.params };
        tool.check_params(&params).map_err(InvokeError::InvalidParams)?;
        let key = invocation_key(&name, tool.write, call.key.as_deref(), &params);
        if key.is_none() || call.minted {
            let guard = self
                .callers
                .guard(call.caller.as_deref().unwrap_or(""), &self.runner.config().run.loop_guard);
            let target: Arc<str> = Arc::from(name.as_str());
            guard
                .check_call(&target, keel_core::CallSignature::new(&name, &params))
                .map_err(InvokeError::LoopDetected)?;
        }
        let run_id = key.as_deref().map_or_else(|| new_id("run"), invocation_run_id);
        let plan = Plan {
            name: Some(format!("invoke {name}")),
            input: params.clone(),
            deadline: None,
            steps: vec![PlanStep { id: Some(name.clone()), tool: name.clone(), params: params.clone() }],
        };
        let work = async {
            // Created with its lease in one transaction: this call drives it at once.
            let created = self.runner.create_leased(&run_id, &plan).await?;
            if created.is_none() {
                let snap = self.runner.snapshot(&run_id).await?;
                let step = &snap.run.input["plan"]["steps"][0];
                let same = step["tool"] == name.as_str()
                    && args_digest(&name, &step["params"]) == args_digest(&name, &params);
                if !same {
                    return Err(InvokeError::Conflict);
                }
            }
            self.answer(&run_id, wait, bound, created).await
        };
        match bound {
            None => work.await,
            Some(bound) => match tokio::time::timeout_at(bound + GRACE, work).await {
                Ok(answered) => answered,
                Err(_) => Err(InvokeError::Timeout(wait)),
            },
        }
    }

    /// Answers from the invocation's run: drives it (in a task of its own) while
    /// nobody else does, and reads its state until it ends, waits for a person, or the
    /// bound passes. `fresh`: this call created the run, with its lease if it got it
    /// (drive it before reading it; a completed drive of it answers without a read).
    async fn answer(
        &self,
        run_id: &str,
        wait: Duration,
        bound: Option<Instant>,
        fresh: Option<keel_journal::NewRun>,
    ) -> Result<Outcome, InvokeError> {
        let person_until = Instant::now() + wait;
        let replayed = fresh.is_none();
        let fresh_run = fresh.is_some();
        let held = fresh.and_then(|new| new.lease.map(|lease| (lease, new.snapshot)));
        // The drive that began with the run: it saw all of it, so its end is the answer.
        let mut whole = held.is_some();
        let mut drive = fresh_run.then(|| self.spawn_drive(run_id, held));
        // Drives start at most once per POLL: a run held elsewhere is not hammered.
        let mut next_drive = Instant::now() + if fresh_run { POLL } else { Duration::ZERO };
        loop {
            if let Some(handle) = drive.as_mut() {
                // Only the drive moves the run on: nothing to read until it ends.
                let joined = match bound {
                    Some(b) => tokio::time::timeout_at(b, handle).await.ok(),
                    None => Some(handle.await),
                };
                if let Some(joined) = joined {
                    drive = None;
                    match joined {
                        Ok(Ok(drove)) => {
                            if let (true, Some((output, attempts))) = (whole, drove.completed) {
                                let run_id = run_id.to_owned();
                                return Ok(Outcome::Completed { run_id, output, attempts, replayed });
                            }
                        }
                        // Another task or process holds the run (or took it over from
                        // this one): read it, and try again later (that holder may die too).
                        Ok(Err(e)) if held_elsewhere(&e) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(e) => return Err(InvokeError::DriveFailed(e.to_string())),
                    }
                }
            }
            let snap = self.runner.snapshot(run_id).await?;
            let attempts = u32::try_from(snap.attempts.len()).unwrap_or(u32::MAX);
            let step = snap.steps.first();
            let now = Instant::now();
            let out_of_time = bound.is_some_and(|b| now >= b);
            let running = |state: RunState| Outcome::Running { run_id: run_id.to_owned(), state, replayed };
            match snap.run.state {
                RunState::Completed => {
                    let output = step.and_then(|st| st.output.clone()).unwrap_or(Value::Null);
                    return Ok(Outcome::Completed { run_id: run_id.to_owned(), output, attempts, replayed });
                }
                state @ (RunState::Failed
                | RunState::TimedOut
                | RunState::Cancelled
                | RunState::Escalated) => {
                    let class = step
                        .and_then(|st| st.error_class.as_deref())
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(match state {
                            RunState::TimedOut => ErrorClass::DeadlineExceeded,
                            _ => ErrorClass::ServerError,
                        });
                    let message = step
                        .and_then(|st| st.message.clone())
                        .or_else(|| snap.run.reason.clone())
                        .unwrap_or_else(|| state.as_str().to_owned());
                    let ticket_id =
                        snap.tickets.iter().rev().find(|t| t.status == "open").map(|t| t.ticket_id.clone());
                    let run_id = run_id.to_owned();
                    return Ok(if state == RunState::Escalated {
                        Outcome::Escalated { run_id, class, message, attempts, ticket_id }
                    } else {
                        Outcome::Failed { run_id, class, message, attempts, ticket_id }
                    });
                }
                RunState::WaitingApproval => {
                    let approval = snap.approvals.iter().rev().find(|a| a.status == "pending");
                    if let Some(approval) = approval.filter(|_| now >= person_until) {
                        return Ok(Outcome::WaitingApproval {
                            run_id: run_id.to_owned(),
                            approval_id: approval.approval_id.clone(),
                            replayed,
                        });
                    }
                    // Waiting for the decision (or decided a moment ago: about to move on).
                }
                RunState::Created | RunState::Running => {
                    if out_of_time || self.past_deadline(&snap) {
                        return Ok(running(RunState::Running));
                    }
                    if drive.is_none() && now >= next_drive {
                        whole = false;
                        drive = Some(self.spawn_drive(run_id, None));
                        next_drive = now + POLL;
                        continue;
                    }
                }
            }
            if out_of_time {
                // Out of time with the run just moving on from a decision.
                return Ok(running(snap.run.state));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Drives `run_id` in a task of its own: a caller giving up must not stop a drive
    /// half-way (it would hold the run's lease, unworked, until the lease expired).
    /// `held`: the run's lease, taken when this call created it.
    fn spawn_drive(
        &self,
        run_id: &str,
        held: Option<(keel_journal::Lease, RunSnapshot)>,
    ) -> JoinHandle<Result<Drove, RunnerError>> {
        let (runner, drives, run) = (self.runner.clone(), self.drives.clone(), run_id.to_owned());
        // The caller's scope (an agent run's budget) crosses into the drive's task, and
        // the drive's spans (`execute_tool`) belong to the request that started it.
        let scope = keel_core::RunScope::current().map(|s| (*s).clone()).unwrap_or_default();
        let span = tracing::Span::current();
        tokio::spawn(async move { scope.run(drives.drive_from(&runner, &run, held)).await }.instrument(span))
    }

    /// Whether the run's own deadline has passed (its holder, wherever it is, gives up).
    fn past_deadline(&self, snap: &RunSnapshot) -> bool {
        let now_ms = self
            .clock
            .wall()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let deadline_ms = snap.run.input["deadline_ms"].as_u64().unwrap_or(u64::MAX);
        let at = snap.run.created_at_ms.saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX));
        now_ms > at
    }
}

/// Whether a drive ended because someone else works the run: its lease was held, or
/// lost to a process that took the run over. The run goes on; the call answers from it.
fn held_elsewhere(e: &RunnerError) -> bool {
    match e {
        RunnerError::Busy(..) => true,
        RunnerError::Journal(j) => {
            matches!(j, keel_journal::Error::LeaseLost { .. })
                || matches!(j, keel_journal::Error::Batch(inner) if matches!(**inner, keel_journal::Error::LeaseLost { .. }))
        }
        _ => false,
    }
}

/// The runs this process is driving, one task per run at a time.
///
/// The journal's lease keeps processes apart, but a process is one lease owner: a
/// server's worker could claim a run that an invoking request had just created, and
/// the request's own drive would then re-enter the lease, so both called the tool (and
/// the second took the first's idempotency claim). Here the later one waits, then
/// finds the run finished.
#[derive(Debug, Default)]
pub struct Drives(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Drives {
    /// Drives `run_id` with `runner` once no other task of this process does.
    ///
    /// # Errors
    /// The runner's.
    ///
    /// # Cancel safety
    /// As [`Runner::drive`]'s; a dropped wait leaves nothing behind.
    pub async fn drive(&self, runner: &Runner, run_id: &str) -> Result<RunStatus, RunnerError> {
        Ok(self.drive_from(runner, run_id, None).await?.status)
    }

    /// As [`drive`](Self::drive); with `held`, the lease this process took creating
    /// the run, and the run as created ([`Runner::drive_held`]).
    ///
    /// # Errors
    /// The runner's.
    pub async fn drive_from(
        &self,
        runner: &Runner,
        run_id: &str,
        held: Option<(keel_journal::Lease, RunSnapshot)>,
    ) -> Result<Drove, RunnerError> {
        let entry = Entry { drives: self, run_id, lock: self.lock_for(run_id) };
        let _held = entry.lock.lock().await;
        // A run's future is large; boxed, it lives on the heap, not on the task's stack
        // (debug builds overflowed a worker's 2 MiB stack).
        match held {
            Some((lease, snapshot)) => Box::pin(runner.drive_held(run_id, lease, snapshot)).await,
            None => Ok(Box::pin(runner.drive(run_id)).await?.into()),
        }
    }

    fn lock_for(&self, run_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(run_id.to_owned()).or_default().clone()
    }
}

/// One task's hold on a run's lock; the last one out removes the run's entry.
struct Entry<'a> {
    drives: &'a Drives,
    run_id: &'a str,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut map = self.drives.0.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under the map's lock: two references are the map's and ours.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(self.run_id);
        }
    }
}

#[cfg(test)]
mod tests;
