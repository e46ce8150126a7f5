//! Test helpers: a fake OpenAI-compatible (and Anthropic-shaped) upstream with
//! scripted faults, and the gateway served on loopback.
//!
//! The fake behaves like the real thing: real status codes and `Retry-After`, SSE
//! framed `data: ...\n\n` ending with `data: [DONE]`, usage chunks when asked; a
//! cut stream is an aborted connection, a stall a connection that stays silent.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a broken test set-up.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post as route_post;
use bytes::Bytes;
use futures_util::StreamExt;
use keel_gateway::{Gateway, GatewayConfig, MemoryJournal, ModelConfig, Provider, router};
use serde_json::{Value, json};

/// One scripted answer of the fake.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(crate) enum Reply {
    /// A normal answer made of these tokens (streamed one chunk each).
    Text(Vec<&'static str>),
    /// A tool call.
    Tool { name: &'static str, args: &'static str },
    /// An error status, with an optional `Retry-After` and a body.
    Status { code: u16, retry_after: Option<&'static str>, body: &'static str },
    /// Never answers.
    Hang,
    /// A 200 whose body is not JSON.
    Malformed,
    /// Empty content, finish_reason stop.
    Empty,
    /// Content cut off at the token limit (finish_reason length).
    Truncated(&'static str),
    /// Refused by the model (`refusal` set).
    Refused(&'static str),
    /// Streams these tokens, then the connection breaks.
    Cut(Vec<&'static str>),
    /// Streams these tokens, then stays silent forever.
    Stall(Vec<&'static str>),
    /// Streams these tokens with a malformed chunk among them.
    MalformedChunk(Vec<&'static str>),
    /// Streams these tokens and the finish reason, then ends without `[DONE]`.
    NoDone(Vec<&'static str>),
    /// An answer of this many tokens, whatever the request's `max_tokens` (an upstream
    /// that ignores the limit).
    Long(usize),
    /// A streamed answer of exactly these bytes (SSE as the test wrote it, in the
    /// route's dialect), then the connection closes: a cut anywhere, even inside a
    /// frame, when the bytes are a prefix of a stream. Billed 5 tokens.
    Raw(String),
    /// As `Raw`, then the connection breaks (an error, not a close).
    RawCut(String),
    /// As `Raw`, then the connection stays silent forever.
    RawStall(String),
    /// These SSE frames, one every `Duration` (a model's pace, for measurements).
    Paced(Vec<String>, Duration),
}

/// What the fake saw.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
}

/// What the fake bills for one answer it produced (a 2xx with output): what a
/// provider's invoice would say, whether or not the answer carried `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bill {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
}

#[derive(Default)]
struct FakeState {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    seen: Mutex<Vec<Seen>>,
    bills: Mutex<Vec<Bill>>,
    /// Answers (whole and streamed) carry no `usage`.
    omit_usage: std::sync::atomic::AtomicBool,
    /// Prompt tokens are the request's size (a token per 4 bytes), not a flat 10.
    prompt_by_size: std::sync::atomic::AtomicBool,
}

/// A fake upstream on 127.0.0.1.
#[derive(Clone)]
pub(crate) struct Fake {
    /// Its base URL, `http://127.0.0.1:PORT/v1`.
    pub(crate) url: String,
    state: Arc<FakeState>,
}

impl Fake {
    /// Starts a fake that answers `Text(["Hello", " world"])` unless scripted.
    pub(crate) async fn start() -> Fake {
        let state = Arc::new(FakeState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let app = fake_app(state.clone());
        tokio::spawn(async move { axum::serve(nodelay(listener), app).await.unwrap() });
        Fake { url, state }
    }

    /// The same fake over TLS with `config` (keel-testkit's HTTPS server, which counts
    /// connections and requests), at `https://127.0.0.1:PORT/v1`.
    #[allow(dead_code)]
    pub(crate) async fn start_tls(
        config: Arc<keel_testkit::tls::rustls::ServerConfig>,
    ) -> (Fake, keel_testkit::tls::HttpsServer) {
        let state = Arc::new(FakeState::default());
        let server = keel_testkit::tls::HttpsServer::start(config, fake_app(state.clone())).await;
        (Fake { url: format!("{}/v1", server.url()), state }, server)
    }

    /// Queues replies, used in order before the default.
    pub(crate) fn script(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.state.script.lock().unwrap().extend(replies);
        self
    }

    /// The reply once the script is used up.
    pub(crate) fn always(&self, reply: Reply) -> &Self {
        *self.state.default.lock().unwrap() = Some(reply);
        self
    }

    /// The requests received so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub(crate) fn hits(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Answers leave out `usage` (some providers and proxies do).
    pub(crate) fn omit_usage(&self) -> &Self {
        self.state.omit_usage.store(true, std::sync::atomic::Ordering::SeqCst);
        self
    }

    /// Prompt tokens are billed by the request's size (a token per 4 bytes of it, tools
    /// and system included), as a real tokenizer roughly would.
    pub(crate) fn prompt_by_size(&self) -> &Self {
        self.state.prompt_by_size.store(true, std::sync::atomic::Ordering::SeqCst);
        self
    }

    /// Every answer billed so far, from the fake's own log.
    pub(crate) fn bills(&self) -> Vec<Bill> {
        self.state.bills.lock().unwrap().clone()
    }

    /// The tokens billed so far, prompt and completion.
    pub(crate) fn billed_tokens(&self) -> u64 {
        self.bills().iter().map(|b| b.prompt + b.completion).sum()
    }

    /// The cost billed so far at `prices`, in micro-dollars (rounded up per answer).
    pub(crate) fn billed_micros(&self, prices: &keel_gateway::Prices) -> u64 {
        self.bills().iter().map(|b| prices.cost_micros(b.prompt, b.completion)).sum()
    }

    fn prompt_tokens(&self, request_bytes: usize) -> u64 {
        if self.state.prompt_by_size.load(std::sync::atomic::Ordering::SeqCst) {
            (request_bytes as u64).div_ceil(4)
        } else {
            10
        }
    }

    fn bill(&self, prompt: u64, completion: u64) {
        self.state.bills.lock().unwrap().push(Bill { prompt, completion });
    }

    fn next(&self, path: &str, headers: HeaderMap, body: Value) -> Reply {
        self.state.seen.lock().unwrap().push(Seen { path: path.into(), headers, body });
        let scripted = self.state.script.lock().unwrap().pop_front();
        scripted
            .or_else(|| self.state.default.lock().unwrap().clone())
            .unwrap_or(Reply::Text(vec!["Hello", " world"]))
    }
}

/// `listener` with Nagle's algorithm off on every connection, as `keel serve` has it:
/// otherwise a stream's first small frame waits out the client's delayed ACK (40 ms).
fn nodelay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        // Best effort: a socket that refuses keeps Nagle, and is only slower.
        let _ = tcp.set_nodelay(true);
    })
}

fn sse(frames: Vec<String>) -> Body {
    Body::from_stream(futures_util::stream::iter(
        frames.into_iter().map(|f| Ok::<_, Infallible>(Bytes::from(f))),
    ))
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn usage_chunk(model: &str, prompt: u64, completion: usize) -> Value {
    let completion = completion as u64;
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
           "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
}

/// A whole answer, billed; `usage` left out when the fake omits it.
fn completion(
    fake: &Fake,
    model: &str,
    message: Value,
    finish: &str,
    completion_tokens: u64,
    prompt: u64,
) -> Response {
    fake.bill(prompt, completion_tokens);
    let mut v = json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens},
        "system_fingerprint": "fp_fake",
    });
    if fake.state.omit_usage.load(std::sync::atomic::Ordering::SeqCst) {
        v.as_object_mut().unwrap().remove("usage");
    }
    axum::Json(v).into_response()
}

