//! Delivering incidents: each sink's bounded queue and the worker that empties it in
//! order, every delivery under keel-core's retry policy (the sink's `retry`), and
//! what PagerDuty, Slack and a generic webhook are sent.
//!
//! A sink that is down costs its own worker time, never the call path's: the router
//! only pushes onto the queue, which drops its oldest delivery when full (a resolve
//! behind a dropped trigger is harmless to PagerDuty; a dropped resolve would leave
//! an incident open for ever).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use keel_core::{Clock, ErrorClass, Failure, NullSink, Pipeline, PolicyConfig, TimeoutConfig};
use serde_json::json;
use tokio::sync::Notify;

use super::config::{Severity, Sink, SinkKind};
use super::digest::DigestReport;
use super::log::{AlertEntry, EntryKind, LogTx};
use crate::http::{SendError, send};

/// Trigger or resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// An incident opened.
    Trigger,
    /// It resolved.
    Resolve,
    /// A period's digest.
    Digest,
}

impl Action {
    /// `trigger`, `resolve` (PagerDuty's `event_action`) or `digest`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Trigger => "trigger",
            Action::Resolve => "resolve",
            Action::Digest => "digest",
        }
    }
}

/// One incident change for one sink.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Trigger or resolve.
    pub action: Action,
    /// The rule's name.
    pub rule: String,
    /// The incident's key.
    pub key: String,
    /// The dedup key: `keel/{rule}/{key}`, the same for a trigger and its resolve.
    pub dedup_key: String,
    /// The class that crossed the threshold (triggers).
    pub class: Option<ErrorClass>,
    /// Its target (triggers).
    pub target: Option<String>,
    /// The rule's severity.
    pub severity: Severity,
    /// Failures in the window when it opened.
    pub count: u32,
    /// The rule's window (a digest's period).
    pub window: Duration,
    /// The incident's id, as the alert log knows it.
    pub incident: String,
    /// The digest (digests).
    pub digest: Option<Arc<DigestReport>>,
}

/// A bounded queue that drops its oldest item when full.
#[derive(Debug)]
pub(crate) struct Queue {
    items: Mutex<VecDeque<Delivery>>,
    notify: Notify,
    closed: AtomicBool,
    cap: usize,
    pub(crate) dropped: AtomicU64,
}

impl Queue {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            items: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            cap: cap.max(1),
            dropped: AtomicU64::new(0),
        })
    }

    /// Never blocks; answers the delivery dropped to make room, if one was.
    pub(crate) fn push(&self, d: Delivery) -> Option<Delivery> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = None;
        if items.len() >= self.cap {
            gone = items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        items.push_back(d);
        drop(items);
        self.notify.notify_one();
        gone
    }

    /// No more pushes: the worker stops once the queue is empty.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub(crate) fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn pop(&self) -> Option<Delivery> {
        loop {
            let notified = self.notify.notified();
            if let Some(d) = self.items.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                return Some(d);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
}

/// The log's entry for `d` at `sink`: `kind` with `detail`, at `wall`.
pub(crate) fn entry(
    d: &Delivery,
    sink: &str,
    kind: EntryKind,
    detail: Option<String>,
    at: std::time::SystemTime,
) -> AlertEntry {
    AlertEntry {
        at,
        incident: d.incident.clone(),
        kind,
        rule: d.rule.clone(),
        key: d.key.clone(),
        severity: d.severity,
        class: d.class,
        target: d.target.clone(),
        count: d.count,
        sink: Some(sink.to_owned()),
        action: Some(d.action),
        detail,
    }
}

/// Empties `queue` into `sink`, in order, each delivery under the sink's retries;
/// each outcome goes to `log`, stamped by `wall`.
pub(crate) async fn worker(
    sink: Sink,
    queue: Arc<Queue>,
    clock: Arc<dyn Clock>,
    wall: Arc<dyn Clock>,
    log: LogTx,
) {
    let policy = PolicyConfig {
        timeout: TimeoutConfig { attempt: Some(sink.timeout), step: None },
        retry: sink.retry.clone(),
        ..PolicyConfig::default()
    };
    // Deliveries' own attempts are not fed back into the alerts (NullSink).
    let pipeline = Pipeline::builder(format!("alert:{}", sink.name), policy)
        .clock(clock.clone())
        .sink(Arc::new(NullSink))
        .build();
    while let Some(d) = queue.pop().await {
        let body = Bytes::from(payload(&sink, &d).to_string());
        let result = pipeline.call(|_| deliver(&sink, body.clone(), &*clock)).await;
        match result {
            Ok(()) => {
                tracing::info!(
                    target: "keel::alert", sink = %sink.name, rule = %d.rule, key = %d.key,
                    action = d.action.as_str(), "alert delivered"
                );
                log.send(entry(&d, &sink.name, EntryKind::Delivered, None, wall.wall()));
            }
            Err(e) => {
                tracing::warn!(
                    target: "keel::alert", sink = %sink.name, rule = %d.rule, key = %d.key,
                    action = d.action.as_str(), keel.error_class = %e.class, attempts = e.attempts,
                    "alert not delivered; dropped"
                );
                let detail = format!(
                    "{} after {} attempt{}",
                    e.class,
                    e.attempts,
                    if e.attempts == 1 { "" } else { "s" }
                );
                log.send(entry(&d, &sink.name, EntryKind::Failed, Some(detail), wall.wall()));
            }
        }
    }
}

