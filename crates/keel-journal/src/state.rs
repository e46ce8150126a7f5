//! Current state as the projections hold it: runs, steps, attempts, approvals and
//! tickets, plus the results of idempotency claims and leases.
//!
//! Every value here is derived from the journal's events (leases and idempotency keys
//! aside, which are coordination, not history), so the projections can be rebuilt from
//! the events alone and must then compare equal to what was kept live.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{JournalEvent, RecordedEvent, RunState};

/// A run, as the `runs` projection holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// The run's id.
    pub run_id: String,
    /// Its name (empty until a `run_created` event was seen).
    pub name: String,
    /// Its state.
    pub state: RunState,
    /// Its input.
    pub input: Value,
    /// Why it is in its state, when said.
    pub reason: Option<String>,
    /// The time of its first event (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// The time of its last event.
    pub updated_at_ms: i64,
    /// The sequence number of its last event.
    pub last_seq: u64,
}

/// A step, as the `steps` projection holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    /// The step's number.
    pub step: u32,
    /// Its name.
    pub name: String,
    /// The target it calls.
    pub target: String,
    /// `running`, `succeeded`, `failed` or `skipped`.
    pub status: String,
    /// Its input.
    pub input: Value,
    /// Its output, once succeeded.
    pub output: Option<Value>,
    /// The failure's class, once failed.
    pub error_class: Option<String>,
    /// The failure or skip message.
    pub message: Option<String>,
    /// When it started.
    pub started_at_ms: i64,
    /// When it finished.
    pub finished_at_ms: Option<i64>,
    /// The structure hash of its output, when one was journaled beside it (agent runs'
    /// tool steps; `None` for other steps and in older journals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
}

/// An attempt, as the `attempts` projection holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// The sequence number of its `attempt_started` event.
    pub started_seq: u64,
    /// The step it belongs to (`None` outside steps).
    pub step: Option<u32>,
    /// The target called.
    pub target: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// `ok` or the failure's class; `None` while it runs (or if it never ended).
    pub outcome: Option<String>,
    /// How long it took.
    pub latency_ms: Option<i64>,
    /// When it started.
    pub started_at_ms: i64,
    /// When it ended.
    pub ended_at_ms: Option<i64>,
}

/// An approval, as the `approvals` projection holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    /// The approval's id.
    pub approval_id: String,
    /// The run.
    pub run_id: String,
    /// The step it holds.
    pub step: u32,
    /// The tool.
    pub tool: String,
    /// The digest of the arguments shown.
    pub args_digest: String,
    /// The arguments the digest covers (`None` for approvals requested before they
    /// were recorded).
    #[serde(default)]
    pub args: Option<Value>,
    /// `pending`, `approved`, `denied` or `expired`.
    pub status: String,
    /// When it was requested.
    pub requested_at_ms: i64,
    /// When it expires.
    pub expires_at_ms: i64,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at_ms: Option<i64>,
}

/// A ticket, as the `tickets` projection holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketView {
    /// The ticket's id.
    pub ticket_id: String,
    /// The run.
    pub run_id: String,
    /// The failing step.
    pub step: Option<u32>,
    /// The class escalated.
    pub class: String,
    /// One line.
    pub summary: String,
    /// The context package.
    pub context: Value,
    /// `open` or `resolved`.
    pub status: String,
    /// The guidance given.
    pub resolution: Option<Value>,
    /// Who answered.
    pub resolved_by: Option<String>,
    /// When it was opened.
    pub opened_at_ms: i64,
    /// When it was answered.
    pub resolved_at_ms: Option<i64>,
}

/// Which runs to list: newest activity first, a page at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// The cursor: runs strictly older than (updated_at ms, run id); the last row of the
    /// previous page.
    pub before: Option<(i64, String)>,
    /// The most runs (1 to [`RunPage::MAX`]).
    pub limit: u32,
}

