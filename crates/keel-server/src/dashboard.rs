//! `/api/dashboard`: what the inbox's dashboard charts — error rate by target,
//! retries per run, top error classes over time, breaker states — computed from the
//! journal.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use keel_core::{AttemptOutcome, BreakerState, Event};
use keel_journal::JournalEvent;
use serde::Serialize;

use crate::api::AppState;
use crate::error::ApiError;

/// Calls and errors of one target.
#[derive(Debug, Default, Serialize, schemars::JsonSchema)]
pub struct TargetStats {
    /// Attempts made.
    pub calls: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// `errors / calls`.
    pub error_rate: f64,
    /// The breaker's last known state.
    pub breaker: Option<String>,
}

/// The dashboard's data.
#[derive(Debug, Default, Serialize, schemars::JsonSchema)]
pub struct Dashboard {
    /// Per target.
    pub targets: BTreeMap<String, TargetStats>,
    /// Retries per run (run id → retries), newest runs first.
    pub retries_per_run: Vec<(String, u64)>,
    /// Failed attempts per class per hour bucket (ms since the epoch of the hour).
    pub classes_over_time: BTreeMap<String, BTreeMap<i64, u64>>,
    /// Failed attempts per class, most frequent first.
    pub top_classes: Vec<(String, u64)>,
}

/// Computes the dashboard.
///
/// # Errors
/// The journal's.
pub async fn dashboard(State(s): State<AppState>) -> Result<Json<Dashboard>, ApiError> {
    let mut d = Dashboard::default();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut runs = Vec::new();
    for id in s.journal.run_ids().await? {
        let Some(export) = s.journal.export_run(&id).await? else { continue };
        let mut retries = 0;
        for e in &export.events {
            let JournalEvent::Policy { event, .. } = &e.event else { continue };
            match event {
                Event::AttemptEnded { target, outcome, .. } => {
                    let t = d.targets.entry(target.to_string()).or_default();
                    t.calls += 1;
                    if let AttemptOutcome::Failed(class) = outcome {
                        t.errors += 1;
                        let hour = e.recorded_at_ms - e.recorded_at_ms.rem_euclid(3_600_000);
                        *d.classes_over_time
                            .entry(class.to_string())
                            .or_default()
                            .entry(hour)
                            .or_default() += 1;
                        *totals.entry(class.to_string()).or_default() += 1;
                    }
                }
                Event::RetryScheduled { .. } => retries += 1,
                Event::BreakerTransition { target, to, .. } => {
                    d.targets.entry(target.to_string()).or_default().breaker = Some(state_name(*to).into());
                }
                _ => {}
            }
        }
        runs.push((export.state.run.updated_at_ms, id, retries));
    }
    for t in d.targets.values_mut() {
        t.error_rate = if t.calls == 0 { 0.0 } else { t.errors as f64 / t.calls as f64 };
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.0));
    d.retries_per_run = runs.into_iter().take(30).map(|(_, id, r)| (id, r)).collect();
    let mut top: Vec<_> = totals.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    d.top_classes = top;
    Ok(Json(d))
}

fn state_name(s: BreakerState) -> &'static str {
    s.as_str()
}
