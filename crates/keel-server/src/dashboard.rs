//! `/api/dashboard`: what the inbox's dashboard charts — error rate by target,
//! retries per run, top error classes over time, breaker states — computed from the
//! journal.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use keel_core::BreakerState;
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

/// The window the dashboard covers.
pub const WINDOW_MS: i64 = 24 * 3_600_000;

/// Computes the dashboard over the last [`WINDOW_MS`]: aggregated by the database from
/// the attempts projection (indexed by start time, so its cost follows the window, not
/// the journal's history), breaker states live from this process's breakers.
///
/// # Errors
/// The journal's.
pub async fn dashboard(State(s): State<AppState>) -> Result<Json<Dashboard>, ApiError> {
    let now_ms = s
        .clock
        .wall()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    let stats = s.journal.attempt_stats(now_ms.saturating_sub(WINDOW_MS)).await?;
    let mut d = Dashboard::default();
    for (target, calls, errors) in stats.by_target {
        let t = d.targets.entry(target).or_default();
        t.calls = calls;
        t.errors = errors;
        t.error_rate = if calls == 0 { 0.0 } else { errors as f64 / calls as f64 };
    }
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for (class, hour, n) in stats.errors_by_hour {
        *d.classes_over_time.entry(class.clone()).or_default().entry(hour).or_default() += n;
        *totals.entry(class).or_default() += n;
    }
    let live = s.runner.breaker_states().into_iter().chain(s.gateway.iter().flat_map(|g| {
        g.model_names().filter_map(|m| g.breaker(m).map(|b| (m.to_owned(), b.state()))).collect::<Vec<_>>()
    }));
    for (target, state) in live {
        d.targets.entry(target).or_default().breaker = Some(state_name(state).into());
    }
    d.retries_per_run = stats.retries_by_run;
    let mut top: Vec<_> = totals.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    d.top_classes = top;
    Ok(Json(d))
}

fn state_name(s: BreakerState) -> &'static str {
    s.as_str()
}
