//! Every route doing its job.

use keel_examples::payments::Faults;
use serde_json::json;

use crate::support::{ADMIN, AGENT, APPROVER, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_routes_answer() {
    let s = Server::start(Faults::default(), "").await;
    assert_eq!(s.get(None, "/healthz").await, (200, json!({"status": "ok"})));
    let (status, ready) = s.get(Some(AGENT), "/readyz").await;
    assert_eq!((status, ready["storage"].as_str()), (200, Some("sqlite")));
    s.post(Some(AGENT), "/api/tools/notify/invoke", Some(json!({"params": {}}))).await;
    let (status, metrics) = s.get(Some(AGENT), "/metrics").await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("keel_calls_total{target=\"notify\"} 1"), "{text}");
    assert!(text.contains("keel_approvals_waiting 0"), "{text}");
    assert!(text.contains("keel_runs_total{state=\"completed\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_route_and_every_route_exists() {
    let s = Server::start(Faults::default(), "").await;
    let (status, doc) = s.get(Some(AGENT), "/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for r in keel_server::openapi::ROUTES {
        assert!(doc["paths"][r.path][r.method].is_object(), "{} {} documented", r.method, r.path);
        let path = r.path.replace("{id}", "x").replace("{name}", "notify").replace("{tool}", "notify");
        let resp = match r.method {
            "get" => s.http.get(s.url(&path)),
            "put" => s.http.put(s.url(&path)).json(&json!({})),
            "delete" => s.http.delete(s.url(&path)),
            _ => s.http.post(s.url(&path)).json(&json!({})),
        }
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
        assert_ne!(resp.status(), 405, "{} {} is routed", r.method, r.path);
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_ne!(body["message"], "no such route", "{} {} is routed", r.method, r.path);
    }
    let schema = doc["paths"]["/api/tools/{name}/invoke"]["post"].to_string();
    assert!(schema.contains("Idempotency-Key") && schema.contains("The tool's parameters"), "{schema}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_with_an_idempotency_key_acts_once() {
    let s = Server::start(Faults { fail_first: 1, ..Faults::default() }, "").await;
    let call = json!({"params": {"order": 1, "amount": 20}});
    let key = [("idempotency-key", "order-1")];
    let (status, first) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(call.clone()), &key).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["attempts"], 2, "the 503 was retried: {first}");
    assert_eq!(first["output"]["body"]["order"], 1);
    let (status, again) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(call.clone()), &key).await;
    assert_eq!(status, 200);
    assert_eq!((again["run_id"].clone(), again["replayed"].clone()), (first["run_id"].clone(), json!(true)));
    // A write-like tool without the header gets a key derived from its arguments.
    let (_, a) = s
        .post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"amount": 5, "order": 2}})))
        .await;
    let (_, b) = s
        .post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"order": 2, "amount": 5}})))
        .await;
    assert_eq!(a["run_id"], b["run_id"]);
    let orders: Vec<_> = s.payments.charges().iter().map(|c| c["order"].as_i64().unwrap()).collect();
    assert_eq!(orders, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_needing_approval_answers_202_and_the_approver_lets_it_finish() {
    let s = Server::start(Faults::default(), "").await;
    let call = json!({"params": {"order": 9, "amount": 500}});
    let key = [("idempotency-key", "big-9")];
    let (status, pending) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(call.clone()), &key).await;
    assert_eq!(status, 202, "{pending}");
    let approval = pending["approval_id"].as_str().unwrap().to_owned();
    assert!(pending["poll_url"].as_str().unwrap().starts_with("/api/runs/"));
    assert!(s.payments.charges().is_empty());

    let (status, shown) = s.get(Some(AGENT), &format!("/api/approvals/{approval}")).await;
    assert_eq!(status, 200);
    assert_eq!(shown["step"]["input"], json!({"order": 9, "amount": 500}), "the exact arguments");
    let (status, list) = s.get(Some(APPROVER), "/api/approvals").await;
    assert_eq!((status, list.as_array().unwrap().len()), (200, 1));

    let (status, refused) = s.post(Some(AGENT), &format!("/api/approvals/{approval}/approve"), None).await;
    assert_eq!((status, refused["class"].as_str()), (403, Some("forbidden")), "an agent key cannot approve");
    let (status, ok) = s
        .post(
            Some(APPROVER),
            &format!("/api/approvals/{approval}/approve"),
            Some(json!({"comment": "looks right"})),
        )
        .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["approval"]["decided_by"], "alice (looks right)");
    let (status, twice) = s.post(Some(APPROVER), &format!("/api/approvals/{approval}/approve"), None).await;
    assert_eq!((status, twice["class"].as_str()), (400, Some("invalid_request")));

    // The same call again waits for the workers to finish the run.
    let (status, done) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke?wait=15s", Some(call), &key).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["output"]["body"]["order"], 9);
    assert_eq!(s.payments.charges().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_call_is_refused_with_its_class() {
    let s = Server::start(Faults::default(), "").await;
    let call = json!({"params": {"order": 3, "amount": 300}});
    let (_, pending) = s.post(Some(AGENT), "/api/tools/charge/invoke", Some(call.clone())).await;
    let approval = pending["approval_id"].as_str().unwrap();
    assert_eq!(s.post(Some(APPROVER), &format!("/api/approvals/{approval}/reject"), None).await.0, 200);
    let (status, e) = s.post(Some(AGENT), "/api/tools/charge/invoke?wait=15s", Some(call)).await;
    assert_eq!((status, e["class"].as_str()), (403, Some("approval_denied")), "{e}");
    assert!(s.payments.charges().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_started_through_the_api_are_worked_by_the_server() {
    let s = Server::start(Faults::default(), "").await;
    let plan = json!({"plan": {"name": "api plan", "steps": [
        {"tool": "charge", "params": {"order": 11, "amount": 10}},
        {"tool": "notify", "params": {}}
    ]}});
    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "completed").await;
    assert_eq!(run["state"]["steps"].as_array().unwrap().len(), 2);
    let (status, list) = s.get(Some(AGENT), "/api/runs").await;
    assert_eq!(status, 200);
    assert!(list.as_array().unwrap().iter().any(|r| r["run_id"] == run_id.as_str()));
    let (status, bad) =
        s.post(Some(AGENT), "/api/runs", Some(json!({"plan": {"steps": [{"tool": "nope"}]}}))).await;
    assert_eq!((status, bad["class"].as_str()), (400, Some("invalid_request")), "{bad}");
    let (status, _) = s.get(Some(AGENT), "/api/runs/run-nope").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_resolved_through_the_api_and_cancel_resume_work() {
    let s = Server::start(Faults { notify_down: true, ..Faults::default() }, "").await;
    let plan = json!({"plan": {"steps": [{"tool": "notify", "params": {}}, {"tool": "charge", "params": {"order": 5, "amount": 1}}]}});
    let (_, started) = s.post(Some(AGENT), "/api/runs", Some(plan.clone())).await;
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "escalated").await;
    let ticket = run["state"]["tickets"][0]["ticket_id"].as_str().unwrap().to_owned();
    let (status, t) = s.get(Some(APPROVER), &format!("/api/tickets/{ticket}")).await;
    assert_eq!(status, 200);
    assert_eq!(t["ticket"]["context"]["failing_step"]["tool"], "notify");
    let (status, _) = s.get(Some(APPROVER), "/api/tickets").await;
    assert_eq!(status, 200);
    let (status, e) =
        s.post(Some(AGENT), &format!("/api/tickets/{ticket}/resolve"), Some(json!({"action": "skip"}))).await;
    assert_eq!((status, e["class"].as_str()), (403, Some("forbidden")));
    let (status, e) = s
        .post(Some(APPROVER), &format!("/api/tickets/{ticket}/resolve"), Some(json!({"action": "dance"})))
        .await;
    assert_eq!((status, e["class"].as_str()), (400, Some("invalid_request")));
    let (status, _) = s
        .post(Some(APPROVER), &format!("/api/tickets/{ticket}/resolve"), Some(json!({"action": "skip"})))
        .await;
    assert_eq!(status, 200);
    s.until_run(&run_id, |r| r["state"]["run"]["state"] == "completed").await;
    assert_eq!(s.payments.charges().len(), 1);

    // Cancel a run that waits for a person; resume refuses an ended run.
    let (_, started) = s
        .post(
            Some(AGENT),
            "/api/runs",
            Some(json!({"plan": {"steps": [{"tool": "charge", "params": {"order": 6, "amount": 600}}]}})),
        )
        .await;
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    s.until_run(&run_id, |r| r["state"]["run"]["state"] == "waiting_approval").await;
    let (status, _) = s.post(Some(AGENT), &format!("/api/runs/{run_id}/cancel"), None).await;
    assert_eq!(status, 200);
    let (status, e) = s.post(Some(AGENT), &format!("/api/runs/{run_id}/resume"), None).await;
    assert_eq!((status, e["class"].as_str()), (400, Some("invalid_request")));
}

/// A tool's breaker opening in an invocation reaches `/metrics`, not a sink that
/// drops it (the journal's side: keel-cli's `tickets.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_breaker_opening_reaches_the_metrics() {
    let extra = "[defaults.breaker]\nmin_calls = 2\nfailure_ratio = 0.5\n";
    let s = Server::start(Faults { notify_down: true, ..Faults::default() }, extra).await;
    let (status, body) = s.post(Some(AGENT), "/api/tools/notify/invoke", Some(json!({"params": {}}))).await;
    assert_ne!(status, 200, "{body}");
    let (_, metrics) = s.get(Some(AGENT), "/metrics").await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("keel_breaker_state{target=\"notify\"} 2"), "open is 2: {text}");
}

