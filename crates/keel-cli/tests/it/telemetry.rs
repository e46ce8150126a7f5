//! Traces over OTLP (issue 17): the real `keel serve` exports to an OTLP/HTTP receiver
//! on loopback, which decodes the protobuf like a collector would. Checked: span names
//! and kinds, parent links (the caller's `traceparent` continued, the gateway's and
//! the runner's spans under the request's), the GenAI and `keel.*` attributes, a
//! retry as a span event, a fallback between two `chat` spans.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::response::IntoResponse;
use axum::routing::post;
use keel_examples::payments::Faults;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::{Value, json};

use crate::support::{Bench, spawn_listening, stop_gracefully};

const AGENT: &str = "agent-secret-telemetry-0f3a";

/// A collector on loopback: every span it was sent, with the resource's service name.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let me = me.clone();
                async move {
                    let ct =
                        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    me.requests.lock().unwrap().push(ct);
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut spans = me.spans.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| string_of(kv.value.as_ref()?.value.as_ref()?))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect()
    }
}

/// The run of a `gen_ai.tool.call.id` (`{run}/{step}`).
fn call_id_run(id: &str) -> String {
    id.rsplit_once('/').map_or(id, |(run, _)| run).to_owned()
}

fn string_of(v: &Any) -> Option<String> {
    match v {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn s(span: &Span, key: &str) -> Option<String> {
    attr(span, key).and_then(string_of)
}

fn i(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Any::IntValue(v) => Some(*v),
        _ => None,
    }
}

/// An OpenAI-compatible upstream: `up-broken` always fails with a 500; `up-small`
/// fails its first call with a 503, then answers.
async fn upstream() -> String {
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(req): Json<Value>| {
            let calls = calls.clone();
            async move {
                let model = req["model"].as_str().unwrap_or("").to_owned();
                let n = {
                    let mut calls = calls.lock().unwrap();
                    let n = calls.entry(model.clone()).or_default();
                    *n += 1;
                    *n
                };
                let fail = model == "up-broken" || n == 1;
                if fail {
                    let status = if model == "up-broken" { 500 } else { 503 };
                    return (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        Json(json!({"error": {"message": "upstream trouble"}})),
                    )
                        .into_response();
                }
                if req["stream"] == true {
                    let chunk = |delta: Value, finish: Value, usage: Value| {
                        let mut c = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                            "model": "up-small-2026", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                        if !usage.is_null() {
                            c["usage"] = usage;
                        }
                        format!("data: {c}\n\n")
                    };
                    let body = [
                        chunk(json!({"role": "assistant", "content": "streamed"}), Value::Null, Value::Null),
                        chunk(
                            json!({}),
                            json!("stop"),
                            json!({"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
                        ),
                        "data: [DONE]\n\n".to_owned(),
                    ]
                    .concat();
                    return ([("content-type", "text/event-stream")], body).into_response();
                }
                (
                    axum::http::StatusCode::OK,
                    Json(json!({
                        "id": "c", "object": "chat.completion", "created": 1, "model": format!("{model}-2026"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
                    })),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

fn config(upstream: &str, collector: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
keys = [{{ name = "bot", key_env = "T_AGENT_KEY", role = "agent" }}]

[telemetry]
service_name = "keel-test"

[telemetry.otlp]
endpoint = "{collector}"
timeout = "5s"

[models.broken]
provider = "openai"
base_url = "{upstream}"
model = "up-broken"
fallbacks = ["small"]
policy = {{ retry = {{ max_attempts = 1 }} }}

[models.small]
provider = "openai"
base_url = "{upstream}"
model = "up-small"
policy = {{ retry = {{ max_attempts = 3, base_delay = "10ms", max_delay = "20ms" }} }}
"#
    )
}

fn serve(bench: &Bench) -> (Child, String) {
    let mut cmd = bench.command(&["serve"]);
    cmd.env("T_AGENT_KEY", AGENT).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null());
    spawn_listening(&mut cmd)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const STREAM_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const TOOL_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const TOOL_PARENT: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_named_linked_and_attributed() {
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let up = upstream().await;
    let bench = Bench::new(Faults::default(), &config(&up, &collector));
    let (child, url) = serve(&bench);
    let http = reqwest::Client::new();

    let chat = json!({"model": "broken", "messages": [{"role": "user", "content": "a secret prompt"}]});
    let answer = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(AGENT)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers().get("x-keel-trace-id").and_then(|v| v.to_str().ok()),
        Some(TRACE),
        "the answer names the continued trace"
    );
    let tool = http
        .post(format!("{url}/api/tools/notify/invoke"))
        .bearer_auth(AGENT)
        .header("traceparent", format!("00-{TOOL_TRACE}-{TOOL_PARENT}-01"))
        .json(&json!({"params": {"order": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(tool.status(), 200, "{:?}", tool.text().await);
    // A malformed traceparent starts a trace of Keel's own; it never fails a request.
    let hostile = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(AGENT)
        .header("traceparent", "00-zz-00-01")
        .json(&json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(hostile.status(), 200);
    let own_trace = hostile.headers().get("x-keel-trace-id").unwrap().to_str().unwrap().to_owned();
    assert!(own_trace.len() == 32 && own_trace != TRACE, "{own_trace}");
    // A streamed answer: its `chat` span carries the stream's usage and finish reason.
    let streamed = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(AGENT)
        .header("traceparent", format!("00-{STREAM_TRACE}-{PARENT}-01"))
        .json(&json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    assert!(text.contains("streamed") && text.contains("[DONE]"), "{text}");
    // Shutdown flushes the exporter's queue.
    stop_gracefully(child);

    let spans = receiver.spans();
    assert!(
        receiver.requests.lock().unwrap().iter().all(|ct| ct == "application/x-protobuf"),
        "OTLP/HTTP protobuf"
    );
    assert!(receiver.spans.lock().unwrap().iter().all(|(svc, _)| svc == "keel-test"), "service.name");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let in_trace = |t: &str| spans.iter().filter(move |s| hex(&s.trace_id) == t).collect::<Vec<_>>();
    let names = |t: &str| in_trace(t).iter().map(|s| s.name.clone()).collect::<Vec<_>>();

    // The model call: the request span continues the caller's, the two `chat` spans
    // (the failed model, then its fallback) are its children.
    let model_trace = in_trace(TRACE);
    let server = model_trace
        .iter()
        .find(|s| s.name == "POST /v1/chat/completions")
        .unwrap_or_else(|| panic!("no server span: {:?}", names(TRACE)));
    assert_eq!(hex(&server.parent_span_id), PARENT, "the caller's traceparent is the parent");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(i(server, "http.response.status_code"), Some(200), "{:?}", server.attributes);
    let broken = model_trace
        .iter()
        .find(|s| s.name == "chat up-broken")
        .unwrap_or_else(|| panic!("no chat span of the failed model: {:?}", names(TRACE)));
    let small = model_trace
        .iter()
        .find(|s| s.name == "chat up-small")
        .unwrap_or_else(|| panic!("no chat span of the fallback: {:?}", names(TRACE)));
    for chat in [broken, small] {
        assert_eq!(chat.parent_span_id, server.span_id, "{} under the request", chat.name);
        assert_eq!(chat.kind, SpanKind::Client as i32);
        assert_eq!(s(chat, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(s(chat, "gen_ai.provider.name").as_deref(), Some("openai"));
    }
    assert_eq!(s(broken, "gen_ai.request.model").as_deref(), Some("up-broken"));
    assert_eq!(s(broken, "error.type").as_deref(), Some("server_error"));
    assert_eq!(s(broken, "keel.error_class").as_deref(), Some("server_error"));
    assert_eq!(s(broken, "keel.disposition").as_deref(), Some("fallback"));
    assert_eq!(i(broken, "keel.attempt"), Some(1));
    assert_eq!(s(broken, "keel.breaker.state").as_deref(), Some("closed"));
    assert_eq!(broken.status.as_ref().map(|st| st.code), Some(2), "status ERROR");

    assert_eq!(s(small, "gen_ai.request.model").as_deref(), Some("up-small"));
    assert_eq!(s(small, "gen_ai.response.model").as_deref(), Some("up-small-2026"));
    assert_eq!(i(small, "gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(i(small, "gen_ai.usage.output_tokens"), Some(2));
    match attr(small, "gen_ai.response.finish_reasons") {
        Some(Any::ArrayValue(a)) => {
            let items: Vec<Option<String>> =
                a.values.iter().map(|v| v.value.as_ref().and_then(string_of)).collect();
            assert_eq!(items, [Some("stop".to_owned())]);
        }
        other => panic!("finish_reasons is a string array, not {other:?}"),
    }
    assert_eq!(s(small, "keel.fallback.from").as_deref(), Some("broken"));
    assert_eq!(i(small, "keel.attempt"), Some(2), "a 503, then the answer");
    assert_eq!(attr(small, "error.type"), None);
    let retry = small
        .events
        .iter()
        .find(|e| e.name == "retry scheduled")
        .unwrap_or_else(|| panic!("the retry is a span event: {:?}", small.events));
    let ev = |key: &str| retry.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone());
    assert!(matches!(ev("keel.retry.delay").and_then(|v| v.value), Some(Any::DoubleValue(d)) if d >= 0.0));
    assert!(
        matches!(ev("keel.error_class").and_then(|v| v.value), Some(Any::StringValue(c)) if c == "server_error")
    );
    assert!(
        server.events.iter().any(|e| e.name == "fallback taken"),
        "the fallback is an event of the request: {:?}",
        server.events
    );
    // No prompt text in any span or event.
    let dump = format!("{spans:?}");
    assert!(!dump.contains("a secret prompt"), "a prompt left the process");

    // The tool call: `execute_tool notify` in the caller's trace, under the request.
    let tool_trace = in_trace(TOOL_TRACE);
    let server = tool_trace
        .iter()
        .find(|s| s.name == "POST /api/tools/{name}/invoke")
        .unwrap_or_else(|| panic!("no server span: {:?}", names(TOOL_TRACE)));
    assert_eq!(hex(&server.parent_span_id), TOOL_PARENT);
    let exec = tool_trace
        .iter()
        .find(|s| s.name == "execute_tool notify")
        .unwrap_or_else(|| panic!("no tool span: {:?}", names(TOOL_TRACE)));
    let run = tool_trace
        .iter()
        .find(|s| s.name == "run")
        .unwrap_or_else(|| panic!("no run span: {:?}", names(TOOL_TRACE)));
    assert_eq!(run.parent_span_id, server.span_id, "the drive belongs to the request");
    assert_eq!(exec.parent_span_id, run.span_id, "the step belongs to the drive");
    assert_eq!(s(run, "keel.run.id"), s(exec, "gen_ai.tool.call.id").map(|id| call_id_run(&id)));
    assert_eq!(s(exec, "gen_ai.operation.name").as_deref(), Some("execute_tool"));
    assert_eq!(s(exec, "gen_ai.tool.name").as_deref(), Some("notify"));
    let call_id = s(exec, "gen_ai.tool.call.id").unwrap_or_default();
    assert!(call_id.ends_with("/0") && call_id.len() > 2, "{call_id}");

    let stream_trace = in_trace(STREAM_TRACE);
    let chat = stream_trace
        .iter()
        .find(|s| s.name == "chat up-small")
        .unwrap_or_else(|| panic!("no chat span of the stream: {:?}", names(STREAM_TRACE)));
    assert_eq!(i(chat, "gen_ai.usage.input_tokens"), Some(5));
    assert_eq!(i(chat, "gen_ai.usage.output_tokens"), Some(1));
    assert!(
        matches!(attr(chat, "gen_ai.response.finish_reasons"), Some(Any::ArrayValue(a)) if a.values.len() == 1)
    );
    assert_eq!(attr(chat, "error.type"), None);

    // The hostile traceparent's request is a root of its own trace.
    let own = in_trace(&own_trace);
    let root = own.iter().find(|s| s.name == "POST /v1/chat/completions").expect("its server span");
    assert!(root.parent_span_id.is_empty(), "a malformed traceparent is ignored");
}

/// `keel run` exports too: its run is one trace, a `run` span over its steps'
/// `execute_tool` spans, flushed before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_run_exports_its_run_as_one_trace() {
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let config = format!("[telemetry.otlp]\nendpoint = \"{collector}\"\n");
    let bench = Bench::new(Faults::default(), &config);
    let plan = bench.write(
        "plan.toml",
        "[[steps]]\ntool = \"notify\"\nparams = { order = 1 }\n\n[[steps]]\ntool = \"charge\"\nparams = { order = 1, amount = 5 }\n",
    );
    let run = tokio::task::spawn_blocking(move || {
        let out = bench.keel(&["run", plan.to_str().unwrap()]);
        (out, bench)
    })
    .await
    .unwrap();
    let (out, _bench) = run;
    assert_eq!(out.code, 0, "{out:?}");
    let spans = receiver.spans();
    let root = spans.iter().find(|s| s.name == "run").unwrap_or_else(|| panic!("no run span: {spans:?}"));
    assert!(root.parent_span_id.is_empty(), "keel run's run is a root");
    let steps: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with("execute_tool ")).collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["execute_tool notify", "execute_tool charge"], "in order");
    for step in steps {
        assert_eq!(step.trace_id, root.trace_id);
        assert_eq!(step.parent_span_id, root.span_id);
    }
}

/// `keel agent` exports one trace: `run` → `invoke_agent m` → the turns' `chat`
/// spans and the call's `execute_tool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_agent_exports_its_turns_and_calls_under_invoke_agent() {
    use keel_testkit::model::{Reply, ScriptedModel};
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let model = ScriptedModel::script(vec![
        Reply::call("charge", serde_json::json!({"order": 1, "amount": 5})),
        Reply::text("charged"),
    ])
    .await;
    let config = format!("[telemetry.otlp]\nendpoint = \"{collector}\"\n\n{}", model.config("m"));
    let bench = Bench::new(Faults::default(), &config);
    let (out, _bench) =
        tokio::task::spawn_blocking(move || (bench.keel(&["agent", "--tools", "charge", "charge 1"]), bench))
            .await
            .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let spans = receiver.spans();
    let agent = spans.iter().find(|s| s.name == "invoke_agent m").unwrap_or_else(|| panic!("{spans:?}"));
    assert_eq!(s(agent, "gen_ai.operation.name").as_deref(), Some("invoke_agent"));
    let run = spans.iter().find(|s| s.name == "run").unwrap();
    assert_eq!(agent.parent_span_id, run.span_id, "inside the run");
    let chats =
        spans.iter().filter(|s| s.name.starts_with("chat ") && s.parent_span_id == agent.span_id).count();
    assert_eq!(chats, 2, "each turn's model call under the agent: {spans:?}");
    let tool = spans.iter().find(|s| s.name == "execute_tool charge").unwrap();
    assert_eq!(tool.parent_span_id, agent.span_id);
}

/// `keel run` records the incidents its run opens in the journal, as `keel serve` does:
/// the inbox of a server on the same journal shows them, and a run that follows does
/// not page for an incident already open.
#[test]
fn keel_run_records_the_incidents_it_opens_in_the_journal() {
    // A webhook receiver that answers every delivery 200.
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let deliveries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = deliveries.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in hook.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = [0u8; 65536];
            let _ = conn.read(&mut buf);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    let b = crate::support::Bench::new(
        keel_examples::payments::Faults { notify_down: true, ..Default::default() },
        &format!(
            "[defaults]\nretry = {{ max_attempts = 3, base_delay = \"5ms\", max_delay = \"10ms\" }}\n\
             breaker = {{ enabled = false }}\n\n[alerts.sinks.hook]\nkind = \"webhook\"\nurl = \"{hook_url}\"\n\n\
             [[alerts.rules]]\nname = \"mail\"\nclasses = [\"server_error\"]\nthreshold = 2\nwindow = \"5m\"\n"
        ),
    );
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"notify\"\nparams = {}\n");
    let run = b.keel(&["run", plan.to_str().unwrap()]);
    assert_ne!(run.code, 0, "notify is down: {run:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = format!("sqlite://{}", b.path("keel.db").display());
    let incidents = rt.block_on(async {
        let journal = keel_journal::open(&url, keel_journal::JournalOptions::default()).await.unwrap();
        journal.incidents(10).await.unwrap()
    });
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!(incidents[0].rule, "mail");
    let trail = format!("{incidents:?}");
    assert!(trail.contains("delivered"), "the delivery is on the incident's timeline: {trail}");
    assert_eq!(deliveries.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Another run, the incident still open in the journal: no second page.
    let again = b.keel(&["run", plan.to_str().unwrap()]);
    assert_ne!(again.code, 0);
    let incidents = rt.block_on(async {
        let journal = keel_journal::open(&url, keel_journal::JournalOptions::default()).await.unwrap();
        journal.incidents(10).await.unwrap()
    });
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!(
        deliveries.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "an open incident is not paged again"
    );
}
