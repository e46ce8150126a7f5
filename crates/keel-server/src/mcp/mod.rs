//! Keel as an MCP server: `/mcp` on `keel serve` (streamable HTTP) and `keel mcp`
//! (stdio) expose keel.toml's tools with their JSON Schemas, and every `tools/call`
//! goes through [`keel_runtime::invoke`] — the tool's policy pipeline, the idempotency
//! store, the approval rule, the loop guard — journaled like `/api/tools/{name}/invoke`.
//!
//! Two eras on one endpoint. The stateless revision 2026-07-28 ([`envelope`]): every
//! request carries its protocol version and the client's capabilities in `_meta`, no
//! `initialize`; `server/discover`, `tools/list`, `tools/call`, results tagged
//! `resultType`, on HTTP the `MCP-Protocol-Version`/`Mcp-Method`/`Mcp-Name` headers
//! checked against the body (`-32020`), an unknown version refused with the supported
//! ones (`-32022`). The handshake revisions 2025-11-25 (2025-06-18 and 2025-03-26
//! answered in kind): `initialize`, `ping`, `tools/list`, `tools/call`, and the
//! `notifications/*` a client sends. A request naming a version in `_meta` is served
//! as 2026-07-28, any other as before. JSON-RPC is handled here by hand: the surface is
//! a handful of methods, and it keeps the server stateless — no `Mcp-Session-Id`,
//! nothing kept between requests, so any instance on the same journal answers any
//! request.
//!
//! The idempotency key of a call is the client's, when it passes one in
//! `_meta["keel/idempotencyKey"]`; otherwise, for a write-like tool, one derived from
//! the tool and its canonical arguments (MCP clients mint a new request id on every
//! retry, so request ids are never the key). A retried call with the same arguments
//! is answered from the first call's run: it never acts twice.
//!
//! Tool failures are tool results with `isError` and the error class, never protocol
//! errors. A call that needs approval answers at once (it never hangs). To a
//! 2026-07-28 client that can show a form, with the spec's input-required result
//! ([`approval`]): a form telling the person what waits and which approval, and a
//! `requestState` the retry echoes, checked against the call and the journal — the
//! client's "accept" never counts as approval. To any other client, with an `isError`
//! result naming the approval and how to poll. Either way the approval in Keel's
//! journal stays the authority: calling again with the same arguments (or key) once it
//! is decided returns the result (or `approval_denied`).

mod approval;
pub mod envelope;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_core::{Classified as _, Disposition, ErrorClass};
use keel_runtime::config::Role;
use keel_runtime::runner::{Error as RunnerError, new_id};
use keel_runtime::{Call, Config, InvokeError, Invoker, Outcome};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};

use self::approval::Answer;
use self::envelope::{Envelope, RpcError, SERVER_INFO_META};
pub use self::envelope::{HANDSHAKE_VERSIONS, MODERN_VERSION, SUPPORTED_VERSIONS};
use crate::AppState;
use crate::auth::Caller;

/// The handshake revision this server speaks, answered to `initialize` clients asking
/// for another.
pub const PROTOCOL_VERSION: &str = "2025-11-25";

/// The `_meta` key under which a client passes its own idempotency key.
pub const IDEMPOTENCY_META_KEY: &str = "keel/idempotencyKey";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

