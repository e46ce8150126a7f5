//! Sentry (issue 17): the `sentry` crate's envelopes, sent by Keel's transport, reach
//! a fake Sentry endpoint on loopback. Terminal failures, refused retries and
//! escalations are captured with Keel's tags and grouping; retryable failures (which
//! may still succeed) are not; no prompt text is ever in an event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use keel_core::{AttemptOutcome, ErrorClass, Event, EventSink, RefusalReason};
use keel_telemetry::sentry::{Reporter, Sentry, parse_dsn};
use serde_json::Value;

#[derive(Clone, Default)]
struct FakeSentry {
    events: Arc<Mutex<Vec<Value>>>,
    auth: Arc<Mutex<Vec<String>>>,
}

impl FakeSentry {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/api/42/envelope/",
            post(move |headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move {
                    let auth = headers.get("x-sentry-auth").and_then(|v| v.to_str().ok()).unwrap_or("");
                    me.auth.lock().unwrap().push(auth.to_owned());
                    // An envelope: a header line, then (item header, payload) pairs.
                    let text = String::from_utf8_lossy(&body).into_owned();
                    let lines: Vec<&str> = text.lines().collect();
                    for pair in lines[1..].chunks(2) {
                        let header: Value = serde_json::from_str(pair[0]).unwrap();
                        if header["type"] == "event" {
                            me.events.lock().unwrap().push(serde_json::from_str(pair[1]).unwrap());
                        }
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://public-key-1234@{addr}/42")
    }
}

fn failed(target: &str, attempt: u32, class: ErrorClass) -> Event {
    Event::AttemptEnded {
        target: target.into(),
        attempt,
        outcome: AttemptOutcome::Failed(class),
        latency: Duration::from_millis(3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_worth_an_error_reach_sentry_tagged_and_grouped() {
    let fake = FakeSentry::default();
    let dsn = fake.start().await;
    let reporter =
        Reporter::start(&Sentry { dsn: parse_dsn(&dsn).unwrap(), environment: Some("test".into()) }).unwrap();
    // Retryable failures that a retry may still fix: nothing.
    reporter.record(&failed("search", 1, ErrorClass::Timeout));
    reporter.record(&failed("search", 2, ErrorClass::ServerError));
    reporter.record(&Event::AttemptStarted { target: "search".into(), attempt: 3 });
    // A terminal failure, retries exhausted, an escalation.
    reporter.record(&failed("crm", 1, ErrorClass::Unauthorized));
    reporter.record(&Event::RetryRefused {
        target: "search".into(),
        attempt: 3,
        class: ErrorClass::ServerError,
        reason: RefusalReason::AttemptsExhausted { max_attempts: 3 },
    });
    reporter.escalated("run-abc", "tkt-1", ErrorClass::LoopDetected, Some(2));
    reporter.shutdown(Duration::from_secs(10)).await;

    let events = fake.events.lock().unwrap().clone();
    assert_eq!(events.len(), 3, "{events:#?}");
    let auth = fake.auth.lock().unwrap().clone();
    assert!(auth.iter().all(|a| a.contains("sentry_key=public-key-1234")), "{auth:?}");
    let tag = |e: &Value, k: &str| e["tags"][k].as_str().map(str::to_owned);

    let terminal = &events[0];
    assert_eq!(tag(terminal, "keel.class").as_deref(), Some("unauthorized"));
    assert_eq!(tag(terminal, "keel.target").as_deref(), Some("crm"));
    assert_eq!(tag(terminal, "keel.attempt").as_deref(), Some("1"));
    assert_eq!(tag(terminal, "keel.disposition").as_deref(), Some("terminal"));
    assert_eq!(terminal["fingerprint"], serde_json::json!(["keel", "unauthorized", "crm"]));
    // `error` is Sentry's default level, left out of the payload.
    assert!(terminal["level"].is_null() || terminal["level"] == "error", "{terminal:#}");
    assert_eq!(terminal["environment"], "test");

    let exhausted = &events[1];
    assert_eq!(tag(exhausted, "keel.class").as_deref(), Some("server_error"));
    assert_eq!(tag(exhausted, "keel.attempt").as_deref(), Some("3"));
    assert_eq!(tag(exhausted, "keel.retries").as_deref(), Some("exhausted"));
    let message = exhausted["message"].as_str().or(exhausted["logentry"]["message"].as_str()).unwrap_or("");
    assert!(message.contains("all 3 attempts used"), "{exhausted:#}");

    let escalation = &events[2];
    assert_eq!(tag(escalation, "keel.class").as_deref(), Some("loop_detected"));
    assert_eq!(tag(escalation, "keel.disposition").as_deref(), Some("escalate"));
    assert_eq!(tag(escalation, "keel.run").as_deref(), Some("run-abc"));
    assert_eq!(tag(escalation, "keel.step").as_deref(), Some("2"));
    // No user or host data.
    for e in &events {
        assert!(e.get("user").is_none() && e.get("server_name").is_none(), "{e:#}");
    }
}

#[test]
fn dsns_are_checked_without_echoing_them() {
    assert!(parse_dsn("http://k@127.0.0.1:9/1").is_ok());
    assert!(parse_dsn("https://k@o1.ingest.example/1").is_ok(), "https DSNs go out over keel-http");
    for bad in ["not a dsn secretkey", "ftp://secretkey@x/1"] {
        let e = parse_dsn(bad).unwrap_err();
        assert!(!e.contains("secretkey"), "{e}");
    }
}
