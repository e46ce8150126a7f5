//! Keel as an MCP client: `[mcp_servers.NAME]` in keel.toml. Keel starts a stdio
//! server (a clean environment: no secret of Keel's reaches it) or connects to a
//! streamable-HTTP one, lists its tools and offers each as a tool of its own,
//! `PREFIX_TOOL`, called like any other: the tool's policy pipeline (timeout, retry,
//! breaker), idempotency keys for write-like tools, approvals, the loop guard, the
//! journal.
//!
//! - **Versions.** Keel asks `server/discover` first: a server speaking the
//!   stateless revision (2026-07-28) gets every request with its version and
//!   capabilities in `_meta` (and, over HTTP, the `MCP-Protocol-Version`,
//!   `Mcp-Method` and `Mcp-Name` headers); any other answer means an older server,
//!   which gets the `initialize` handshake (2025-11-25).
//! - **Write-like or not** comes from the tool's annotations, as the protocol
//!   defines them: a tool is read-only only when it says `readOnlyHint: true`;
//!   `read_only`/`write` override. `approval = "writes"` or `"destructive"`
//!   (`destructiveHint`, true by default) asks a person before such calls.
//! - **Time.** A request waits at most `request_timeout` for an answer or a progress
//!   notification (each one starts the wait again) and `max_request_time` in all;
//!   past either, Keel sends `notifications/cancelled` and the attempt is a
//!   `timeout`.
//! - **Crashes.** A stdio server that exits is started again on the next call after
//!   a backoff (`restart_backoff`, doubling per crash in a row up to `restart_max`);
//!   meanwhile its tools answer `circuit_open` at once. Calls in flight when it died
//!   are `network` failures (the tool's retry decides).
//! - **Errors.** A JSON-RPC error is classified by its code; a tool result with
//!   `isError` by the class it names (a Keel upstream's `structuredContent.class`),
//!   else by its text through the server's `classify` rules (as a command's stderr).
//!
//! JSON-RPC is written by hand here, as in the MCP server (`keel-server`'s
//! `mcp.rs`): the client needs five methods, and its HTTP must be Keel's one stack
//! (`keel-http`: TLS, proxies, the pool), which `rmcp`'s transports are not.

mod http;
mod stdio;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::classify::{CommandClassifier, CommandExit};
use keel_core::{ErrorClass, Failure, PolicyConfig};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::config::raw::McpApproval;
use crate::config::{ApprovalRule, FixedApproval};
use crate::tool::{Tool, ToolKind};

/// The stateless revision, asked for first.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The revision of the `initialize` handshake, for servers that do not discover.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// The `_meta` key carrying a write-like call's idempotency key (as Keel's own MCP
/// server reads it).
pub const IDEMPOTENCY_META_KEY: &str = "keel/idempotencyKey";
/// The largest message read from a server; a larger one ends the connection.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;
/// The least a server's start (its first answer) is given, whatever `request_timeout`.
const START_TIME: Duration = Duration::from_secs(30);
/// The most tools taken from one server (pages of `tools/list` included).
const MAX_TOOLS: usize = 1000;

/// How a server is reached.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A program Keel starts, speaking newline-delimited JSON-RPC on stdin/stdout.
    Stdio(stdio::Spec),
    /// A streamable-HTTP endpoint.
    Http(http::Spec),
}

pub use http::Spec as HttpSpec;
pub use stdio::Spec as StdioSpec;

/// What a server's tools become in Keel.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Offered as `PREFIX_TOOL` (`TOOL` when empty).
    pub prefix: String,
    /// Only these, when set.
    pub only: Option<BTreeSet<String>>,
    /// Read-only whatever their annotations say.
    pub read_only: BTreeSet<String>,
    /// Write-like whatever their annotations say.
    pub write: BTreeSet<String>,
    /// Which calls ask a person first.
    pub approval: McpApproval,
    /// The policy of every tool of the server.
    pub policy: PolicyConfig,
}

/// Waits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Without an answer or a progress notification for this long, the request fails.
    pub request: Duration,
    /// The longest a request takes, progress or not.
    pub total: Duration,
}

