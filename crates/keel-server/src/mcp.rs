//! Keel as an MCP server: `/mcp` on `keel serve` (streamable HTTP) and `keel mcp`
//! (stdio) expose keel.toml's tools with their JSON Schemas, and every `tools/call`
//! goes through [`keel_runtime::invoke`] — the tool's policy pipeline, the idempotency
//! store, the approval rule, the loop guard — journaled like `/api/tools/{name}/invoke`.
//!
//! Protocol revision 2025-11-25 (2025-06-18 and 2025-03-26 are answered in kind):
//! `initialize`, `ping`, `tools/list`, `tools/call`, and the `notifications/*` a client
//! sends. JSON-RPC is handled here by hand: the surface is four methods, and it keeps
//! the server stateless — no `Mcp-Session-Id`, nothing kept between requests, so any
//! instance on the same journal answers any request.
//!
//! The idempotency key of a call is the client's, when it passes one in
//! `_meta["keel/idempotencyKey"]`; otherwise, for a write-like tool, one derived from
//! the tool and its canonical arguments (MCP clients mint a new request id on every
//! retry, so request ids are never the key). A retried call with the same arguments
//! is answered from the first call's run: it never acts twice.
//!
//! Tool failures are tool results with `isError` and the error class, never protocol
//! errors. A call that needs approval answers at once (it never hangs) with an
//! `isError` result naming the approval and how to poll; the approval in Keel's
//! journal stays the authority. Calling again with the same arguments (or key) once it
//! is decided returns the result.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_core::{Classified as _, Disposition, ErrorClass};
use keel_runtime::config::Role;
use keel_runtime::{Call, Config, InvokeError, Invoker, Outcome};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::AppState;
use crate::auth::Caller;

/// The revision this server speaks, answered to clients asking for another.
pub const PROTOCOL_VERSION: &str = "2025-11-25";

/// The revisions answered in kind.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// The `_meta` key under which a client passes its own idempotency key.
pub const IDEMPOTENCY_META_KEY: &str = "keel/idempotencyKey";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// Answers MCP messages for one process: stateless, cheap to share.
#[derive(Debug, Clone)]
pub struct McpServer {
    invoker: Invoker,
    config: Arc<Config>,
    /// Who calls, for the loop guard (the API key's name, `stdio`).
    caller: Option<String>,
}

impl McpServer {
    /// A server calling tools through `invoker`.
    pub fn new(invoker: Invoker) -> Self {
        let config = invoker.runner().config().clone();
        Self { invoker, config, caller: None }
    }

    /// This server answering for `caller` (the loop guard counts each caller apart).
    #[must_use]
    pub fn for_caller(mut self, caller: &str) -> Self {
        self.caller = Some(caller.to_owned());
        self
    }

    /// Answers one raw message (a line on stdio, a POST body): `None` for a
    /// notification or a response, which get no answer.
    pub async fn handle_raw(&self, raw: &[u8]) -> Option<Value> {
        match serde_json::from_slice::<Value>(raw) {
            Ok(msg) => self.handle(msg).await,
            Err(e) => Some(error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}"))),
        }
    }

