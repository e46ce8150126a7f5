//! Streams: invisible failover before the first token, rescue after it, and never a
//! cut answer presented as complete.

use std::sync::Arc;
use std::time::Duration;

use keel_core::ErrorClass;
use serde_json::Value;

use crate::support::{Fake, Reply, ask_stream, model, post_chat, serve};

#[tokio::test]
async fn a_stream_is_relayed_with_usage_and_done() {
    let fake = Fake::start().await;
    fake.always(Reply::Text(vec!["Hel", "lo", " there"]));
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(
        (a.status, a.header("content-type"), a.header("x-keel-model")),
        (200, "text/event-stream", "gpt")
    );
    assert_eq!(a.streamed_text(), "Hello there");
    assert_eq!(a.finish_reasons(), ["stop"]);
    let events = a.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        (usage["usage"]["completion_tokens"].as_u64(), usage["model"].as_str()),
        (Some(3), Some("gpt"))
    );

    // Without include_usage the agent gets no usage chunk, but the budget still does.
    let mut body = ask_stream("gpt");
    body.as_object_mut().unwrap().remove("stream_options");
    let a = post_chat(&served.url, body, &[]).await;
    assert!(a.events().iter().all(|e| !e.contains("\"usage\"")), "{}", a.text);
    assert_eq!(fake.seen()[1].body["stream_options"]["include_usage"], true);
    assert_eq!(served.gateway.metrics().models["gpt"].completion_tokens, 6);
}

#[tokio::test]
async fn failures_before_the_first_token_are_invisible() {
    let primary = Fake::start().await;
    primary.script([Reply::Status { code: 500, retry_after: None, body: "x" }, Reply::Empty]);
    primary.always(Reply::Hang);
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["from", " backup"]));
    let mut gpt = model(&primary, "m");
    gpt.policy.ttft_timeout = Duration::from_millis(300);
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt.clone()), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    // 500 (retried), then an empty stream (empty_output: fallback), all unseen.
    assert_eq!((a.status, a.header("x-keel-model"), a.header("x-keel-fallback")), (200, "backup", "true"));
    assert_eq!(a.streamed_text(), "from backup");
    assert_eq!(primary.hits(), 2);

    // A model silent past its time-to-first-token limit: a timeout, failed over at once.
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!((a.header("x-keel-model"), a.streamed_text().as_str()), ("backup", "from backup"));
    assert_eq!(primary.hits(), 3);
    assert_eq!(served.gateway.metrics().models["gpt"].attempt_failures[&ErrorClass::Timeout], 1);
}

#[tokio::test]
async fn a_cut_stream_continues_on_a_fallback_that_accepts_prefill() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["The capital", " of France"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec![" is", " Paris."]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let mut b = model(&backup, "b");
    b.accepts_prefill = true;
    let served = serve(vec![("gpt", gpt), ("backup", b)]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "The capital of France is Paris.");
    assert_eq!(a.finish_reasons(), ["stop"]);
    assert_eq!(a.events().last().unwrap(), "[DONE]");
    let prefill = backup.seen()[0].body["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (prefill["role"].as_str(), prefill["content"].as_str()),
        (Some("assistant"), Some("The capital of France"))
    );
    let m = served.gateway.metrics();
    assert_eq!(m.models["backup"].rescued_prefill, 1);
    assert_eq!(served.journal.records()[0].rescue.as_deref(), Some("prefill"));
    // The last chunk names every model whose text the client got (the headers, sent
    // before the cut, could name only the first), and its usage covers both attempts.
    let events = a.events();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["keel"], serde_json::json!({"models": ["gpt", "backup"], "rescue": "prefill"}), "{last}");
    let charged = served.journal.records()[0].usage.unwrap();
    assert_eq!(last["usage"]["total_tokens"].as_u64(), Some(charged.total_tokens), "{last}");
    assert!(charged.completion_tokens > 2, "the primary's cut attempt is in it too: {charged:?}");
}

/// `gpt`, whose stream is cut after "The capital of France", falling back to `backup`,
/// which says it takes a prefill but answers from the start whatever it is given.
async fn cut_then_a_backup_that_restarts() -> (Fake, Fake, Vec<(&'static str, keel_gateway::ModelConfig)>) {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["The capital", " of France"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["The capital of", " France is", " Paris."]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let mut b = model(&backup, "b");
    b.accepts_prefill = true;
    (primary, backup, vec![("gpt", gpt), ("backup", b)])
}

#[tokio::test]
async fn a_prefill_fallback_that_restarts_its_answer_sends_no_text_twice_and_is_spliced_onto_next_time() {
    let (_primary, backup, models) = cut_then_a_backup_that_restarts().await;
    let served = serve(models).await;
    assert_eq!(served.gateway.takes_prefill("backup"), Some(true));
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "The capital of France is Paris.", "the repeat was dropped at the seam");
    assert_eq!(a.finish_reasons(), ["stop"]);
    let last: Value = serde_json::from_str(&a.events()[a.events().len() - 2]).unwrap();
    assert_eq!(last["keel"]["rescue"], "prefill_restarted", "{last}");
    assert_eq!(served.journal.records()[0].rescue.as_deref(), Some("prefill_restarted"));
    assert_eq!(served.gateway.metrics().models["backup"].prefill_restarts, 1);
    // Learned: the next rescue on it regenerates and splices, no prefill sent.
    assert_eq!(served.gateway.takes_prefill("backup"), Some(false));
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "The capital of France is Paris.");
    let last_messages = backup.seen()[1].body["messages"].as_array().unwrap().clone();
    assert_eq!(last_messages.last().unwrap()["role"], "user", "no prefill the second time");
    assert_eq!(served.journal.records()[1].rescue.as_deref(), Some("splice"));
    assert_eq!(served.gateway.metrics().models["backup"].rescued_splice, 1);
}

