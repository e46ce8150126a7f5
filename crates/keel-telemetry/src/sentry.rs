//! Sentry: failures that a person should see as errors, captured with the `sentry`
//! crate and sent through [`crate::http::send`] (a transport of Keel's own: no
//! native-tls, no reqwest).
//!
//! What is captured, from the one event path: a failed attempt whose class is
//! terminal by default (a retry cannot help), a retry that was refused (attempts
//! exhausted, low confidence, a deadline), and an escalation (a ticket opened). A
//! retry that eventually succeeds sends nothing. Each event is tagged `keel.class`,
//! `keel.target`, `keel.attempt`, `keel.disposition` and grouped by class and target
//! (its fingerprint). Events carry names and classes only: no prompt, argument or
//! upstream body reaches Sentry.
//!
//! Capturing never blocks a call: the transport's queue is bounded and drops when
//! full; one task on the tokio runtime posts the envelopes.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_core::{AttemptOutcome, Disposition, ErrorClass, Event, EventSink};
use sentry::protocol::{Event as SentryEvent, Level};
use sentry::types::Dsn;
use sentry::{ClientOptions, Envelope, Transport};
use tokio::sync::mpsc;

/// Envelopes waiting to be sent at most; past it they are dropped and counted.
pub const QUEUE: usize = 256;

/// A checked `[telemetry.sentry]`.
#[derive(Clone)]
pub struct Sentry {
    /// The project's DSN (its key is a secret: never logged).
    pub dsn: Dsn,
    /// The `environment` of every event.
    pub environment: Option<String>,
}

impl std::fmt::Debug for Sentry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentry").field("environment", &self.environment).finish_non_exhaustive()
    }
}

/// The reporter: an [`EventSink`] for policy events, and [`escalated`](Self::escalated)
/// for tickets.
pub struct Reporter {
    client: sentry::Client,
    transport: Arc<HttpTransport>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").finish_non_exhaustive()
    }
}

/// Why Sentry could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It needs a tokio runtime to send on.
    #[error("Sentry must be started from inside a tokio runtime")]
    NoRuntime,
}

impl Reporter {
    /// Starts the transport's task on the current runtime.
    ///
    /// # Errors
    /// [`Error::NoRuntime`] outside a tokio runtime.
    pub fn start(config: &Sentry) -> Result<Arc<Self>, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let transport =
            Arc::new(HttpTransport { tx: std::sync::Mutex::new(Some(tx)), dropped: AtomicU64::new(0) });
        let task = runtime.spawn(post_all(config.dsn.clone(), rx));
        let factory = {
            let transport = transport.clone();
            move |_: &ClientOptions| -> Arc<dyn Transport> { transport.clone() }
        };
        let options = ClientOptions {
            dsn: Some(config.dsn.clone()),
            environment: config.environment.clone().map(Cow::Owned),
            release: Some(Cow::Borrowed(concat!("keel@", env!("CARGO_PKG_VERSION")))),
            // No user, IP or host data: Keel sends names and classes only.
            send_default_pii: false,
            default_integrations: false,
            transport: Some(Arc::new(factory)),
            ..ClientOptions::default()
        };
        Ok(Arc::new(Self {
            client: sentry::Client::from(options),
            transport,
            task: std::sync::Mutex::new(Some(task)),
        }))
    }

    /// Envelopes dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.transport.dropped.load(Ordering::Relaxed)
    }

    /// A ticket was opened for `class` in `run_id`: a person was asked.
    pub fn escalated(&self, run_id: &str, ticket_id: &str, class: ErrorClass, step: Option<u32>) {
        let mut event = base_event(class, "escalation", Disposition::Escalate);
        event.message = Some(format!("escalated to a person: {class} in run {run_id}"));
        event.tags.insert("keel.run".into(), clean(run_id));
        event.tags.insert("keel.ticket".into(), clean(ticket_id));
        if let Some(step) = step {
            event.tags.insert("keel.step".into(), step.to_string());
        }
        self.client.capture_event(event, None);
    }

    /// A self-correcting call of `target` stopped for `reason` (rounds or tokens
    /// exhausted, low confidence, a repeated program, a class no correction can fix)
    /// after `attempts` programs, its last failure of `class`.
    pub fn correction_stopped(&self, target: &str, class: ErrorClass, reason: &str, attempts: u32) {
        let mut event = base_event(class, target, class.default_disposition());
        event.message = Some(format!("{target}: {class}, correction stopped: {}", clean(reason)));
        event.tags.insert("keel.attempt".into(), attempts.to_string());
        event.tags.insert("keel.correction.stopped".into(), clean(reason));
        self.client.capture_event(event, None);
    }

    /// Stops taking events and sends what is queued, within `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.transport.close();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!(target: "keel::sentry", "Sentry events still queued at shutdown");
            }
        }
    }
}

