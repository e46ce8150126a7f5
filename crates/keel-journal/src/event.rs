//! What the journal records: [`JournalEvent`], keel-core's policy events plus the
//! run, step, approval, ticket and program events around them.
//!
//! The journal is the source of truth; every table of current state is derived from
//! these events. Events are stored as JSON with a schema version, so a newer Keel can
//! read what an older one wrote, and an older one refuses (rather than misreads) what
//! a newer one wrote.

use keel_core::{ErrorClass, Event};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schema version written with every event. Bump it when an event's meaning or
/// shape changes incompatibly, and teach the decoder the old shape.
pub const SCHEMA_VERSION: u32 = 1;

/// The lifecycle state of a run (the states `keel run` reports; see its exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created, no step started yet.
    Created,
    /// Being worked on.
    Running,
    /// Waiting for a person's approval; no process waits with it.
    WaitingApproval,
    /// A ticket is open: a person must say how to go on.
    Escalated,
    /// Finished successfully.
    Completed,
    /// Finished with a failure.
    Failed,
    /// Its deadline passed.
    TimedOut,
    /// Stopped by a person.
    Cancelled,
}

impl RunState {
    /// Every state.
    pub const ALL: [RunState; 8] = [
        RunState::Created,
        RunState::Running,
        RunState::WaitingApproval,
        RunState::Escalated,
        RunState::Completed,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Cancelled,
    ];

    /// The state's name as stored (`waiting_approval`).
    pub const fn as_str(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::WaitingApproval => "waiting_approval",
            RunState::Escalated => "escalated",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Cancelled => "cancelled",
        }
    }

    /// Whether the run is over: nobody needs to hold a lease on it.
    pub const fn is_terminal(self) -> bool {
        match self {
            RunState::Completed | RunState::Failed | RunState::TimedOut | RunState::Cancelled => true,
            RunState::Created | RunState::Running | RunState::WaitingApproval | RunState::Escalated => false,
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StepOutcome {
    /// The step produced `output`.
    Succeeded {
        /// The step's result.
        output: Value,
        /// The structure hash (keys and types, not values) of `output`, journaled beside
        /// it by agent runs; absent in older journals and for other steps.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shape: Option<String>,
    },
    /// The step failed.
    Failed {
        /// What went wrong.
        class: ErrorClass,
        /// In words.
        message: String,
    },
    /// A person or a policy skipped the step.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// A person's (or an expiry's) answer to an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    /// The action may go ahead.
    Approved,
    /// The action must not happen.
    Denied,
    /// Nobody answered in time.
    Expired,
}

impl ApprovalDecision {
    /// The decision's name as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            ApprovalDecision::Approved => "approved",
            ApprovalDecision::Denied => "denied",
            ApprovalDecision::Expired => "expired",
        }
    }
}

/// How a generated program ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ProgramOutcome {
    /// It ran and set `result`.
    Succeeded {
        /// The program's `result`.
        result: Value,
    },
    /// It failed.
    Failed {
        /// The failure's class (usually `code_error`).
        class: ErrorClass,
        /// The error message and traceback.
        message: String,
    },
}