    /// Answers one JSON-RPC message.
    pub async fn handle(&self, msg: Value) -> Option<Value> {
        let Value::Object(msg) = msg else {
            // Batches were removed from the protocol in 2025-06-18.
            return Some(error(Value::Null, INVALID_REQUEST, "a message must be one JSON-RPC object"));
        };
        let id = msg.get("id").cloned();
        let method = msg.get("method").and_then(Value::as_str);
        let (Some(id), Some(method)) = (id, method) else {
            // A notification (`notifications/initialized`, `notifications/cancelled`) or a
            // response to a request this server never sends: nothing to answer.
            return None;
        };
        if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Some(error(id, INVALID_REQUEST, "`jsonrpc` must be \"2.0\""));
        }
        let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
        let answered = match method {
            "initialize" => Ok(initialize(&params)),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(self.list_tools()),
            "tools/call" => self.call_tool(&params).await,
            other => Err((METHOD_NOT_FOUND, format!("method `{other}` is not served here"))),
        };
        Some(match answered {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => error(id, code, &message),
        })
    }

    /// `tools/list`: every tool with its parameters' schema and its hints.
    fn list_tools(&self) -> Value {
        let tools: Vec<Value> = self
            .config
            .tools
            .values()
            .map(|t| {
                let schema = t.params_schema.clone().filter(Value::is_object).unwrap_or_else(|| json!({}));
                let mut input = match schema {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                // MCP requires an object schema at the root.
                input.entry("type").or_insert_with(|| json!("object"));
                json!({
                    "name": &*t.name,
                    "description": t.description,
                    "inputSchema": input,
                    "annotations": {
                        "readOnlyHint": !t.write,
                        "destructiveHint": t.write,
                        // Write-like calls are idempotent through Keel: a repeat replays.
                        "idempotentHint": true,
                    },
                })
            })
            .collect();
        json!({ "tools": tools })
    }

    /// `tools/call`: one invocation, its outcome as a tool result.
    async fn call_tool(&self, params: &Value) -> Result<Value, (i64, String)> {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return Err((INVALID_PARAMS, "tools/call needs `name`".into()));
        };
        if !self.config.tools.contains_key(name) {
            return Err((INVALID_PARAMS, format!("unknown tool: `{name}`")));
        }
        let arguments = params.get("arguments").cloned().unwrap_or(Value::Null);
        let key = params
            .get("_meta")
            .and_then(|m| m.get(IDEMPOTENCY_META_KEY))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let call =
            Call { tool: name.to_owned(), params: arguments, key, wait: None, caller: self.caller.clone() };
        match self.invoker.invoke(call).await {
            Ok(outcome) => Ok(tool_result(&outcome)),
            Err(InvokeError::UnknownTool(t)) => Err((INVALID_PARAMS, format!("unknown tool: `{t}`"))),
            // Even the journal's failures: a tool result with the class, so the agent
            // sees `retryable` and may call again with the same arguments.
            Err(e) => Ok(failed(e.class(), &e.to_string(), json!({}))),
        }
    }
}

/// `initialize`: the client's revision when it is one of ours, else ours.
fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str).unwrap_or(PROTOCOL_VERSION);
    let version = if SUPPORTED_VERSIONS.contains(&asked) { asked } else { PROTOCOL_VERSION };
    json!({
        "protocolVersion": version,
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": { "name": "keel", "version": env!("CARGO_PKG_VERSION") },
        "instructions": "Tools called through Keel run under its policies (timeouts, retries, \
            idempotency, approvals, loop guard). A write-like call repeated with the same \
            arguments is answered from the first; a call that needs approval answers at once \
            with the approval's id: call again with the same arguments once it is decided.",
    })
}

/// An invocation's outcome as a `CallToolResult`.
fn tool_result(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Completed { run_id, output, attempts, replayed } => {
            let text = serde_json::to_string(output).unwrap_or_default();
            let mut r = json!({
                "content": [{ "type": "text", "text": text }],
                "isError": false,
                "_meta": { "keel/runId": run_id, "keel/attempts": attempts, "keel/replayed": replayed },
            });
            if output.is_object() {
                r["structuredContent"] = output.clone();
            }
            r
        }
        Outcome::WaitingApproval { run_id, approval_id, replayed } => {
            let text = format!(
                "pending approval: this call needs a person's approval ({approval_id}); nothing was \
                 done yet. Approve it with `keel approvals approve {approval_id}` or POST \
                 /api/approvals/{approval_id}/approve, then call this tool again with the same \
                 arguments to get its result (poll GET /api/runs/{run_id} for its state)."
            );
            json!({
                "content": [{ "type": "text", "text": text }],
                "isError": true,
                "structuredContent": {
                    "status": "waiting_approval",
                    "approval_id": approval_id,
                    "run_id": run_id,
                    "poll_url": format!("/api/runs/{run_id}"),
                    "replayed": replayed,
                },
            })
        }
        Outcome::Running { run_id, state, replayed } => {
            let text = format!(
                "still {}: the call goes on; call this tool again with the same arguments for its \
                 result (poll GET /api/runs/{run_id})",
                state.as_str()
            );
            json!({
                "content": [{ "type": "text", "text": text }],
                "isError": true,
                "structuredContent": {
                    "status": state.as_str(), "run_id": run_id,
                    "poll_url": format!("/api/runs/{run_id}"), "replayed": replayed,
                },
            })
        }
        Outcome::Failed { run_id, class, message, attempts, ticket_id }
        | Outcome::Escalated { run_id, class, message, attempts, ticket_id } => {
            let escalated = matches!(outcome, Outcome::Escalated { .. });
            failed(
                *class,
                message,
                json!({ "run_id": run_id, "attempts": attempts, "ticket_id": ticket_id, "escalated": escalated }),
            )
        }
    }
}

