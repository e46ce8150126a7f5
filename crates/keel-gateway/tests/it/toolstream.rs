//! Tool calls in streams: held until whole and checked, never sent in part. A fake
//! upstream cuts a stream at every byte offset of a sample answer; whatever the
//! offset, the client gets one complete, valid call (or a clear error), never a
//! fragment, and `finish_reason: "tool_calls"` only with whole, valid arguments.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a failed test.

use std::collections::BTreeMap;

use keel_core::ErrorClass;
use keel_gateway::Provider;
use serde_json::{Value, json};

use crate::support::{Answer, Fake, Reply, model, post_chat, serve};

const ARGS: &str = r#"{"city": "Paris", "days": 3}"#;

fn frame(delta: Value, finish: Option<&str>) -> String {
    // Only what Keel reads, so that the every-offset loops stay short.
    let chunk = json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

/// An OpenAI stream: the role, `text` in 4-byte chunks, a call to `get_weather` with
/// `args` in 6-byte chunks, `finish_reason: "tool_calls"`, `[DONE]`; and the offsets
/// at which its first content frame and its tool call's first frame start.
fn openai_stream(text: &str, args: &str) -> (String, usize, usize) {
    let mut out = frame(json!({"role": "assistant", "content": ""}), None);
    let start = out.len();
    for part in text.as_bytes().chunks(4) {
        out.push_str(&frame(json!({"content": std::str::from_utf8(part).unwrap()}), None));
    }
    let tool = out.len();
    out.push_str(&frame(
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        None,
    ));
    for part in args.as_bytes().chunks(6) {
        let part = std::str::from_utf8(part).unwrap();
        out.push_str(&frame(json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}), None));
    }
    out.push_str(&frame(json!({}), Some("tool_calls")));
    out.push_str("data: [DONE]\n\n");
    (out, start, tool)
}

/// What a client made of a stream, reassembling tool calls as the official clients do.
#[derive(Debug, Default)]
struct Received {
    text: String,
    /// index → (id, name, arguments)
    calls: BTreeMap<u64, (String, String, String)>,
    /// Tool-call deltas whose arguments were not a whole JSON document.
    fragments: Vec<String>,
    finishes: Vec<String>,
    error: Option<Value>,
    done: bool,
}

fn received(a: &Answer) -> Received {
    let mut r = Received::default();
    if a.status != 200 {
        r.error = Some(a.json()["error"].clone());
        return r;
    }
    for e in a.events() {
        if e == "[DONE]" {
            r.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap_or_else(|err| panic!("{err}: {e}"));
        if v.get("error").is_some() {
            r.error = Some(v["error"].clone());
            continue;
        }
        let Some(choice) = v.pointer("/choices/0") else { continue };
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
            r.text.push_str(text);
        }
        for d in choice.pointer("/delta/tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let call = r.calls.entry(d["index"].as_u64().unwrap()).or_default();
            if let Some(id) = d["id"].as_str() {
                call.0 = id.to_owned();
            }
            call.1.push_str(d.pointer("/function/name").and_then(Value::as_str).unwrap_or(""));
            let args = d.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("");
            if serde_json::from_str::<Value>(args).is_err() {
                r.fragments.push(args.to_owned());
            }
            call.2.push_str(args);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            r.finishes.push(f.to_owned());
        }
    }
    r
}

impl Received {
    /// One complete call to `get_weather` with `args`, `finish_reason: "tool_calls"`, `[DONE]`.
    fn assert_one_call(&self, args: &str, context: &str) {
        assert!(self.fragments.is_empty(), "{context}: fragments reached the client: {self:?}");
        assert_eq!(self.calls.len(), 1, "{context}: {self:?}");
        let (id, name, got) = &self.calls[&0];
        assert_eq!((id.as_str(), name.as_str()), ("call_1", "get_weather"), "{context}: {self:?}");
        assert_eq!(
            serde_json::from_str::<Value>(got).unwrap(),
            serde_json::from_str::<Value>(args).unwrap(),
            "{context}"
        );
        assert_eq!(self.finishes, ["tool_calls"], "{context}: {self:?}");
        assert!(self.error.is_none() && self.done, "{context}: {self:?}");
    }

    /// A clear error, and nothing of a call.
    fn assert_error_without_call(&self, class: &str, context: &str) {
        assert!(self.calls.is_empty(), "{context}: a call reached the client: {self:?}");
        assert!(self.finishes.is_empty(), "{context}: {self:?}");
        let e = self.error.as_ref().unwrap_or_else(|| panic!("{context}: no error: {self:?}"));
        assert_eq!(e["keel_class"], class, "{context}: {self:?}");
        assert!(!self.done, "{context}");
    }
}