/// The restart backoff of a stdio server.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The wait after the first crash.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `crashes` crashes in a row (≥ 1).
    fn after(self, crashes: u32) -> Duration {
        let doublings = crashes.saturating_sub(1).min(30);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

/// One `[mcp_servers.NAME]`: its settings and its live connection.
pub struct McpUpstream {
    /// The server's name in keel.toml.
    pub name: String,
    transport: Transport,
    /// What its tools become.
    pub offer: Offer,
    timeouts: Timeouts,
    backoff: Backoff,
    classifier: CommandClassifier,
    link: tokio::sync::Mutex<Link>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for McpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers and environment may hold secrets: only the name and the kind.
        let kind = match &self.transport {
            Transport::Stdio(_) => "stdio",
            Transport::Http(_) => "http",
        };
        f.debug_struct("McpUpstream")
            .field("name", &self.name)
            .field("transport", &kind)
            .finish_non_exhaustive()
    }
}

/// The state of the connection.
struct Link {
    session: Option<Session>,
    /// Crashes in a row (reset by a call that succeeds on a new session).
    crashes: u32,
    /// No start before this instant (after a crash).
    retry_at: Option<Instant>,
    /// Why the last session ended.
    reason: String,
}

/// One live connection.
#[derive(Clone)]
enum Session {
    Stdio(Arc<stdio::Conn>),
    Http(Arc<http::Conn>),
}

/// How a request failed.
#[derive(Debug)]
pub(crate) enum RpcError {
    /// The connection failed, or the wait ran out: a classified failure.
    Transport(Failure),
    /// The server answered a JSON-RPC error.
    Rpc { code: i64, message: String },
    /// An HTTP server no longer knows the session (404 with `Mcp-Session-Id`).
    SessionGone,
}

impl Session {
    fn alive(&self) -> bool {
        match self {
            Session::Stdio(c) => c.alive(),
            Session::Http(_) => true,
        }
    }

    fn modern(&self) -> bool {
        match self {
            Session::Stdio(c) => c.modern.load(Ordering::Relaxed),
            Session::Http(c) => c.modern.load(Ordering::Relaxed),
        }
    }

    fn set_modern(&self) {
        match self {
            Session::Stdio(c) => c.modern.store(true, Ordering::Relaxed),
            Session::Http(c) => c.modern.store(true, Ordering::Relaxed),
        }
    }

    /// One request, its id its progress token (both transports route progress by it).
    async fn request(&self, id: u64, method: &str, params: Value, t: Timeouts) -> Result<Value, RpcError> {
        let mut params = params;
        if let Some(meta) = params.as_object_mut().map(|o| o.entry("_meta").or_insert_with(|| json!({}))) {
            if let Some(meta) = meta.as_object_mut() {
                meta.insert("progressToken".into(), json!(id));
            }
        }
        match self {
            Session::Stdio(c) => c.request(id, method, params, t).await,
            Session::Http(c) => Box::pin(c.request(id, method, params, t)).await,
        }
    }
}

/// A tool as a server lists it.
#[derive(Debug, Clone)]
pub struct RemoteTool {
    /// Its name on the server.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Its parameters' JSON Schema.
    pub input_schema: Value,
    /// `annotations.readOnlyHint` (false when absent).
    pub read_only_hint: bool,
    /// `annotations.destructiveHint` (true when absent).
    pub destructive_hint: bool,
}

/// The `_meta` of a request in the stateless revision.
pub(crate) fn modern_meta() -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert("io.modelcontextprotocol/protocolVersion".into(), json!(MODERN_VERSION));
    meta.insert("io.modelcontextprotocol/clientCapabilities".into(), json!({}));
    meta.insert("io.modelcontextprotocol/clientInfo".into(), client_info());
    meta
}

pub(crate) fn client_info() -> Value {
    json!({ "name": "keel", "version": env!("CARGO_PKG_VERSION") })
}

/// The class of a JSON-RPC error code.
pub(crate) fn rpc_class(code: i64) -> ErrorClass {
    match code {
        // Parse error, invalid request, invalid params, unsupported version, header
        // mismatch: the same request fails again.
        -32700 | -32600 | -32602 | -32022 | -32020 => ErrorClass::InvalidRequest,
        -32601 => ErrorClass::NotFound,
        _ => ErrorClass::ServerError,
    }
}

