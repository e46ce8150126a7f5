//! The model gateway mounted in `keel serve`: `/v1` behind the same keys.

use axum::Json;
use axum::routing::post;
use keel_examples::payments::Faults;
use serde_json::{Value, json};

use crate::support::{AGENT, APPROVER, Server};

/// An OpenAI-compatible upstream that answers every completion.
pub(crate) async fn upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|Json(req): Json<Value>| async move {
            Json(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": req["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_served_under_v1_with_the_servers_keys() {
    let base = upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!("[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up-small\"\n"),
    )
    .await;
    let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let resp = s.http.post(s.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "authentication_error", "OpenAI's error shape: {e}");

    let resp =
        s.http.post(s.url("/v1/chat/completions")).bearer_auth(APPROVER).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 403, "an approver key does not call models");

    let resp =
        s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-keel-model"], "small");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "hello");
    assert_eq!(answer["usage"]["total_tokens"], 4);

    let (status, models) = s.get(Some(AGENT), "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "small");
    let (_, metrics) = s.get(Some(AGENT), "/metrics").await;
    assert!(metrics.as_str().unwrap().contains("keel_gateway_"), "gateway metrics are exported");
}

/// An upstream that streams every completion in two chunks.
async fn streaming_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let chunk = |delta: Value, finish: Value| {
                let c = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {c}\n\n")
            };
            let body = format!(
                "{}{}data: [DONE]\n\n",
                chunk(json!({"role": "assistant", "content": "hel"}), Value::Null),
                chunk(json!({"content": "lo"}), json!("stop"))
            );
            ([("content-type", "text/event-stream")], body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_passes_through_the_servers_connections() {
    let base = streaming_upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!("[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up\"\n"),
    )
    .await;
    let body = json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let resp =
            s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert!(text.contains("\"hel\"") && text.contains("\"lo\""), "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_listed_under_api_budgets() {
    let base = upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!("[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up-small\"\n"),
    )
    .await;
    let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let resp =
        s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, view) = s.get(Some(AGENT), "/api/budgets").await;
    assert_eq!(status, 200, "{view}");
    let budgets = view["budgets"].as_object().unwrap();
    let (name, key) = budgets.iter().find(|(n, _)| n.starts_with("key:")).expect("the caller's key budget");
    assert_eq!(key["used"]["tokens"], 4, "{name}: settled to the upstream's usage: {view}");
    assert_eq!((key["reserved"]["tokens"].as_u64(), key["refusals"].as_u64()), (Some(0), Some(0)));
}