/// The text of `n` tokens.
fn long_text(n: usize) -> Vec<&'static str> {
    vec!["w "; n]
}

fn status(code: u16, retry_after: Option<&str>, body: &str) -> Response {
    let mut resp = (StatusCode::from_u16(code).unwrap(), body.to_owned()).into_response();
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    if let Some(r) = retry_after {
        resp.headers_mut().insert("retry-after", r.parse().unwrap());
    }
    resp
}

async fn openai(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let fake = Fake { url: String::new(), state };
    let prompt = fake.prompt_tokens(body.len());
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("?").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false)
        && !fake.state.omit_usage.load(std::sync::atomic::Ordering::SeqCst);
    let reply = fake.next("/v1/chat/completions", headers, body);
    if let Reply::Hang = reply {
        std::future::pending::<()>().await;
    }
    if let Reply::Status { code, retry_after, body } = reply {
        return status(code, retry_after, body);
    }
    if let Reply::Raw(bytes) | Reply::RawCut(bytes) | Reply::RawStall(bytes) = &reply {
        fake.bill(prompt, 5);
        return raw_stream(bytes.clone(), &reply);
    }
    if let Reply::Paced(frames, pace) = reply {
        fake.bill(prompt, frames.len() as u64);
        let body = futures_util::stream::iter(frames).then(move |f| async move {
            tokio::time::sleep(pace).await;
            Ok::<_, Infallible>(Bytes::from(f))
        });
        let mut resp = Response::new(Body::from_stream(body));
        resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        return resp;
    }
    if !stream {
        return match reply {
            Reply::Text(tokens) => completion(
                &fake,
                &model,
                json!({"role": "assistant", "content": tokens.concat()}),
                "stop",
                tokens.len() as u64,
                prompt,
            ),
            Reply::Long(n) => completion(
                &fake,
                &model,
                json!({"role": "assistant", "content": long_text(n).concat()}),
                "stop",
                n as u64,
                prompt,
            ),
            Reply::Tool { name, args } => completion(
                &fake,
                &model,
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]}),
                "tool_calls",
                5,
                prompt,
            ),
            Reply::Malformed => {
                (StatusCode::OK, "{\"id\": \"chatcmpl-fake\", \"choices\": [").into_response()
            }
            Reply::Empty => {
                completion(&fake, &model, json!({"role": "assistant", "content": ""}), "stop", 0, prompt)
            }
            Reply::Truncated(text) => {
                completion(&fake, &model, json!({"role": "assistant", "content": text}), "length", 16, prompt)
            }
            Reply::Refused(why) => completion(
                &fake,
                &model,
                json!({"role": "assistant", "content": null, "refusal": why}),
                "stop",
                3,
                prompt,
            ),
            other => panic!("{other:?} is a streaming fault"),
        };
    }
    let role = data(&chunk(&model, json!({"role": "assistant", "content": ""}), None));
    let tokens = |tokens: &[&str]| -> Vec<String> {
        tokens.iter().map(|t| data(&chunk(&model, json!({"content": t}), None))).collect()
    };
    let ending = |n: usize, done: bool| -> Vec<String> {
        let mut out = vec![data(&chunk(&model, json!({}), Some("stop")))];
        if usage {
            out.push(data(&usage_chunk(&model, prompt, n)));
        }
        if done {
            out.push("data: [DONE]\n\n".into());
        }
        out
    };
    // A stream is billed for what the upstream generated, cut or not.
    let generated = match &reply {
        Reply::Text(t) | Reply::MalformedChunk(t) | Reply::NoDone(t) | Reply::Cut(t) | Reply::Stall(t) => {
            t.len()
        }
        Reply::Long(n) => *n,
        Reply::Tool { .. } => 5,
        _ => 0,
    };
    fake.bill(prompt, generated as u64);
    let frames: Vec<String> = match &reply {
        Reply::Text(t) => [vec![role], tokens(t), ending(t.len(), true)].concat(),
        Reply::Long(n) => [vec![role], tokens(&long_text(*n)), ending(*n, true)].concat(),
        Reply::Tool { name, args } => [
            vec![role],
            vec![data(&chunk(&model, json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}]}), None))],
            vec![data(&chunk(&model, json!({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}), None))],
            vec![data(&chunk(&model, json!({}), Some("tool_calls"))), "data: [DONE]\n\n".into()],
        ]
        .concat(),
        Reply::Empty => [vec![role], ending(0, true)].concat(),
        Reply::MalformedChunk(t) => {
            let mut f = tokens(t);
            f.insert(1, "data: {\"id\": \"chatcmpl-fake\", \"choices\": [{\n\n".into());
            [vec![role], f, ending(t.len(), true)].concat()
        }
        Reply::NoDone(t) => [vec![role], tokens(t), ending(t.len(), false)].concat(),
        Reply::Cut(t) | Reply::Stall(t) => [vec![role], tokens(t)].concat(),
        other => panic!("{other:?} is not a streaming reply"),
    };
    let body = match reply {
        Reply::Cut(_) => Body::from_stream(
            futures_util::stream::iter(frames.into_iter().map(|f| Ok(Bytes::from(f))))
                // The upstream dies a moment after its last token (hyper would drop
                // frames still buffered if the error came with them).
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("connection cut"))
                })),
        ),
        Reply::Stall(_) => Body::from_stream(
            futures_util::stream::iter(frames.into_iter().map(|f| Ok::<_, Infallible>(Bytes::from(f))))
                .chain(futures_util::stream::pending()),
        ),
        _ => sse(frames),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

