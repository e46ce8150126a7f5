//! Keys, roles, limits and error shapes.

use keel_examples::payments::Faults;
use serde_json::json;

use crate::support::{ADMIN, AGENT, APPROVER, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_healthz_needs_a_valid_key() {
    let s = Server::start(Faults::default(), "").await;
    assert_eq!(s.get(None, "/healthz").await.0, 200);
    for path in [
        "/readyz",
        "/metrics",
        "/api/runs",
        "/api/approvals",
        "/api/tickets",
        "/api/incidents",
        "/api/openapi.json",
        "/api/dashboard",
    ] {
        let (status, body) = s.get(None, path).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["class"], "unauthorized", "{path}: {body}");
        let (status, _) = s.get(Some("not-a-key-at-all-000"), path).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, body) = s.post(None, "/api/tools/notify/invoke", Some(json!({}))).await;
    assert_eq!((status, body["class"].as_str()), (401, Some("unauthorized")));
    // X-Api-Key works too.
    let resp = s.http.get(s.url("/api/runs")).header("x-api-key", AGENT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced() {
    let s = Server::start(Faults::default(), "").await;
    let (status, body) =
        s.post(Some(APPROVER), "/api/tools/notify/invoke", Some(json!({"params": {}}))).await;
    assert_eq!((status, body["class"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, _) = s.post(Some(ADMIN), "/api/tools/notify/invoke", Some(json!({"params": {}}))).await;
    assert_eq!(status, 200, "admin may do everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_and_oversized_bodies_answer_in_the_error_shape() {
    let s = Server::start(Faults::default(), "").await;
    let resp = s
        .http
        .post(s.url("/api/tools/notify/invoke"))
        .bearer_auth(AGENT)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["class"], "invalid_request");
    assert_eq!(body["retryable"], false);
    assert!(body["message"].as_str().unwrap().to_lowercase().contains("json"), "{body}");

    let big = json!({"params": {"blob": "x".repeat(10_000)}});
    let (status, body) = s.post(Some(AGENT), "/api/tools/notify/invoke", Some(big)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["class"], "invalid_request");

    let (status, body) =
        s.post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"order": "x"}}))).await;
    assert_eq!((status, body["class"].as_str()), (400, Some("invalid_request")), "{body}");
    assert!(s.payments.charges().is_empty());

    let (status, body) = s.post(Some(AGENT), "/api/tools/nope/invoke", Some(json!({}))).await;
    assert_eq!((status, body["class"].as_str()), (404, Some("not_found")));
    let (status, body) = s.get(Some(AGENT), "/api/nowhere").await;
    assert_eq!((status, body["class"].as_str()), (404, Some("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_rate_limit() {
    let s = Server::start(Faults::default(), "[server.rate_limit]\nper_second = 1\nburst = 3\n").await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(s.get(Some(AGENT), "/api/runs").await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let resp = s.http.get(s.url("/api/runs")).bearer_auth(AGENT).send().await.unwrap();
    if resp.status() == 429 {
        assert!(resp.headers().contains_key("retry-after"));
    }
    assert_eq!(s.get(Some(APPROVER), "/api/runs").await.0, 200, "another key is not limited by the first");
}