/// A failed call's tool result: `isError`, the class first in the text, and the
/// details in `structuredContent`.
fn failed(class: ErrorClass, message: &str, extra: Value) -> Value {
    let mut details = json!({
        "status": "failed",
        "class": class,
        "message": message,
        "retryable": class.default_disposition() == Disposition::Retry,
    });
    if let (Some(d), Value::Object(extra)) = (details.as_object_mut(), extra) {
        d.extend(extra);
    }
    json!({
        "content": [{ "type": "text", "text": format!("{}: {message}", class.as_str()) }],
        "isError": true,
        "structuredContent": details,
    })
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// `POST /mcp`: one JSON-RPC message, answered with JSON (202 with no body for a
/// notification). Needs an agent key, like `/api/tools`.
///
/// # Errors
/// `forbidden` for a key of another role.
pub async fn post(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, crate::error::ApiError> {
    caller.require(&[Role::Agent])?;
    if let Some(refused) = check_headers(&headers) {
        return Ok(refused);
    }
    let server = McpServer::new(s.invoker()).for_caller(&caller.name);
    Ok(match server.handle_raw(&body).await {
        Some(answer) => {
            let status = if answer.get("error").is_some_and(|e| e["code"] == PARSE_ERROR) {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            (status, Json(answer)).into_response()
        }
        None => StatusCode::ACCEPTED.into_response(),
    })
}

/// `GET` and `DELETE /mcp`: this server offers no server-initiated stream and keeps
/// no session to end.
pub async fn not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}

/// Refuses a request from a browser page of another origin (DNS rebinding) and one
/// naming a protocol revision this server does not speak.
fn check_headers(headers: &HeaderMap) -> Option<Response> {
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin_host != host {
            let body =
                error(Value::Null, INVALID_REQUEST, &format!("origin `{origin}` may not call this server"));
            return Some((StatusCode::FORBIDDEN, Json(body)).into_response());
        }
    }
    if let Some(v) = headers.get("mcp-protocol-version") {
        let v = v.to_str().unwrap_or("");
        if !SUPPORTED_VERSIONS.contains(&v) {
            let body = error(
                Value::Null,
                INVALID_REQUEST,
                &format!(
                    "unsupported MCP-Protocol-Version `{v}`; supported: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            );
            return Some((StatusCode::BAD_REQUEST, Json(body)).into_response());
        }
    }
    None
}

/// `keel mcp`: answers newline-delimited JSON-RPC messages from `input` on `output`
/// until `input` ends. Each request is answered on a task of its own, so a slow tool
/// does not hold up a `ping`; answers are written whole, one per line.
///
/// # Errors
/// Reading `input` or writing `output`.
pub async fn serve_stdio<R, W>(server: McpServer, input: R, output: W) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(answer) = rx.recv().await {
            let mut line = serde_json::to_vec(&answer).unwrap_or_default();
            line.push(b'\n');
            output.write_all(&line).await?;
            output.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    });
    let mut calls = tokio::task::JoinSet::new();
    let mut lines = input.lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let (server, tx) = (server.clone(), tx.clone());
        calls.spawn(async move {
            if let Some(answer) = server.handle_raw(line.as_bytes()).await {
                let _ = tx.send(answer);
            }
        });
    }
    // Input closed: answer what was asked, then stop.
    while calls.join_next().await.is_some() {}
    drop(tx);
    writer.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use keel_core::TokioClock;
    use keel_journal::JournalOptions;
    use keel_runtime::Runner;
    use keel_runtime::runner::NullObserver;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    async fn server(dir: &std::path::Path) -> McpServer {
        let text = "[tools.echo]\nkind = \"command\"\nargv = [\"echo\", \"{}\"]\n\
                    params = { type = \"object\", properties = { x = { type = \"integer\" } } }\n";
        let config = Config::parse(text, &dir.join("keel.toml"), &|_| None).unwrap();
        let clock = Arc::new(TokioClock::new());
        let journal = keel_journal::open(
            &config.storage_url,
            JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
        )
        .await
        .unwrap();
        let runner = Arc::new(
            Runner::new(Arc::new(config), journal, clock.clone(), Arc::new(NullObserver)).await.unwrap(),
        );
        McpServer::new(Invoker::new(runner, Arc::default(), clock))
    }

    fn code(answer: &Option<Value>) -> i64 {
        answer.as_ref().unwrap()["error"]["code"].as_i64().unwrap_or(0)
    }

    #[tokio::test]
    async fn hostile_messages_get_json_rpc_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path()).await;
        assert_eq!(code(&s.handle_raw(b"{nope").await), PARSE_ERROR);
        assert_eq!(
            code(&s.handle_raw(b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]").await),
            INVALID_REQUEST
        );
        assert_eq!(code(&s.handle_raw(b"{\"id\":1,\"method\":\"ping\"}").await), INVALID_REQUEST);
        assert_eq!(
            code(&s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nope\"}").await),
            METHOD_NOT_FOUND
        );
        // Notifications and responses get no answer.
        assert!(
            s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}").await.is_none()
        );
        assert!(s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}").await.is_none());
        let call =
            |p: &str| format!("{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{p}}}");
        assert_eq!(code(&s.handle_raw(call("{}").as_bytes()).await), INVALID_PARAMS);
        assert_eq!(code(&s.handle_raw(call("{\"name\":\"nosuch\"}").as_bytes()).await), INVALID_PARAMS);
        // Arguments of the wrong shape are the tool's `invalid_request`, as a result.
        for args in ["5", "\"x\"", "[1]", "{\"x\":\"one\"}"] {
            let answer =
                s.handle_raw(call(&format!("{{\"name\":\"echo\",\"arguments\":{args}}}")).as_bytes()).await;
            let r = &answer.as_ref().unwrap()["result"];
            assert_eq!(r["isError"], true, "{args}: {answer:?}");
            assert_eq!(r["structuredContent"]["class"], "invalid_request", "{args}: {answer:?}");
        }
    }

    #[tokio::test]
    async fn initialize_answers_a_known_revision_in_kind_and_any_other_with_ours() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path()).await;
        let init = |v: &str| {
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                   "params": {"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
        };
        let answer = s.handle(init("2025-06-18")).await.unwrap();
        assert_eq!(answer["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(answer["result"]["capabilities"]["tools"]["listChanged"], false);
        let answer = s.handle(init("2099-01-01")).await.unwrap();
        assert_eq!(answer["result"]["protocolVersion"], PROTOCOL_VERSION);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdio_answers_each_request_on_its_own_line_and_stops_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path()).await;
        let input = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n\n{broken\n\
                      {\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n\
                      {\"jsonrpc\":\"2.0\",\"id\":\"b\",\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"x\":1}}}\n";
        let (out, mut read) = tokio::io::duplex(1 << 16);
        serve_stdio(s, &input[..], out).await.unwrap();
        let mut text = String::new();
        read.read_to_string(&mut text).await.unwrap();
        let answers: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(answers.len(), 3, "{text}");
        let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("{text}"));
        assert_eq!(by_id(json!(1))["result"], json!({}));
        assert_eq!(by_id(Value::Null)["error"]["code"], PARSE_ERROR);
        assert_eq!(by_id(json!("b"))["result"]["isError"], false, "{text}");
    }
}
