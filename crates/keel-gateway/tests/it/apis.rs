//! The inbound APIs beside chat completions — `/v1/responses`, `/v1/messages`,
//! `/v1/embeddings`, `/v1/models/{id}` — on loopback against the fakes: each goes
//! through the same routing (retries, fallbacks, rescue), budgets and journal, and
//! answers errors in its own shape with the upstream's own message.

use keel_gateway::Provider;
use serde_json::{Value, json};

use crate::support::{Fake, Reply, get, model, post, post_raw, serve, serve_with};

fn claude(fake: &Fake) -> keel_gateway::ModelConfig {
    let mut m = model(fake, "claude-sonnet-4");
    m.provider = Provider::Anthropic;
    m.api_key_env = Some("FAKE_KEY".into());
    m
}

fn weather_tool() -> Value {
    json!({"type": "function", "name": "get_weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
}

#[tokio::test]
async fn responses_answer_text_and_function_calls_through_the_gateway() {
    let fake = Fake::start().await;
    fake.script([
        Reply::Text(vec!["Hello", " world"]),
        Reply::Tool { name: "get_weather", args: "{\"city\":\"Paris\"}" },
    ]);
    let served = serve(vec![("gpt", model(&fake, "gpt-4o-mini"))]).await;

    let a = post(
        &served.url,
        "/v1/responses",
        json!({"model": "gpt", "input": "Say hello", "store": false, "instructions": "Be brief."}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str(), v["model"].as_str()),
        (Some("response"), Some("completed"), Some("gpt"))
    );
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello world");
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12})
    );
    assert_eq!(a.header("x-keel-model"), "gpt");
    let sent = &fake.seen()[0].body;
    assert_eq!(sent["messages"][0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(sent["model"], "gpt-4o-mini");

    let a = post(&served.url, "/v1/responses", json!({"model": "gpt", "input": "Weather in Paris?", "tools": [weather_tool()], "tool_choice": "auto", "max_output_tokens": 50}), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let call = &a.json()["output"][0];
    assert_eq!(
        (call["type"].as_str(), call["call_id"].as_str(), call["name"].as_str()),
        (Some("function_call"), Some("call_1"), Some("get_weather"))
    );
    assert_eq!(call["arguments"], "{\"city\":\"Paris\"}");
    let sent = &fake.seen()[1].body;
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(sent["max_tokens"], 50);

    // The second turn carries the call and its output: translated to chat's terms.
    let a = post(&served.url, "/v1/responses", json!({"model": "gpt", "store": false, "tools": [weather_tool()], "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]}), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let sent = &fake.seen()[2].body;
    assert_eq!(sent["messages"][1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(sent["messages"][2], json!({"role": "tool", "tool_call_id": "call_1", "content": "18C"}));
    assert_eq!(served.journal.records().len(), 3, "every call is journaled");
}

#[tokio::test]
async fn a_responses_stream_is_rescued_like_a_chat_stream() {
    let cut = Fake::start().await;
    cut.always(Reply::Cut(vec!["Hello"]));
    let good = Fake::start().await;
    let mut cutting = model(&cut, "cut-upstream");
    cutting.fallbacks = vec!["gpt".into()];
    let served =
        serve(vec![("gpt", model(&good, "gpt-4o-mini")), ("cut", cutting), ("alone", model(&cut, "m"))])
            .await;

    let a = post(
        &served.url,
        "/v1/responses",
        json!({"model": "cut", "input": "Say hello", "stream": true}),
        &[],
    )
    .await;
    assert_eq!((a.status, a.header("content-type")), (200, "text/event-stream"), "{}", a.text);
    let events = a.named_events();
    for (i, (name, e)) in events.iter().enumerate() {
        assert_eq!(
            (e["type"].as_str(), e["sequence_number"].as_u64()),
            (Some(name.as_str()), Some(i as u64)),
            "{e}"
        );
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello world", "spliced, never duplicated");
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Hello world");
    assert_eq!(done["response"]["keel"]["rescue"], "splice");
    assert!(done["response"]["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(served.gateway.metrics().models["gpt"].rescued_splice, 1);

    // No fallback: the stream ends with `response.failed`, never `completed`.
    let a = post(
        &served.url,
        "/v1/responses",
        json!({"model": "alone", "input": "Say hello", "stream": true}),
        &[],
    )
    .await;
    let events = a.named_events();
    let (last, failed) = events.last().unwrap();
    assert_eq!(last, "response.failed", "{}", a.text);
    assert_eq!(
        (failed["response"]["status"].as_str(), failed["response"]["error"]["keel_class"].as_str()),
        (Some("failed"), Some("network"))
    );
    assert!(!events.iter().any(|(n, _)| n == "response.completed"));
}

#[tokio::test]
async fn responses_refuse_state_and_answer_errors_in_openais_shape() {
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "gpt-4o-mini"))]).await;
    for body in [
        json!({"model": "gpt", "input": "hi", "store": true}),
        json!({"model": "gpt", "input": "hi", "previous_response_id": "resp_1"}),
    ] {
        let a = post(&served.url, "/v1/responses", body, &[]).await;
        assert_eq!(a.status, 400, "{}", a.text);
        let e = &a.json()["error"];
        assert_eq!(
            (e["type"].as_str(), e["keel_class"].as_str()),
            (Some("invalid_request_error"), Some("invalid_request"))
        );
        assert!(e["message"].as_str().unwrap().contains("stateless"), "{e}");
    }
    let a = post(&served.url, "/v1/responses", json!({"model": "nope", "input": "hi"}), &[]).await;
    assert_eq!((a.status, a.json()["error"]["code"].as_str()), (404, Some("model_not_found")));
    for raw in ["", "{", "[1,2]", "{\"model\":\"gpt\",\"input\":{}}"] {
        let a = post_raw(&served.url, "/v1/responses", raw.into(), &[]).await;
        assert_eq!(
            (a.status, a.json()["error"]["type"].as_str()),
            (400, Some("invalid_request_error")),
            "{raw}"
        );
    }
    let huge = format!("{{\"model\":\"gpt\",\"input\":\"{}\"}}", "x".repeat(33 << 20));
    let a = post_raw(&served.url, "/v1/responses", huge, &[]).await;
    assert_eq!((a.status, a.json()["error"]["type"].as_str()), (413, Some("invalid_request_error")));
    assert_eq!(fake.hits(), 0, "nothing bad went upstream");

    // The upstream's own message, not its body as a string.
    fake.script([Reply::Status {
        code: 400,
        retry_after: None,
        body: r#"{"error":{"message":"temperature is out of range","type":"invalid_request_error"}}"#,
    }]);
    let a = post(&served.url, "/v1/responses", json!({"model": "gpt", "input": "hi"}), &[]).await;
    let e = &a.json()["error"];
    assert_eq!((a.status, e["message"].as_str()), (400, Some("temperature is out of range")), "{}", a.text);
    // A 429 retried by Keel, then passed on as OpenAI's rate_limit_error.
    fake.always(Reply::Status { code: 429, retry_after: None, body: r#"{"error":{"message":"slow down"}}"# });
    let a = post(&served.url, "/v1/responses", json!({"model": "gpt", "input": "hi"}), &[]).await;
    let e = &a.json()["error"];
    assert_eq!((a.status, e["type"].as_str()), (429, Some("rate_limit_error")), "{}", a.text);
    // Keel adds why it stopped retrying.
    assert_eq!(e["message"], "slow down (not retried: all 3 attempts used)");
    assert!(a.header("x-keel-attempts").parse::<u32>().unwrap() > 1, "retried first");
}

#[tokio::test]
async fn messages_are_answered_by_models_of_both_providers() {
    let openai = Fake::start().await;
    let anthropic = Fake::start().await;
    let served = serve(vec![("gpt", model(&openai, "gpt-4o-mini")), ("claude", claude(&anthropic))]).await;
    for (name, fake) in [("gpt", &openai), ("claude", &anthropic)] {
        fake.script([
            Reply::Text(vec!["Hello", " world"]),
            Reply::Tool { name: "get_weather", args: "{\"city\":\"Rome\"}" },
        ]);
        let a = post(&served.url, "/v1/messages", json!({"model": name, "max_tokens": 100, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello"}]}), &[]).await;
        assert_eq!(a.status, 200, "{name}: {}", a.text);
        let v = a.json();
        assert_eq!(
            (v["type"].as_str(), v["role"].as_str(), v["model"].as_str()),
            (Some("message"), Some("assistant"), Some(name))
        );
        assert_eq!(v["content"], json!([{"type": "text", "text": "Hello world"}]), "{name}");
        assert_eq!(v["stop_reason"], "end_turn");
        assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 0);

        let tools = json!([{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
        let a = post(&served.url, "/v1/messages", json!({"model": name, "max_tokens": 100, "tools": tools, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "18C"}, {"type": "text", "text": "And Rome?"}]},
        ]}), &[]).await;
        assert_eq!(a.status, 200, "{name}: {}", a.text);
        let v = a.json();
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        let call = v["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
        assert_eq!((call["name"].as_str(), &call["input"]), (Some("get_weather"), &json!({"city": "Rome"})));
        let seen = fake.seen();
        let sent = &seen.last().unwrap().body;
        let tool_result = if name == "claude" {
            sent["messages"][2]["content"][0].clone()
        } else {
            sent["messages"][2].clone()
        };
        assert!(tool_result.to_string().contains("18C"), "{name}: the tool result went upstream: {sent}");

        fake.script([Reply::Text(vec!["Hello", " world"])]);
        let a = post(&served.url, "/v1/messages", json!({"model": name, "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "Say hello"}]}), &[]).await;
        assert_eq!(a.status, 200, "{name}: {}", a.text);
        let events = a.named_events();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"), "{name}");
        assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"], "{name}");
        let text: String =
            events.iter().filter_map(|(_, e)| e.pointer("/delta/text").and_then(Value::as_str)).collect();
        assert_eq!(text, "Hello world", "{name}");
        assert_eq!(events[events.len() - 2].1["delta"]["stop_reason"], "end_turn");
    }
    assert_eq!(served.journal.records().len(), 6);
}

#[tokio::test]
async fn a_messages_stream_is_rescued_and_a_failed_one_ends_with_an_error_event() {
    let cut = Fake::start().await;
    cut.always(Reply::Cut(vec!["Hello"]));
    let good = Fake::start().await;
    let mut cutting = model(&cut, "cut-upstream");
    cutting.fallbacks = vec!["claude".into()];
    let served = serve(vec![("claude", claude(&good)), ("cut", cutting), ("alone", model(&cut, "m"))]).await;
    let ask = |m: &str| json!({"model": m, "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "Say hello"}]});
    let a = post(&served.url, "/v1/messages", ask("cut"), &[]).await;
    let events = a.named_events();
    let text: String =
        events.iter().filter_map(|(_, e)| e.pointer("/delta/text").and_then(Value::as_str)).collect();
    assert_eq!(text, "Hello world", "spliced onto the Anthropic fallback, never duplicated: {}", a.text);
    let (name, delta) = &events[events.len() - 2];
    assert_eq!((name.as_str(), delta["keel"]["rescue"].as_str()), ("message_delta", Some("splice")));
    assert_eq!(delta["keel"]["models"], json!(["cut", "claude"]));

    let a = post(&served.url, "/v1/messages", ask("alone"), &[]).await;
    let events = a.named_events();
    let (name, e) = events.last().unwrap();
    assert_eq!(
        (name.as_str(), e["error"]["type"].as_str(), e["error"]["keel_class"].as_str()),
        ("error", Some("api_error"), Some("network"))
    );
    assert!(!events.iter().any(|(n, _)| n == "message_stop"), "a cut answer is never presented as complete");
}

#[tokio::test]
async fn messages_errors_are_in_anthropics_shape() {
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "gpt-4o-mini"))]).await;
    let check = |a: &crate::support::Answer, status: u16, kind: &str| {
        assert_eq!(a.status, status, "{}", a.text);
        let v = a.json();
        assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some(kind)), "{v}");
        v["error"].clone()
    };
    let a = post(
        &served.url,
        "/v1/messages",
        json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    let e = check(&a, 400, "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("max_tokens"), "{e}");
    let a = post(
        &served.url,
        "/v1/messages",
        json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    check(&a, 404, "not_found_error");
    let a = post_raw(&served.url, "/v1/messages", "{\"model\":".into(), &[]).await;
    check(&a, 400, "invalid_request_error");
    let a = post_raw(&served.url, "/v1/messages", "x".repeat(33 << 20), &[]).await;
    check(&a, 413, "request_too_large");
    fake.script([Reply::Status {
        code: 400,
        retry_after: None,
        body: r#"{"error":{"message":"bad tool schema"}}"#,
    }]);
    let a = post(
        &served.url,
        "/v1/messages",
        json!({"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    let e = check(&a, 400, "invalid_request_error");
    assert_eq!(
        (e["message"].as_str(), e["keel_class"].as_str()),
        (Some("bad tool schema"), Some("invalid_request"))
    );
    fake.always(Reply::Status { code: 429, retry_after: None, body: r#"{"error":{"message":"slow down"}}"# });
    let a = post(&served.url, "/v1/messages", json!({"model": "gpt", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "hi"}]}), &[]).await;
    let e = check(&a, 429, "rate_limit_error");
    assert!(e["message"].as_str().unwrap().starts_with("slow down"), "{e}");
}

#[tokio::test]
async fn embeddings_pass_through_under_the_models_policies_and_budgets() {
    let fake = Fake::start().await;
    let claude_fake = Fake::start().await;
    let config = keel_gateway::GatewayConfig {
        run_budget: keel_core::BudgetConfig { tokens: Some(40), ..keel_core::BudgetConfig::default() },
        ..keel_gateway::GatewayConfig::default()
    };
    let served = serve_with(
        vec![("embed", model(&fake, "text-embedding-3-small")), ("claude", claude(&claude_fake))],
        config,
    )
    .await;
    fake.script([Reply::Status { code: 503, retry_after: None, body: r#"{"error":{"message":"busy"}}"# }]);
    let a = post(
        &served.url,
        "/v1/embeddings",
        json!({"model": "embed", "input": ["a", "b"], "dimensions": 3}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!((v["model"].as_str(), v["data"].as_array().map(Vec::len)), (Some("embed"), Some(2)));
    assert_eq!((a.header("x-keel-attempts"), fake.hits()), ("2", 2), "the 503 was retried");
    let sent = &fake.seen()[1];
    assert_eq!(
        (sent.path.as_str(), &sent.body),
        ("/v1/embeddings", &json!({"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 3}))
    );
    let record = served.journal.records().pop().unwrap();
    assert_eq!(
        (record.model.as_str(), record.usage.map(|u| u.prompt_tokens), record.attempts),
        ("embed", Some(8), 2)
    );

    // The run's budget: charged from the real usage, then refused before the upstream.
    let run = [("x-keel-run", "r1")];
    let big: Vec<String> = (0..20).map(|i| format!("text {i}")).collect();
    assert_eq!(
        post(&served.url, "/v1/embeddings", json!({"model": "embed", "input": "a"}), &run).await.status,
        200
    );
    let hits = fake.hits();
    let a = post(&served.url, "/v1/embeddings", json!({"model": "embed", "input": big}), &run).await;
    assert_eq!(
        (a.status, a.json()["error"]["keel_class"].as_str()),
        (429, Some("budget_exceeded")),
        "{}",
        a.text
    );
    assert_eq!(a.json()["error"]["type"], "insufficient_quota");
    assert_eq!(fake.hits(), hits, "refused before the upstream");

    for (body, status) in [
        (json!({"model": "claude", "input": "a"}), 400),
        (json!({"model": "nope", "input": "a"}), 404),
        (json!({"model": "embed", "input": []}), 400),
        (json!({"model": "embed"}), 400),
    ] {
        let a = post(&served.url, "/v1/embeddings", body.clone(), &[]).await;
        assert_eq!(a.status, status, "{body}: {}", a.text);
        assert!(a.json()["error"]["message"].is_string(), "{}", a.text);
    }
    assert_eq!(claude_fake.hits(), 0);
}

#[tokio::test]
async fn a_model_is_retrieved_or_not_found() {
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "gpt-4o-mini"))]).await;
    let a = get(&served.url, "/v1/models/gpt").await;
    assert_eq!(
        (a.status, a.json()),
        (200, json!({"id": "gpt", "object": "model", "created": 0, "owned_by": "keel"}))
    );
    let a =
        post(&served.url, "/v1/messages/count_tokens", json!({"model": "gpt", "messages": []}), &[]).await;
    assert_eq!((a.status, a.json()["error"]["type"].as_str()), (404, Some("not_found_error")), "{}", a.text);
    let a = get(&served.url, "/v1/models/meta/llama").await;
    assert_eq!(
        (a.status, a.json()["error"]["message"].as_str().map(|m| m.contains("meta/llama"))),
        (404, Some(true))
    );
    let a = get(&served.url, "/v1/models/nope").await;
    assert_eq!(a.status, 404);
    let e = &a.json()["error"];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["keel_class"].as_str()),
        (Some("invalid_request_error"), Some("model_not_found"), Some("not_found"))
    );
}