fn ask_stream_tools(model: &str) -> Value {
    json!({
        "model": model, "stream": true,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                           "required": ["city"], "additionalProperties": false},
        }}],
    })
}

/// Cuts at every byte offset of `stream` in `cuts`: with a fallback
/// that regenerates the same answer the client always gets it whole; without one,
/// the whole call or a clear error, never part of a call.
async fn cut_everywhere(stream: &str, cuts: std::ops::RangeInclusive<usize>, text: &str) {
    let primary = Fake::start().await;
    let backup = Fake::start().await;
    backup.always(Reply::Raw(stream.to_owned()));
    // A thousand cuts in a row would open the breaker: every cut must reach the model.
    let mut solo = model(&primary, "m");
    solo.policy.breaker.enabled = false;
    let mut gpt = solo.clone();
    gpt.fallbacks = vec!["backup".into()];
    let rescued = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let alone = serve(vec![("gpt", solo)]).await;
    for cut in cuts {
        primary.always(Reply::Raw(stream[..cut].to_owned()));
        let context = format!("cut at byte {cut} of {}", stream.len());
        let (with_fallback, without) = tokio::join!(
            post_chat(&rescued.url, ask_stream_tools("gpt"), &[]),
            post_chat(&alone.url, ask_stream_tools("gpt"), &[]),
        );
        let got = received(&with_fallback);
        got.assert_one_call(ARGS, &context);
        assert_eq!(got.text, text, "{context}: no text lost or repeated");

        let got = received(&without);
        assert!(got.fragments.is_empty(), "{context}: {got:?}");
        if got.calls.is_empty() {
            got.assert_error_without_call("network", &context);
            assert!(text.starts_with(&got.text), "{context}: {got:?}");
        } else {
            got.assert_one_call(ARGS, &context);
        }
    }
    // The cut attempts are in the journal as rescued (those cut after the first token).
    assert!(rescued.gateway.metrics().models["backup"].rescued_splice > 0);
}

#[tokio::test]
async fn a_cut_anywhere_in_a_tool_call_regenerates_it_unseen() {
    // From the first byte of the call to the end of the stream, `[DONE]` included.
    let (stream, _, tool) = openai_stream("", ARGS);
    cut_everywhere(&stream, tool..=stream.len(), "").await;
}

#[tokio::test]
async fn a_cut_anywhere_in_the_text_before_a_tool_call_continues_the_text_then_makes_the_call() {
    let text = "Let me check the weather.";
    // Every offset of the text, and into the call's first frames (the rest of the
    // call is cut everywhere above, with no text before it).
    let (stream, start, tool) = openai_stream(text, ARGS);
    cut_everywhere(&stream, start..=tool + 200, text).await;
}

#[tokio::test]
async fn a_broken_connection_inside_the_arguments_sends_nothing_of_the_call() {
    let (stream, _, _) = openai_stream("Checking.", ARGS);
    // Inside the second frame of arguments.
    let cut = stream.match_indices(r#""arguments":"#).nth(2).unwrap().0 + 16;
    let primary = Fake::start().await;
    primary.always(Reply::RawCut(stream[..cut].to_owned()));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(stream.clone()));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt.clone()), ("backup", model(&backup, "b"))]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_one_call(ARGS, "rescued");
    assert_eq!(got.text, "Checking.");
    assert_eq!(served.journal.records()[0].rescue.as_deref(), Some("splice"));

    // A prefill fallback continues the text and makes the call itself.
    let mut b = model(&backup, "b");
    b.accepts_prefill = true;
    let (continuation, _, _) = openai_stream("", ARGS);
    backup.always(Reply::Raw(continuation));
    let served = serve(vec![("gpt", gpt), ("backup", b)]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_one_call(ARGS, "prefill");
    assert_eq!(got.text, "Checking.");
    let prefill = backup.seen().last().unwrap().body["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (prefill["role"].as_str(), prefill["content"].as_str()),
        (Some("assistant"), Some("Checking."))
    );
}

