//! The people's side of a run: listing and deciding approvals, resolving tickets.
//!
//! Used by `keel approvals`/`keel tickets` and by the server's API and web inbox alike,
//! so a decision means the same wherever it is made. A decision is an event in the
//! journal; it moves the run back to `running` so that whoever works runs (a waiting
//! `keel run --wait`, `keel runs resume`, the server's workers) carries it on.

use std::time::SystemTime;

use keel_core::ErrorClass;
use keel_journal::{
    ApprovalDecision, ApprovalView, Journal, JournalEvent, NewEvent, RunState, RunView, StepView, TicketView,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::runner::{Error, Result};

/// An approval with what the person needs to decide it.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalItem {
    /// The approval.
    pub approval: ApprovalView,
    /// Its run.
    pub run: RunView,
    /// The step it holds; its `input` is the approval's arguments (below), not the
    /// step's latest (a ticket's retry with new parameters changes those).
    pub step: Option<StepView>,
    /// Exactly the arguments the approval's digest covers, forever; `None` for an
    /// approval requested before they were recorded whose step's input no longer
    /// matches the digest.
    pub args: Option<Value>,
}

/// The arguments `a` covers: as recorded with it, else (older journals) the step's
/// input if its digest is the approval's.
fn covered_args(a: &ApprovalView, step: Option<&StepView>) -> Option<Value> {
    if let Some(args) = &a.args {
        return Some(args.clone());
    }
    let input = &step?.input;
    let canary = format!("{}#rest-after-canary", a.tool);
    [a.tool.as_str(), canary.as_str()]
        .into_iter()
        .any(|tool| crate::runner::args_digest(tool, input) == a.args_digest)
        .then(|| input.clone())
}

/// A ticket with its run.
#[derive(Debug, Clone, Serialize)]
pub struct TicketItem {
    /// The ticket (its `context` is the context package).
    pub ticket: TicketView,
    /// Its run.
    pub run: RunView,
}

/// What a person answers to a ticket.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Guidance {
    /// Run the step again, with new parameters if given.
    Retry {
        /// Parameters replacing the step's.
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<Value>,
    },
    /// Skip the step and go on.
    Skip,
    /// Stop the run.
    Abort,
}

fn wall_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The most items a list shows: the pending or open ones first, then the latest others.
pub const LIST_LIMIT: u32 = 200;

/// The approvals (pending first, newest first, at most [`LIST_LIMIT`]), with context:
/// indexed queries, whatever the journal's history.
///
/// # Errors
/// The journal's.
pub async fn approvals(journal: &dyn Journal) -> Result<Vec<ApprovalItem>> {
    let mut rows = journal.approvals(Some("pending"), LIST_LIMIT).await?;
    if rows.len() < LIST_LIMIT as usize {
        let rest = journal.approvals(None, LIST_LIMIT).await?;
        rows.extend(rest.into_iter().filter(|(a, _, _)| a.status != "pending"));
        rows.truncate(LIST_LIMIT as usize);
    }
    Ok(rows.into_iter().map(|(approval, run, step)| item(approval, run, step)).collect())
}

fn item(approval: ApprovalView, run: RunView, mut step: Option<StepView>) -> ApprovalItem {
    let args = covered_args(&approval, step.as_ref());
    if let Some(step) = &mut step {
        step.input = args.clone().unwrap_or(Value::Null);
    }
    ApprovalItem { approval, run, step, args }
}

async fn approval_item(journal: &dyn Journal, id: &str) -> Result<Option<ApprovalItem>> {
    Ok(journal.approval(id).await?.map(|(approval, run, step)| item(approval, run, step)))
}

/// One approval by id.
///
/// # Errors
/// `not_found` for an unknown id; the journal's.
pub async fn approval(journal: &dyn Journal, id: &str) -> Result<ApprovalItem> {
    approval_item(journal, id).await?.ok_or_else(|| Error::NotFound(format!("approval `{id}`")))
}