/// The lesson is kept in the process's confidence gate, whose history the journal
/// keeps: a gateway built again on it (a restarted server) sends the model no
/// prefill, and the gate has the outcome to save.
#[tokio::test]
async fn a_learned_prefill_restart_survives_a_restart_through_the_gate() {
    let (_primary, _backup, models) = cut_then_a_backup_that_restarts().await;
    let models: std::collections::BTreeMap<String, keel_gateway::ModelConfig> =
        models.into_iter().map(|(n, m)| (n.to_owned(), m)).collect();
    let gate = Arc::new(keel_core::ConfidenceGate::new(keel_core::GateConfig::default()));
    let build = || {
        Arc::new(
            keel_gateway::Gateway::builder(models.clone())
                .env(|k| (k == "FAKE_KEY").then(|| "sk-test".to_owned()))
                .gate(gate.clone())
                .proxies(keel_http::Proxies::none())
                .build()
                .unwrap(),
        )
    };
    let first = build();
    assert_eq!(first.takes_prefill("backup"), Some(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = keel_gateway::router(first.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let a = post_chat(&url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "The capital of France is Paris.");
    assert_eq!(first.takes_prefill("backup"), Some(false));
    let unsaved = gate.take_unsaved();
    assert!(
        unsaved.iter().any(|r| r.target == "prefill:backup" && r.outcomes.failures == 1),
        "the lesson is what the runner saves: {unsaved:?}"
    );
    gate.restore_unsaved(unsaved);
    // Built again on the same history (loaded from the journal after a restart).
    assert_eq!(build().takes_prefill("backup"), Some(false), "learned before the restart");
}

#[tokio::test]
async fn a_prefill_restart_that_diverges_is_not_joined_to_the_sent_text() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["The capital of France", " is a city"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["The capital of France is", " Paris."]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let mut b = model(&backup, "b");
    b.accepts_prefill = true;
    let served = serve(vec![("gpt", gpt), ("backup", b)]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(
        a.streamed_text(),
        "The capital of France is a city",
        "nothing of the restart reached the client"
    );
    let events = a.events();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["keel_class"], "network", "the original failure is reported: {last}");
    assert!(a.finish_reasons().is_empty(), "a cut answer never ends with a finish reason");
    assert_eq!(served.gateway.takes_prefill("backup"), Some(false));
}

#[tokio::test]
async fn a_cut_stream_is_regenerated_and_spliced_without_duplicate_text() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["One, two,", " three,"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["One,", " two, thr", "ee, four", ", five."]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "One, two, three, four, five.", "{}", a.text);
    assert_eq!(a.finish_reasons(), ["stop"]);
    let models: Vec<String> = a
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| {
            v.pointer("/choices/0/delta/content").and_then(Value::as_str).is_some_and(|c| !c.is_empty())
        })
        .map(|v| v["model"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(models, ["gpt", "gpt", "backup", "backup"], "each chunk names its model");
    assert_eq!(served.gateway.metrics().models["backup"].rescued_splice, 1);
}

#[tokio::test]
async fn an_unrescuable_stream_ends_with_an_error_event_naming_the_original_failure() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["Partial", " answer"]));
    let diverging = Fake::start().await;
    diverging.always(Reply::Text(vec!["Something", " else entirely"]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["other".into()];
    let served = serve(vec![("gpt", gpt.clone()), ("other", model(&diverging, "o"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.status, 200, "the stream had started");
    assert_eq!(a.streamed_text(), "Partial answer", "no text of the diverging fallback leaks");
    assert!(a.finish_reasons().is_empty(), "never finish_reason stop on a cut stream: {}", a.text);
    let last: Value = serde_json::from_str(a.events().last().unwrap()).unwrap();
    assert_eq!(last["error"]["keel_class"], "network", "the original failure, not the fallback's: {last}");
    assert!(last["error"]["message"].as_str().unwrap().contains("diverged"), "{last}");
    assert!(!a.text.contains("[DONE]"));

    // No fallback at all: the same well-formed error event.
    let served = serve(vec![("gpt", model(&primary, "m"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    let last: Value = serde_json::from_str(a.events().last().unwrap()).unwrap();
    assert_eq!(last["error"]["keel_class"], "network");
    let record = &served.journal.records()[0];
    assert_eq!(record.error.as_ref().map(|e| e.0), Some(ErrorClass::Network));
    assert_eq!(served.gateway.metrics().models["gpt"].rescue_failed, 1);
}

#[tokio::test]
async fn a_stalled_stream_is_a_timeout_and_is_rescued() {
    let primary = Fake::start().await;
    primary.always(Reply::Stall(vec!["Count: 1,", " 2,"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec![" 3."]));
    let mut gpt = model(&primary, "m");
    gpt.policy.stall_timeout = Duration::from_millis(300);
    gpt.fallbacks = vec!["backup".into()];
    let mut b = model(&backup, "b");
    b.accepts_prefill = true;
    let served = serve(vec![("gpt", gpt), ("backup", b)]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "Count: 1, 2, 3.");
    assert_eq!(served.gateway.metrics().models["gpt"].attempt_failures[&ErrorClass::Timeout], 1);
}

#[tokio::test]
async fn malformed_chunks_are_skipped_and_a_missing_done_is_finalised() {
    let fake = Fake::start().await;
    fake.script([Reply::MalformedChunk(vec!["a", "b", "c"]), Reply::NoDone(vec!["x", "y"])]);
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(a.streamed_text(), "abc");
    assert_eq!(a.events().last().unwrap(), "[DONE]");
    let b = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!(b.streamed_text(), "xy");
    assert_eq!(b.finish_reasons(), ["stop"]);
    let events = b.events();
    assert_eq!(events.last().unwrap(), "[DONE]", "finalised by Keel");
    assert!(events[events.len() - 2].contains("\"usage\""), "with usage");
    let m = &served.gateway.metrics().models["gpt"];
    assert_eq!((m.malformed_chunks, m.finalised_without_done), (1, 1));
}

#[tokio::test]
async fn a_buffered_model_hides_even_a_mid_stream_cut() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["never", " seen"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["clean", " answer"]));
    let mut gpt = model(&primary, "m");
    gpt.buffer = true;
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!((a.header("x-keel-model"), a.streamed_text().as_str()), ("backup", "clean answer"));
}

/// `body` offering the `get_weather` tool (a call to a tool never offered is
/// `unknown_tool`, streamed or not).
fn with_weather_tool(mut body: Value) -> Value {
    body["tools"] = serde_json::json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]);
    body
}

#[tokio::test]
async fn streamed_tool_calls_are_relayed() {
    let fake = Fake::start().await;
    fake.always(Reply::Tool { name: "get_weather", args: "{\"city\":\"Paris\"}" });
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, with_weather_tool(ask_stream("gpt")), &[]).await;
    let args: String = a
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    assert_eq!(a.finish_reasons(), ["tool_calls"]);
}

#[tokio::test]
async fn the_loop_guard_sees_streamed_tool_calls() {
    let fake = Fake::start().await;
    fake.always(Reply::Tool { name: "get_weather", args: "{\"city\":\"Paris\"}" });
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let run = [("x-keel-run", "looping")];
    for _ in 0..2 {
        let a = post_chat(&served.url, with_weather_tool(ask_stream("gpt")), &run).await;
        assert_eq!(a.events().last().unwrap(), "[DONE]");
    }
    let a = post_chat(&served.url, with_weather_tool(ask_stream("gpt")), &run).await;
    let last: Value = serde_json::from_str(a.events().last().unwrap()).unwrap();
    assert_eq!(last["error"]["keel_class"], "loop_detected", "{}", a.text);
    assert!(!a.text.contains("[DONE]"));
    // The looping call was held and checked before release: nothing of it was sent.
    assert!(!a.text.contains("tool_calls"), "{}", a.text);
}

/// A shutdown can wait for the streams being pumped: it returns once they ended and
/// journaled themselves, and gives up at its bound.
#[tokio::test]
async fn a_shutdown_waits_for_streams_in_flight_within_its_bound() {
    let fake = Fake::start().await;
    fake.always(Reply::Stall(vec!["Hel", "lo"]));
    let mut gpt = model(&fake, "m");
    gpt.policy.stall_timeout = Duration::from_millis(300);
    let served = serve(vec![("gpt", gpt)]).await;
    let mut a = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", served.url))
        .json(&ask_stream("gpt"))
        .send()
        .await
        .unwrap();
    assert!(a.chunk().await.unwrap().is_some());
    assert!(!served.gateway.wait_for_streams(Duration::from_millis(10)).await, "bounded: still pumping");
    assert!(served.gateway.wait_for_streams(Duration::from_secs(30)).await, "it ends at its stall timeout");
    assert_eq!(served.journal.records().len(), 1, "and journaled itself before the wait returned");
    while a.chunk().await.unwrap().is_some() {}
    // The gateway takes streams again after a wait.
    assert_eq!(post_chat(&served.url, ask_stream("gpt"), &[]).await.status, 200);
}