/// One event of a run, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JournalEvent {
    /// A run was created.
    RunCreated {
        /// What the run is (a plan's name, an agent task).
        name: String,
        /// The run's input.
        #[serde(default)]
        input: Value,
    },
    /// A run moved to another state.
    RunStateChanged {
        /// The new state.
        state: RunState,
        /// Why, when there is more to say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A step started.
    StepStarted {
        /// The step's number within the run.
        step: u32,
        /// The step's name.
        name: String,
        /// The target it calls.
        target: String,
        /// The call's input.
        #[serde(default)]
        input: Value,
    },
    /// A step ended.
    StepFinished {
        /// The step's number within the run.
        step: u32,
        /// How it ended.
        outcome: StepOutcome,
    },
    /// An action is held until a person approves it.
    ApprovalRequested {
        /// The approval's id.
        approval_id: String,
        /// The step it holds.
        step: u32,
        /// The tool that would be called.
        tool: String,
        /// The digest of the arguments the person is shown.
        args_digest: String,
        /// When it expires, in milliseconds since the Unix epoch.
        expires_at_ms: i64,
        /// The arguments the digest covers, as the person is shown them (forever: a
        /// retry with new parameters asks anew and never changes these). `null` in
        /// events written before they were recorded.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        args: Value,
    },
    /// An approval was decided.
    ApprovalDecided {
        /// The approval's id.
        approval_id: String,
        /// The answer.
        decision: ApprovalDecision,
        /// Who decided (a person, or `expiry`).
        by: String,
    },
    /// A ticket (an escalation with its context package) was opened.
    TicketOpened {
        /// The ticket's id.
        ticket_id: String,
        /// The failing step, if any.
        step: Option<u32>,
        /// The class of the failure escalated.
        class: ErrorClass,
        /// One line for the inbox.
        summary: String,
        /// The context package.
        context: Value,
    },
    /// A ticket was answered.
    TicketResolved {
        /// The ticket's id.
        ticket_id: String,
        /// The guidance: retry, retry with new params, skip or abort, with details.
        resolution: Value,
        /// Who answered.
        by: String,
    },
    /// A generated program was run.
    ProgramRecorded {
        /// The step it belongs to.
        step: u32,
        /// Which program of the step's correction chain (1 for the first).
        attempt: u32,
        /// The program's source.
        program: String,
        /// How it ended.
        outcome: ProgramOutcome,
    },
    /// A model call through the gateway: one event a call, no projection row (at
    /// thousands of calls a second, the journal's writes are its cost).
    ModelCalled {
        /// The model name the agent used.
        model: String,
        /// The call as the gateway recorded it: prompt digest, answering model,
        /// attempts, usage, cost, failures, rescue.
        record: Value,
    },
    /// A process took the run over from another whose lease had expired (it died or
    /// stalled); the earlier holder can no longer write to the run (fencing).
    RunTakenOver {
        /// The new holder.
        by: String,
        /// The holder whose lease expired, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// The new lease's epoch.
        epoch: u64,
    },
    /// An attempt whose process died (or lost the run) before it ended: its outcome is
    /// unknown, so it is closed as abandoned and never counted as a success.
    AttemptAbandoned {
        /// The step it belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
        /// The target it called.
        target: String,
        /// Its number.
        attempt: u32,
    },
    /// A keel-core policy event within the run.
    Policy {
        /// The step it belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
        /// The event.
        event: Event,
    },
}

impl JournalEvent {
    /// The event's type name as stored (`step_started`, or `policy.retry_scheduled`).
    pub fn kind(&self) -> &'static str {
        match self {
            JournalEvent::RunCreated { .. } => "run_created",
            JournalEvent::RunStateChanged { .. } => "run_state_changed",
            JournalEvent::StepStarted { .. } => "step_started",
            JournalEvent::StepFinished { .. } => "step_finished",
            JournalEvent::ApprovalRequested { .. } => "approval_requested",
            JournalEvent::ApprovalDecided { .. } => "approval_decided",
            JournalEvent::TicketOpened { .. } => "ticket_opened",
            JournalEvent::TicketResolved { .. } => "ticket_resolved",
            JournalEvent::ProgramRecorded { .. } => "program_recorded",
            JournalEvent::ModelCalled { .. } => "model_called",
            JournalEvent::RunTakenOver { .. } => "run_taken_over",
            JournalEvent::AttemptAbandoned { .. } => "attempt_abandoned",
            JournalEvent::Policy { event, .. } => policy_kind(event),
        }
    }
}

