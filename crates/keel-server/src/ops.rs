//! Operations: `/healthz` (no key), `/readyz` (storage reachable), `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
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
    Json(BudgetsView { budgets: s.gateway.as_ref().map(|g| g.budgets()).unwrap_or_default() })
}

/// `GET /api/budgets`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct BudgetsView {
    /// By budget name (`key:NAME`, `runs`).
    pub budgets: std::collections::BTreeMap<String, keel_gateway::BudgetMetrics>,
}

/// Ready: the journal answers.
///
/// # Errors
/// The journal's, as 503-ish classes.
pub async fn readyz(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    s.journal.run_ids().await?;
    Ok(Json(json!({"status": "ready", "storage": format!("{:?}", s.journal.backend()).to_lowercase()})))
}

/// Prometheus text exposition; the approvals-waiting gauge is read at scrape time.
///
/// # Errors
/// The journal's.
pub async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let approvals = keel_runtime::inbox::approvals(&*s.journal).await?;
    let waiting = approvals.iter().filter(|a| a.approval.status == "pending").count();
    s.metrics.gauge("keel_approvals_waiting", &[], waiting as f64);
    let tickets = keel_runtime::inbox::tickets(&*s.journal).await?;
    let open = tickets.iter().filter(|t| t.ticket.status == "open").count();
    s.metrics.gauge("keel_tickets_open", &[], open as f64);
    let mut text = s.metrics.render();
    if let Some(gw) = &s.gateway {
        text.push_str(&gw.metrics().render_prometheus());
    }
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
