//! The one way telemetry sends HTTP: [`send`], over hyper-util's pooled client.
//!
//! Exports (OTLP) and alert deliveries both go through this one function, so that
//! moving them to the shared TLS client (`keel-http`, planned) is a change here alone.
//! Plain `http://` only for now; a whole request is bounded by its timeout, and a
//! response body by [`MAX_BODY`].

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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

type PooledClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> &'static PooledClient {
    static CLIENT: OnceLock<PooledClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector)
    })
}

/// Sends `request` and reads the whole response, within `timeout`.
///
/// Needs a tokio runtime (the caller's).
///
/// # Errors
/// [`SendError`]: a timeout, a transport failure, or a URL that is not `http://`.
/// A response with any status is `Ok`: the caller judges it.
///
/// # Cancel safety
/// Dropping the future drops the request; the pool discards its connection.
pub async fn send(request: Request<Bytes>, timeout: Duration) -> Result<Response<Bytes>, SendError> {
    if request.uri().scheme_str() != Some("http") {
        return Err(SendError::Url(format!(
            "{}://… (only http:// is built in)",
            request.uri().scheme_str().unwrap_or("")
        )));
    }
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, Full::new(body));
    let exchange = async {
        let response = client().request(request).await.map_err(|e| SendError::Transport(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| SendError::Transport(format!("reading the response: {e}")))?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| SendError::Timeout(timeout))?
}