/// Issue 17: every series on `/metrics` has its `# HELP` and `# TYPE`, in base units
/// (seconds, dollars), with one encoding of breaker state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_series_is_described_in_base_units() {
    let upstream = {
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|| async {
                axum::Json(json!({
                    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
                }))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    };
    let extra = format!(
        "[defaults.breaker]\nmin_calls = 2\nfailure_ratio = 0.5\n\n[gateway]\nkey_budget = {{ cost_usd = 5.0 }}\n\n\
         [models.small]\nprovider = \"openai\"\nbase_url = \"{upstream}\"\nmodel = \"m\"\n\
         prices = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}\n"
    );
    let s = Server::start(Faults { notify_down: true, ..Faults::default() }, &extra).await;
    let (status, _) = s.post(Some(AGENT), "/api/tools/notify/invoke", Some(json!({"params": {}}))).await;
    assert_ne!(status, 200);
    let (status, _) = s
        .post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"order": 1, "amount": 5}})))
        .await;
    assert_eq!(status, 200);
    let chat = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let resp =
        s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&chat).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (_, metrics) = s.get(Some(AGENT), "/metrics").await;
    let text = metrics.as_str().unwrap();
    let mut series = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        series.insert(base.to_owned());
    }
    assert!(series.len() > 10, "{text}");
    for name in &series {
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{text}");
        assert!(text.contains(&format!("# TYPE {name} ")), "no TYPE for {name}:\n{text}");
        assert!(!name.contains("micros"), "{name} is not in base units");
    }
    assert!(series.contains("keel_run_duration_seconds"), "{series:?}");
    // 1000 tokens at $1/M in and 1000 at $2/M out: $0.003.
    assert!(text.contains("keel_gateway_cost_dollars{model=\"small\"} 0.003"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("keel_gateway_budget_used{budget=\"key:")
            && l.ends_with("kind=\"cost_dollars\"} 0.003")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("keel_gateway_budget_limit{budget=\"key:")
            && l.ends_with("kind=\"cost_dollars\"} 5")),
        "{text}"
    );
    assert!(text.contains("keel_breaker_state{target=\"notify\"} 2"), "{text}");
    assert!(text.contains("keel_gateway_breaker_state{model=\"small\"} 0"), "{text}");
    // Requests by route pattern (never the path: the tool's name stays a pattern).
    assert!(
        text.contains(
            "keel_http_requests_total{method=\"POST\",route=\"/api/tools/{name}/invoke\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "keel_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "keel_http_request_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"0.0005\"}"
        ),
        "sub-millisecond buckets: {text}"
    );
}

