//! HTTP tools: one request per attempt, classified by status and `Retry-After`.

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
    client: reqwest::Client,
}

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
    /// A tool sending `method` to `url`.
    pub fn new(
        method: http::Method,
        url: String,
        headers: Vec<(String, String)>,
        body: Option<Value>,
    ) -> Self {
        // Per-attempt timeouts come from the pipeline; the client only bounds connecting.
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_default();
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
        let url = reqwest::Url::parse(&url).map_err(|e| {
            Failure::new(ErrorClass::InvalidRequest, format!("the tool's URL is not valid: {e}"))
        })?;
        let mut req = self.client.request(self.method.clone(), url);
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        if self.method != http::Method::GET && self.method != http::Method::HEAD {
            let body = match &self.body {
                Some(t) => render_json(t, params).map_err(invalid)?,
                None => params.clone(),
            };
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| transport(&e))?;
        if let Some(failure) = http_response(status, &headers, &bytes, clock.wall()) {
            return Err(failure);
        }
        let body = serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(json!({ "status": status.as_u16(), "body": body }))
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

/// Checks an http tool's URL template at config time: `http://`, a scheme and host
/// written in the config (never from a parameter), no dot segment, parseable.
///
/// # Errors
/// What is wrong, for the config error.
pub(crate) fn check_url_template(url: &str) -> Result<(), String> {
    let end = authority_end(url).ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
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
    reqwest::Url::parse(&sample).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
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

fn transport(e: &reqwest::Error) -> Failure {
    // A request reqwest cannot even build (a bad URL, a bad header) never gets better.
    let class = if e.is_builder() {
        ErrorClass::InvalidRequest
    } else if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Network
    };
    // Without the URL: it may carry a token in its query.
    Failure::new(class, e.without_url_ref().to_string())
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut text = self.to_string();
        if let Some(url) = self.url() {
            text = text.replace(url.as_str(), "<url>");
        }
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}
