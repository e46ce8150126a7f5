//! Hostile requests to every edge API: any JSON at all, in any field, is either
//! translated or refused as `invalid_request` — never a panic — and whatever is
//! translated can be sent to an upstream of either dialect.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::embeddings::EmbeddingsRequest;
use crate::wire::{anthropic, messages, responses};
use keel_core::ErrorClass;

/// Any JSON value, a few levels deep, with the keys and type tags these APIs use
/// (so that the fuzz reaches past the first check).
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "type",
        "role",
        "content",
        "text",
        "name",
        "arguments",
        "call_id",
        "output",
        "input",
        "id",
        "tool_use_id",
        "input_schema",
        "parameters",
        "source",
        "image_url",
        "is_error",
        "format",
        "effort",
        "function",
        "x",
    ]);
    let word = prop::sample::select(vec![
        "message",
        "user",
        "assistant",
        "system",
        "developer",
        "function",
        "function_call",
        "function_call_output",
        "input_text",
        "output_text",
        "input_image",
        "text",
        "tool_use",
        "tool_result",
        "image",
        "base64",
        "url",
        "reasoning",
        "json_schema",
        "auto",
        "any",
        "tool",
        "",
        "\u{0}",
        "🦀",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        word.prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<_, _>>()
            )),
        ]
    })
}

fn check<T>(result: Result<T, keel_core::Failure>) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(f) => {
            assert_eq!(f.class, ErrorClass::InvalidRequest, "{}", f.message);
            assert!(!f.message.is_empty());
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn responses_requests_never_panic(input in any_json(), tools in any_json(), extra in any_json()) {
        let mut body = json!({"model": "m", "input": input, "tools": tools, "tool_choice": extra.clone(), "text": extra});
        if let Some(r) = check(responses::parse(body.to_string().as_bytes())) {
            let _ = r.chat.openai_body("up");
            let _ = anthropic::request_body(&r.chat, "up", 16);
        }
        body["tools"] = Value::Null;
        body["text"] = Value::Null;
        body["tool_choice"] = Value::Null;
        if let Some(r) = check(responses::parse(body.to_string().as_bytes())) {
            let _ = anthropic::request_body(&r.chat, "up", 16);
        }
    }

    #[test]
    fn messages_requests_never_panic(messages_in in any_json(), system in any_json(), tools in any_json()) {
        let body = json!({"model": "m", "max_tokens": 5, "messages": messages_in, "system": system.clone(), "tools": tools, "tool_choice": system});
        if let Some(r) = check(messages::parse(body.to_string().as_bytes())) {
            let _ = anthropic::request_body(&r.chat, "up", 16);
        }
        let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": messages_in}]});
        if let Some(r) = check(messages::parse(body.to_string().as_bytes())) {
            let _ = anthropic::request_body(&r.chat, "up", 16);
        }
    }

    #[test]
    fn whole_bodies_never_panic(body in any_json(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let text = body.to_string();
        check(responses::parse(text.as_bytes()));
        check(messages::parse(text.as_bytes()));
        check(EmbeddingsRequest::parse(text.as_bytes()));
        check(responses::parse(&bytes));
        check(messages::parse(&bytes));
        check(EmbeddingsRequest::parse(&bytes));
    }
}