async fn anthropic(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let fake = Fake { url: String::new(), state };
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("?").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let reply = fake.next("/v1/messages", headers, body);
    if let Reply::Raw(bytes) | Reply::RawCut(bytes) | Reply::RawStall(bytes) = &reply {
        fake.bill(12, 5);
        return raw_stream(bytes.clone(), &reply);
    }
    let (blocks, stop) = match reply {
        Reply::Text(t) => (vec![json!({"type": "text", "text": t.concat()})], "end_turn"),
        Reply::Tool { name, args } => (
            vec![
                json!({"type": "text", "text": "Let me check."}),
                json!({"type": "tool_use", "id": "toolu_1", "name": name, "input": serde_json::from_str::<Value>(args).unwrap()}),
            ],
            "tool_use",
        ),
        Reply::Truncated(text) => (vec![json!({"type": "text", "text": text})], "max_tokens"),
        Reply::Status { code, retry_after, body } => return status(code, retry_after, body),
        other => panic!("{other:?} is not an Anthropic reply"),
    };
    if !stream {
        return axum::Json(json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop, "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 7},
        }))
        .into_response();
    }
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut frames = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [], "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for (i, block) in blocks.iter().enumerate() {
        if block["type"] == "text" {
            frames.push(ev("content_block_start", json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})));
            let text = block["text"].as_str().unwrap();
            let (a, b) = text.split_at(text.len() / 2);
            for part in [a, b] {
                frames.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": part}})));
            }
        } else {
            frames.push(ev("content_block_start", json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})));
            let input = block["input"].to_string();
            let (a, b) = input.split_at(input.len() / 2);
            for part in [a, b] {
                frames.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": part}})));
            }
        }
        frames.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": i})));
    }
    frames.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 7}})));
    frames.push(ev("message_stop", json!({"type": "message_stop"})));
    let mut resp = Response::new(sse(frames));
    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

