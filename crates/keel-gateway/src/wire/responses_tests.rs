//! The Responses API's translation: requests to chat, answers and streams back, and
//! hostile requests refused with a clear 400 (never a panic).

use super::*;
use crate::wire::chunks::{FunctionDelta, ToolDelta};
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
fn a_conversation_with_tools_becomes_a_chat_request() {
    let v = chat(json!({
        "model": "gpt", "store": false, "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "c1", "output": "18C"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "21C"}]},
        ],
        "tools": [{"type": "function", "name": "weather", "description": "Weather now", "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "weather"},
        "max_output_tokens": 100, "temperature": 0.2,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        "reasoning": {"effort": "low"},
        "metadata": {"k": "v"}, "include": ["reasoning.encrypted_content"],
    }));
    assert_eq!(v["model"], "up");
    let m = v["messages"].as_array().unwrap();
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(m[1], json!({"role": "user", "content": "Weather in Paris?"}));
    assert_eq!(m[2]["content"], "Checking.");
    assert_eq!(m[2]["tool_calls"].as_array().unwrap().len(), 2, "consecutive calls are one turn: {m:?}");
    assert_eq!(m[2]["tool_calls"][1]["function"]["arguments"], "{\"city\":\"Rome\"}");
    assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "c1", "content": "18C"}));
    assert_eq!(m[4]["content"], "21C");
    assert_eq!(m.len(), 5, "the reasoning item is dropped");
    assert_eq!(v["tools"][0]["function"]["name"], "weather");
    assert_eq!(v["tools"][0]["function"]["strict"], true);
    assert_eq!(v["tool_choice"], json!({"type": "function", "function": {"name": "weather"}}));
    assert_eq!((v["max_tokens"].as_u64(), v["temperature"].as_f64()), (Some(100), Some(0.2)));
    assert_eq!(v["response_format"]["json_schema"]["name"], "w");
    assert_eq!(v["reasoning_effort"], "low");
    assert!(v.get("metadata").is_none() && v.get("include").is_none());
}