const INSTRUCTIONS: &str = "Tools called through Keel run under its policies (timeouts, retries, \
    idempotency, approvals, loop guard). A write-like call repeated with the same arguments is \
    answered from the first; a call that needs approval answers at once: with a form naming the \
    approval (2026-07-28 clients that declare elicitation) or with the approval's id. Call again \
    with the same arguments once it is decided.";

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
        let answered = match envelope::era(method, &params) {
            None => self.handle_handshake_era(method, &params).await,
            Some(Err(e)) => Err(e),
            Some(Ok(env)) => self.handle_modern(method, &params, &env).await.map(stamp),
        };
        Some(match answered {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(e) => e.response(id),
        })
    }

    /// A request of the handshake era (2025-11-25 and before).
    async fn handle_handshake_era(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        match method {
            "initialize" => Ok(initialize(params)),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(self.list_tools()),
            "tools/call" => self.call_tool(params, None).await,
            "server/discover" => Err(RpcError::invalid_params(format!(
                "server/discover needs `_meta[\"{}\"]`",
                envelope::PROTOCOL_VERSION_META
            ))),
            other => Err(not_found(other)),
        }
    }

    /// A 2026-07-28 request, its envelope checked.
    async fn handle_modern(&self, method: &str, params: &Value, env: &Envelope) -> Result<Value, RpcError> {
        match method {
            "server/discover" => Ok(json!({
                "supportedVersions": SUPPORTED_VERSIONS,
                "capabilities": { "tools": {} },
                "instructions": INSTRUCTIONS,
                // keel.toml's tools are the same for every agent key, but a restart may
                // change them: never served from a cache.
                "ttlMs": 0,
                "cacheScope": "private",
            })),
            "tools/list" => {
                let mut tools = self.list_tools();
                tools["ttlMs"] = json!(0);
                tools["cacheScope"] = json!("private");
                Ok(tools)
            }
            "tools/call" => self.call_tool(params, Some(env)).await,
            // `ping` and `initialize` are gone in 2026-07-28; the rest is not served.
            other => Err(not_found(other)),
        }
    }

    /// The input schema `tools/call` of this request's tool declares (for its
    /// `Mcp-Param-*` headers).
    fn param_schema(&self, params: &Value) -> Option<&Value> {
        let name = params.get("name")?.as_str()?;
        self.config.tools.get(name)?.params_schema.as_ref()
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

    /// `tools/call`: one invocation, its outcome as a tool result. `modern`: the
    /// 2026-07-28 envelope, whose client may be asked to wait for an approval.
    async fn call_tool(&self, params: &Value, modern: Option<&Envelope>) -> Result<Value, RpcError> {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return Err(RpcError::invalid_params("tools/call needs `name`"));
        };
        let Some(tool) = self.config.tools.get(name) else {
            return Err(RpcError::invalid_params(format!("unknown tool: `{}`", envelope::clip(name))));
        };
        let arguments = params.get("arguments").cloned().unwrap_or(Value::Null);
        let client_key = params
            .get("_meta")
            .and_then(|m| m.get(IDEMPOTENCY_META_KEY))
            .and_then(Value::as_str)
            // A blank key is no key, for the invoker too.
            .filter(|k| !k.trim().is_empty())
            .map(str::to_owned);
        let mut key = client_key.clone();
        let mut minted = false;
        let mut answer = None;
        // What the invoker digests: `null` arguments are `{}`.
        let normalized = if arguments.is_null() { json!({}) } else { arguments.clone() };
        if modern.is_some() {
            answer = approval::answer(params)?;
            match params.get("requestState") {
                None | Some(Value::Null) => {
                    // A read-only call without a key gets one of its own, so that a retry
                    // carrying its state finds its run (and its approval) again.
                    if key.is_none() && !tool.write {
                        key = Some(new_id("mcp"));
                        minted = true;
                    }
                }
                Some(Value::String(text)) => {
                    let state =
                        approval::State::decode(text).ok_or_else(|| approval::stale("it does not parse"))?;
                    key = state.check(name, tool.write, &normalized, client_key.as_deref())?;
                    match self.invoker.runner().snapshot(&state.run).await {
                        Ok(snap) if snap.approvals.iter().any(|a| a.approval_id == state.approval) => {}
                        Ok(_) | Err(RunnerError::UnknownRun(_)) => {
                            return Err(approval::stale("its run holds no such approval"));
                        }
                        Err(e) => return Ok(failed(e.class(), &e.to_string(), json!({}))),
                    }
                }
                Some(_) => return Err(RpcError::invalid_params("`requestState` must be a string")),
            }
        }
        let call = Call {
            tool: name.to_owned(),
            params: arguments,
            key: key.clone(),
            wait: None,
            caller: self.caller.clone(),
            minted,
        };
        match self.invoker.invoke(call).await {
            Ok(Outcome::WaitingApproval { run_id, approval_id, .. })
                if modern.is_some_and(|env| env.elicit_form) && answer != Some(Answer::StopWaiting) =>
            {
                let digest = keel_runtime::runner::args_digest(name, &normalized);
                let state =
                    approval::State { run: run_id.clone(), approval: approval_id.clone(), digest, key };
                Ok(approval::input_required(name, &normalized, &run_id, &approval_id, &state))
            }
            Ok(outcome) => Ok(tool_result(&outcome)),
            Err(InvokeError::UnknownTool(t)) => {
                Err(RpcError::invalid_params(format!("unknown tool: `{}`", envelope::clip(&t))))
            }
            // Even the journal's failures: a tool result with the class, so the agent
            // sees `retryable` and may call again with the same arguments.
            Err(e) => Ok(failed(e.class(), &e.to_string(), json!({}))),
        }
    }
}

