//! keel-telemetry: what Keel shows of its calls outside the process — traces over
//! OTLP with the OpenTelemetry GenAI names, and the W3C trace context that joins an
//! agent's trace to Keel's.
//!
//! - [`names`] — every span and attribute name, with the table of who makes which.
//! - [`config`] — `[telemetry]` of `keel.toml` (keel-runtime reads the file).
//! - [`otlp`] — the `tracing` layer and its exporter (OTLP/HTTP, protobuf).
//! - [`propagate`] — `traceparent` in, trace ids out.
//! - [`alert`] — alert routing by class and rate: PagerDuty, Slack, webhooks.
//! - [`sentry`] — terminal failures, refused retries and escalations in Sentry.
//! - [`http`] — the one function every outbound telemetry request goes through.
//!
//! The crates that do the work (gateway, runtime, server) make plain `tracing` spans
//! and know nothing of OpenTelemetry; `keel serve` and `keel run` install the layer:
//!
//! ```no_run
//! # async fn f(t: keel_telemetry::Telemetry) -> Result<(), keel_telemetry::otlp::Error> {
//! use tracing_subscriber::layer::SubscriberExt;
//! let registry = tracing_subscriber::registry();
//! if let Some(otlp) = &t.otlp {
//!     let (layer, guard) = keel_telemetry::otlp::layer(otlp, &t.service_name)?;
//!     let _ = tracing::subscriber::set_global_default(registry.with(layer));
//!     // ... serve ...
//!     let _ = guard.shutdown(std::time::Duration::from_secs(5)).await;
//! }
//! # Ok(()) }
//! ```

pub mod alert;
pub mod config;
pub mod http;
pub mod names;
pub mod otlp;
pub mod propagate;
pub mod sentry;

pub use config::{Otlp, OtlpConfig, Telemetry, TelemetryConfig};
pub use otlp::TraceGuard;
