//! `/api`: runs, approvals, tickets, incidents and tool invocation. Handlers are thin: the
//! decisions live in keel-runtime (`Runner`, `inbox`), shared with the CLI.

pub mod approvals;
pub mod faults;
pub mod incidents;
pub mod runs;
pub mod tickets;
pub mod tools;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_core::Clock;
use keel_journal::Journal;
use keel_runtime::{Config, Runner};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Carries runs out.
    pub runner: Arc<Runner>,
    /// The journal.
    pub journal: Arc<dyn Journal>,
    /// keel.toml.
    pub config: Arc<Config>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Metrics and the change feed.
    pub metrics: Arc<Metrics>,
    /// Wakes the workers (a run to carry on).
    pub wake: Arc<Notify>,
    /// The runs this process is driving (a request's and a worker's never overlap).
    pub drives: Arc<crate::workers::Drives>,
    /// Each caller's loop guard for tool invocations.
    pub callers: Arc<keel_runtime::invoke::Callers>,
    /// Whether the journal could be written at the last readiness check.
    pub storage: Arc<crate::ops::StorageHealth>,
    /// The model gateway, when keel.toml has `[models]`.
    pub gateway: Option<Arc<keel_gateway::Gateway>>,
    /// The gateway's journal writer, flushed at shutdown.
    pub gateway_writer: Option<keel_journal::JournalWriter>,
    /// The alert router, when `[alerts]` has sinks.
    pub alerts: Option<Arc<Alerting>>,
    /// Sentry, when `[telemetry.sentry]` is set.
    pub sentry: Option<Arc<keel_telemetry::sentry::Reporter>>,
}

/// The alert router and its tasks (drained by `serve` at shutdown).
#[derive(Debug)]
pub struct Alerting {
    /// The sink the runner's and the gateway's events reach.
    pub router: Arc<keel_telemetry::alert::AlertRouter>,
    /// Its tasks, taken at shutdown.
    pub tasks: std::sync::Mutex<Option<keel_telemetry::alert::AlertTasks>>,
}

impl AppState {
    /// Wall time now, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        ms(self.clock.wall())
    }

    /// Tool invocation (`/api/tools/{name}/invoke`, `/mcp`), driving runs beside this
    /// process's workers.
    pub fn invoker(&self) -> keel_runtime::Invoker {
        keel_runtime::Invoker::new(self.runner.clone(), self.drives.clone(), self.clock.clone())
            .with_callers(self.callers.clone())
    }
}

pub(crate) fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `?wait=30s`: how long a request may wait for a person or a run.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct WaitQuery {
    /// A duration such as "30s"; at most 5 minutes. On a tool invocation it bounds
    /// the whole request; without it the request waits while the run is worked, but
    /// not for a person.
    pub wait: Option<String>,
}

impl WaitQuery {
    /// The wait asked for, capped.
    ///
    /// # Errors
    /// `invalid_request` for an unreadable duration.
    pub fn duration(&self) -> Result<Duration, crate::error::ApiError> {
        match &self.wait {
            None => Ok(Duration::ZERO),
            Some(w) => humantime::parse_duration(w).map(|d| d.min(Duration::from_secs(300))).map_err(|e| {
                crate::error::ApiError::new(keel_core::ErrorClass::InvalidRequest, format!("wait: {e}"))
            }),
        }
    }
}
