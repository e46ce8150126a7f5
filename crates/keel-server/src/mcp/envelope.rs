//! The 2026-07-28 request envelope: the protocol version, the client's capabilities
//! and identity carried in every request's `_meta` (no `initialize`), and on HTTP the
//! `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*` headers that must
//! mirror the body (a proxy may route on them; Keel acts on the body).

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};

use super::{INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};

/// The stateless revision: served per request, with no handshake.
pub const MODERN_VERSION: &str = "2026-07-28";

/// The handshake revisions (`initialize`), newest first.
pub const HANDSHAKE_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// Every revision served, newest first: what `server/discover` and an
/// unsupported-version error list.
pub const SUPPORTED_VERSIONS: [&str; 4] = [MODERN_VERSION, "2025-11-25", "2025-06-18", "2025-03-26"];

/// `_meta` key: the request's protocol version.
pub const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key: the client's capabilities for this request.
pub const CLIENT_CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key: the client's name and version (display only).
pub const CLIENT_INFO_META: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key of a result: this server's name and version.
pub const SERVER_INFO_META: &str = "io.modelcontextprotocol/serverInfo";

/// HTTP headers that do not mirror the body, or a required one missing.
pub const HEADER_MISMATCH: i64 = -32020;
/// The request's protocol version is not served here.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

const VERSION_HEADER: &str = "mcp-protocol-version";
const METHOD_HEADER: &str = "mcp-method";
const NAME_HEADER: &str = "mcp-name";
const PARAM_HEADER_PREFIX: &str = "mcp-param-";

/// How much of a client's value an error echoes back.
const ECHO_MAX: usize = 64;

/// A JSON-RPC error to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The code.
    pub code: i64,
    /// What went wrong.
    pub message: String,
    /// Details (the supported versions, for -32022).
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with no data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), data: None }
    }

    /// `-32602`.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    fn mismatch(message: impl Into<String>) -> Self {
        Self::new(HEADER_MISMATCH, message)
    }

    /// The error as a JSON-RPC response to `id`.
    pub fn response(&self, id: Value) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(data) = &self.data {
            e["data"] = data.clone();
        }
        json!({"jsonrpc": "2.0", "id": id, "error": e})
    }
}

/// What a 2026-07-28 request says about its client.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The client can show a form to a person (`elicitation` declared, with `form`
    /// or empty, which means form).
    pub elicit_form: bool,
}

/// Which era a request belongs to: a request naming a protocol version in `_meta` is
/// a 2026-07-28 one (its envelope checked), anything else the handshake era's — and
/// `initialize` always is.
pub fn era(method: &str, params: &Value) -> Option<Result<Envelope, RpcError>> {
    if method == "initialize" {
        return None;
    }
    let meta = params.get("_meta")?.as_object()?;
    let version = meta.get(PROTOCOL_VERSION_META)?;
    Some(envelope(meta, version))
}

fn envelope(meta: &Map<String, Value>, version: &Value) -> Result<Envelope, RpcError> {
    let Some(version) = version.as_str() else {
        return Err(RpcError::invalid_params(format!(
            "`_meta[\"{PROTOCOL_VERSION_META}\"]` must be a string"
        )));
    };
    if version != MODERN_VERSION {
        return Err(unsupported(version));
    }
    let caps = match meta.get(CLIENT_CAPABILITIES_META) {
        Some(Value::Object(caps)) => caps,
        Some(_) => {
            return Err(RpcError::invalid_params(format!(
                "`_meta[\"{CLIENT_CAPABILITIES_META}\"]` must be an object"
            )));
        }
        None => {
            return Err(RpcError::invalid_params(format!(
                "a {MODERN_VERSION} request needs `_meta[\"{CLIENT_CAPABILITIES_META}\"]`"
            )));
        }
    };
    // Display only: never acted on, but a client sending junk there is told.
    if meta.get(CLIENT_INFO_META).is_some_and(|i| !i.is_object()) {
        return Err(RpcError::invalid_params(format!("`_meta[\"{CLIENT_INFO_META}\"]` must be an object")));
    }
    let elicit_form = match caps.get("elicitation") {
        Some(Value::Object(e)) => e.is_empty() || e.get("form").is_some_and(Value::is_object),
        _ => false,
    };
    Ok(Envelope { elicit_form })
}

/// `-32022`, listing what is served.
pub fn unsupported(requested: &str) -> RpcError {
    let requested = clip(requested);
    RpcError {
        code: UNSUPPORTED_PROTOCOL_VERSION,
        message: format!(
            "unsupported protocol version `{requested}`; supported: {}",
            SUPPORTED_VERSIONS.join(", ")
        ),
        data: Some(json!({ "supported": SUPPORTED_VERSIONS, "requested": requested })),
    }
}

