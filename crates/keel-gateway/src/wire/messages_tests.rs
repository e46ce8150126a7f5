//! The Messages API's translation: requests to chat, answers and streams back, and
//! hostile requests refused with a clear 400 (never a panic).

use super::*;
use crate::wire::chunks::FunctionDelta;
use crate::wire::{FunctionCall, ToolCall};

fn chat(body: Value) -> Value {
    let r = parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{body}: {e:?}"));
    serde_json::from_slice(&r.chat.openai_body("up")).unwrap()
}

fn refused(body: Value) -> String {
    let e = parse(body.to_string().as_bytes()).expect_err(&body.to_string());
    assert_eq!(e.class, ErrorClass::InvalidRequest, "{body}");
    e.message
}

#[test]
fn a_conversation_with_tool_use_becomes_a_chat_request() {
    let v = chat(json!({
        "model": "claude", "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "...", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And Rome?"},
            ]},
        ],
        "tools": [{"name": "weather", "description": "Weather now", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "stop_sequences": ["END"], "temperature": 0.5, "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }));
    let m = v["messages"].as_array().unwrap();
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(m[1], json!({"role": "user", "content": "Weather in Paris?"}));
    assert_eq!(m[2]["content"], "Checking.");
    assert_eq!(
        m[2]["tool_calls"][0]["function"],
        json!({"name": "weather", "arguments": "{\"city\":\"Paris\"}"})
    );
    assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}));
    assert_eq!(m[4], json!({"role": "user", "content": "And Rome?"}));
    assert_eq!(v["tools"][0]["function"]["parameters"], json!({"type": "object"}));
    assert_eq!(
        (v["tool_choice"].as_str(), v["parallel_tool_calls"].as_bool()),
        (Some("required"), Some(false))
    );
    assert_eq!(
        (v["max_tokens"].as_u64(), v["stop"][0].as_str(), v["user"].as_str()),
        (Some(300), Some("END"), Some("u1"))
    );
    assert!(v.get("thinking").is_none());
}

#[test]
fn an_image_in_a_tool_result_follows_in_the_user_turn() {
    let v = chat(json!({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "Look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a.png"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "a.png"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}},
        ]}]},
    ]}));
    let m = v["messages"].as_array().unwrap();
    assert_eq!(m[2], json!({"role": "tool", "tool_call_id": "t1", "content": "a.png"}));
    assert_eq!(m[3]["role"], "user");
    assert_eq!(m[3]["content"][1]["image_url"]["url"], "data:image/png;base64,AA", "{m:?}");
}

#[test]
fn hostile_requests_are_a_clear_400() {
    let ok = |extra: Value| {
        let mut b = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, needle) in [
        (json!("hi"), "JSON object"),
        (json!({"max_tokens": 5, "messages": []}), "model: Field required"),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens: Field required",
        ),
        (ok(json!({"max_tokens": 0})), "max_tokens"),
        (ok(json!({"max_tokens": "5"})), "max_tokens"),
        (ok(json!({"model": ["m"]})), "model"),
        (ok(json!({"messages": []})), "at least one message"),
        (ok(json!({"messages": {}})), "messages: must be an array"),
        (ok(json!({"messages": [{"content": "x"}]})), "role"),
        (ok(json!({"messages": [{"role": "system", "content": "x"}]})), "role"),
        (ok(json!({"messages": [{"role": "user"}]})), "content"),
        (ok(json!({"messages": [{"role": "user", "content": 3}]})), "content"),
        (ok(json!({"messages": [{"role": "user", "content": [{"text": "x"}]}]})), "type"),
        (ok(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]})), "text"),
        (
            ok(json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]})),
            "document",
        ),
        (
            ok(
                json!({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}),
            ),
            "tool_use",
        ),
        (
            ok(
                json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}),
            ),
            "input",
        ),
        (ok(json!({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]})), "tool_use_id"),
        (
            ok(
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}),
            ),
            "source.type",
        ),
        (ok(json!({"system": 3})), "system"),
        (ok(json!({"system": [{"type": "image"}]})), "system.0"),
        (ok(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})), "server tools"),
        (ok(json!({"tools": [{"name": "f"}]})), "input_schema"),
        (ok(json!({"tools": [{"input_schema": {}}]})), "name"),
        (ok(json!({"tool_choice": {"type": "sometimes"}})), "tool_choice"),
        (ok(json!({"tool_choice": {"type": "tool"}})), "tool_choice.name"),
        (ok(json!({"stop_sequences": "END"})), "stop_sequences"),
        (ok(json!({"stream": 1})), "stream"),
        (ok(json!({"temperature": "warm"})), "temperature"),
        (ok(json!({"mcp_servers": []})), "mcp_servers: Extra inputs"),
    ] {
        let m = refused(body.clone());
        assert!(m.contains(needle), "{body}: {m}");
    }
}

