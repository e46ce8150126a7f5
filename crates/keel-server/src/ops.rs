//! Operations: `/healthz` (no key), `/readyz` (storage reachable), `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use keel_core::{Classified as _, ErrorClass};
use serde_json::json;

use crate::api::AppState;
use crate::error::ApiError;

/// Alive.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// The gateway's budgets: each API key's, and every run's summed as `runs` (empty
/// without a gateway).
pub async fn budgets(State(s): State<AppState>) -> Json<BudgetsView> {
    let mut budgets = s.gateway.as_ref().map(|g| g.budgets()).unwrap_or_default();
    // The runs driven here now, each under its `[run].budget` (`run:ID`): their
    // model calls and paid tools draw on it.
    for budget in s.runner.run_budgets() {
        budgets.entry(budget.name().to_string()).or_default().add(&budget);
    }
    Json(BudgetsView { budgets })
}

/// `GET /api/budgets`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct BudgetsView {
    /// By budget name (`key:NAME`, `runs` — every agent run's gateway account
    /// together —, and `run:ID` for each run driven by this server now).
    pub budgets: std::collections::BTreeMap<String, keel_gateway::BudgetMetrics>,
}

/// How long `/readyz` waits for the journal before answering 503.
pub const READY_BOUND: Duration = Duration::from_secs(1);

/// Whether the journal could be written at the last check, to log the start and the
/// end of an outage once each (not every probe).
#[derive(Debug)]
pub struct StorageHealth(AtomicBool);

impl Default for StorageHealth {
    fn default() -> Self {
        Self(AtomicBool::new(true))
    }
}

impl StorageHealth {
    /// Records the outcome of a check, logging a change.
    pub fn observe(&self, outcome: Result<(), &str>) {
        let ok = outcome.is_ok();
        if self.0.swap(ok, Ordering::SeqCst) != ok {
            match outcome {
                Ok(()) => tracing::info!("journal writable again: ready"),
                Err(e) => tracing::warn!(error = e, "journal cannot be written: not ready"),
            }
        }
    }
}

/// Ready: the journal can be written now (a bounded write probe), else 503 within
/// [`READY_BOUND`] — a full disk or a database that is down or unreachable.
///
/// # Errors
/// 503 with the journal's class (`timeout` when it did not answer in time).
pub async fn readyz(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let failure = match tokio::time::timeout(READY_BOUND, s.journal.check_writable()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(ApiError::new(e.class(), format!("the journal cannot be written: {e}"))),
        Err(_) => Some(ApiError::new(
            ErrorClass::Timeout,
            format!("the journal did not answer within {}", humantime::format_duration(READY_BOUND)),
        )),
    };
    s.storage.observe(failure.as_ref().map_or(Ok(()), |e| Err(e.message.as_str())));
    if let Some(mut e) = failure {
        e.status = Some(StatusCode::SERVICE_UNAVAILABLE);
        return Err(e);
    }
    Ok(Json(json!({"status": "ready", "storage": format!("{:?}", s.journal.backend()).to_lowercase()})))
}

/// Prometheus text exposition; the approvals-waiting gauge is read at scrape time.
///
/// # Errors
/// The journal's.
pub async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    // Counted by index: the cost does not grow with the journal's history.
    let (waiting, open) = s.journal.waiting().await?;
    s.metrics.gauge("keel_approvals_waiting", &[], waiting as f64);
    s.metrics.gauge("keel_tickets_open", &[], open as f64);
    if let Some(a) = &s.alerts {
        s.metrics.gauge("keel_incidents_open", &[], a.router.open_incidents() as f64);
        s.metrics.gauge("keel_alert_failures_dropped", &[], a.router.dropped() as f64);
    }
    if let Some(gw) = &s.gateway {
        gw.metrics().record(s.metrics.recorder());
    }
    let text = s.metrics.render();
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
