//! `[telemetry]` of a keel.toml in a Python process: traces over OTLP and Sentry, as
//! `keel serve` sends them (keel-telemetry's exporter and reporter, not a copy).
//!
//! A step given the telemetry is an `execute_tool {target}` span per call (the
//! GenAI conventions' name, as the runner's steps are), its retries and refusals span
//! events in it; terminal failures, refused retries, stopped self-corrections and
//! escalations are Sentry events tagged with class, target and attempt. Both go out
//! from a runtime of the telemetry's own: a collector or a Sentry that is down costs
//! dropped batches, never a slower call.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{ErrorClass, Event, EventSink};
use keel_telemetry::sentry::Reporter;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::{approval_run, policy_error_under};

/// `[telemetry]`, running in this process.
#[pyclass(module = "keel._keel")]
pub(crate) struct Telemetry {
    reporter: Option<Arc<Reporter>>,
    traces: Option<keel_telemetry::TraceGuard>,
    runtime: crate::OwnRuntime,
}

#[pymethods]
impl Telemetry {
    /// Starts the exporter and the reporter of keel.toml's `text` (its `[telemetry]`;
    /// secrets from the environment, as `keel serve` reads them). Traces are exported
    /// by one telemetry per process (the process's `tracing` subscriber).
    #[staticmethod]
    fn from_toml(text: &str) -> PyResult<Telemetry> {
        let doc: toml::Table = text.parse().map_err(|e| PyValueError::new_err(format!("keel.toml: {e}")))?;
        let table = doc.get("telemetry").cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
        let config: keel_telemetry::TelemetryConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| PyValueError::new_err(format!("telemetry: {e}")))?;
        let telemetry =
            config.resolve(&|k| std::env::var(k).ok()).map_err(|e| policy_error_under("telemetry", e))?;
        if telemetry.otlp.is_none() && telemetry.sentry.is_none() {
            return Err(PyValueError::new_err(
                "telemetry: neither [telemetry.otlp] nor [telemetry.sentry] is configured",
            ));
        }
        let runtime = crate::OwnRuntime::new("keel-telemetry")?;
        let _in = runtime.enter();
        let traces = match &telemetry.otlp {
            None => None,
            Some(otlp) => {
                let (layer, guard) = keel_telemetry::otlp::layer(otlp, &telemetry.service_name)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                let subscriber = tracing_subscriber::registry()
                    .with(tracing_subscriber::filter::LevelFilter::INFO)
                    .with(layer);
                tracing::subscriber::set_global_default(subscriber).map_err(|_| {
                    PyRuntimeError::new_err(
                        "telemetry: this process exports its traces already (one keel.Telemetry with \
                         [telemetry.otlp] per process)",
                    )
                })?;
                Some(guard)
            }
        };
        let reporter = match &telemetry.sentry {
            None => None,
            Some(sentry) => {
                Some(Reporter::start(sentry).map_err(|e| PyRuntimeError::new_err(e.to_string()))?)
            }
        };
        drop(_in);
        Ok(Telemetry { reporter, traces, runtime })
    }

    /// Whether traces are exported.
    #[getter]
    fn traces(&self) -> bool {
        self.traces.is_some()
    }

    /// Whether Sentry is configured.
    #[getter]
    fn sentry(&self) -> bool {
        self.reporter.is_some()
    }

    /// Feeds a call's policy events (JSON, as steps report them) to Sentry.
    fn record_json(&self, events_json: &str) -> PyResult<()> {
        let Some(reporter) = &self.reporter else { return Ok(()) };
        let events: Vec<Event> =
            serde_json::from_str(events_json).map_err(|e| PyValueError::new_err(format!("events: {e}")))?;
        let _in = self.runtime.enter();
        for e in &events {
            reporter.record(e);
        }
        Ok(())
    }

    /// A self-correcting call of `target` stopped for `reason` after `attempts`
    /// programs, its last failure of `error_class`.
    fn correction_stopped(
        &self,
        target: &str,
        error_class: &str,
        reason: &str,
        attempts: u32,
    ) -> PyResult<()> {
        let Some(reporter) = &self.reporter else { return Ok(()) };
        let class = ErrorClass::from_str(error_class).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let _in = self.runtime.enter();
        reporter.correction_stopped(target, class, reason, attempts);
        Ok(())
    }

    /// The call under `key` failed with `error_class` and was handed to a person
    /// (`ticket_id`, in the call's run).
    fn escalated(&self, key: &str, ticket_id: &str, error_class: &str) -> PyResult<()> {
        let Some(reporter) = &self.reporter else { return Ok(()) };
        let class = ErrorClass::from_str(error_class).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let _in = self.runtime.enter();
        reporter.escalated(&approval_run(key), ticket_id, class, Some(0));
        Ok(())
    }

    /// Exports the finished spans still queued (a collector that is down: the error,
    /// within the export's timeout).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let Some(traces) = &self.traces else { return Ok(()) };
        py.allow_threads(|| traces.flush()).map_err(PyRuntimeError::new_err)
    }

    /// Flushes the spans and sends the Sentry events still queued, within `grace`
    /// seconds; the telemetry takes nothing more after.
    #[pyo3(signature = (grace = 5.0))]
    fn close(&mut self, py: Python<'_>, grace: f64) -> PyResult<()> {
        let grace = Duration::from_secs_f64(if grace.is_finite() { grace.clamp(0.0, 300.0) } else { 5.0 });
        let (traces, reporter) = (self.traces.take(), self.reporter.take());
        py.allow_threads(|| {
            self.runtime.block_on(async {
                if let Some(reporter) = reporter {
                    reporter.shutdown(grace).await;
                }
                match traces {
                    Some(traces) => traces.shutdown(grace).await,
                    None => Ok(()),
                }
            })
        })
        .map_err(PyRuntimeError::new_err)
    }
}

/// The `execute_tool {target}` span of one call of a Python step (keel-telemetry's,
/// as the runner's steps make it; no call id: a Python call has no run step).
pub(crate) fn step_span(target: &str) -> tracing::Span {
    keel_telemetry::names::execute_tool_span(target, None)
}

/// Writes how the call ended into its span.
pub(crate) fn end_span<T>(
    span: &tracing::Span,
    outcome: &Result<T, keel_core::CallError<keel_core::Failure>>,
) {
    if let Err(e) = outcome {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", e.class.as_str());
        span.record("keel.error_class", e.class.as_str());
        span.record("keel.disposition", e.class.default_disposition().as_str());
        span.record("keel.attempt", e.attempts);
    }
}