/// Decides a pending approval. An expired one cannot be approved: it is marked
/// expired and the run takes the configured outcome when it resumes.
///
/// # Errors
/// `invalid_request` when the approval is not pending or has expired; the journal's.
pub async fn decide(
    journal: &dyn Journal,
    id: &str,
    approve: bool,
    by: &str,
    now: SystemTime,
) -> Result<ApprovalItem> {
    let item = approval(journal, id).await?;
    let a = &item.approval;
    if a.status != "pending" {
        return Err(Error::Refused(format!("approval `{id}` is already {}", a.status)));
    }
    let run_id = a.run_id.clone();
    let mut events = Vec::new();
    let expired = a.expires_at_ms <= wall_ms(now);
    let decision = match (expired, approve) {
        (true, _) => ApprovalDecision::Expired,
        (false, true) => ApprovalDecision::Approved,
        (false, false) => ApprovalDecision::Denied,
    };
    events.push(NewEvent::new(
        &run_id,
        JournalEvent::ApprovalDecided { approval_id: id.to_owned(), decision, by: by.to_owned() },
    ));
    if !item.run.state.is_terminal() {
        events.push(NewEvent::new(
            &run_id,
            JournalEvent::RunStateChanged {
                state: RunState::Running,
                reason: Some(format!("approval {id} {} by {by}", decision.as_str())),
            },
        ));
    }
    journal.append(&events).await?;
    if expired {
        return Err(Error::Refused(format!("approval `{id}` expired before it was decided")));
    }
    approval(journal, id).await
}

/// The tickets (open first, newest first, at most [`LIST_LIMIT`]).
///
/// # Errors
/// The journal's.
pub async fn tickets(journal: &dyn Journal) -> Result<Vec<TicketItem>> {
    let mut rows = journal.tickets(Some("open"), LIST_LIMIT).await?;
    if rows.len() < LIST_LIMIT as usize {
        let rest = journal.tickets(None, LIST_LIMIT).await?;
        rows.extend(rest.into_iter().filter(|(t, _)| t.status != "open"));
        rows.truncate(LIST_LIMIT as usize);
    }
    Ok(rows.into_iter().map(|(ticket, run)| TicketItem { ticket, run }).collect())
}

/// One ticket by id.
///
/// # Errors
/// `not_found` for an unknown id; the journal's.
pub async fn ticket(journal: &dyn Journal, id: &str) -> Result<TicketItem> {
    let (ticket, run) = journal.ticket(id).await?.ok_or_else(|| Error::NotFound(format!("ticket `{id}`")))?;
    Ok(TicketItem { ticket, run })
}

/// Resolves an open ticket with a person's guidance.
///
/// # Errors
/// `invalid_request` when the ticket is not open; the journal's.
pub async fn resolve(journal: &dyn Journal, id: &str, guidance: &Guidance, by: &str) -> Result<TicketItem> {
    let item = ticket(journal, id).await?;
    if item.ticket.status != "open" {
        return Err(Error::Refused(format!("ticket `{id}` is already {}", item.ticket.status)));
    }
    let run_id = item.run.run_id.clone();
    let resolution = serde_json::to_value(guidance).unwrap_or_else(|_| json!({}));
    let mut events = vec![NewEvent::new(
        &run_id,
        JournalEvent::TicketResolved { ticket_id: id.to_owned(), resolution, by: by.to_owned() },
    )];
    if !item.run.state.is_terminal() {
        let state = match guidance {
            Guidance::Abort => RunState::Cancelled,
            Guidance::Retry { .. } | Guidance::Skip => RunState::Running,
        };
        events.push(NewEvent::new(
            &run_id,
            JournalEvent::RunStateChanged { state, reason: Some(format!("ticket {id} resolved by {by}")) },
        ));
    }
    journal.append(&events).await?;
    ticket(journal, id).await
}

/// The class a ticket was opened for, parsed.
pub fn ticket_class(t: &TicketView) -> Option<ErrorClass> {
    t.class.parse().ok()
}