impl RunPage {
    /// The largest page.
    pub const MAX: u32 = 1000;

    /// The first page of `limit` runs.
    pub fn first(limit: u32) -> RunPage {
        RunPage { state: None, before: None, limit }
    }
}

/// Attempts over a window, aggregated by the database (the dashboard).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptStats {
    /// (target, attempts, failed attempts).
    pub by_target: Vec<(String, u64, u64)>,
    /// (class, hour in ms since the epoch, failed attempts).
    pub errors_by_hour: Vec<(String, i64, u64)>,
    /// (run id, retries), the most recently active runs first.
    pub retries_by_run: Vec<(String, u64)>,
}

/// Everything the projections know about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// The run.
    pub run: RunView,
    /// Its steps, by number.
    pub steps: Vec<StepView>,
    /// Its attempts, in order.
    pub attempts: Vec<AttemptView>,
    /// Its approvals, by request time.
    pub approvals: Vec<ApprovalView>,
    /// Its tickets, by opening time.
    pub tickets: Vec<TicketView>,
}

impl RunSnapshot {
    /// What the projections hold for a run just created at `at_ms` with `events`, its
    /// first events, folded here instead of read back: `None` unless they are only
    /// `run_created` and `run_state_changed` (the events a run is created with).
    pub fn of_created(run_id: &str, events: &[JournalEvent], at_ms: i64) -> Option<RunSnapshot> {
        let mut run = RunView {
            run_id: run_id.to_owned(),
            name: String::new(),
            state: RunState::Created,
            input: Value::Null,
            reason: None,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            last_seq: 0,
        };
        for event in events {
            match event {
                JournalEvent::RunCreated { name, input } => {
                    run.name.clone_from(name);
                    run.input = input.clone();
                }
                JournalEvent::RunStateChanged { state, reason } => {
                    run.state = *state;
                    run.reason.clone_from(reason);
                }
                _ => return None,
            }
            run.last_seq += 1;
        }
        Some(RunSnapshot {
            run,
            steps: Vec::new(),
            attempts: Vec::new(),
            approvals: Vec::new(),
            tickets: Vec::new(),
        })
    }
}

/// A run that [`create_run_leased`](crate::Journal::create_run_leased) created.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The run's lease for the owner that created it; `None` when a lease on the id
    /// was held already.
    pub lease: Option<Lease>,
    /// What the projections hold for it now, as [`snapshot`](crate::Journal::snapshot)
    /// would read it (so that a drive starting at once need not read it back).
    pub snapshot: RunSnapshot,
}

/// One run exported: its events and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunExport {
    /// The schema version of the events.
    pub schema_version: u32,
    /// The run's state as projected.
    pub state: RunSnapshot,
    /// Every event, in order.
    pub events: Vec<RecordedEvent>,
}

/// The answer to an idempotency claim.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This caller holds the key: act, then [`complete`](crate::Journal::complete).
    Won(ClaimToken),
    /// The key was completed: here is the stored result; do not act again.
    Done(Value),
    /// Another caller holds the key and has not finished.
    InProgress {
        /// When its claim expires (ms since the Unix epoch); after that it can be won.
        expires_at_ms: i64,
    },
}

/// Proof of holding an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken {
    /// The key.
    pub key: String,
    /// A random token naming this claim.
    pub token: String,
}

/// A lease on a run: the holder is the one instance working it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The run.
    pub run_id: String,
    /// The holder.
    pub owner: String,
    /// Counts acquisitions of this run's lease: a fencing token. Writes fenced with an
    /// older epoch are refused.
    pub epoch: u64,
    /// When it expires unless renewed (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// The owner whose expired lease this acquisition took over, if another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_from: Option<String>,
}

/// What [`prune`](crate::Journal::prune) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Runs removed, with their events and projections.
    pub runs: u64,
    /// Events removed.
    pub events: u64,
    /// Expired idempotency keys removed.
    pub idempotency_keys: u64,
}
