//! A streamable-HTTP MCP server, through Keel's one HTTP stack (`keel-http`): each
//! message is one POST, answered with JSON or with an event stream (whose progress
//! notifications keep the request alive until its answer arrives).

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Full};
use keel_core::{ErrorClass, Failure};
use serde_json::{Value, json};

use super::{MAX_MESSAGE, RpcError, Timeouts};

/// How an HTTP server is reached.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The endpoint.
    pub url: http::Uri,
    /// Headers sent with every message (values may be secrets).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The process's client for the server's TLS settings.
    pub client: keel_http::Client,
}

const SESSION: &str = "mcp-session-id";

/// One session with a server.
pub(crate) struct Conn {
    name: String,
    spec: Spec,
    /// The revision agreed by `initialize` (legacy servers).
    version: Mutex<Option<String>>,
    /// The legacy session id a server gave at `initialize`.
    session_id: Mutex<Option<HeaderValue>>,
    /// Whether the server speaks the stateless revision.
    pub(crate) modern: AtomicBool,
}

impl Conn {
    pub(crate) fn new(name: &str, spec: &Spec) -> Conn {
        Conn {
            name: name.to_owned(),
            spec: spec.clone(),
            version: Mutex::new(None),
            session_id: Mutex::new(None),
            modern: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_version(&self, version: &str) {
        if let Ok(mut v) = self.version.lock() {
            *v = Some(version.to_owned());
        }
    }

    fn request_of(
        &self,
        message: &Value,
        method: &str,
        name: Option<&str>,
    ) -> Result<http::Request<Full<Bytes>>, Failure> {
        let mut req = http::Request::post(self.spec.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        for (k, v) in &self.spec.headers {
            req = req.header(k, v);
        }
        let modern = self.modern.load(std::sync::atomic::Ordering::Relaxed)
            || message.pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion").is_some();
        if modern {
            req = req.header("mcp-protocol-version", super::MODERN_VERSION).header("mcp-method", method);
            if let Some(name) = name.and_then(|n| HeaderValue::from_str(n).ok()) {
                req = req.header("mcp-name", name);
            }
        } else if let Some(v) = self.version.lock().ok().and_then(|v| v.clone()) {
            req = req.header("mcp-protocol-version", v);
        }
        if let Some(id) = self.session_id.lock().ok().and_then(|s| s.clone()) {
            req = req.header(SESSION, id);
        }
        req.body(Full::new(Bytes::from(serde_json::to_vec(message).unwrap_or_default()))).map_err(|e| {
            Failure::new(
                ErrorClass::InvalidRequest,
                format!("MCP server `{}`: cannot build a request: {e}", self.name),
            )
        })
    }

    /// Sends a notification; its answer (202) is not waited for beyond the send.
    pub(crate) async fn notify(&self, method: &str, params: Value) {
        let msg = json!({ "jsonrpc": "2.0", "method": method, "params": params });
        if let Ok(req) = self.request_of(&msg, method, None) {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.spec.client.send(req)).await;
        }
    }

    /// One request: a JSON answer, or the event stream read until the answer.
    pub(crate) async fn request(
        &self,
        id: u64,
        method: &str,
        params: Value,
        t: Timeouts,
    ) -> Result<Value, RpcError> {
        let tool =
            params.get("name").and_then(Value::as_str).filter(|_| method == "tools/call").map(str::to_owned);
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let req = self.request_of(&msg, method, tool.as_deref()).map_err(RpcError::Transport)?;
        let uri = req.uri().clone();
        let sent = tokio::time::timeout(t.request, self.spec.client.send(req)).await;
        let resp = match sent {
            Err(_) => return Err(RpcError::Transport(super::timed_out(&self.name, method, t))),
            Ok(r) => r.map_err(RpcError::Transport)?,
        };
        let status = resp.status();
        let had_session = self.session_id.lock().ok().is_some_and(|s| s.is_some());
        if status == http::StatusCode::NOT_FOUND && had_session {
            return Err(RpcError::SessionGone);
        }
        if method == "initialize" {
            if let (Some(sid), Ok(mut slot)) = (resp.headers().get(SESSION).cloned(), self.session_id.lock())
            {
                *slot = Some(sid);
            }
        }
        let is_stream = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !status.is_success() {
            let class = keel_core::classify::http_status(status).unwrap_or(ErrorClass::ServerError);
            let body = keel_http::read_body(resp.into_body(), 64 << 10, &uri).await.unwrap_or_default();
            // A JSON-RPC error in the body says more than the status.
            if let Some(err) =
                serde_json::from_slice::<Value>(&body).ok().filter(|m| m.get("error").is_some())
            {
                return super::answer_of(err);
            }
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            return Err(RpcError::Transport(Failure::new(
                class,
                format!("MCP server `{}` answered {status}: {}", self.name, text.trim()),
            )));
        }
        if !is_stream {
            let body =
                tokio::time::timeout(t.request, keel_http::read_body(resp.into_body(), MAX_MESSAGE, &uri))
                    .await
                    .map_err(|_| RpcError::Transport(super::timed_out(&self.name, method, t)))?
                    .map_err(RpcError::Transport)?;
            let answer: Value = serde_json::from_slice(&body).map_err(|e| {
                RpcError::Transport(Failure::new(
                    ErrorClass::ServerError,
                    format!("MCP server `{}` answered what is not JSON: {e}", self.name),
                ))
            })?;
            return super::answer_of(answer);
        }
        // The event stream: the answer to `id`, with progress along the way.
        let mut body = resp.into_body();
        let mut parser = keel_gateway::stream::SseParser::default();
        let mut events = Vec::new();
        let mut read = 0usize;
        let total = super::later(t.total);
        loop {
            let quiet = super::later(t.request).min(total);
            let frame = match tokio::time::timeout_at(quiet, body.frame()).await {
                Err(_) => {
                    return Err(RpcError::Transport(super::timed_out(&self.name, method, t)));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let host = uri.host().unwrap_or("the server").to_owned();
                    return Err(RpcError::Transport(keel_http::transport_failure(
                        &e,
                        &host,
                        keel_http::Stage::Body,
                    )));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            read = read.saturating_add(data.len());
            if read > MAX_MESSAGE.saturating_mul(4) {
                return Err(RpcError::Transport(Failure::new(
                    ErrorClass::ServerError,
                    format!("MCP server `{}`: its event stream is over {} bytes", self.name, MAX_MESSAGE * 4),
                )));
            }
            parser.feed(&data, &mut events);
            for event in events.drain(..) {
                let Ok(msg) = serde_json::from_str::<Value>(&event.data) else { continue };
                let answered = std::cell::RefCell::new(None);
                // Requests from the server on this stream get no answer here: the
                // stateless revision has none, and Keel offers none to older ones.
                let keep = |got: u64, m: Value| {
                    if got == id {
                        *answered.borrow_mut() = Some(m);
                    }
                };
                let _ = super::dispatch(&msg, &keep, &|_| {});
                if let Some(answer) = answered.into_inner() {
                    return super::answer_of(answer);
                }
            }
        }
        Err(RpcError::Transport(Failure::new(
            ErrorClass::Network,
            format!("MCP server `{}` ended its event stream before answering `{method}`", self.name),
        )))
    }
}