#[test]
fn answers_are_messages() {
    let s = AnswerSummary {
        content: Some("Let me check.".into()),
        refusal: None,
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            function: FunctionCall { name: "f".into(), arguments: "{\"a\":1}".into() },
        }],
        finish_reason: Some("tool_calls".into()),
        usage: None,
    };
    let a = answer("x", "claude", &s, Usage::new(12, 7)).unwrap();
    assert_eq!(
        (a["id"].as_str(), a["type"].as_str(), a["stop_reason"].as_str()),
        (Some("msg_x"), Some("message"), Some("tool_use"))
    );
    assert_eq!(a["content"][0], json!({"type": "text", "text": "Let me check."}));
    assert_eq!(a["content"][1], json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}));
    assert_eq!(a["usage"], json!({"input_tokens": 12, "output_tokens": 7}));
    let mut bad = s.clone();
    bad.tool_calls[0].function.arguments = "[1]".into();
    assert_eq!(answer("x", "claude", &bad, Usage::default()).unwrap_err().class, ErrorClass::ServerError);
}

#[test]
fn a_stream_is_reframed_as_anthropic_events() {
    let mut s = MessagesStream::new("x", "claude");
    let mut out = Vec::new();
    s.start(&mut out);
    let tool = |id: Option<&str>, name: Option<&str>, args: &str| ToolDelta {
        index: 0,
        id: id.map(str::to_owned),
        function: Some(FunctionDelta { name: name.map(str::to_owned), arguments: Some(args.into()) }),
    };
    for f in [
        Internal::Delta { text: Some("Hi".into()), tool_calls: vec![], finish: None },
        Internal::Delta { text: None, tool_calls: vec![tool(Some("call_1"), Some("f"), "")], finish: None },
        Internal::Delta {
            text: None,
            tool_calls: vec![tool(None, None, "{}")],
            finish: Some("tool_calls".into()),
        },
        Internal::Tail { usage: Some(Usage::new(5, 3)), keel: None },
        Internal::Done,
    ] {
        s.frame(f, &mut out);
    }
    let ev: Vec<(String, Value)> = out
        .iter()
        .map(|f| {
            let t = std::str::from_utf8(f).unwrap();
            let (name, data) = t.trim_end().split_once('\n').unwrap();
            (
                name.trim_start_matches("event: ").to_owned(),
                serde_json::from_str(data.trim_start_matches("data: ")).unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(ev[4].1["content_block"]["type"], "tool_use");
    assert_eq!(ev[5].1["delta"], json!({"type": "input_json_delta", "partial_json": "{}"}));
    assert_eq!(ev[7].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(ev[7].1["usage"]["output_tokens"], 3);

    let mut failed = MessagesStream::new("y", "claude");
    let mut out = Vec::new();
    failed.frame(Internal::Error { class: ErrorClass::RateLimited, message: "slow down".into() }, &mut out);
    let t = std::str::from_utf8(&out[0]).unwrap();
    assert!(
        t.starts_with("event: error\n") && t.contains("rate_limit_error") && t.contains("slow down"),
        "{t}"
    );
}
