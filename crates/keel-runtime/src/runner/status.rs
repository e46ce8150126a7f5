//! How a run ended (for now), and the exit code `keel run` gives for it.

use keel_core::ErrorClass;
use serde::Serialize;

/// Where a run stands after the runner drove it as far as it could.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunStatus {
    /// Every step is done.
    Completed,
    /// A step failed in a way no policy or person can fix here.
    Failed {
        /// The class of the failure.
        class: ErrorClass,
        /// What happened.
        message: String,
    },
    /// A step waits for a person's approval; no process waits with it.
    WaitingApproval {
        /// The approval to decide.
        approval_id: String,
    },
    /// A ticket is open: a person must say how to go on.
    Escalated {
        /// The ticket to resolve.
        ticket_id: String,
    },
    /// The run's deadline passed.
    TimedOut,
    /// Someone cancelled the run.
    Cancelled,
}

impl RunStatus {
    /// The exit code of `keel run` / `keel runs resume` for this status.
    ///
    /// | code | status |
    /// |---|---|
    /// | 0 | completed |
    /// | 1 | failed |
    /// | 2 | bad input (plan, config, arguments): nothing was touched |
    /// | 3 | waiting for approval |
    /// | 4 | escalated: a ticket is open |
    /// | 5 | timed out |
    /// | 6 | cancelled |
    /// | 7 | busy: another process works the run (not a status: the CLI's) |
    /// | 8 | Keel could not use its journal (not a status: the CLI's) |
    pub fn exit_code(&self) -> u8 {
        match self {
            RunStatus::Completed => 0,
            RunStatus::Failed { .. } => 1,
            RunStatus::WaitingApproval { .. } => 3,
            RunStatus::Escalated { .. } => 4,
            RunStatus::TimedOut => 5,
            RunStatus::Cancelled => 6,
        }
    }

    /// Whether the run is over for good.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed { .. } | RunStatus::TimedOut | RunStatus::Cancelled
        )
    }
}