/// One attempt: posts `body` to the sink; any status but a success is a classified
/// failure (429 with its `Retry-After`, 5xx retried, 4xx terminal).
async fn deliver(sink: &Sink, body: Bytes, clock: &dyn Clock) -> Result<(), Failure> {
    let request =
        http::Request::post(sink.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| Failure::new(ErrorClass::InvalidRequest, format!("building the request: {e}")))?;
    match send(request, sink.timeout).await {
        Ok(response) => {
            match keel_core::classify::http_response(response.status(), response.headers(), &[], clock.wall())
            {
                None => Ok(()),
                Some(failure) => Err(failure),
            }
        }
        Err(SendError::Timeout(d)) => {
            Err(Failure::new(ErrorClass::Timeout, format!("no answer within {d:?}")))
        }
        Err(SendError::Transport(e)) => Err(Failure::new(ErrorClass::Network, e)),
        Err(SendError::Url(e)) => Err(Failure::new(ErrorClass::InvalidRequest, e)),
    }
}

/// What `sink` is sent for `d`. Names come from the config (rules, targets) and the
/// taxonomy; no prompt, argument or upstream body is ever part of an alert.
pub fn payload(sink: &Sink, d: &Delivery) -> serde_json::Value {
    if let Some(report) = &d.digest {
        return digest_payload(sink, d, report);
    }
    let class = d.class.map(|c| c.as_str());
    let window = humantime_window(d.window);
    let summary = match (d.action, class, &d.target) {
        (Action::Trigger, Some(class), Some(target)) => format!(
            "keel: {} `{class}` failure{} of `{target}` within {window} (rule {})",
            d.count,
            if d.count == 1 { "" } else { "s" },
            d.rule
        ),
        (Action::Trigger, _, _) => format!("keel: rule {} fired for {}", d.rule, d.key),
        (Action::Resolve, _, _) => format!("keel: resolved: rule {} for {}", d.rule, d.key),
        (Action::Digest, _, _) => format!("keel: digest for {}", d.key),
    };
    match sink.kind {
        SinkKind::Pagerduty => {
            let routing_key = sink.routing_key.as_deref().unwrap_or("");
            match d.action {
                Action::Trigger | Action::Digest => json!({
                    "routing_key": routing_key,
                    "event_action": "trigger",
                    "dedup_key": d.dedup_key,
                    "payload": {
                        "summary": summary,
                        "source": "keel",
                        "severity": d.severity.as_str(),
                        "component": d.target,
                        "class": class,
                        "custom_details": {"rule": d.rule, "key": d.key, "count": d.count, "window": window},
                    },
                }),
                Action::Resolve => json!({
                    "routing_key": routing_key,
                    "event_action": "resolve",
                    "dedup_key": d.dedup_key,
                }),
            }
        }
        SinkKind::Slack => {
            let icon = match d.action {
                Action::Trigger => ":rotating_light:",
                Action::Resolve => ":white_check_mark:",
                Action::Digest => ":bar_chart:",
            };
            json!({ "text": format!("{icon} [{}] {}", d.severity.as_str(), slack_escape(&summary)) })
        }
        SinkKind::Webhook => json!({
            "action": d.action.as_str(),
            "dedup_key": d.dedup_key,
            "rule": d.rule,
            "key": d.key,
            "class": class,
            "target": d.target,
            "severity": d.severity.as_str(),
            "count": d.count,
            "window": window,
            "summary": summary,
        }),
    }
}

/// Lines a digest names at most (the totals count them all).
const DIGEST_LINES: usize = 50;

/// A digest: one Slack message, or Keel's JSON for a webhook
/// (`{action: "digest", from, to, period, failures, exhausted, entries, summary}`).
fn digest_payload(sink: &Sink, d: &Delivery, report: &DigestReport) -> serde_json::Value {
    let from = humantime::format_rfc3339_seconds(report.from).to_string();
    let to = humantime::format_rfc3339_seconds(report.to).to_string();
    let summary = format!(
        "keel: {} failure{} outside incidents and {} exhausted retr{} from {from} to {to}",
        report.failures(),
        if report.failures() == 1 { "" } else { "s" },
        report.exhausted(),
        if report.exhausted() == 1 { "y" } else { "ies" },
    );
    let shown = report.entries.iter().take(DIGEST_LINES);
    match sink.kind {
        SinkKind::Slack => {
            let mut text = format!(":bar_chart: {}", slack_escape(&summary));
            for e in shown {
                text.push_str(&slack_escape(&format!(
                    "\n• `{}` of `{}`: {} failed, {} exhausted",
                    e.class, e.target, e.failures, e.exhausted
                )));
            }
            if report.entries.len() > DIGEST_LINES {
                text.push_str(&format!("\n… and {} more", report.entries.len() - DIGEST_LINES));
            }
            json!({ "text": text })
        }
        // A digest is refused for PagerDuty by the config check; Keel's JSON otherwise.
        SinkKind::Webhook | SinkKind::Pagerduty => json!({
            "action": "digest",
            "from": from,
            "to": to,
            "period": humantime_window(d.window),
            "failures": report.failures(),
            "exhausted": report.exhausted(),
            "entries": shown.map(|e| json!({
                "class": e.class.as_str(),
                "target": e.target,
                "failures": e.failures,
                "exhausted": e.exhausted,
            })).collect::<Vec<_>>(),
            "more": report.entries.len().saturating_sub(DIGEST_LINES),
            "summary": summary,
        }),
    }
}

fn humantime_window(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Slack's three control characters, escaped (a target name cannot mention @channel
/// or forge a link).
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