/// A stall inside a call is a timeout, rescued like a cut. Real sockets: the stall
/// timeout is real time (small), not paused tokio time, which would auto-advance
/// while loopback I/O is in flight.
#[tokio::test]
async fn a_stall_inside_the_arguments_is_a_timeout_and_sends_nothing_of_the_call() {
    let (stream, _, _) = openai_stream("", ARGS);
    let stall = stream.match_indices(r#""arguments":"#).nth(2).unwrap().0;
    let primary = Fake::start().await;
    primary.always(Reply::RawStall(stream[..stall].to_owned()));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(stream.clone()));
    let mut gpt = model(&primary, "m");
    gpt.policy.stall_timeout = std::time::Duration::from_millis(200);
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt.clone()), ("backup", model(&backup, "b"))]).await;
    received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await).assert_one_call(ARGS, "stalled");
    assert_eq!(served.gateway.metrics().models["gpt"].attempt_failures[&ErrorClass::Timeout], 1);
    // No fallback: the timeout as an error event, nothing of the call.
    gpt.fallbacks.clear();
    let served = serve(vec![("gpt", gpt)]).await;
    received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await)
        .assert_error_without_call("timeout", "stalled, no fallback");
}

#[tokio::test]
async fn a_held_call_with_invalid_arguments_is_corrected_before_anything_of_it_is_sent() {
    let fake = Fake::start().await;
    fake.script([
        Reply::Tool { name: "get_weather", args: r#"{"town": "Paris"}"# },
        Reply::Tool { name: "get_weather", args: ARGS },
    ]);
    let mut gpt = model(&fake, "m");
    gpt.correct = 1;
    let served = serve(vec![("gpt", gpt.clone())]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_one_call(ARGS, "corrected");
    let fix = fake.seen()[1].body["messages"].as_array().unwrap().clone();
    assert_eq!(fix[1]["tool_calls"][0]["function"]["arguments"], r#"{"town": "Paris"}"#);
    assert_eq!((fix[2]["role"].as_str(), fix[2]["tool_call_id"].as_str()), (Some("tool"), Some("call_1")));
    assert!(fix[2]["content"].as_str().unwrap().contains("schema"), "{}", fix[2]);
    assert_eq!(served.journal.records()[0].corrections, 1);
    assert_eq!(served.gateway.metrics().models["gpt"].corrections, 1);

    // After text: the correction's answer repeats the text before its call, and the
    // repeat is dropped at the seam (the model is not learned to ignore prefills).
    let (bad, _, _) = openai_stream("Checking.", r#"{"town": "Paris"}"#);
    let (good, _, _) = openai_stream("Checking.", ARGS);
    fake.script([Reply::Raw(bad), Reply::Raw(good)]);
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_one_call(ARGS, "corrected after text");
    assert_eq!(got.text, "Checking.", "no text twice");
    assert_eq!(served.gateway.takes_prefill("gpt"), Some(false), "as configured, nothing learned");
    assert_eq!(served.gateway.metrics().models["gpt"].prefill_restarts, 0);

    // A buffered model's calls get the same rounds (they used to go out unchecked).
    let mut buffered = gpt.clone();
    buffered.buffer = true;
    let served_buffered = serve(vec![("gpt", buffered)]).await;
    fake.script([
        Reply::Tool { name: "get_weather", args: r#"{"town": "Paris"}"# },
        Reply::Tool { name: "get_weather", args: ARGS },
    ]);
    received(&post_chat(&served_buffered.url, ask_stream_tools("gpt"), &[]).await)
        .assert_one_call(ARGS, "buffered, corrected");
    assert_eq!(served_buffered.journal.records()[0].corrections, 1);

    // Without a correction round the call is never sent: a clear error instead.
    fake.always(Reply::Tool { name: "get_weather", args: r#"{"town": "Paris"}"# });
    gpt.correct = 0;
    let served = serve(vec![("gpt", gpt)]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_error_without_call("invalid_tool_call", "not corrected");
    let message = got.error.unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("schema"), "{message}");
}

#[tokio::test]
async fn finish_reason_tool_calls_is_never_sent_with_arguments_that_are_not_json() {
    // The upstream says `tool_calls` over truncated arguments.
    let (bad, _, _) = openai_stream("", r#"{"city": "Par"#);
    let (good, _, _) = openai_stream("", ARGS);
    let primary = Fake::start().await;
    primary.always(Reply::Raw(bad));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(good));
    let served = serve(vec![("gpt", model(&primary, "m"))]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    got.assert_error_without_call("invalid_tool_call", "no fallback");
    assert!(got.error.unwrap()["message"].as_str().unwrap().contains("not JSON"));
    // Even with validation off and no tool declared: JSON is checked whatever the
    // configuration.
    let mut unchecked = model(&primary, "m");
    unchecked.validate = false;
    let served = serve(vec![("gpt", unchecked)]).await;
    let ask = json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let got = received(&post_chat(&served.url, ask, &[]).await);
    got.assert_error_without_call("invalid_tool_call", "validation off");

    // A model whose policy falls back on it: the fallback makes the call, unseen.
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    gpt.policy.fallback.on.push(ErrorClass::InvalidToolCall);
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await).assert_one_call(ARGS, "fallback");
}

/// Anthropic's `tool_use` blocks arrive as `input_json_delta`s, translated into the
/// same tool-call deltas: held the same way.
#[tokio::test]
async fn an_anthropic_stream_cut_inside_its_input_json_is_rescued_whole() {
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut s = ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {"input_tokens": 12, "output_tokens": 1}}}),
    );
    s.push_str(&ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    s.push_str(&ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}})));
    s.push_str(&ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    s.push_str(&ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}})));
    for part in ARGS.as_bytes().chunks(9) {
        let part = std::str::from_utf8(part).unwrap();
        s.push_str(&ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": part}})));
    }
    let cut = s.len() - 40;
    s.push_str(&ev("content_block_stop", json!({"type": "content_block_stop", "index": 1})));
    s.push_str(&ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 9}})));
    s.push_str(&ev("message_stop", json!({"type": "message_stop"})));
    let claude = |fake: &Fake| {
        let mut m = model(fake, "claude-sonnet-4");
        m.provider = Provider::Anthropic;
        m.api_key_env = Some("FAKE_KEY".into());
        m
    };
    let primary = Fake::start().await;
    primary.always(Reply::Raw(s[..cut].to_owned()));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(s.clone()));
    let mut c = claude(&primary);
    c.fallbacks = vec!["backup".into()];
    let served = serve(vec![("claude", c), ("backup", claude(&backup))]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("claude"), &[]).await);
    got.assert_one_call(ARGS, "anthropic");
    assert_eq!(got.text, "Let me check.");
    assert_eq!(served.journal.records()[0].rescue.as_deref(), Some("splice"));
}

