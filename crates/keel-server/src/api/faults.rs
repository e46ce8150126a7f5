//! `/api/faults`: fault injection on a running server, for drills — set, read and
//! clear a tool's injected faults (`{rate, kinds, latency, seed}`, keel-core's
//! `FaultConfig`) without a restart. Admin keys only. Calls that start after the
//! change draw from it; their events mark each fault as injected, so the alert
//! router, Sentry and the inbox do not take a drill for an incident.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Extension, Path, State};
use keel_core::{ErrorClass, FaultConfig};

use super::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};

fn known(s: &AppState, tool: &str) -> Result<(), ApiError> {
    if s.config.tools.contains_key(tool) {
        return Ok(());
    }
    Err(ApiError::new(ErrorClass::NotFound, format!("no tool named `{tool}`")))
}

/// The faults set on this process, by tool.
///
/// # Errors
/// `forbidden` without the admin role.
pub async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<BTreeMap<String, FaultConfig>>, ApiError> {
    caller.require(&[])?;
    Ok(Json(s.runner.faults()))
}

/// Sets a tool's injected faults.
///
/// # Errors
/// `forbidden` without the admin role, `not_found` for an unknown tool,
/// `invalid_request` for a value out of range (named by key).
pub async fn set(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tool): Path<String>,
    ApiJson(fault): ApiJson<FaultConfig>,
) -> Result<Json<FaultConfig>, ApiError> {
    caller.require(&[])?;
    known(&s, &tool)?;
    if let Err(errors) = fault.validate() {
        let message =
            errors.iter().map(|e| format!("{}: {}", e.key, e.message)).collect::<Vec<_>>().join("; ");
        return Err(ApiError::new(ErrorClass::InvalidRequest, message));
    }
    s.runner
        .set_fault(&tool, Some(fault.clone()))
        .map_err(|e| ApiError::new(ErrorClass::InvalidRequest, e.to_string()))?;
    tracing::warn!(target: "keel::decision", tool = %tool, rate = fault.rate, by = %caller.name, "fault injection set");
    Ok(Json(fault))
}

/// Clears a tool's injected faults (back to its configured policy).
///
/// # Errors
/// `forbidden` without the admin role, `not_found` for an unknown tool.
pub async fn clear(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tool): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(&[])?;
    known(&s, &tool)?;
    s.runner.set_fault(&tool, None).map_err(|e| ApiError::new(ErrorClass::InvalidRequest, e.to_string()))?;
    tracing::info!(target: "keel::decision", tool = %tool, by = %caller.name, "fault injection cleared");
    Ok(Json(serde_json::json!({"tool": tool, "cleared": true})))
}