impl EventSink for Reporter {
    fn record(&self, event: &Event) {
        let captured = match event {
            Event::AttemptEnded { target, attempt, outcome: AttemptOutcome::Failed(class), .. }
                if class.default_disposition() == Disposition::Terminal =>
            {
                let mut e = base_event(*class, target, Disposition::Terminal);
                e.message = Some(format!("{target}: {class} (terminal)"));
                e.tags.insert("keel.attempt".into(), attempt.to_string());
                e
            }
            Event::RetryRefused { target, attempt, class, reason } => {
                let mut e = base_event(*class, target, class.default_disposition());
                e.message = Some(format!("{target}: {class}, not retried: {reason}"));
                e.tags.insert("keel.attempt".into(), attempt.to_string());
                e.tags.insert("keel.retries".into(), "exhausted".into());
                e
            }
            Event::AttemptStarted { .. }
            | Event::AttemptEnded { .. }
            | Event::RetryScheduled { .. }
            | Event::BreakerTransition { .. }
            | Event::FallbackTaken { .. }
            | Event::CorrectionRound { .. }
            | Event::BudgetCharged { .. }
            | Event::BudgetExceeded { .. }
            | Event::FaultInjected { .. }
            | Event::SchemaDrift { .. }
            | Event::LoopDetected { .. } => return,
        };
        self.client.capture_event(captured, None);
    }
}

fn base_event(class: ErrorClass, target: &str, disposition: Disposition) -> SentryEvent<'static> {
    let mut event =
        SentryEvent { level: Level::Error, logger: Some("keel".into()), ..SentryEvent::default() };
    let target = clean(target);
    event.tags.insert("keel.class".into(), class.as_str().into());
    event.tags.insert("keel.target".into(), target.clone());
    event.tags.insert("keel.disposition".into(), disposition.as_str().into());
    event.fingerprint =
        Cow::Owned(vec![Cow::Borrowed("keel"), Cow::Borrowed(class.as_str()), Cow::Owned(target)]);
    event
}

/// A name as a tag value: bounded, printable.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// The transport: envelopes onto a bounded channel, never blocking.
struct HttpTransport {
    tx: std::sync::Mutex<Option<mpsc::Sender<Envelope>>>,
    dropped: AtomicU64,
}

impl HttpTransport {
    fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Transport for HttpTransport {
    fn send_envelope(&self, envelope: Envelope) {
        let sent = match &*self.tx.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.try_send(envelope).is_ok(),
            None => false,
        };
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Posts every envelope to the DSN's envelope endpoint, one at a time; a failure is
/// logged and the envelope dropped (Sentry is best effort).
async fn post_all(dsn: Dsn, mut rx: mpsc::Receiver<Envelope>) {
    let auth = dsn.to_auth(Some(concat!("keel/", env!("CARGO_PKG_VERSION")))).to_string();
    let url = dsn.envelope_api_url().to_string();
    while let Some(envelope) = rx.recv().await {
        let mut body = Vec::new();
        if envelope.to_writer(&mut body).is_err() {
            continue;
        }
        let request = http::Request::post(url.as_str())
            .header("content-type", "application/x-sentry-envelope")
            .header("x-sentry-auth", auth.as_str())
            .body(Bytes::from(body));
        let Ok(request) = request else { continue };
        match crate::http::send(request, Duration::from_secs(10)).await {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => {
                tracing::warn!(target: "keel::sentry", status = resp.status().as_u16(), "Sentry refused an event")
            }
            Err(e) => tracing::warn!(target: "keel::sentry", error = %e, "cannot reach Sentry"),
        }
    }
}

/// `[telemetry.sentry]`'s DSN checked: parsed, `http://` or `https://`.
///
/// # Errors
/// What is wrong, in words that never contain the DSN (it holds the project's key).
pub fn parse_dsn(dsn: &str) -> Result<Dsn, String> {
    let parsed: Dsn = dsn.parse().map_err(|_| "is not a valid Sentry DSN".to_owned())?;
    match parsed.scheme() {
        sentry::types::Scheme::Http | sentry::types::Scheme::Https => Ok(parsed),
    }
}
