//! A reference for every failure (issue 17): each answer names one in
//! `x-keel-reference`, and each error body carries it in its own API's shape.

use keel_examples::payments::Faults;
use serde_json::{Value, json};

use crate::support::{AGENT, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_carries_the_reference_its_header_names() {
    let model = crate::gateway::upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!("[models.small]\nprovider = \"openai\"\nbase_url = \"{model}\"\nmodel = \"up\"\n"),
    )
    .await;
    // Keel's shape: at the top.
    let resp = s.http.get(s.url("/api/runs/run-nope")).bearer_auth(AGENT).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let header = resp.headers()["x-keel-reference"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reference"], header.as_str(), "{body}");
    assert_eq!(body["class"], "not_found");
    // OpenAI's shape: inside `error`.
    let resp = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(AGENT)
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let header = resp.headers()["x-keel-reference"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["reference"], header.as_str(), "{body}");
    assert!(body.get("reference").is_none(), "the SDK's shape is kept: {body}");
    // A success names one too, and two answers never share one.
    let ok = s.http.get(s.url("/api/runs")).bearer_auth(AGENT).send().await.unwrap();
    let other = ok.headers()["x-keel-reference"].to_str().unwrap().to_owned();
    assert_ne!(other, header);
}
