//! `/api/incidents`: what alerting opened, with each incident's timeline, from the
//! journal (so it survives a restart); and [`JournalLog`], the alert router's record
//! written into that journal.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use keel_journal::{AlertRecord, IncidentView, Journal};
use keel_telemetry::alert::{AlertEntry, AlertLog, OpenIncident};
use serde::{Deserialize, Serialize};

use super::{AppState, ms};
use crate::error::ApiError;

/// The alert router's [`AlertLog`] over the journal: entries are written from the
/// log's own task (keel-telemetry's), never from a call's path.
#[derive(Debug)]
pub struct JournalLog(pub Arc<dyn Journal>);

/// The journal's line for `e`.
pub fn record(e: &AlertEntry) -> AlertRecord {
    AlertRecord {
        at_ms: ms(e.at),
        incident: e.incident.clone(),
        kind: e.kind.as_str().to_owned(),
        rule: e.rule.clone(),
        key: e.key.clone(),
        severity: e.severity.as_str().to_owned(),
        class: e.class.map(|c| c.as_str().to_owned()),
        target: e.target.clone(),
        count: e.count,
        sink: e.sink.clone(),
        action: e.action.map(|a| a.as_str().to_owned()),
        detail: e.detail.clone(),
    }
}

#[async_trait::async_trait]
impl AlertLog for JournalLog {
    async fn write(&self, entries: &[AlertEntry]) -> Result<(), String> {
        let records: Vec<AlertRecord> = entries.iter().map(record).collect();
        self.0.record_alerts(&records).await.map_err(|e| e.to_string())
    }
}

/// Incidents the journal holds open, for a starting router to take over (an earlier
/// process opened them). A journal that cannot be read gives none, with a warning: the
/// router starts anyway.
pub async fn open_before(journal: &dyn Journal) -> Vec<OpenIncident> {
    let listed = match journal.incidents(500).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(target: "keel::alert", error = %e, "open incidents not read: none taken over");
            return Vec::new();
        }
    };
    listed
        .into_iter()
        .filter(IncidentView::is_open)
        .map(|i| {
            // Still held: a `held` line with no `released` after it.
            let held = i
                .timeline
                .iter()
                .rev()
                .find(|e| e.kind == "held" || e.kind == "released")
                .is_some_and(|e| e.kind == "held");
            OpenIncident {
                class: i.class.as_deref().and_then(|c| c.parse().ok()),
                id: i.id,
                rule: i.rule,
                key: i.key,
                target: i.target,
                count: i.count,
                held,
            }
        })
        .collect()
}

/// `GET /api/incidents?limit=50`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentsQuery {
    /// Open incidents at most, and resolved ones at most (default 50, at most 500).
    pub limit: Option<u32>,
}

/// One incident as `/api/incidents` lists it.
#[derive(Debug, Serialize)]
pub struct IncidentItem {
    /// `open` or `resolved`.
    pub state: &'static str,
    /// The incident and its timeline.
    #[serde(flatten)]
    pub incident: IncidentView,
}

/// Incidents, open first (latest first), then the latest resolved, each with its
/// timeline: triggered, held for quiet hours, released, resolved or cancelled, and
/// every delivery's outcome per sink.
///
/// # Errors
/// The journal's.
pub async fn list(
    State(s): State<AppState>,
    Query(q): Query<IncidentsQuery>,
) -> Result<Json<Vec<IncidentItem>>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let incidents = s.journal.incidents(limit).await?;
    Ok(Json(
        incidents
            .into_iter()
            .map(|i| IncidentItem { state: if i.is_open() { "open" } else { "resolved" }, incident: i })
            .collect(),
    ))
}
