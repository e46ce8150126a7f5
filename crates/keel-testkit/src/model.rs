//! A scripted model: an OpenAI-compatible `/v1/chat/completions` on loopback whose
//! answers a test decides, request by request, and which keeps every request it got.
//!
//! It behaves like a real provider where Keel looks: OpenAI's answer shape (`choices`,
//! `message.tool_calls` with ids, `finish_reason`), a `usage` that grows with the
//! prompt, and errors as a status with OpenAI's error body. A test says how many times
//! the model was asked ([`ScriptedModel::calls`]) and what it was sent
//! ([`ScriptedModel::requests`]): that is how "a journaled turn is not re-asked" and
//! "the validation error went back to the model" are checked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One answer of the scripted model.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A final text answer.
    Text(String),
    /// Tool calls: (function name, arguments as sent — any string, valid JSON or not).
    Tools(Vec<(String, String)>),
    /// An error status with OpenAI's error body carrying this message.
    Status(u16, String),
}

impl Reply {
    /// A single tool call with `args` serialized.
    pub fn call(name: &str, args: Value) -> Reply {
        Reply::Tools(vec![(name.to_owned(), args.to_string())])
    }

    /// A text answer.
    pub fn text(s: &str) -> Reply {
        Reply::Text(s.to_owned())
    }
}

type Script = dyn Fn(usize, &Value) -> Reply + Send + Sync;

struct Shared {
    script: Box<Script>,
    requests: Mutex<Vec<Value>>,
    calls: AtomicUsize,
}

/// A running scripted model; it stops with the test's runtime.
#[derive(Clone)]
pub struct ScriptedModel {
    base_url: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ScriptedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedModel").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl ScriptedModel {
    /// Answers request `n` (0-based) with `replies[n]`; past the end, a 400 saying the
    /// script has no answer (a test that asks too often fails loudly).
    pub async fn script(replies: Vec<Reply>) -> ScriptedModel {
        Self::serve(move |n, _| {
            replies.get(n).cloned().unwrap_or_else(|| {
                Reply::Status(400, format!("the scripted model has no answer for request {}", n + 1))
            })
        })
        .await
    }

    /// Answers each request with `f(n, request)`.
    pub async fn serve(f: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> ScriptedModel {
        let shared =
            Arc::new(Shared { script: Box::new(f), requests: Mutex::default(), calls: AtomicUsize::new(0) });
        let app = axum::Router::new().route("/v1/chat/completions", post(answer)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedModel { base_url: format!("http://{addr}/v1"), shared }
    }

    /// The `base_url` for `[models.NAME]`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// How many requests it got.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Every request body it got, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A `keel.toml` `[models.NAME]` table for this model.
    pub fn config(&self, name: &str) -> String {
        format!(
            "[models.{name}]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"scripted\"\n",
            self.base_url
        )
    }
}

async fn answer(State(shared): State<Arc<Shared>>, Json(req): Json<Value>) -> Response {
    let n = shared.calls.fetch_add(1, Ordering::SeqCst);
    let reply = (shared.script)(n, &req);
    let prompt_tokens = (req.to_string().len() / 4) as u64 + 1;
    shared.requests.lock().unwrap_or_else(|e| e.into_inner()).push(req);
    let (message, finish, completion) = match reply {
        Reply::Text(text) => {
            let tokens = (text.len() / 4) as u64 + 1;
            (json!({"role": "assistant", "content": text}), "stop", tokens)
        }
        Reply::Tools(calls) => {
            let tokens = calls.iter().map(|(n, a)| (n.len() + a.len()) / 4 + 1).sum::<usize>() as u64;
            let calls: Vec<Value> = calls
                .into_iter()
                .enumerate()
                .map(|(i, (name, arguments))| {
                    json!({"id": format!("call_{n}_{i}"), "type": "function",
                           "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            (json!({"role": "assistant", "content": null, "tool_calls": calls}), "tool_calls", tokens)
        }
        Reply::Status(status, message) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = if status == 429 { "rate_limit_error" } else { "invalid_request_error" };
            let body = json!({"error": {"message": message, "type": kind, "code": null}});
            return (code, Json(body)).into_response();
        }
    };
    Json(json!({
        "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 1, "model": "scripted",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    }))
    .into_response()
}