impl McpUpstream {
    /// A server not yet started; nothing runs until the first request.
    pub fn new(
        name: String,
        transport: Transport,
        offer: Offer,
        timeouts: Timeouts,
        backoff: Backoff,
        classifier: CommandClassifier,
    ) -> Self {
        Self {
            name,
            transport,
            offer,
            timeouts,
            backoff,
            classifier,
            link: tokio::sync::Mutex::new(Link {
                session: None,
                crashes: 0,
                retry_at: None,
                reason: String::new(),
            }),
            next_id: AtomicU64::new(1),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The live session, started (or restarted, after its backoff) when needed.
    async fn session(&self) -> Result<Session, Failure> {
        let mut link = self.link.lock().await;
        if let Some(s) = &link.session {
            if s.alive() {
                return Ok(s.clone());
            }
            let reason = match s {
                Session::Stdio(c) => c.exit_reason(),
                Session::Http(_) => String::new(),
            };
            link.session = None;
            link.crashes = link.crashes.saturating_add(1);
            link.retry_at = Some(Instant::now() + self.backoff.after(link.crashes));
            link.reason = reason;
        }
        if let Some(at) = link.retry_at {
            let now = Instant::now();
            if now < at {
                let wait = at - now;
                return Err(Failure::new(
                    ErrorClass::CircuitOpen,
                    format!(
                        "MCP server `{}` is down ({}); it is started again in {}",
                        self.name,
                        if link.reason.is_empty() { "it exited" } else { &link.reason },
                        humantime::format_duration(Duration::from_millis(
                            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
                        ))
                    ),
                ));
            }
        }
        match self.start().await {
            Ok(s) => {
                link.session = Some(s.clone());
                link.retry_at = None;
                Ok(s)
            }
            Err(f) => {
                if matches!(self.transport, Transport::Stdio(_)) {
                    link.crashes = link.crashes.saturating_add(1);
                    link.retry_at = Some(Instant::now() + self.backoff.after(link.crashes));
                    link.reason = format!("it failed to start: {}", f.message);
                }
                Err(f)
            }
        }
    }

    /// Starts a session: `server/discover`, else the `initialize` handshake.
    async fn start(&self) -> Result<Session, Failure> {
        let fail = |e: RpcError, what: &str| match e {
            RpcError::Transport(f) => f,
            RpcError::Rpc { code, message } => Failure::new(
                rpc_class(code),
                format!("MCP server `{}` refused {what}: {message} (code {code})", self.name),
            ),
            RpcError::SessionGone => {
                Failure::new(ErrorClass::ServerError, format!("MCP server `{}` lost its session", self.name))
            }
        };
        let session = match &self.transport {
            Transport::Stdio(spec) => Session::Stdio(Arc::new(stdio::Conn::spawn(&self.name, spec)?)),
            Transport::Http(spec) => Session::Http(Arc::new(http::Conn::new(&self.name, spec))),
        };
        // A program's start (an interpreter loading its packages) may take longer than
        // one request is allowed.
        let starting = Timeouts {
            request: self.timeouts.request.max(START_TIME),
            total: self.timeouts.total.max(START_TIME),
        };
        let discover = json!({ "_meta": modern_meta() });
        let modern = match session.request(self.id(), "server/discover", discover, starting).await {
            Ok(result) => result
                .get("supportedVersions")
                .and_then(Value::as_array)
                .is_some_and(|v| v.iter().any(|v| v.as_str() == Some(MODERN_VERSION))),
            Err(RpcError::Transport(f)) if matches!(session, Session::Stdio(_)) => return Err(f),
            Err(_) => false,
        };
        if modern {
            session.set_modern();
            return Ok(session);
        }
        let init = json!({
            "protocolVersion": LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": client_info(),
        });
        let answer = session
            .request(self.id(), "initialize", init, starting)
            .await
            .map_err(|e| fail(e, "initialize"))?;
        let version = answer.get("protocolVersion").and_then(Value::as_str).unwrap_or(LEGACY_VERSION);
        match &session {
            Session::Stdio(c) => c.notify("notifications/initialized", json!({})).await,
            Session::Http(c) => {
                c.set_version(version);
                c.notify("notifications/initialized", json!({})).await;
            }
        }
        Ok(session)
    }

    /// One request on the live session; a session an HTTP server forgot is started
    /// again once.
    async fn request(&self, method: &str, params: Value) -> Result<Value, Failure> {
        for _ in 0..2 {
            let session = self.session().await?;
            let mut params = params.clone();
            if session.modern() {
                if let Some(obj) = params.as_object_mut() {
                    let meta = obj.entry("_meta").or_insert_with(|| json!({}));
                    if let Some(meta) = meta.as_object_mut() {
                        meta.extend(modern_meta());
                    }
                }
            }
            match session.request(self.id(), method, params, self.timeouts).await {
                Ok(result) => {
                    let mut link = self.link.lock().await;
                    link.crashes = 0;
                    return Ok(result);
                }
                Err(RpcError::SessionGone) => {
                    self.link.lock().await.session = None;
                }
                Err(RpcError::Transport(f)) => return Err(f),
                Err(RpcError::Rpc { code, message }) => {
                    return Err(Failure::new(
                        rpc_class(code),
                        format!("MCP server `{}`: {message} (JSON-RPC error {code})", self.name),
                    ));
                }
            }
        }
        Err(Failure::new(
            ErrorClass::ServerError,
            format!("MCP server `{}` keeps losing its session", self.name),
        ))
    }

    /// Every tool the server lists (all pages), at most [`MAX_TOOLS`].
    ///
    /// # Errors
    /// The failure of starting the server or of a `tools/list`.
    pub async fn list_tools(&self) -> Result<Vec<RemoteTool>, Failure> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let page = self.request("tools/list", params).await?;
            for t in page.get("tools").and_then(Value::as_array).into_iter().flatten() {
                let Some(name) = t.get("name").and_then(Value::as_str) else { continue };
                let hint = |k: &str| t.get("annotations").and_then(|a| a.get(k)).and_then(Value::as_bool);
                tools.push(RemoteTool {
                    name: name.to_owned(),
                    description: t.get("description").and_then(Value::as_str).unwrap_or("").to_owned(),
                    input_schema: t.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object"})),
                    read_only_hint: hint("readOnlyHint").unwrap_or(false),
                    destructive_hint: hint("destructiveHint").unwrap_or(true),
                });
                if tools.len() >= MAX_TOOLS {
                    return Ok(tools);
                }
            }
            match page.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() && cursor.as_deref() != Some(next) => {
                    cursor = Some(next.to_owned())
                }
                _ => return Ok(tools),
            }
        }
    }

    /// Calls `tool` with `args`: the result as `{ text, content, structured }` —
    /// `text` the text items joined, `structured` the `structuredContent` (or the
    /// text read as JSON when it is an object or an array), `content` as sent.
    ///
    /// # Errors
    /// A classified [`Failure`]: the transport's, a JSON-RPC error's, or an `isError`
    /// result's.
    pub async fn call(&self, tool: &str, args: &Value, key: Option<&str>) -> Result<Value, Failure> {
        let mut params = json!({ "name": tool, "arguments": args });
        if let Some(key) = key {
            params["_meta"] = json!({ IDEMPOTENCY_META_KEY: key });
        }
        let result = self.request("tools/call", params).await?;
        self.call_result(tool, result)
    }

    /// A `CallToolResult` as Keel's value, or its failure.
    fn call_result(&self, tool: &str, result: Value) -> Result<Value, Failure> {
        let content = result.get("content").cloned().unwrap_or_else(|| json!([]));
        let text: Vec<&str> = content
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|c| c.get("text").and_then(Value::as_str))
            .collect();
        let text = text.join("\n");
        // Many servers answer JSON as text: read it as the structured result when the
        // server gave none.
        let structured = match result.get("structuredContent") {
            Some(v) if !v.is_null() => v.clone(),
            _ => serde_json::from_str::<Value>(&text)
                .ok()
                .filter(|v| v.is_object() || v.is_array())
                .unwrap_or(Value::Null),
        };
        if result.get("resultType").and_then(Value::as_str) == Some("input_required") {
            return Err(Failure::new(
                ErrorClass::InvalidRequest,
                format!("`{tool}` of MCP server `{}` asks for input Keel cannot give: {text}", self.name),
            ));
        }
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            // A Keel upstream names the class; anything else is read like stderr.
            let named =
                structured.get("class").and_then(|c| serde_json::from_value::<ErrorClass>(c.clone()).ok());
            let shown = if text.is_empty() { "the tool failed".to_owned() } else { text };
            let shown: String = shown.chars().take(2000).collect();
            let class = named.unwrap_or_else(|| {
                self.classifier
                    .classify(CommandExit::Code(1), &shown)
                    .map_or(ErrorClass::ServerError, |f| f.class)
            });
            return Err(Failure::new(class, format!("`{tool}` of MCP server `{}`: {shown}", self.name)));
        }
        Ok(json!({ "text": text, "content": content, "structured": structured }))
    }

    /// The Keel tools for `remote`, each named `PREFIX_TOOL`.
    pub fn tools(self: &Arc<Self>, remote: &[RemoteTool]) -> Vec<Tool> {
        let offer = &self.offer;
        remote
            .iter()
            .filter(|t| offer.only.as_ref().is_none_or(|only| only.contains(&t.name)))
            .map(|t| {
                let write = if offer.write.contains(&t.name) {
                    true
                } else if offer.read_only.contains(&t.name) {
                    false
                } else {
                    !t.read_only_hint
                };
                let asks = match offer.approval {
                    McpApproval::Never => false,
                    McpApproval::Always => true,
                    McpApproval::Writes => write,
                    McpApproval::Destructive => write && t.destructive_hint,
                };
                let schema = if t.input_schema.is_object() {
                    t.input_schema.clone()
                } else {
                    json!({"type": "object"})
                };
                // A schema the validator cannot read is left to the server to check.
                let validator = jsonschema::validator_for(&schema).ok().map(Arc::new);
                let name = if offer.prefix.is_empty() {
                    t.name.clone()
                } else {
                    format!("{}_{}", offer.prefix, t.name)
                };
                Tool {
                    name: Arc::from(name.as_str()),
                    description: t.description.clone(),
                    write,
                    approval: ApprovalRule::Fixed(if asks {
                        FixedApproval::Always
                    } else {
                        FixedApproval::Never
                    }),
                    undo: None,
                    batch_param: None,
                    canary_above: None,
                    cost: None,
                    fallback: None,
                    policy: offer.policy.clone(),
                    params_schema: Some(schema),
                    validator,
                    kind: ToolKind::Mcp(McpTool { upstream: self.clone(), remote: t.name.clone() }),
                }
            })
            .collect()
    }
}