/// A run driven by the server is listed under its own budget (`run:ID`, `[run].budget`)
/// while it runs, with what it has spent; gone once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_own_budget_is_listed_while_it_runs() {
    // Each charge takes 400 ms: the run is in flight while it is looked at.
    let s =
        Server::start(Faults { charge_delay_ms: 400, ..Faults::default() }, "[run.budget]\nattempts = 50\n")
            .await;
    let plan = json!({"plan": {"steps": [
        {"tool": "charge", "params": {"order": 21, "amount": 10}},
        {"tool": "charge", "params": {"order": 22, "amount": 10}},
        {"tool": "charge", "params": {"order": 23, "amount": 10}}
    ]}});
    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let name = format!("run:{run_id}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let seen = loop {
        let (_, view) = s.get(Some(AGENT), "/api/budgets").await;
        if let Some(b) = view["budgets"].get(&name).filter(|b| b["used"]["attempts"].as_u64() >= Some(1)) {
            break b.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "the run's budget never showed: {view}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(seen["limit"]["attempts"], 50, "{seen}");
    s.until_run(&run_id, |r| r["state"]["run"]["state"] == "completed").await;
    // Unlisted when its drive ends (just after its last event).
    loop {
        let (_, view) = s.get(Some(AGENT), "/api/budgets").await;
        if view["budgets"].get(&name).is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "an ended run's budget stays listed: {view}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An agent's run has one budget: the tools it calls through Keel (`X-Keel-Run` on
/// `/api/tools/.../invoke`) draw on the budget its model calls do, and a call that
/// would pass it is refused before the tool runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_called_for_an_agents_run_is_charged_to_the_runs_budget() {
    let base = upstream().await;
    let count = tempfile::NamedTempFile::new().unwrap();
    let s = Server::start(
        Faults::default(),
        &format!(
            "[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up\"\n\
             [gateway]\nrun_budget = {{ cost_usd = 1.0 }}\n\
             [tools.lookup]\nkind = \"command\"\nargv = ['sh', '-c', 'echo x >> \"$1\"; echo {{}}', 'sh', '{}']\n\
             cost = {{ per_call_usd = 0.4 }}\n",
            count.path().display()
        ),
    )
    .await;
    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(json!({"name": "research"}))).await;
    assert_eq!(status, 201, "{started}");
    let run = started["run_id"].as_str().unwrap().to_owned();
    let invoke = |n: u32, run: String| {
        s.http
            .post(s.url("/api/tools/lookup/invoke"))
            .bearer_auth(AGENT)
            .header("x-keel-run", run)
            .json(&json!({"params": {"n": n}}))
            .send()
    };
    let mut statuses = Vec::new();
    let mut last = Value::Null;
    for n in 0..3 {
        let resp = invoke(n, run.clone()).await.unwrap();
        statuses.push(resp.status().as_u16());
        last = resp.json().await.unwrap();
    }
    assert_eq!(&statuses[..2], [200, 200], "{last}");
    assert_eq!(last["class"], "budget_exceeded", "{last}");
    let ran = std::fs::read_to_string(count.path()).unwrap().lines().count();
    assert_eq!(ran, 2, "the third call was refused before the tool ran");
    let (_, view) = s.get(Some(AGENT), "/api/budgets").await;
    assert_eq!(view["budgets"]["runs"]["used"]["cost_micros"], 800_000, "{view}");

    // A run the key was not issued is refused, in the API's shape.
    let resp = invoke(9, "run-not-mine".to_owned()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert!(e["message"].as_str().unwrap().contains("not a run Keel issued"), "{e}");
}

/// One gate per process, persisted: what the gateway learns about a model's retries is
/// saved with the runner's and is there after a restart; the gateway's call records
/// are flushed at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_gate_and_calls_are_saved_at_shutdown() {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = hits.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(req): Json<Value>| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n % 2 == 0 {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": {"message": "busy"}})));
                }
                (axum::http::StatusCode::OK, Json(json!({
                    "id": "c", "object": "chat.completion", "created": 1, "model": req["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut s = Server::start(
        Faults::default(),
        &format!(
            "[models.flaky]\nprovider = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"up\"\n\
             policy = {{ retry = {{ max_attempts = 3, base_delay = \"1ms\", max_delay = \"2ms\" }} }}\n"
        ),
    )
    .await;
    let body = json!({"model": "flaky", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let resp =
            s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "each call succeeds on its retry");
    }
    s.shutdown().await;

    let url = format!("sqlite://{}", s.dir.path().join("keel.db").display());
    let journal = keel_journal::open(
        &url,
        keel_journal::JournalOptions {
            clock: std::sync::Arc::new(keel_core::TokioClock::new()),
            ..keel_journal::JournalOptions::default()
        },
    )
    .await
    .unwrap();
    let history = journal.load_gate_history().await.unwrap();
    let flaky: Vec<_> = history.iter().filter(|r| r.target == "flaky").collect();
    assert!(!flaky.is_empty(), "the gateway's gate was saved: {history:?}");
    let successes: u64 = flaky.iter().map(|r| r.outcomes.successes).sum();
    assert_eq!(successes, 3, "three retries, each a success: {flaky:?}");
    let calls = journal.export_run(keel_gateway::journal::GATEWAY_RUN).await.unwrap().unwrap();
    let called = calls.events.iter().filter(|e| e.event.kind() == "model_called").count();
    assert_eq!(called, 3, "every call record was flushed before exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_api_takes_the_key_as_x_api_key_and_answers_in_anthropics_shape() {
    let base = upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!("[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up-small\"\n"),
    )
    .await;
    let body = json!({"model": "small", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let url = s.url("/v1/messages");
    let resp = s.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error")),
        "{e}"
    );
    let resp = s.http.post(&url).header("x-api-key", "wrong").json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // Roles hold whatever header carries the key.
    let resp = s.http.post(&url).header("x-api-key", APPROVER).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "permission_error", "{e}");

    let resp = s.http.post(&url).header("x-api-key", AGENT).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["content"], json!([{"type": "text", "text": "hello"}]), "{answer}");
    assert_eq!(answer["usage"], json!({"input_tokens": 3, "output_tokens": 1}));
    // A run Keel did not issue, refused in the API's shape.
    let resp = s
        .http
        .post(&url)
        .header("x-api-key", AGENT)
        .header("x-keel-run", "made-up")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");

    // The Responses API and models/{id} under the same keys, in OpenAI's shape.
    let resp = s
        .http
        .post(s.url("/v1/responses"))
        .bearer_auth(AGENT)
        .json(&json!({"model": "small", "input": "hi", "store": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["output"][0]["content"][0]["text"], "hello", "{answer}");
    assert_eq!(s.get(Some(AGENT), "/v1/models/small").await.0, 200);
    let (status, e) = s.get(Some(AGENT), "/v1/models/nope").await;
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("model_not_found")), "{e}");
    // An endpoint Keel does not serve, in the API's shape too.
    let (status, e) =
        s.post(Some(AGENT), "/v1/completions", Some(json!({"model": "small", "prompt": "hi"}))).await;
    assert_eq!((status, e["error"]["type"].as_str()), (404, Some("invalid_request_error")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("/v1/completions"), "{e}");
    let (status, e) = s.get(Some(AGENT), "/api/nope").await;
    assert_eq!((status, e["class"].as_str()), (404, Some("not_found")), "{e}");
}
