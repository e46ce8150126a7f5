//! The drill's fault proxies: one loopback HTTP server per drilled target, put where
//! the target's URL was, so every fault comes off the wire and Keel's whole adapter —
//! the HTTP client, the status and transport classification, the answer parser, the
//! validator, the stream rescue, the breaker — handles it as it would a real one.
//!
//! A model's proxy is also its upstream: it answers chat completions (whole and
//! streamed) itself, so a drill never spends a provider's money. A tool's proxy
//! forwards to the tool's service and logs what reached it (body, `Idempotency-Key`,
//! the service's status): a request forwarded and answered is an effect, whether or
//! not its answer got back to Keel — the `lost_response` fault drops it on the way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A fault the drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillFault {
    /// Nothing comes back: the attempt times out (models and tools).
    Timeout,
    /// A 503 (models and tools).
    ServerError,
    /// The answer comes, late (models and tools).
    Latency,
    /// A model answers with empty content.
    Empty,
    /// A model answers 200 with a body that is not JSON (a stream: a broken chunk
    /// among good ones).
    Malformed,
    /// A model's answer is cut: the connection closes mid-body.
    Cut,
    /// A model's stream stops after its first token and stays open.
    Stall,
    /// A tool's request reaches the service, which acts and answers; the answer is
    /// lost on the way back (the attempt times out). Retried, it is the double charge.
    LostResponse,
}

impl DrillFault {
    /// Every fault, in the order reports list them.
    pub const ALL: [DrillFault; 8] = [
        DrillFault::Timeout,
        DrillFault::ServerError,
        DrillFault::Latency,
        DrillFault::Empty,
        DrillFault::Malformed,
        DrillFault::Cut,
        DrillFault::Stall,
        DrillFault::LostResponse,
    ];

    /// Its name (`lost_response`).
    pub fn as_str(self) -> &'static str {
        match self {
            DrillFault::Timeout => "timeout",
            DrillFault::ServerError => "server_error",
            DrillFault::Latency => "latency",
            DrillFault::Empty => "empty",
            DrillFault::Malformed => "malformed",
            DrillFault::Cut => "cut",
            DrillFault::Stall => "stall",
            DrillFault::LostResponse => "lost_response",
        }
    }

    /// The fault named `s`.
    pub fn parse(s: &str) -> Option<DrillFault> {
        DrillFault::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Whether it can be injected into a model (else: into a tool).
    pub fn for_models(self) -> bool {
        !matches!(self, DrillFault::LostResponse)
    }

    /// Whether it can be injected into an http tool.
    pub fn for_tools(self) -> bool {
        matches!(
            self,
            DrillFault::Timeout | DrillFault::ServerError | DrillFault::Latency | DrillFault::LostResponse
        )
    }
}

/// What the proxy injects: a share of requests, drawn from kinds. Adjustable while a
/// drill runs ([`Proxy::set_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// The share of requests that get a fault (0.0–1.0).
    pub rate: f64,
    /// The kinds drawn from, uniformly.
    pub faults: Vec<DrillFault>,
    /// How late a `latency` fault answers.
    pub latency: Duration,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The fault injected into it, if any.
    pub fault: Option<DrillFault>,
    /// The request's body.
    pub body: Bytes,
    /// Its `Idempotency-Key` header.
    pub key: Option<String>,
    /// Its method is safe (GET, HEAD, OPTIONS): by HTTP's semantics it changes nothing.
    pub safe: bool,
    /// The service's status, when the request was forwarded and answered (an effect).
    pub service_status: Option<u16>,
}

enum Upstream {
    /// A synthetic OpenAI-wire model.
    Model,
    /// An http tool's service at this origin.
    Tool { origin: String, client: keel_http::Client },
}

struct Inner {
    upstream: Upstream,
    plan: Mutex<FaultPlan>,
    rng: Mutex<fastrand::Rng>,
    seen: Mutex<Vec<Seen>>,
}

/// A running fault proxy.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
    /// Where it listens (`http://127.0.0.1:PORT`).
    pub url: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Proxy {
    /// A synthetic model upstream with faults.
    ///
    /// # Errors
    /// The loopback listener's.
    pub async fn model(plan: FaultPlan, seed: u64) -> std::io::Result<Proxy> {
        Self::start(Upstream::Model, plan, seed).await
    }

    /// A proxy in front of a tool's service at `origin` (`http://host:port`).
    ///
    /// # Errors
    /// The loopback listener's.
    pub async fn tool(
        origin: String,
        client: keel_http::Client,
        plan: FaultPlan,
        seed: u64,
    ) -> std::io::Result<Proxy> {
        Self::start(Upstream::Tool { origin, client }, plan, seed).await
    }

    async fn start(upstream: Upstream, plan: FaultPlan, seed: u64) -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner {
            upstream,
            plan: Mutex::new(plan),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            seen: Mutex::default(),
        });
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Proxy { inner, url })
    }

    /// Changes what is injected from the next request on.
    pub fn set_plan(&self, plan: FaultPlan) {
        *lock(&self.inner.plan) = plan;
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner.seen).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn draw(inner: &Inner) -> (Option<DrillFault>, Duration) {
    let plan = lock(&inner.plan).clone();
    let mut rng = lock(&inner.rng);
    let fault = (!plan.faults.is_empty() && rng.f64() < plan.rate)
        .then(|| plan.faults[rng.usize(..plan.faults.len())]);
    (fault, plan.latency)
}