/// A tool of an MCP server, called through its [`McpUpstream`].
#[derive(Debug, Clone)]
pub struct McpTool {
    /// The server.
    pub upstream: Arc<McpUpstream>,
    /// The tool's name on the server.
    pub remote: String,
}

impl McpTool {
    /// One call.
    ///
    /// # Errors
    /// A classified [`Failure`].
    pub async fn call(&self, params: &Value, key: Option<&str>) -> Result<Value, Failure> {
        self.upstream.call(&self.remote, params, key).await
    }
}

/// `now + d`, or a day from now past what the clock can hold.
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(86_400))).unwrap_or(now)
}

/// Waits for `rx` while progress notifications keep the request alive: `None` when
/// no answer or progress came within `t.request`, or the answer not within `t.total`.
pub(crate) async fn wait<T>(
    rx: &mut tokio::sync::oneshot::Receiver<T>,
    progress: &tokio::sync::Notify,
    t: Timeouts,
) -> Option<Result<T, tokio::sync::oneshot::error::RecvError>> {
    let total = later(t.total);
    loop {
        let quiet = later(t.request).min(total);
        tokio::select! {
            r = &mut *rx => return Some(r),
            () = progress.notified() => {}
            () = tokio::time::sleep_until(quiet) => return None,
        }
    }
}

