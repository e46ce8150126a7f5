//! HTTP tools: one request per attempt over keel-http's pooled client (TLS, proxies),
//! classified by status and `Retry-After`; transport errors by keel-http.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http_body_util::Full;
use keel_core::classify::http_response;
use keel_core::{Clock, ErrorClass, Failure};
use serde_json::{Value, json};

use crate::template::{percent_encode, render_json, render_text};

/// An HTTP tool.
#[derive(Clone)]
pub struct HttpTool {
    /// The method.
    pub method: http::Method,
    /// The URL template.
    pub url: String,
    /// Headers, secrets already read from the environment (never logged).
    headers: Vec<(String, String)>,
    /// The body template; `None` sends the parameters themselves.
    pub body: Option<Value>,
    client: keel_http::Client,
}

/// The largest answer body read from a tool.
const MAX_BODY: usize = 32 << 20;

impl std::fmt::Debug for HttpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may be secrets: only their names are shown.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpTool")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &names)
            .finish_non_exhaustive()
    }
}

impl HttpTool {
    /// A tool sending `method` to `url` through `client` (the process's client for the
    /// tool's TLS settings: [`keel_http::Client::shared`]). Per-attempt timeouts come
    /// from the pipeline; the client only bounds connecting.
    pub fn new(
        method: http::Method,
        url: String,
        headers: Vec<(String, String)>,
        body: Option<Value>,
        client: keel_http::Client,
    ) -> Self {
        Self { method, url, headers, body, client }
    }

    /// Sends one request with `params`; `key` becomes the `Idempotency-Key` header.
    ///
    /// # Errors
    /// A [`Failure`]: `network`/`timeout` for transport errors, the status's class
    /// (with `Retry-After`) for an error response.
    pub async fn send(&self, params: &Value, clock: &dyn Clock, key: Option<&str>) -> Result<Value, Failure> {
        let invalid =
            |e: crate::template::MissingValue| Failure::new(ErrorClass::InvalidRequest, e.to_string());
        let url = render_text(&self.url, params, percent_encode).map_err(invalid)?;
        // Values are percent-encoded, but `.` is unreserved and URL parsers resolve
        // `.`/`..` (and `%2e`) segments: a parameter must not move the request (and its
        // secret headers) to another path.
        if let Some(seg) = dot_segment(&url) {
            return Err(Failure::new(
                ErrorClass::InvalidRequest,
                format!(
                    "a parameter makes the URL's path hold the segment `{seg}`, which would change its path"
                ),
            ));
        }
        let uri = keel_http::parse_url(&url).map_err(|e| {
            Failure::new(ErrorClass::InvalidRequest, format!("the tool's URL is not valid: {e}"))
        })?;
        let mut req = http::Request::builder().method(self.method.clone()).uri(uri.clone());
        let mut has_type = false;
        for (name, value) in &self.headers {
            let (Ok(name), Ok(mut value)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
            else {
                return Err(Failure::new(
                    ErrorClass::InvalidRequest,
                    format!("`{name}` is not a valid header"),
                ));
            };
            // Values may be secrets (`headers_env`): never printed by hyper's Debug.
            value.set_sensitive(true);
            has_type |= name == CONTENT_TYPE;
            req = req.header(name, value);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let mut payload = Bytes::new();
        if self.method != http::Method::GET && self.method != http::Method::HEAD {
            let body = match &self.body {
                Some(t) => render_json(t, params).map_err(invalid)?,
                None => params.clone(),
            };
            if !has_type {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        }
        let req = req.body(Full::new(payload)).map_err(|e| {
            Failure::new(ErrorClass::InvalidRequest, format!("cannot build the request: {e}"))
        })?;
        let resp = self.client.send(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = keel_http::read_body(body, MAX_BODY, &uri).await?;
        if let Some(failure) = http_response(parts.status, &parts.headers, &bytes, clock.wall()) {
            return Err(failure);
        }
        let body = serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(json!({ "status": parts.status.as_u16(), "body": body }))
    }
}

/// Where the authority of `url` (after `scheme://`) ends.
fn authority_end(url: &str) -> Option<usize> {
    let start = url.find("://")? + 3;
    Some(url[start..].find(['/', '?', '#', '\\']).map_or(url.len(), |i| start + i))
}

/// The first `.` or `..` segment (also spelled `%2e`) of `url`'s path, if any.
fn dot_segment(url: &str) -> Option<&str> {
    let from = authority_end(url)?;
    let path = &url[from..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    path.split(['/', '\\']).find(|seg| {
        let lower = seg.to_ascii_lowercase().replace("%2e", ".");
        lower == "." || lower == ".."
    })
}

/// Checks an http tool's URL template at config time: `http://` or `https://`, a scheme and host
/// written in the config (never from a parameter), no dot segment, parseable.
///
/// # Errors
/// What is wrong, for the config error.
pub(crate) fn check_url_template(url: &str) -> Result<(), String> {
    let end = authority_end(url).ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
    if url[..end].contains("{{") {
        return Err(format!(
            "`{url}`: the scheme and host must be written here, never come from a parameter \
             (placeholders may appear in the path and the query)"
        ));
    }
    let sample = replace_placeholders(url);
    if let Some(seg) = dot_segment(&sample) {
        return Err(format!("`{url}`: the path holds the segment `{seg}`; write the path it means"));
    }
    keel_http::parse_url(&sample).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    Ok(())
}

/// `url` with each placeholder replaced by `x`.
fn replace_placeholders(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        match rest[open..].find("}}") {
            Some(close) => {
                out.push('x');
                rest = &rest[open + close + 2..];
            }
            None => {
                rest = &rest[open..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}