fn policy_kind(event: &Event) -> &'static str {
    match event {
        Event::AttemptStarted { .. } => "policy.attempt_started",
        Event::AttemptEnded { .. } => "policy.attempt_ended",
        Event::RetryScheduled { .. } => "policy.retry_scheduled",
        Event::RetryRefused { .. } => "policy.retry_refused",
        Event::BreakerTransition { .. } => "policy.breaker_transition",
        Event::FallbackTaken { .. } => "policy.fallback_taken",
        Event::CorrectionRound { .. } => "policy.correction_round",
        Event::BudgetCharged { .. } => "policy.budget_charged",
        Event::BudgetExceeded { .. } => "policy.budget_exceeded",
        Event::LoopDetected { .. } => "policy.loop_detected",
        Event::FaultInjected { .. } => "policy.fault_injected",
        Event::SchemaDrift { .. } => "policy.schema_drift",
    }
}

/// An event to append: which run it belongs to, and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The run.
    pub run_id: String,
    /// The event.
    pub event: JournalEvent,
    /// Append it only while this lease on its run is held at this epoch: a process
    /// that lost the run (it stalled past its lease and another took over) cannot
    /// write to it any more.
    pub fence: Option<std::sync::Arc<crate::Lease>>,
    /// Give the fence's lease up in the transaction that appends this event (a drive's
    /// last event): one transaction fewer, and the run is never seen ended but held.
    pub release: bool,
}

impl NewEvent {
    /// An event of `run_id`.
    pub fn new(run_id: impl Into<String>, event: JournalEvent) -> Self {
        Self { run_id: run_id.into(), event, fence: None, release: false }
    }

    /// The same event, fenced by `lease` (see [`NewEvent::fence`]).
    pub fn fenced(mut self, lease: Option<std::sync::Arc<crate::Lease>>) -> Self {
        self.fence = lease;
        self
    }

    /// The same event, giving its fence's lease up when it is appended (see
    /// [`NewEvent::release`]); without a fence, nothing is released.
    pub fn releasing(mut self) -> Self {
        self.release = true;
        self
    }
}

/// A run to create (unless it exists) in a batch of the writer's, with its first
/// events, and the lease its creator takes on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Creation {
    /// The run's id.
    pub run_id: String,
    /// Its first events.
    pub events: Vec<JournalEvent>,
    /// The owner taking its lease, and for how long.
    pub lease: (String, std::time::Duration),
}

/// An event as stored, with its place in the run's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The run.
    pub run_id: String,
    /// 1 for the run's first event, then consecutive.
    pub seq: u64,
    /// The schema version it was written with.
    pub schema_version: u32,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub recorded_at_ms: i64,
    /// The event.
    pub event: JournalEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approval_requested_before_args_were_recorded_still_reads() {
        let old = r#"{"type":"approval_requested","approval_id":"a","step":1,"tool":"pay","args_digest":"d","expires_at_ms":5}"#;
        let JournalEvent::ApprovalRequested { args, .. } = serde_json::from_str(old).unwrap() else {
            panic!("not an approval_requested")
        };
        assert!(args.is_null());
        let new = JournalEvent::ApprovalRequested {
            approval_id: "a".into(),
            step: 1,
            tool: "pay".into(),
            args_digest: "d".into(),
            expires_at_ms: 5,
            args: serde_json::json!({"amount": 150}),
        };
        let back: JournalEvent = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn a_step_finished_before_shapes_were_recorded_still_reads() {
        let old = r#"{"type":"step_finished","step":1,"outcome":{"status":"succeeded","output":[1]}}"#;
        let JournalEvent::StepFinished { outcome: StepOutcome::Succeeded { output, shape }, .. } =
            serde_json::from_str(old).unwrap()
        else {
            panic!("not a succeeded step_finished")
        };
        assert_eq!((output, shape), (serde_json::json!([1]), None));
        let plain = JournalEvent::StepFinished {
            step: 1,
            outcome: StepOutcome::Succeeded { output: serde_json::json!([1]), shape: None },
        };
        assert_eq!(serde_json::to_string(&plain).unwrap(), old, "no shape: the record as before");
        let new = JournalEvent::StepFinished {
            step: 1,
            outcome: StepOutcome::Succeeded { output: serde_json::json!([1]), shape: Some("0f1e".into()) },
        };
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""shape":"0f1e""#), "{text}");
        assert_eq!(serde_json::from_str::<JournalEvent>(&text).unwrap(), new);
    }
}
