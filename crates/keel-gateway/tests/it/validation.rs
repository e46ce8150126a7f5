//! Answers that "succeed" but cannot be used: classified, corrected, or failed over.

use keel_core::ErrorClass;
use serde_json::{Value, json};

use crate::support::{Fake, Reply, ask, model, post_chat, serve};

fn with_weather_tool(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false},
        }}],
    })
}

#[tokio::test]
async fn empty_output_falls_back() {
    let primary = Fake::start().await;
    primary.always(Reply::Empty);
    let backup = Fake::start().await;
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-model")), (200, "backup"));
    assert_eq!(primary.hits(), 1, "empty output is not retried blindly");
    assert_eq!(served.gateway.metrics().models["gpt"].attempt_failures[&ErrorClass::EmptyOutput], 1);
}

#[tokio::test]
async fn truncated_output_is_corrected_before_the_agent_sees_it() {
    let fake = Fake::start().await;
    fake.script([Reply::Truncated("The answer is a very long")]);
    let mut gpt = model(&fake, "m");
    gpt.correct = 1;
    let served = serve(vec![("gpt", gpt.clone())]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-corrections")), (200, "1"));
    assert_eq!(a.json()["choices"][0]["finish_reason"], "stop");
    let retry = &fake.seen()[1].body["messages"];
    assert!(
        retry.as_array().unwrap().last().unwrap()["content"].as_str().unwrap().contains("cut off"),
        "{retry}"
    );

    // Without correction (and no fallback) the agent gets a classified error.
    fake.script([Reply::Truncated("cut")]);
    gpt.correct = 0;
    let served = serve(vec![("gpt", gpt)]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.json()["error"]["keel_class"].as_str()), (502, Some("truncated_output")));
}

#[tokio::test]
async fn a_tool_call_with_bad_arguments_is_sent_back_to_the_model() {
    let fake = Fake::start().await;
    fake.script([
        Reply::Tool { name: "get_weather", args: "{\"city\": " },
        Reply::Tool { name: "get_weather", args: "{\"town\": \"Paris\"}" },
        Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" },
    ]);
    let mut gpt = model(&fake, "m");
    gpt.correct = 2;
    let served = serve(vec![("gpt", gpt)]).await;
    let a = post_chat(&served.url, with_weather_tool("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-corrections")), (200, "2"), "{}", a.text);
    assert_eq!(
        a.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\": \"Paris\"}"
    );
    let seen = fake.seen();
    let first_fix = seen[1].body["messages"].as_array().unwrap().clone();
    assert_eq!(first_fix[1]["role"], "assistant");
    assert_eq!(first_fix[2]["role"], "tool");
    assert_eq!(first_fix[2]["tool_call_id"], "call_1");
    assert!(first_fix[2]["content"].as_str().unwrap().contains("not JSON"), "{}", first_fix[2]);
    let second_fix = seen[2].body["messages"].as_array().unwrap();
    assert!(second_fix.last().unwrap()["content"].as_str().unwrap().contains("schema"), "{second_fix:?}");
}

#[tokio::test]
async fn a_call_to_a_tool_never_offered_is_unknown_tool() {
    let fake = Fake::start().await;
    fake.always(Reply::Tool { name: "delete_everything", args: "{}" });
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, with_weather_tool("gpt"), &[]).await;
    assert_eq!(a.status, 502);
    let e = &a.json()["error"];
    assert_eq!((e["type"].as_str(), e["keel_class"].as_str()), (Some("server_error"), Some("unknown_tool")));
    assert!(e["message"].as_str().unwrap().contains("delete_everything"), "{e}");
    assert_eq!(fake.hits(), 1);
}

#[tokio::test]
async fn the_loop_guard_stops_a_run_repeating_the_same_tool_call() {
    let fake = Fake::start().await;
    fake.always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let run = [("x-keel-run", "agent-7")];
    assert_eq!(post_chat(&served.url, with_weather_tool("gpt"), &run).await.status, 200);
    assert_eq!(post_chat(&served.url, with_weather_tool("gpt"), &run).await.status, 200);
    let a = post_chat(&served.url, with_weather_tool("gpt"), &run).await;
    assert_eq!((a.status, a.json()["error"]["keel_class"].as_str()), (409, Some("loop_detected")));
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("same call"), "{}", a.text);
    // Without a run there is nothing to guard.
    assert_eq!(post_chat(&served.url, with_weather_tool("gpt"), &[]).await.status, 200);
}
