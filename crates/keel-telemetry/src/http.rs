//! The one way telemetry sends HTTP: [`send`], over the process's `keel-http` client
//! (rustls, the built-in roots, the process's `HTTPS_PROXY`/`NO_PROXY`).
//!
//! Exports (OTLP), alert deliveries and Sentry envelopes all go through this one
//! function, over `http://` or `https://`; a whole request is bounded by its timeout,
//! and a response body by [`MAX_BODY`].

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;

/// The largest response body read (collectors and webhooks answer briefly).
pub const MAX_BODY: usize = 1 << 20;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request did not finish within its timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// Connecting or talking to the server failed.
    #[error("request failed: {0}")]
    Transport(String),
    /// The URL is not one this client can reach (not `http://`).
    #[error("unsupported URL: {0}")]
    Url(String),
}

fn client() -> Result<&'static keel_http::Client, SendError> {
    static CLIENT: OnceLock<Option<keel_http::Client>> = OnceLock::new();
    CLIENT
        .get_or_init(|| keel_http::Client::default_shared().ok())
        .as_ref()
        .ok_or_else(|| SendError::Transport("the TLS roots could not be loaded".into()))
}

/// Sends `request` and reads the whole response, within `timeout`.
///
/// Needs a tokio runtime (the caller's).
///
/// # Errors
/// [`SendError`]: a timeout, a transport failure (an untrusted certificate among
/// them), or a URL that is neither `http://` nor `https://`.
/// A response with any status is `Ok`: the caller judges it.
///
/// # Cancel safety
/// Dropping the future drops the request; the pool discards its connection.
pub async fn send(request: Request<Bytes>, timeout: Duration) -> Result<Response<Bytes>, SendError> {
    if !matches!(request.uri().scheme_str(), Some("http" | "https")) {
        return Err(SendError::Url(format!(
            "{}://… (only http:// and https://)",
            request.uri().scheme_str().unwrap_or("")
        )));
    }
    let client = client()?;
    let uri = request.uri().clone();
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, Full::new(body));
    let exchange = async {
        let response = client.send(request).await.map_err(|f| SendError::Transport(f.message))?;
        let (parts, body) = response.into_parts();
        let body = keel_http::read_body(body, MAX_BODY, &uri)
            .await
            .map_err(|f| SendError::Transport(format!("reading the response: {}", f.message)))?;
        Ok(Response::from_parts(parts, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| SendError::Timeout(timeout))?
}