/// At most [`ECHO_MAX`] bytes of `s`, cut on a character boundary.
pub fn clip(s: &str) -> &str {
    let mut end = s.len().min(ECHO_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The HTTP status of a 2026-07-28 answer: 400 for a request that is malformed or
/// does not fit (the body says why), 404 for an unknown method, else 200.
pub fn http_status(answer: &Value) -> StatusCode {
    match answer.get("error").and_then(|e| e["code"].as_i64()) {
        Some(
            PARSE_ERROR | INVALID_REQUEST | INVALID_PARAMS | HEADER_MISMATCH | UNSUPPORTED_PROTOCOL_VERSION,
        ) => StatusCode::BAD_REQUEST,
        Some(METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

/// Checks a 2026-07-28 request's headers against its body: the version, the method,
/// the tool's name for `tools/call`, each routing header once. `param_schema`: the
/// called tool's input schema, whose `x-mcp-header` properties must be mirrored too.
///
/// # Errors
/// [`HEADER_MISMATCH`] naming the first header that does not fit.
pub fn check_headers(
    headers: &HeaderMap,
    method: &str,
    params: &Value,
    param_schema: Option<&Value>,
) -> Result<(), RpcError> {
    for name in [VERSION_HEADER, METHOD_HEADER, NAME_HEADER] {
        if headers.get_all(name).iter().count() > 1 {
            return Err(RpcError::mismatch(format!("the {name} header appears more than once")));
        }
    }
    let text = |name: &str| headers.get(name).map(|v| v.to_str().ok());
    let version = params["_meta"][PROTOCOL_VERSION_META].as_str();
    match text(VERSION_HEADER) {
        None => return Err(RpcError::mismatch("a 2026-07-28 request needs the MCP-Protocol-Version header")),
        Some(v) if v.is_none() || v != version => {
            return Err(RpcError::mismatch(
                "the MCP-Protocol-Version header does not match `_meta[\"io.modelcontextprotocol/protocolVersion\"]`",
            ));
        }
        Some(_) => {}
    }
    match text(METHOD_HEADER) {
        None => return Err(RpcError::mismatch("a 2026-07-28 request needs the Mcp-Method header")),
        Some(m) if m != Some(method) => {
            return Err(RpcError::mismatch("the Mcp-Method header does not match the body's `method`"));
        }
        Some(_) => {}
    }
    let name_field = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    let body_name = name_field.and_then(|f| Some((f, params.get(f)?.as_str()?)));
    if let Some((field, body_name)) = body_name {
        match text(NAME_HEADER) {
            None => return Err(RpcError::mismatch(format!("a {method} request needs the Mcp-Name header"))),
            Some(h) if h.and_then(decode_header_value).as_deref() != Some(body_name) => {
                return Err(RpcError::mismatch(format!(
                    "the Mcp-Name header does not match the body's `{field}`"
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(schema) = param_schema.filter(|_| method == "tools/call") {
        check_param_headers(headers, schema, params.get("arguments").unwrap_or(&Value::Null))?;
    }
    Ok(())
}

/// The `Mcp-Param-{token}` headers a tool's `x-mcp-header` properties call for: each
/// present exactly when its argument is, and equal to it.
fn check_param_headers(headers: &HeaderMap, schema: &Value, arguments: &Value) -> Result<(), RpcError> {
    let mut annotated = Vec::new();
    header_properties(schema, &mut Vec::new(), &mut annotated);
    for (path, token, kind) in annotated {
        let name = format!("{PARAM_HEADER_PREFIX}{}", token.to_ascii_lowercase());
        let shown = format!("Mcp-Param-{token}");
        let mut all = headers.get_all(name.as_str()).iter();
        let (raw, again) = (all.next(), all.next());
        if again.is_some() {
            return Err(RpcError::mismatch(format!("the {shown} header appears more than once")));
        }
        let value = path.iter().try_fold(arguments, |v, key| v.get(key)).filter(|v| !v.is_null());
        let rendered = value.and_then(render);
        let Some(rendered) = rendered else {
            if raw.is_some() {
                return Err(RpcError::mismatch(format!("the {shown} header has no argument to mirror")));
            }
            continue;
        };
        let Some(raw) = raw else {
            return Err(RpcError::mismatch(format!(
                "the {shown} header is missing; its argument is present"
            )));
        };
        let Some(decoded) = raw.to_str().ok().and_then(decode_header_value) else {
            return Err(RpcError::mismatch(format!("the {shown} header is malformed")));
        };
        let same = match (kind.as_str(), value.and_then(Value::as_f64)) {
            // Integers compare as numbers: `42` and `42.0` are one value.
            ("integer", Some(n)) => decoded.parse::<f64>().is_ok_and(|d| d == n),
            _ => decoded == rendered,
        };
        if !same {
            return Err(RpcError::mismatch(format!("the {shown} header does not match its argument")));
        }
    }
    Ok(())
}

/// An argument as a client mirrors it into a header; `None` for an object or array.
fn render(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The properties reachable from the root through `properties` alone that carry an
/// `x-mcp-header` (a token, on a string, integer or boolean): path, token, type.
fn header_properties(schema: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String, String)>) {
    // A schema from keel.toml, but bounded all the same.
    if path.len() > 16 {
        return;
    }
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
    for (key, sub) in props {
        path.push(key.clone());
        let token = sub.get("x-mcp-header").and_then(Value::as_str).filter(|t| is_token(t));
        let kind = sub.get("type").and_then(Value::as_str);
        if let (Some(token), Some(kind @ ("string" | "integer" | "boolean"))) = (token, kind) {
            out.push((path.clone(), token.to_owned(), kind.to_owned()));
        }
        header_properties(sub, path, out);
        path.pop();
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value as sent: verbatim, or the UTF-8 inside `=?base64?…?=`. `None` for a
/// sentinel whose payload is not canonical base64 of UTF-8.
pub fn decode_header_value(v: &str) -> Option<String> {
    match v.strip_prefix("=?base64?").and_then(|rest| rest.strip_suffix("?=")) {
        Some(payload) => {
            let bytes = base64_decode(payload)?;
            String::from_utf8(bytes).ok()
        }
        None => Some(v.to_owned()),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding, canonical only (what [`base64_encode`] writes).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let bytes = text.as_bytes();
    for (i, quad) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = ALPHABET.iter().position(|&a| a == c)?;
            n = (n << 6) | u32::try_from(v).ok()?;
        }
        n <<= 6 * pad;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad]);
    }
    // Canonical: re-encoding gives the same text (no stray bits in the last quad).
    (base64_encode(&out) == text).then_some(out)
}