/// Not a check: the cost of holding, measured in process over `N` streams on
/// loopback (`cargo test -p keel-gateway --test it measure_holding -- --ignored
/// --nocapture`; `bench/README.md` has the numbers). Times to the first byte of the
/// tool call (and of the text), and to the end, from the request's start; upstreams
/// that answer at once (Keel's own cost) and at a model's pace (a frame every 2 ms).
#[tokio::test]
#[ignore = "a measurement, not a test: run it by name"]
#[allow(clippy::print_stdout)] // its numbers are its output
async fn measure_holding() {
    const N: usize = 200;
    let (tool, _, _) = openai_stream("", ARGS);
    let text: String =
        (0..16).map(|i| frame(json!({"content": format!("word{i} ")}), None)).collect::<String>()
            + &frame(json!({}), Some("stop"))
            + "data: [DONE]\n\n";
    let frames = |s: &str| -> Vec<String> { s.split_inclusive("\n\n").map(str::to_owned).collect() };
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let client = reqwest::Client::new();
    for (label, body, marker) in [("tool call", &tool, "tool_calls"), ("text", &text, "\"content\":\"word")] {
        for (pace, reply) in [
            ("instant", Reply::Raw(body.clone())),
            ("2 ms/frame", Reply::Paced(frames(body), std::time::Duration::from_millis(2))),
        ] {
            fake.always(reply);
            let (mut first, mut total) = (Vec::with_capacity(N), Vec::with_capacity(N));
            // The first stream of each case warms the connections up and is not counted.
            for i in 0..=N {
                let start = tokio::time::Instant::now();
                let mut resp = client
                    .post(format!("{}/v1/chat/completions", served.url))
                    .json(&ask_stream_tools("gpt"))
                    .send()
                    .await
                    .unwrap();
                let mut seen = String::new();
                let mut at = None;
                while let Some(chunk) = resp.chunk().await.unwrap() {
                    seen.push_str(&String::from_utf8_lossy(&chunk));
                    if at.is_none() && seen.contains(marker) {
                        at = Some(start.elapsed());
                    }
                }
                if i > 0 {
                    first.push(at.unwrap());
                    total.push(start.elapsed());
                }
            }
            let stats = |v: &mut Vec<std::time::Duration>| {
                v.sort();
                (v[v.len() / 2].as_secs_f64() * 1e3, v[v.len() * 9 / 10].as_secs_f64() * 1e3)
            };
            let ((f50, f90), (t50, t90)) = (stats(&mut first), stats(&mut total));
            println!(
                "{label:9} {pace:10} first byte of it: p50 {f50:6.2} ms p90 {f90:6.2} ms | whole stream: p50 {t50:6.2} ms p90 {t90:6.2} ms"
            );
        }
    }
}