#[test]
fn a_string_input_and_a_stream() {
    let v = chat(json!({"model": "gpt", "input": "hi", "stream": true}));
    assert_eq!(v["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(
        (v["stream"].as_bool(), v["stream_options"]["include_usage"].as_bool()),
        (Some(true), Some(true))
    );
    let v = chat(
        json!({"model": "gpt", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]}),
    );
    assert_eq!(v["messages"][0]["content"][0]["image_url"]["url"], "data:image/png;base64,AA");
    let v = chat(json!({"model": "gpt", "input": [
        {"role": "user", "content": "Look"},
        {"type": "function_call", "call_id": "c", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "done"}, {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
    ]}));
    assert_eq!(v["messages"][2], json!({"role": "tool", "tool_call_id": "c", "content": "done"}));
    assert_eq!(v["messages"][3]["content"][1]["image_url"]["url"], "data:image/png;base64,AA");
}

#[test]
fn state_is_refused_never_ignored() {
    for (body, needle) in [
        (json!({"model": "gpt", "input": "hi", "store": true}), "store: true"),
        (json!({"model": "gpt", "input": "hi", "previous_response_id": "resp_1"}), "previous_response_id"),
        (json!({"model": "gpt", "input": "hi", "conversation": "conv_1"}), "conversation"),
        (json!({"model": "gpt", "input": "hi", "background": true}), "background"),
        (json!({"model": "gpt", "input": "hi", "prompt": {"id": "p"}}), "prompt"),
        (json!({"model": "gpt", "input": [{"type": "item_reference", "id": "msg_1"}]}), "item_reference"),
    ] {
        let m = refused(body.clone());
        assert!(m.contains(needle) && m.contains("stateless"), "{body}: {m}");
    }
}

#[test]
fn hostile_requests_are_a_clear_400() {
    for (body, needle) in [
        (json!([]), "JSON object"),
        (json!({"input": "hi"}), "missing field `model`"),
        (json!({"model": 3, "input": "hi"}), "`model`"),
        (json!({"model": "", "input": "hi"}), "`model`"),
        (json!({"model": "gpt"}), "missing field `input`"),
        (json!({"model": "gpt", "input": ""}), "empty"),
        (json!({"model": "gpt", "input": []}), "empty"),
        (json!({"model": "gpt", "input": 7}), "`input`"),
        (json!({"model": "gpt", "input": "hi", "instructions": 3}), "`instructions`"),
        (json!({"model": "gpt", "input": [3]}), "input[0]"),
        (json!({"model": "gpt", "input": [{"content": "x"}]}), "`type`"),
        (json!({"model": "gpt", "input": [{"role": "wizard", "content": "x"}]}), "role"),
        (json!({"model": "gpt", "input": [{"role": "user"}]}), "content"),
        (json!({"model": "gpt", "input": [{"role": "user", "content": 5}]}), "content"),
        (
            json!({"model": "gpt", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "input_file",
        ),
        (json!({"model": "gpt", "input": [{"role": "user", "content": [{"type": "input_text"}]}]}), "text"),
        (
            json!({"model": "gpt", "input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "u"}]}]}),
            "only text",
        ),
        (
            json!({"model": "gpt", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
            "call_id",
        ),
        (
            json!({"model": "gpt", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}),
            "arguments",
        ),
        (json!({"model": "gpt", "input": [{"type": "function_call_output", "call_id": "c"}]}), "output"),
        (json!({"model": "gpt", "input": [{"type": "web_search_call"}]}), "web_search_call"),
        (json!({"model": "gpt", "input": "hi", "tools": {}}), "`tools`"),
        (json!({"model": "gpt", "input": "hi", "tools": [{"type": "web_search"}]}), "web_search"),
        (json!({"model": "gpt", "input": "hi", "tools": [{"type": "function"}]}), "name"),
        (
            json!({"model": "gpt", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 3}]}),
            "parameters",
        ),
        (json!({"model": "gpt", "input": "hi", "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"model": "gpt", "input": "hi", "max_output_tokens": -1}), "max_output_tokens"),
        (json!({"model": "gpt", "input": "hi", "max_output_tokens": "9"}), "max_output_tokens"),
        (json!({"model": "gpt", "input": "hi", "temperature": "hot"}), "temperature"),
        (json!({"model": "gpt", "input": "hi", "stream": "yes"}), "stream"),
        (json!({"model": "gpt", "input": "hi", "store": "no"}), "store"),
        (json!({"model": "gpt", "input": "hi", "text": {"format": {"type": "xml"}}}), "text.format"),
        (json!({"model": "gpt", "input": "hi", "text": {"format": {"type": "json_schema"}}}), "json_schema"),
        (json!({"model": "gpt", "input": "hi", "reasoning": "hard"}), "reasoning"),
        (json!({"model": "gpt", "input": "hi", "frobnicate": 1}), "unknown field `frobnicate`"),
    ] {
        let m = refused(body.clone());
        assert!(m.contains(needle), "{body}: {m}");
    }
    assert_eq!(parse(b"").unwrap_err().class, ErrorClass::InvalidRequest);
    assert_eq!(parse(b"{\"model\":").unwrap_err().class, ErrorClass::InvalidRequest);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        parse(format!("{{\"model\":\"m\",\"input\":{deep}}}").as_bytes()).unwrap_err().class,
        ErrorClass::InvalidRequest
    );
}

fn summary(content: Option<&str>, calls: &[(&str, &str, &str)], finish: &str) -> AnswerSummary {
    AnswerSummary {
        content: content.map(str::to_owned),
        refusal: None,
        tool_calls: calls
            .iter()
            .map(|(id, name, args)| ToolCall {
                id: (*id).into(),
                function: FunctionCall { name: (*name).into(), arguments: (*args).into() },
            })
            .collect(),
        finish_reason: Some(finish.into()),
        usage: None,
    }
}

#[test]
fn answers_have_output_items_and_usage() {
    let echo = parse(br#"{"model":"gpt","input":"hi","max_output_tokens":9}"#).unwrap().echo;
    let a = answer(
        &echo,
        "x1",
        7,
        "gpt",
        &summary(Some("Hello"), &[("c1", "f", "{}")], "tool_calls"),
        Usage::new(3, 2),
    );
    assert_eq!(
        (a["id"].as_str(), a["object"].as_str(), a["status"].as_str()),
        (Some("resp_x1"), Some("response"), Some("completed"))
    );
    assert_eq!(
        a["output"][0]["content"][0],
        json!({"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []})
    );
    assert_eq!(a["output"][1]["type"], "function_call");
    assert_eq!(
        (a["output"][1]["call_id"].as_str(), a["output"][1]["name"].as_str()),
        (Some("c1"), Some("f"))
    );
    assert_eq!(a["usage"]["total_tokens"], 5);
    assert_eq!((a["store"].as_bool(), a["max_output_tokens"].as_u64()), (Some(false), Some(9)));
    let cut = answer(&echo, "x2", 7, "gpt", &summary(Some("Hel"), &[], "length"), Usage::new(3, 9));
    assert_eq!(
        (cut["status"].as_str(), cut["incomplete_details"]["reason"].as_str()),
        (Some("incomplete"), Some("max_output_tokens"))
    );
}

fn events(frames: &[bytes::Bytes]) -> Vec<Value> {
    frames
        .iter()
        .map(|f| {
            let text = std::str::from_utf8(f).unwrap();
            let (name, data) = text.trim_end().split_once('\n').unwrap();
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(name.strip_prefix("event: "), v["type"].as_str(), "the event name is its type");
            v
        })
        .collect()
}

#[test]
fn a_stream_is_reframed_with_sequence_numbers() {
    let echo = parse(br#"{"model":"gpt","input":"hi","stream":true}"#).unwrap().echo;
    let mut s = ResponsesStream::new(echo, "x", 1, "gpt");
    let mut out = Vec::new();
    s.start(&mut out);
    let delta = |text: Option<&str>, tools: Vec<ToolDelta>, finish: Option<&str>| Internal::Delta {
        text: text.map(str::to_owned),
        tool_calls: tools,
        finish: finish.map(str::to_owned),
    };
    let call = |id: Option<&str>, name: Option<&str>, args: &str| ToolDelta {
        index: 0,
        id: id.map(str::to_owned),
        function: Some(FunctionDelta { name: name.map(str::to_owned), arguments: Some(args.into()) }),
    };
    for f in [
        delta(Some("Hel"), vec![], None),
        delta(Some("lo"), vec![], None),
        delta(None, vec![call(Some("c1"), Some("f"), "")], None),
        delta(None, vec![call(None, None, "{\"a\":")], None),
        delta(None, vec![call(None, None, "1}")], None),
        delta(None, vec![], Some("tool_calls")),
        Internal::Tail { usage: Some(Usage::new(4, 6)), keel: None },
        Internal::Done,
    ] {
        s.frame(f, &mut out);
    }
    assert!(s.ended());
    let ev = events(&out);
    let kinds: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["sequence_number"].as_u64(), Some(i as u64));
    }
    let done = &ev.last().unwrap()["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["output"][1]["arguments"], "{\"a\":1}");
    assert_eq!(done["usage"]["output_tokens"], 6);
    assert_eq!(ev[12]["arguments"], "{\"a\":1}");

    let mut failed = ResponsesStream::new(Echo::default(), "y", 1, "gpt");
    let mut out = Vec::new();
    failed.frame(delta(Some("Hi"), vec![], None), &mut out);
    failed.cut(&mut out);
    let last = events(&out).pop().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["response"]["status"].as_str()),
        (Some("response.failed"), Some("failed"))
    );
    assert_eq!(last["response"]["error"]["keel_class"], "server_error");
}
