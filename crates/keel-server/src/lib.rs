//! keel-server: `keel serve` — one axum server for the `/api` (runs, approvals,
//! tickets, tool invocation for agents in any language), the web inbox at `/`,
//! `/healthz`, `/readyz` and `/metrics`. It also works runs: its workers carry on runs
//! started through the API or unblocked by a decision, with no other process waiting.
//!
//! [`app`] builds the router from an [`AppState`] (tests call it with `oneshot` or
//! serve it on a loopback port); [`serve`] runs it until a shutdown signal, then stops
//! taking work, finishes in-flight calls and flushes the journal.

pub mod api;
pub mod auth;
pub mod conn;
pub mod dashboard;
pub mod drill;
pub mod error;
pub mod inbox;
pub mod log;
pub mod mcp;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use keel_core::Clock;
use keel_journal::Journal;
use keel_runtime::runner::Observer;
use keel_runtime::{Config, Runner};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::AppState;

/// Builds the shared state: a runner whose events feed the metrics and, when
/// `[alerts]` has sinks, the alert router (started here, on the caller's runtime;
/// [`serve`] drains it at shutdown).
///
/// # Errors
/// The journal's (loading the gate's history).
pub async fn state(
    config: Arc<Config>,
    journal: Arc<dyn Journal>,
    clock: Arc<dyn Clock>,
) -> Result<AppState, keel_runtime::runner::Error> {
    let metrics = Arc::new(metrics::Metrics::new());
    let alerts = if config.alerts.is_enabled() {
        let log = Arc::new(api::incidents::JournalLog(journal.clone()));
        let open = api::incidents::open_before(&*journal).await;
        let (router, tasks) =
            keel_telemetry::alert::spawn_logged(config.alerts.clone(), clock.clone(), log, open);
        Some(Arc::new(api::Alerting { router, tasks: std::sync::Mutex::new(Some(tasks)) }))
    } else {
        None
    };
    let sentry = match &config.telemetry.sentry {
        None => None,
        Some(s) => Some(
            keel_telemetry::sentry::Reporter::start(s)
                .map_err(|e| keel_runtime::runner::Error::Refused(e.to_string()))?,
        ),
    };
    let mut observers: Vec<Arc<dyn Observer>> = vec![metrics.clone()];
    let mut sinks: Vec<Arc<dyn keel_core::EventSink>> = Vec::new();
    if let Some(a) = &alerts {
        observers.push(Arc::new(keel_runtime::runner::PolicySink(a.router.clone())));
        sinks.push(a.router.clone());
    }
    if let Some(r) = &sentry {
        observers.push(Arc::new(keel_runtime::runner::SentryObserver(r.clone())));
        sinks.push(r.clone());
    }
    let observer: Arc<dyn Observer> = Arc::new(keel_runtime::runner::Observers(observers));
    let runner = Arc::new(Runner::new(config.clone(), journal.clone(), clock.clone(), observer).await?);
    let (wake, drives) = (Arc::new(Notify::new()), Arc::default());
    let mut gateway_writer = None;
    let gateway = if config.models.is_empty() {
        None
    } else {
        let writer =
            keel_journal::JournalWriter::spawn(journal.clone(), keel_journal::writer::DEFAULT_MAX_BATCH);
        // Calls and decisions (retries, fallbacks, breaker changes) are journaled; the
        // per-attempt noise of a high-rate endpoint is not.
        let sink = keel_gateway::journal::DecisionsOnly(writer.sink(keel_gateway::journal::GATEWAY_RUN));
        gateway_writer = Some(writer.clone());
        let sink: Arc<dyn keel_core::EventSink> = if sinks.is_empty() {
            Arc::new(sink)
        } else {
            sinks.insert(0, Arc::new(sink));
            Arc::new(keel_core::Fanout(sinks))
        };
        let built = config
            .gateway_builder()
            .clock(clock.clone())
            .sink(sink)
            .gate(runner.gate().clone())
            .journal(Arc::new(keel_gateway::WriterJournal::new(writer)))
            .build()
            .map_err(|e| keel_runtime::runner::Error::Refused(e.to_string()))?;
        let built = Arc::new(built);
        // Agent runs ask the server's gateway: one gate, one journal, one set of breakers.
        runner.set_gateway(built.clone());
        Some(built)
    };
    let storage = Arc::default();
    Ok(AppState {
        runner,
        journal,
        config,
        clock,
        metrics,
        wake,
        drives,
        callers: Arc::default(),
        storage,
        gateway,
        gateway_writer,
        alerts,
        sentry,
    })
}