/// The largest request body read.
const MAX_BODY: usize = 8 << 20;

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "drill: body too large").into_response();
    };
    let (fault, latency) = draw(&inner);
    let key = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let index = {
        let mut seen = lock(&inner.seen);
        let safe = matches!(parts.method.as_str(), "GET" | "HEAD" | "OPTIONS");
        seen.push(Seen { fault, body: body.clone(), key, safe, service_status: None });
        seen.len() - 1
    };
    match fault {
        Some(DrillFault::Timeout) => return std::future::pending().await,
        Some(DrillFault::ServerError) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"error":{"message":"drill: injected 503","type":"server_error"}}"#,
            )
                .into_response();
        }
        Some(DrillFault::Latency) => tokio::time::sleep(latency).await,
        _ => {}
    }
    match &inner.upstream {
        Upstream::Model => model_answer(&body, fault),
        Upstream::Tool { origin, client } => {
            let forwarded = forward(client, origin, &parts.method, &parts.uri, &parts.headers, body).await;
            let (status, headers, answer) = match forwarded {
                Ok(r) => r,
                Err(message) => {
                    return (
                        StatusCode::BAD_GATEWAY,
                        format!("drill: the service cannot be reached: {message}"),
                    )
                        .into_response();
                }
            };
            if let Some(s) = lock(&inner.seen).get_mut(index) {
                s.service_status = Some(status.as_u16());
            }
            if fault == Some(DrillFault::LostResponse) {
                // The service acted; its answer never gets back.
                return std::future::pending().await;
            }
            let mut resp = (status, answer).into_response();
            if let Some(ct) = headers.get(header::CONTENT_TYPE) {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            resp
        }
    }
}

async fn forward(
    client: &keel_http::Client,
    origin: &str,
    method: &axum::http::Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let target: Uri = format!("{origin}{path}").parse().map_err(|e| format!("{e}"))?;
    let mut req = http::Request::builder().method(method.clone()).uri(target.clone());
    for (name, value) in headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            req = req.header(name, value);
        }
    }
    let req = req.body(http_body_util::Full::new(body)).map_err(|e| e.to_string())?;
    let resp = client.send(req).await.map_err(|f| f.message)?;
    let (parts, body) = resp.into_parts();
    let bytes = keel_http::read_body(body, MAX_BODY, &target).await.map_err(|f| f.message)?;
    Ok((parts.status, parts.headers, bytes))
}

/// The synthetic model's answer to a chat completion, with `fault` applied.
fn model_answer(body: &[u8], fault: Option<DrillFault>) -> Response {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("drill").to_owned();
    let content = if fault == Some(DrillFault::Empty) { "" } else { "The drill's answer." };
    if req["stream"].as_bool() != Some(true) {
        let whole = serde_json::json!({
            "id": "chatcmpl-drill", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
        })
        .to_string();
        return match fault {
            Some(DrillFault::Malformed) => json_response("{\"choices\": [{\"message\": "),
            Some(DrillFault::Cut) => {
                // Promised whole, sent half: the connection closes mid-body.
                let half = Bytes::from(whole[..whole.len() / 2].to_owned());
                body_of(vec![Ok(half), Err(())], None)
            }
            Some(DrillFault::Stall) => body_of(vec![Ok(Bytes::from(whole[..10].to_owned()))], Some(())),
            _ => json_response(&whole),
        };
    }
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let c = serde_json::json!({
            "id": "chatcmpl-drill", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut frames: Vec<Result<Bytes, ()>> = vec![Ok(chunk(serde_json::json!({"role": "assistant"}), None))];
    let words = if content.is_empty() { vec![] } else { vec!["The ", "drill's ", "answer."] };
    for (i, w) in words.iter().enumerate() {
        frames.push(Ok(chunk(serde_json::json!({"content": w}), None)));
        if i == 0 {
            match fault {
                Some(DrillFault::Stall) => return sse(frames, true),
                Some(DrillFault::Cut) => {
                    frames.push(Err(()));
                    return sse(frames, false);
                }
                Some(DrillFault::Malformed) => {
                    frames.push(Ok(Bytes::from_static(b"data: {\"choices\": [\n\n")))
                }
                _ => {}
            }
        }
    }
    frames.push(Ok(chunk(serde_json::json!({}), Some("stop"))));
    let usage = serde_json::json!({
        "id": "chatcmpl-drill", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    });
    frames.push(Ok(Bytes::from(format!("data: {usage}\n\n"))));
    frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    sse(frames, false)
}

fn json_response(body: &str) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_owned()).into_response()
}

fn sse(frames: Vec<Result<Bytes, ()>>, stall: bool) -> Response {
    let mut resp = body_of(frames, stall.then_some(()));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    resp
}

/// A 200 whose body is `frames` (an `Err` closes the connection mid-body), then, with
/// `stall`, nothing more while the connection stays open.
fn body_of(frames: Vec<Result<Bytes, ()>>, stall: Option<()>) -> Response {
    use futures_util::StreamExt as _;
    let items =
        futures_util::stream::iter(frames.into_iter().map(|f| {
            f.map_err(|()| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "drill: cut"))
        }));
    let body = match stall {
        Some(()) => Body::from_stream(items.chain(futures_util::stream::pending())),
        None => Body::from_stream(items),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

/// Effects: requests of an unsafe method (POST, PUT, PATCH, DELETE: whatever the
/// tool's `write` says) that reached its service and were answered with a success,
/// grouped by body, with the keys they carried.
pub fn effects(seen: &[Seen]) -> BTreeMap<Bytes, Vec<Option<String>>> {
    let mut out: BTreeMap<Bytes, Vec<Option<String>>> = BTreeMap::new();
    for s in seen.iter().filter(|s| !s.safe && s.service_status.is_some_and(|c| (200..300).contains(&c))) {
        out.entry(s.body.clone()).or_default().push(s.key.clone());
    }
    out
}