/// Fault injection on a running server (drills): admin only, checked by key, in force
/// for the calls that start after it, marked injected in the run's events, cleared
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_set_and_cleared_on_a_running_server_by_an_admin() {
    let s = Server::start(Faults::default(), "").await;
    let put = |key: &'static str, tool: &'static str, body: serde_json::Value| {
        let req = s.http.put(s.url(&format!("/api/faults/{tool}"))).bearer_auth(key).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let always = json!({"rate": 1.0, "kinds": ["server_error"], "seed": 1});
    assert_eq!(put(AGENT, "charge", always.clone()).await.0, 403, "an agent cannot drill");
    let (status, body) = put(ADMIN, "charge", json!({"rate": 2.0})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("rate"), "{body}");
    assert_eq!(put(ADMIN, "ghost", always.clone()).await.0, 404);
    assert_eq!(put(ADMIN, "charge", always).await.0, 200);
    let (_, set) = s.get(Some(ADMIN), "/api/faults").await;
    assert_eq!(set["charge"]["rate"], 1.0, "{set}");

    let (status, failed) = s
        .post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"order": 1, "amount": 5}})))
        .await;
    assert_ne!(status, 200, "{failed}");
    assert_eq!(failed["class"], "server_error", "{failed}");
    assert!(s.payments.charges().is_empty(), "an injected fault never reaches the service");
    assert!(failed["message"].as_str().unwrap().contains("injected fault"), "said to be a drill: {failed}");

    let resp = s.http.delete(s.url("/api/faults/charge")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, ok) = s
        .post(Some(AGENT), "/api/tools/charge/invoke", Some(json!({"params": {"order": 2, "amount": 5}})))
        .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(s.payments.charges().len(), 1);
}