/// The failure of a request whose wait ran out.
pub(crate) fn timed_out(server: &str, method: &str, t: Timeouts) -> Failure {
    Failure::new(
        ErrorClass::Timeout,
        format!(
            "MCP server `{server}` did not answer `{method}` (no answer or progress within {}, at most {} in all)",
            humantime::format_duration(t.request),
            humantime::format_duration(t.total)
        ),
    )
}

/// A response's result, or its JSON-RPC error.
pub(crate) fn answer_of(msg: Value) -> Result<Value, RpcError> {
    if let Some(e) = msg.get("error") {
        return Err(RpcError::Rpc {
            code: e.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(msg.get("result").cloned().unwrap_or(Value::Null))
}

/// One message from a server: a response goes to `answer`, progress to `progress`;
/// the server's own request gets the returned reply (`ping` is answered, anything
/// else is a method this client does not offer).
pub(crate) fn dispatch(msg: &Value, answer: &dyn Fn(u64, Value), progress: &dyn Fn(u64)) -> Option<Value> {
    let id = msg.get("id");
    match msg.get("method").and_then(Value::as_str) {
        Some("notifications/progress") => {
            if let Some(token) =
                msg.get("params").and_then(|p| p.get("progressToken")).and_then(Value::as_u64)
            {
                progress(token);
            }
            None
        }
        Some(_) if id.is_none() => None,
        Some("ping") => Some(json!({ "jsonrpc": "2.0", "id": id, "result": {} })),
        Some(other) => Some(json!({
            "jsonrpc": "2.0", "id": id,
            "error": { "code": -32601, "message": format!("Keel's MCP client does not offer `{other}`") },
        })),
        None => {
            if let Some(id) = id.and_then(Value::as_u64) {
                if msg.get("result").is_some() || msg.get("error").is_some() {
                    answer(id, msg.clone());
                }
            }
            None
        }
    }
}
