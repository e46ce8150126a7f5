//! Anthropic models behind the OpenAI endpoint: requests and answers translated both
//! ways, tool use included, streamed or not.

use keel_gateway::Provider;
use serde_json::{Value, json};

use crate::support::{Fake, Reply, model, post_chat, serve};

fn claude(fake: &Fake) -> keel_gateway::ModelConfig {
    let mut m = model(fake, "claude-sonnet-4");
    m.provider = Provider::Anthropic;
    m.api_key_env = Some("FAKE_KEY".into());
    m
}

fn conversation(stream: bool) -> Value {
    json!({
        "model": "claude",
        "stream": stream,
        "max_tokens": 300,
        "stop": "END",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_0", "content": "18C, sunny"},
            {"role": "user", "content": "And in Rome?"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required",
    })
}

#[tokio::test]
async fn requests_and_tool_use_are_translated_both_ways() {
    let fake = Fake::start().await;
    fake.always(Reply::Tool { name: "get_weather", args: "{\"city\":\"Rome\"}" });
    let served = serve(vec![("claude", claude(&fake))]).await;
    let a = post_chat(&served.url, conversation(false), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["model"], "claude");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["content"], "Let me check.");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(msg["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Rome"}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        (v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
        (Some(12), Some(7))
    );

    let seen = &fake.seen()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "sk-test");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    let b = &seen.body;
    assert_eq!(
        (b["model"].as_str(), b["system"].as_str(), b["max_tokens"].as_u64()),
        (Some("claude-sonnet-4"), Some("Be brief."), Some(300))
    );
    assert_eq!(b["stop_sequences"], json!(["END"]));
    assert_eq!(b["tool_choice"], json!({"type": "any"}));
    assert_eq!(b["tools"][0]["input_schema"]["properties"]["city"]["type"], "string");
    let roles: Vec<&str> =
        b["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user"],
        "the tool result and the next question merge into one user turn"
    );
    assert_eq!(
        b["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}})
    );
    assert_eq!(b["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(b["messages"][2]["content"][0]["tool_use_id"], "toolu_0");
}

#[tokio::test]
async fn anthropic_streams_become_openai_chunks() {
    let fake = Fake::start().await;
    fake.script([
        Reply::Text(vec!["Rome is ", "sunny."]),
        Reply::Tool { name: "get_weather", args: "{\"city\":\"Rome\"}" },
    ]);
    let served = serve(vec![("claude", claude(&fake))]).await;
    let mut body = conversation(true);
    body["stream_options"] = json!({"include_usage": true});
    let a = post_chat(&served.url, body.clone(), &[]).await;
    assert_eq!(a.streamed_text(), "Rome is sunny.", "{}", a.text);
    assert_eq!(a.finish_reasons(), ["stop"]);
    let events = a.events();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"], json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}));

    let a = post_chat(&served.url, body, &[]).await;
    let chunks: Vec<Value> = a.events().iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let name = chunks.iter().find_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/name")).unwrap();
    assert_eq!(name, "get_weather");
    let args: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str))
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Rome"}));
    assert_eq!(a.finish_reasons(), ["tool_calls"]);
}

#[tokio::test]
async fn anthropic_errors_are_classified() {
    let fake = Fake::start().await;
    fake.script([Reply::Status {
        code: 529,
        retry_after: None,
        body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    }]);
    fake.script([Reply::Status { code: 400, retry_after: None, body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 250000 tokens > 200000 maximum"}}"# }]);
    let served = serve(vec![("claude", claude(&fake))]).await;
    let a = post_chat(&served.url, conversation(false), &[]).await;
    assert_eq!(a.status, 400, "529 retried, then the overflow is final: {}", a.text);
    assert_eq!(a.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(fake.hits(), 2);
}
