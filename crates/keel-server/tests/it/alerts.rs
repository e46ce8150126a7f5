//! Alert routing inside `keel serve` (issue 17): the runner's and the gateway's
//! events reach the router, whose webhook sink (a receiver on loopback) gets one
//! trigger per rule and key, however often the failure repeats.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use keel_examples::payments::Faults;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::support::{AGENT, Server, Storage};

/// A webhook receiver on loopback: what it got.
#[derive(Clone, Default)]
pub(crate) struct Hook {
    pub(crate) got: Arc<Mutex<Vec<Value>>>,
    changed: Arc<Notify>,
}

impl Hook {
    pub(crate) async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |Json(body): Json<Value>| {
                let me = me.clone();
                async move {
                    me.got.lock().unwrap().push(body);
                    me.changed.notify_waiters();
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hook")
    }

    pub(crate) async fn wait_for(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.got.lock().unwrap().len() >= n {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), wait).await.is_err() {
            panic!("waited for {n} alerts, got {:?}", self.got.lock().unwrap());
        }
    }
}

/// A Sentry endpoint: the raw envelopes it was sent.
async fn fake_sentry(got: Arc<Mutex<Vec<String>>>) -> String {
    let app = axum::Router::new().route(
        "/api/7/envelope/",
        post(move |body: axum::body::Bytes| {
            let got = got.clone();
            async move {
                got.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://sentrykey@{addr}/7")
}

/// An upstream that refuses every key.
async fn locked_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async { (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad key"}}))) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_and_model_failures_reach_the_alert_sink_once_per_incident() {
    let hook = Hook::default();
    let url = hook.start().await;
    let upstream = locked_upstream().await;
    let envelopes: Arc<Mutex<Vec<String>>> = Arc::default();
    let dsn = fake_sentry(envelopes.clone()).await;
    let extra = format!(
        r#"
[telemetry.sentry]
dsn = "{dsn}"

[models.locked]
provider = "openai"
base_url = "{upstream}"
model = "up-locked"

[alerts.sinks.hook]
kind = "webhook"
url = "{url}"

[[alerts.rules]]
name = "auth"
classes = ["unauthorized", "forbidden"]
severity = "critical"

[[alerts.rules]]
name = "notify-down"
classes = ["server_error"]
targets = ["notify"]
threshold = 2
window = "5m"
"#
    );
    let mut s = Server::start(Faults { notify_down: true, ..Faults::default() }, &extra).await;
    let chat = json!({"model": "locked", "messages": [{"role": "user", "content": "a private prompt"}]});
    for _ in 0..3 {
        let resp =
            s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&chat).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    for _ in 0..2 {
        let (status, body) =
            s.post(Some(AGENT), "/api/tools/notify/invoke", Some(json!({"params": {"order": 1}}))).await;
        assert!(status >= 400, "{status} {body}");
    }
    hook.wait_for(2).await;
    // The record, in the journal: both incidents open, each trigger delivered.
    let incidents = s
        .until_incidents(|list| {
            list.len() == 2
                && list.iter().all(|i| i["timeline"].to_string().contains(r#""kind":"delivered""#))
        })
        .await;
    for i in &incidents {
        assert_eq!(i["state"], "open", "{i:#}");
        let kinds: Vec<&str> =
            i["timeline"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["triggered", "delivered"], "{i:#}");
        assert_eq!(i["timeline"][1]["sink"], "hook");
        assert_eq!(i["timeline"][1]["action"], "trigger");
    }
    let rules: std::collections::BTreeSet<&str> =
        incidents.iter().map(|i| i["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, ["auth", "notify-down"].into());
    let (status, _) = s.get(None, "/api/incidents").await;
    assert_eq!(status, 401, "the record needs a key");
    let (_, metrics) = s.get(Some(AGENT), "/metrics").await;
    let metrics = metrics.as_str().unwrap_or("").to_owned();
    assert!(metrics.contains("keel_incidents_open 2"), "{metrics}");
    assert!(metrics.contains("# HELP keel_incidents_open "), "{metrics}");
    s.shutdown().await;
    // After the server is gone, the record is in its journal.
    let db = format!("sqlite://{}", s.dir.path().join("keel.db").display());
    let journal = keel_journal::open(&db, keel_journal::JournalOptions::default()).await.unwrap();
    let kept = journal.incidents(10).await.unwrap();
    assert_eq!(kept.len(), 2, "{kept:#?}");
    assert!(kept.iter().all(|i| i.is_open() && i.timeline.len() == 2), "{kept:#?}");
    journal.close().await;
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one trigger per incident: {got:#?}");
    let of =
        |rule: &str| got.iter().find(|a| a["rule"] == rule).unwrap_or_else(|| panic!("{rule}: {got:#?}"));
    let auth = of("auth");
    assert_eq!((auth["action"].as_str(), auth["target"].as_str()), (Some("trigger"), Some("locked")));
    assert_eq!(auth["class"], "unauthorized");
    assert_eq!(auth["dedup_key"], "keel/auth/locked");
    let notify = of("notify-down");
    assert_eq!((notify["action"].as_str(), notify["target"].as_str()), (Some("trigger"), Some("notify")));
    assert_eq!(notify["class"], "server_error");

    // Sentry got the model's terminal 401s and the tool's exhausted retries (shutdown
    // flushed them), never the prompt.
    let envelopes = envelopes.lock().unwrap().join("\n");
    assert!(
        envelopes.contains(r#""keel.class":"unauthorized""#)
            && envelopes.contains(r#""keel.target":"locked""#),
        "{envelopes}"
    );
    assert!(
        envelopes.contains(r#""keel.retries":"exhausted""#)
            && envelopes.contains(r#""keel.target":"notify""#)
    );
    assert!(!envelopes.contains("a private prompt"));
}

/// A restart (issue 17): an incident the journal holds open is taken over by the new
/// server's router — not triggered again — and resolved, with a resolve to its sink
/// under its dedup key, once a window passes without failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_takes_over_an_open_incident_and_resolves_it() {
    let hook = Hook::default();
    let url = hook.start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("before.db").display());
    // The record as an earlier process left it: one incident open, its trigger sent.
    let before = keel_journal::open(&db, keel_journal::JournalOptions::default()).await.unwrap();
    let line = |kind: &str, sink: Option<&str>| keel_journal::AlertRecord {
        at_ms: 1_700_000_000_000,
        incident: "keel/notify-down/notify@1700000000000".into(),
        kind: kind.into(),
        rule: "notify-down".into(),
        key: "notify".into(),
        severity: "error".into(),
        class: Some("server_error".into()),
        target: Some("notify".into()),
        count: 2,
        sink: sink.map(Into::into),
        action: sink.map(|_| "trigger".into()),
        detail: None,
    };
    before.record_alerts(&[line("triggered", None), line("delivered", Some("hook"))]).await.unwrap();
    before.close().await;
    let extra = format!(
        r#"
[alerts]
check_every = "100ms"

[alerts.sinks.hook]
kind = "webhook"
url = "{url}"

[[alerts.rules]]
name = "notify-down"
classes = ["server_error"]
targets = ["notify"]
threshold = 2
window = "1s"
"#
    );
    let storage = Storage { url: Some(db), ..Storage::default() };
    let mut s = Server::start_with(Faults::default(), &extra, storage).await;
    let list = s
        .until_incidents(|l| {
            l.len() == 1
                && l[0]["state"] == "resolved"
                && l[0]["timeline"].as_array().is_some_and(|t| t.len() == 5)
        })
        .await;
    let kinds: Vec<&str> =
        list[0]["timeline"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["triggered", "delivered", "adopted", "resolved", "delivered"], "{list:#?}");
    assert_eq!(list[0]["timeline"][4]["action"], "resolve");
    hook.wait_for(1).await;
    s.shutdown().await;
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "a resolve, and no second trigger: {got:#?}");
    assert_eq!(
        (got[0]["action"].as_str(), got[0]["dedup_key"].as_str()),
        (Some("resolve"), Some("keel/notify-down/notify"))
    );
}