/// The router: every route but `/healthz` (and the inbox's static files) needs a key.
pub fn app(state: AppState) -> Router {
    let keys = Arc::new(auth::Keys::new(&state.config.keys, &state.config.server.rate_limit));
    let protected = Router::new()
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/api/openapi.json", get(|| async { axum::Json(openapi::document()) }))
        .route("/api/runs", post(api::runs::start).get(api::runs::list))
        .route("/api/runs/{id}", get(api::runs::show))
        .route("/api/runs/{id}/cancel", post(api::runs::cancel))
        .route("/api/runs/{id}/resume", post(api::runs::resume))
        .route("/api/approvals", get(api::approvals::list))
        .route("/api/approvals/{id}", get(api::approvals::show))
        .route("/api/approvals/{id}/approve", post(api::approvals::approve))
        .route("/api/approvals/{id}/reject", post(api::approvals::reject))
        .route("/api/tickets", get(api::tickets::list))
        .route("/api/tickets/{id}", get(api::tickets::show))
        .route("/api/tickets/{id}/resolve", post(api::tickets::resolve))
        .route("/api/incidents", get(api::incidents::list))
        .route("/api/faults", get(api::faults::list))
        .route("/api/faults/{tool}", axum::routing::put(api::faults::set).delete(api::faults::clear))
        .route("/api/tools/{name}/invoke", post(api::tools::invoke))
        .route("/api/dashboard", get(dashboard::dashboard))
        .route("/api/budgets", get(ops::budgets))
        .route("/mcp", post(mcp::post).get(mcp::not_allowed).delete(mcp::not_allowed))
        .route_layer(axum::middleware::from_fn_with_state(keys.clone(), auth::require_key));
    let gateway = state.gateway.clone();
    let issued = Arc::new(api::runs::IssuedRuns::new(state.journal.clone()));
    let metrics = state.metrics.clone();
    let main = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/", get(inbox::index))
        .route("/assets/app.js", get(inbox::app_js))
        .route("/assets/style.css", get(inbox::style))
        .merge(protected)
        .fallback(not_found)
        .layer(axum::Extension(issued.clone()))
        .layer(DefaultBodyLimit::max(state.config.server.body_limit))
        .with_state(state);
    let all = match gateway {
        // The model gateway: `/v1/chat/completions` and `/v1/models`, behind the same
        // keys, answering auth errors in OpenAI's shape.
        // `X-Keel-Run` must name a run issued to the calling key.
        Some(gw) => main.merge(
            keel_gateway::router(gw)
                .layer(axum::middleware::from_fn_with_state(issued, api::runs::require_issued_run))
                .layer(axum::middleware::from_fn_with_state(keys, auth::require_key_v1)),
        ),
        None => main,
    };
    all.layer(axum::middleware::from_fn_with_state(metrics, log::requests))
}

/// An unknown route: under `/v1` in the model APIs' shape (an SDK calling an endpoint
/// Keel does not serve, such as legacy `/v1/completions`), else in `/api`'s.
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = uri.path();
    if path.starts_with("/v1/") {
        let message = format!("Keel does not serve {path}");
        return keel_gateway::Shape::for_path(path).response(keel_core::ErrorClass::NotFound, &message);
    }
    error::ApiError::new(keel_core::ErrorClass::NotFound, "no such route").into_response()
}

/// How often a server saves what its confidence gate learned.
pub const GATE_SAVE_EVERY: Duration = Duration::from_secs(30);

/// Serves `state` on `listener` until `shutdown` resolves; then stops taking runs,
/// lets in-flight requests and drives finish (up to `grace`), saves the gate and
/// flushes every journal writer (the runner's and the gateway's).
/// Connections are held to `[server]`'s limits ([`conn`]).
///
/// # Errors
/// The listener's.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    workers::start(
        state.runner.clone(),
        state.drives.clone(),
        state.wake.clone(),
        state.config.server.workers,
        &tracker,
        stop.clone(),
    );
    let runner = state.runner.clone();
    let gateway_writer = state.gateway_writer.clone();
    let gateway = state.gateway.clone();
    // The gate learns from every call (the gateway's too): saved now and then, not
    // only at the end of drives, and once more at shutdown.
    tracker.spawn({
        let (runner, stop) = (runner.clone(), stop.clone());
        async move {
            let mut every = tokio::time::interval(GATE_SAVE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => runner.save_gate().await,
                }
            }
        }
    });
    let alerts = state.alerts.clone();
    let sentry = state.sentry.clone();
    let limits = conn::Limits::from_config(&state.config.server);
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let tls = state.config.server_tls.clone();
    conn::accept_loop(listener, app(state), limits, tls, stop.clone(), &tracker).await;
    stop.cancel();
    tracker.close();
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("workers and connections did not finish within the grace period");
    }
    if let Some(gateway) = &gateway {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !gateway.wait_for_streams(left).await {
            tracing::warn!("streams were still being pumped at the end of the grace period");
        }
    }
    runner.save_gate().await;
    if let Err(e) = runner.flush().await {
        tracing::error!(error = %e, "flushing the journal at shutdown failed");
    }
    if let Some(writer) = &gateway_writer {
        if let Err(e) = writer.flush().await {
            tracing::error!(error = %e, "flushing the gateway's journal at shutdown failed");
        }
    }
    if let Some(tasks) = alerts.and_then(|a| a.tasks.lock().unwrap_or_else(|e| e.into_inner()).take()) {
        tasks.shutdown(grace).await;
    }
    if let Some(sentry) = sentry {
        sentry.shutdown(grace).await;
    }
    Ok(())
}
