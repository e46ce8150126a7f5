//! Alerting's record: every incident an alert rule opened, and its timeline (held for
//! quiet hours, released, resolved or cancelled, and each sink's delivery outcome), so
//! an operator sees after a restart what paged whom.
//!
//! Why tables of their own and not journal events: incidents belong to no run, and
//! the inbox lists them by state and time, so they are kept as rows (`incidents`, one
//! per incident, and `incident_events`, its timeline) written in one transaction per
//! batch by [`Journal::record_alerts`](crate::Journal::record_alerts). They are not
//! projections of `journal_events`: `rebuild_projections` leaves them alone, and
//! `prune` removes incidents resolved before its cutoff with their timelines.

use serde::{Deserialize, Serialize};

/// One line of the record, as the alert router hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The incident's id (unique per incident; a digest's id names no incident).
    pub incident: String,
    /// What happened: `triggered` (makes the incident's row), `held`, `released`,
    /// `resolved` and `cancelled` (close it), `delivered`, `failed`, `dropped`.
    pub kind: String,
    /// The rule.
    pub rule: String,
    /// The incident's key (a target, `target/class`, `*`).
    pub key: String,
    /// The rule's severity.
    pub severity: String,
    /// The class that crossed the threshold.
    pub class: Option<String>,
    /// Its target.
    pub target: Option<String>,
    /// Failures in the window when it opened.
    pub count: u32,
    /// The sink (deliveries).
    pub sink: Option<String>,
    /// What was delivered: `trigger`, `resolve`, `digest` (deliveries).
    pub action: Option<String>,
    /// More, in words.
    pub detail: Option<String>,
}

/// One line of an incident's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentEntry {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened (as [`AlertRecord::kind`]).
    pub kind: String,
    /// The sink (deliveries).
    pub sink: Option<String>,
    /// What was delivered (deliveries).
    pub action: Option<String>,
    /// More, in words.
    pub detail: Option<String>,
}

/// An incident with its timeline, oldest line first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentView {
    /// Its id.
    pub id: String,
    /// The rule that opened it.
    pub rule: String,
    /// Its key.
    pub key: String,
    /// The rule's severity.
    pub severity: String,
    /// The class that crossed the threshold.
    pub class: Option<String>,
    /// Its target.
    pub target: Option<String>,
    /// Failures in the window when it opened.
    pub count: u32,
    /// When it opened.
    pub triggered_at_ms: i64,
    /// When it resolved (or was cancelled); `None` while open.
    pub resolved_at_ms: Option<i64>,
    /// What happened to it, in order.
    pub timeline: Vec<IncidentEntry>,
}

impl IncidentView {
    /// Whether it is still open.
    pub fn is_open(&self) -> bool {
        self.resolved_at_ms.is_none()
    }
}