/// A `text/event-stream` response of `bytes`, then what `reply` says: a close
/// (`Raw`), a broken connection (`RawCut`) or silence (`RawStall`).
fn raw_stream(bytes: String, reply: &Reply) -> Response {
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(bytes)) });
    let body = match reply {
        Reply::RawCut(_) => Body::from_stream(first.chain(futures_util::stream::once(async {
            // As for `Cut`: the error a moment after the bytes, so that they are sent.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(std::io::Error::other("connection cut"))
        }))),
        Reply::RawStall(_) => Body::from_stream(first.chain(futures_util::stream::pending())),
        _ => Body::from_stream(first),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

/// OpenAI's `/embeddings`: a 3-dimensional vector per input, 4 prompt tokens billed
/// per input; `Status` and `Hang` as for chat.
async fn embeddings(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let fake = Fake { url: String::new(), state };
    let body: Value = serde_json::from_slice(&body).unwrap();
    let model = body["model"].as_str().unwrap_or("?").to_owned();
    let inputs = match &body["input"] {
        Value::Array(a) => a.len(),
        _ => 1,
    };
    match fake.next("/v1/embeddings", headers, body) {
        Reply::Hang => std::future::pending().await,
        Reply::Status { code, retry_after, body } => status(code, retry_after, body),
        _ => {
            let prompt = 4 * inputs as u64;
            fake.bill(prompt, 0);
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
                .collect();
            axum::Json(json!({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}))
            .into_response()
        }
    }
}

fn fake_app(state: Arc<FakeState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", route_post(openai))
        .route("/v1/messages", route_post(anthropic))
        .route("/v1/embeddings", route_post(embeddings))
        .with_state(state)
}

/// A model on `fake` with quick, test-sized policies.
pub(crate) fn model(fake: &Fake, upstream_model: &str) -> ModelConfig {
    let mut m = ModelConfig::new(Provider::Openai, &fake.url, upstream_model);
    m.policy.retry.base_delay = Duration::from_millis(5);
    m.policy.retry.max_delay = Duration::from_millis(20);
    m.policy.rate_limit_floor = Duration::from_millis(5);
    m.policy.timeout = Duration::from_secs(10);
    m.policy.ttft_timeout = Duration::from_secs(10);
    m.policy.stall_timeout = Duration::from_secs(10);
    m
}

/// The gateway, served on loopback.
pub(crate) struct Served {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) url: String,
    pub(crate) journal: Arc<MemoryJournal>,
    pub(crate) events: Arc<keel_core::MemorySink>,
}

/// Serves a gateway of `models` on 127.0.0.1.
pub(crate) async fn serve(models: Vec<(&str, ModelConfig)>) -> Served {
    serve_with(models, GatewayConfig::default()).await
}

