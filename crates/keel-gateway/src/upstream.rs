//! Calling an upstream over HTTP: keel-http's pooled client (TLS, proxies), and every
//! way a call can fail reduced to a [`Failure`].
//!
//! Transport errors are classified by keel-http (`keel_http::transport_failure`, the
//! one home of it); statuses by `keel_core::classify::http_response`.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use keel_core::{Clock, ErrorClass, Failure};
use keel_http::{Client, Proxies, TlsConfig};

use crate::config::{ModelConfig, Provider};

/// The largest answer body read from an upstream.
const MAX_BODY: usize = 32 << 20;

/// Where and how one model is reached.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: Uri,
    /// `/embeddings` beside `/chat/completions`, for an OpenAI-compatible upstream.
    pub(crate) embeddings_uri: Option<Uri>,
    pub(crate) provider: Provider,
    auth: Option<(HeaderName, HeaderValue)>,
    /// The process's client for this model's TLS settings and the proxies.
    client: Client,
}

impl Endpoint {
    /// The endpoint of `config`, with the key found by `env`, reached through `proxies`.
    ///
    /// # Errors
    /// Every problem, as `models.NAME.key: message`.
    pub(crate) fn new(
        name: &str,
        config: &ModelConfig,
        key: Option<String>,
        proxies: &Proxies,
    ) -> Result<Self, Vec<String>> {
        let tls = TlsConfig {
            ca_file: config.ca_file.clone(),
            client_cert_file: config.client_cert_file.clone(),
            client_key_file: config.client_key_file.clone(),
        };
        let mut problems = Vec::new();
        let client = match Client::shared(&tls, proxies) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.extend(e.iter().map(|p| format!("models.{name}.{p}")));
                None
            }
        };
        let uri = match config.provider.chat_url(config).parse::<Uri>() {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(format!("models.{name}.base_url: {e}"));
                None
            }
        };
        let auth = match key {
            None => None,
            Some(key) => {
                let (header, value) = config.provider.auth(key);
                match HeaderValue::from_str(&value) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        Some((header, value))
                    }
                    Err(_) => {
                        problems
                            .push(format!("models.{name}.api_key_env: the key is not a valid header value"));
                        None
                    }
                }
            }
        };
        let embeddings_uri = config.provider.embeddings_url(config).and_then(|u| u.parse().ok());
        match (client, uri) {
            (Some(client), Some(uri)) if problems.is_empty() => {
                Ok(Self { uri, embeddings_uri, provider: config.provider, auth, client })
            }
            _ => Err(problems),
        }
    }

    /// Sends `body` and returns the response once its status is a success; any other
    /// status is read and classified.
    ///
    /// # Cancel safety
    /// Dropping the future drops the connection's request; the pool discards it.
    pub(crate) async fn send(&self, body: Vec<u8>, clock: &dyn Clock) -> Result<Response<Incoming>, Failure> {
        self.send_at(&self.uri, body, clock).await
    }

    /// As [`send`](Self::send), to another path of the same upstream.
    pub(crate) async fn send_at(
        &self,
        uri: &Uri,
        body: Vec<u8>,
        clock: &dyn Clock,
    ) -> Result<Response<Incoming>, Failure> {
        let mut req = Request::post(uri.clone()).header(CONTENT_TYPE, "application/json");
        if let Some((name, value)) = &self.auth {
            req = req.header(name, value);
        }
        for (name, value) in self.provider.fixed_headers() {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| {
            Failure::new(ErrorClass::InvalidRequest, format!("cannot build the upstream request: {e}"))
        })?;
        let resp = self.client.send(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let (parts, body) = resp.into_parts();
        let bytes = read_body(body, uri).await.unwrap_or_default();
        let mut failure =
            keel_core::classify::http_response(parts.status, &parts.headers, &bytes, clock.wall())
                .unwrap_or_else(|| Failure::new(ErrorClass::ServerError, format!("HTTP {}", parts.status)));
        // The agent reads the upstream's own words, not its JSON body as a string.
        if let Some(message) = upstream_message(&bytes) {
            failure.message = message;
        }
        Err(failure)
    }
}

/// The longest upstream error message passed on (in characters).
const MAX_MESSAGE: usize = 2_000;

/// The message of an upstream's error body: OpenAI's and Anthropic's `error.message`,
/// a bare `error` or `message` string, or FastAPI's `detail` (vLLM), cut to
/// [`MAX_MESSAGE`] characters. `None` when the body says nothing readable.
pub(crate) fn upstream_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let found = ["/error/message", "/error", "/message", "/detail"]
        .iter()
        .find_map(|p| v.pointer(p).and_then(serde_json::Value::as_str))
        .map(str::trim)
        .filter(|m| !m.is_empty())?;
    Some(found.chars().take(MAX_MESSAGE).collect())
}

/// Reads a whole body from `uri`, up to a cap.
pub(crate) async fn read_body(body: Incoming, uri: &Uri) -> Result<Bytes, Failure> {
    keel_http::read_body(body, MAX_BODY, uri).await
}