/// The Responses and Messages APIs are fed by the same held stream: a cut inside the
/// call reaches their clients as one whole `function_call` / `tool_use`.
#[tokio::test]
async fn responses_and_messages_clients_get_a_cut_call_whole() {
    let (stream, _, _) = openai_stream("", ARGS);
    let cut = stream.match_indices(r#""arguments":"#).nth(2).unwrap().0 + 10;
    let primary = Fake::start().await;
    primary.always(Reply::Raw(stream[..cut].to_owned()));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(stream.clone()));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]});

    let a = crate::support::post(
        &served.url,
        "/v1/responses",
        json!({"model": "gpt", "input": "Weather in Paris?", "stream": true,
               "tools": [{"type": "function", "name": "get_weather", "parameters": schema}]}),
        &[],
    )
    .await;
    let events = a.named_events();
    for (name, e) in &events {
        if name == "response.function_call_arguments.delta" {
            assert!(serde_json::from_str::<Value>(e["delta"].as_str().unwrap()).is_ok(), "a fragment: {e}");
        }
    }
    let done: Vec<&Value> =
        events.iter().filter(|(n, _)| n == "response.function_call_arguments.done").map(|(_, e)| e).collect();
    assert_eq!(done.len(), 1, "{}", a.text);
    assert_eq!(done[0]["arguments"], ARGS);
    assert_eq!(events.last().unwrap().0, "response.completed", "{}", a.text);

    let a = crate::support::post(
        &served.url,
        "/v1/messages",
        json!({"model": "gpt", "max_tokens": 100, "stream": true,
               "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": [{"name": "get_weather", "input_schema": schema}]}),
        &[],
    )
    .await;
    let events = a.named_events();
    let partials: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| {
            (e.pointer("/delta/type")? == "input_json_delta").then(|| e["delta"]["partial_json"].as_str())?
        })
        .collect();
    assert_eq!(partials.concat(), ARGS, "{}", a.text);
    assert!(partials.iter().all(|p| serde_json::from_str::<Value>(p).is_ok()), "a fragment: {partials:?}");
    let stop = events.iter().find_map(|(_, e)| e.pointer("/delta/stop_reason")).unwrap();
    assert_eq!(stop, "tool_use");
}

/// Parallel calls are held together until the answer's finish reason: a cut in the
/// second sends nothing of the first either, and the regenerated answer has both.
#[tokio::test]
async fn parallel_calls_are_released_together_and_a_cut_in_the_second_holds_back_the_first() {
    let call = |index: u64, id: &str, args: &str| {
        let (a, b) = args.split_at(args.len() / 2);
        frame(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
            None,
        ) + &frame(json!({"tool_calls": [{"index": index, "function": {"arguments": a}}]}), None)
            + &frame(json!({"tool_calls": [{"index": index, "function": {"arguments": b}}]}), None)
    };
    let rome = r#"{"city": "Rome"}"#;
    let stream = frame(json!({"role": "assistant", "content": ""}), None)
        + &call(0, "call_1", ARGS)
        + &call(1, "call_2", rome)
        + &frame(json!({}), Some("tool_calls"))
        + "data: [DONE]\n\n";
    let cut = stream.match_indices(r#""arguments":"#).nth(4).unwrap().0 + 8;
    let primary = Fake::start().await;
    primary.always(Reply::Raw(stream[..cut].to_owned()));
    let backup = Fake::start().await;
    backup.always(Reply::Raw(stream.clone()));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let got = received(&post_chat(&served.url, ask_stream_tools("gpt"), &[]).await);
    assert!(got.fragments.is_empty(), "{got:?}");
    assert_eq!(got.calls.len(), 2, "{got:?}");
    assert_eq!(got.calls[&0], ("call_1".into(), "get_weather".into(), ARGS.into()));
    assert_eq!(got.calls[&1], ("call_2".into(), "get_weather".into(), rome.into()));
    assert_eq!(got.finishes, ["tool_calls"]);
    assert!(got.done && got.error.is_none());
}
