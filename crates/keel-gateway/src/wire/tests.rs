//! Unit tests of the shallow wire parsing.

use super::*;

#[test]
fn a_request_keeps_every_field_and_replaces_the_model() {
    let body = br#"{"model":"gpt","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"response_format":{"type":"json_object"},"max_tokens":50,"stream":true,"stream_options":{"include_usage":false},"x_vendor":[1,2]}"#;
    let req = ChatRequest::parse(body).unwrap();
    assert_eq!(
        (req.model.as_str(), req.stream, req.include_usage, req.max_tokens),
        ("gpt", true, false, Some(50))
    );
    let out: serde_json::Value = serde_json::from_slice(&req.openai_body("gpt-4o-mini")).unwrap();
    assert_eq!(out["model"], "gpt-4o-mini");
    assert_eq!(out["response_format"]["type"], "json_object");
    assert_eq!(out["x_vendor"], serde_json::json!([1, 2]));
    assert_eq!(out["stream_options"]["include_usage"], true, "streams always ask for usage");
    assert_eq!(req.tools()[0].name, "f");
}

#[test]
fn bad_requests_are_invalid_request() {
    for body in [
        &b"[]"[..],
        br#"{"messages":[]}"#,
        br#"{"model":1,"messages":[]}"#,
        br#"{"model":"m","messages":{}}"#,
        br#"{"model":"m","messages":[],"stream":"yes"}"#,
    ] {
        assert_eq!(
            ChatRequest::parse(body).unwrap_err().class,
            ErrorClass::InvalidRequest,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn an_answer_is_renamed_and_summarised() {
    let body = br#"{"id":"c1","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello \"you\"","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"system_fingerprint":"x"}"#;
    let a = parse_answer(body, "gpt").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!((v["model"].as_str(), v["system_fingerprint"].as_str()), (Some("gpt"), Some("x")));
    assert_eq!(a.summary.content.as_deref(), Some("hello \"you\""));
    assert_eq!(a.summary.tool_calls[0].function.name, "f");
    assert_eq!(a.summary.usage, Some(Usage::new(3, 2)));
    assert_eq!(parse_answer(b"{\"choices\":[", "gpt").unwrap_err().class, ErrorClass::ServerError);
}

#[test]
fn the_openai_length_is_the_bodys_without_building_it() {
    for body in [
        r#"{"model":"gpt","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        r#"{"model":"gpt","stream":true,"stream_options":{"include_usage":false},"messages":[],"tools":[{"type":"function"}]}"#,
    ] {
        let req = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(req.openai_len("gpt-4o-mini"), req.openai_body("gpt-4o-mini").len(), "{body}");
    }
}