/// A 2026-07-28 result: tagged `complete` unless it says otherwise, and naming this
/// server in `_meta`.
fn stamp(mut result: Value) -> Value {
    if let Value::Object(r) = &mut result {
        r.entry("resultType").or_insert_with(|| json!("complete"));
        let meta = r.entry("_meta").or_insert_with(|| json!({}));
        if let Value::Object(meta) = meta {
            meta.insert(
                SERVER_INFO_META.to_owned(),
                json!({ "name": "keel", "version": env!("CARGO_PKG_VERSION") }),
            );
        }
    }
    result
}

fn not_found(method: &str) -> RpcError {
    RpcError::new(METHOD_NOT_FOUND, format!("method `{}` is not served here", envelope::clip(method)))
}

/// `initialize`: the client's revision when it is one of ours, else ours.
fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str).unwrap_or(PROTOCOL_VERSION);
    let version = if HANDSHAKE_VERSIONS.contains(&asked) { asked } else { PROTOCOL_VERSION };
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
    if let Some(refused) = check_origin(&headers) {
        return Ok(refused);
    }
    let server = McpServer::new(s.invoker()).for_caller(&caller.name);
    let (status, answer) = server.answer_http(&headers, &body).await;
    Ok(match answer {
        Some(answer) => (status, Json(answer)).into_response(),
        None => status.into_response(),
    })
}

impl McpServer {
    /// One POST body with its headers: the status and the answer (`None` for a
    /// notification, 202).
    ///
    /// A 2026-07-28 request's headers must mirror its body (400, `-32020`); its
    /// answer's status follows the spec (400 for a malformed or unsupported request,
    /// 404 for an unknown method). A handshake-era request is answered as before: 200,
    /// 400 for a body that is not JSON or a version header this server does not speak.
    pub async fn answer_http(&self, headers: &HeaderMap, body: &[u8]) -> (StatusCode, Option<Value>) {
        let msg = match serde_json::from_slice::<Value>(body) {
            Ok(msg) => msg,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Some(error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}"))),
                );
            }
        };
        let id = msg.get("id").cloned();
        let method = msg.get("method").and_then(Value::as_str);
        let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
        let modern = match (&id, method) {
            (Some(_), Some(method)) => envelope::era(method, &params).is_some(),
            _ => false,
        };
        if modern {
            let method = method.unwrap_or_default();
            if let Err(e) = envelope::check_headers(headers, method, &params, self.param_schema(&params)) {
                return (StatusCode::BAD_REQUEST, Some(e.response(id.unwrap_or_default())));
            }
        } else if let Some(refused) = check_handshake_version(headers, id.is_some() && method.is_some()) {
            return (StatusCode::BAD_REQUEST, Some(refused));
        }
        match self.handle(msg).await {
            Some(answer) if modern => (envelope::http_status(&answer), Some(answer)),
            Some(answer) => (StatusCode::OK, Some(answer)),
            None => (StatusCode::ACCEPTED, None),
        }
    }
}

/// `GET` and `DELETE /mcp`: this server offers no server-initiated stream and keeps
/// no session to end.
pub async fn not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}

/// Refuses a request from a browser page of another origin (DNS rebinding).
fn check_origin(headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())?;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    if origin_host == host {
        return None;
    }
    let body = error(
        Value::Null,
        INVALID_REQUEST,
        &format!("origin `{}` may not call this server", envelope::clip(origin)),
    );
    Some((StatusCode::FORBIDDEN, Json(body)).into_response())
}

/// Refuses a handshake-era message naming a revision this server does not speak in
/// its `MCP-Protocol-Version` header — or, for a request, naming 2026-07-28 while its
/// body carries no version in `_meta` (the header and the body disagree).
fn check_handshake_version(headers: &HeaderMap, request: bool) -> Option<Value> {
    let v = headers.get("mcp-protocol-version")?;
    let v = v.to_str().unwrap_or("");
    if v == MODERN_VERSION {
        if !request {
            return None;
        }
        return Some(error(
            Value::Null,
            envelope::HEADER_MISMATCH,
            &format!(
                "the MCP-Protocol-Version header says {MODERN_VERSION}, but the body carries no \
                 `_meta[\"{}\"]`",
                envelope::PROTOCOL_VERSION_META
            ),
        ));
    }
    if HANDSHAKE_VERSIONS.contains(&v) {
        return None;
    }
    Some(error(
        Value::Null,
        INVALID_REQUEST,
        &format!(
            "unsupported MCP-Protocol-Version `{}`; supported: {}",
            envelope::clip(v),
            SUPPORTED_VERSIONS.join(", ")
        ),
    ))
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