/// Serves a gateway of `models` with `config` on 127.0.0.1.
pub(crate) async fn serve_with(models: Vec<(&str, ModelConfig)>, config: GatewayConfig) -> Served {
    serve_clocked(models, config, Arc::new(ManualClock::new())).await
}

/// A clock that follows tokio's, plus an offset tests advance: breaker waits pass
/// without sleeping, while sockets keep real time.
#[derive(Debug)]
pub(crate) struct ManualClock {
    offset: Mutex<Duration>,
    wall: std::time::SystemTime,
    origin: tokio::time::Instant,
}

impl ManualClock {
    pub(crate) fn new() -> Self {
        Self {
            offset: Mutex::new(Duration::ZERO),
            wall: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            origin: tokio::time::Instant::now(),
        }
    }

    /// Moves the clock forward.
    #[allow(dead_code)]
    pub(crate) fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl keel_core::Clock for ManualClock {
    fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + *self.offset.lock().unwrap()
    }

    fn wall(&self) -> std::time::SystemTime {
        self.wall + (self.now() - self.origin)
    }
}

/// Serves a gateway of `models` with `config` and `clock` on 127.0.0.1.
pub(crate) async fn serve_clocked(
    models: Vec<(&str, ModelConfig)>,
    config: GatewayConfig,
    clock: Arc<ManualClock>,
) -> Served {
    let models: BTreeMap<String, ModelConfig> = models.into_iter().map(|(n, m)| (n.to_owned(), m)).collect();
    let journal = Arc::new(MemoryJournal::default());
    let events = keel_core::MemorySink::new();
    let gateway = Arc::new(
        Gateway::builder(models)
            .env(|k| (k == "FAKE_KEY").then(|| "sk-test".to_owned()))
            .config(config)
            .clock(clock)
            .sink(events.clone())
            .journal(journal.clone())
            // Whatever proxies the machine running the tests has, the fakes are local.
            .proxies(keel_http::Proxies::none())
            .build()
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(gateway.clone());
    tokio::spawn(async move { axum::serve(nodelay(listener), app).await.unwrap() });
    Served { gateway, url, journal, events }
}

/// A client's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) text: String,
}

#[allow(dead_code)]
impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// The `data:` payloads of an SSE body.
    pub(crate) fn events(&self) -> Vec<String> {
        self.text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
    }

    /// The named events of an SSE body (`event: NAME` + `data: JSON`), in order.
    pub(crate) fn named_events(&self) -> Vec<(String, Value)> {
        self.text
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap_or_else(|| panic!("not a named event: {e}"));
                let name = name.strip_prefix("event: ").unwrap_or_else(|| panic!("not a named event: {e}"));
                let data = data.strip_prefix("data: ").unwrap_or_else(|| panic!("no data: {e}"));
                (name.to_owned(), serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}")))
            })
            .collect()
    }

    /// The text of a streamed answer.
    pub(crate) fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| v.pointer("/choices/0/delta/content").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// The finish reasons a stream carried.
    pub(crate) fn finish_reasons(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| v.pointer("/choices/0/finish_reason").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }
}

/// Posts `body` to the gateway's chat completions, with extra headers.
pub(crate) async fn post_chat(url: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
    post(url, "/v1/chat/completions", body, headers).await
}

/// Posts `body` to `path` of the gateway, with extra headers.
pub(crate) async fn post(url: &str, path: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
    post_raw(url, path, body.to_string(), headers).await
}

/// Gets `path` of the gateway.
#[allow(dead_code)]
pub(crate) async fn get(url: &str, path: &str) -> Answer {
    let resp = reqwest::Client::new().get(format!("{url}{path}")).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer { status, headers, text }
}

/// Posts a raw body to `path` of the gateway, with extra headers.
pub(crate) async fn post_raw(url: &str, path: &str, body: String, headers: &[(&str, &str)]) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client.post(format!("{url}{path}")).header("content-type", "application/json").body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer { status, headers, text }
}

/// A simple request for `model`.
pub(crate) fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

/// A streamed request for `model`.
pub(crate) fn ask_stream(model: &str) -> Value {
    json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "Say hello"}]})
}

/// The gateway's series as `/metrics` renders them: written into a Prometheus
/// registry of the `metrics` stack, the server's one encoder.
pub(crate) fn prometheus(gateway: &keel_gateway::Gateway) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    keel_gateway::MetricsSnapshot::describe(&recorder);
    gateway.metrics().record(&recorder);
    recorder.handle().render()
}
