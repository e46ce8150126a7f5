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

/// Sends `request` — an OTLP/HTTP export, its body the protobuf message — as a gRPC
/// call instead: the same message framed (no compression), `application/grpc`, over
/// HTTP/2 (cleartext with prior knowledge for `http://`, ALPN over TLS for
/// `https://`), within `timeout`. The answer is the gRPC status mapped to HTTP for
/// the exporter: 200 for OK, 503 for UNAVAILABLE and RESOURCE_EXHAUSTED (a collector
/// that asks to be retried later), 500 for every other status, with its message.
///
/// Why by hand: tonic would bring its own HTTP stack and TLS into the build for one
/// unary call whose message the OTLP exporter already encodes.
///
/// # Errors
/// As [`send`].
pub async fn send_grpc(request: Request<Bytes>, timeout: Duration) -> Result<Response<Bytes>, SendError> {
    use http_body_util::BodyExt as _;
    let (mut parts, message) = request.into_parts();
    let len =
        u32::try_from(message.len()).map_err(|_| SendError::Transport("a span batch past 4 GiB".into()))?;
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&message);
    parts.version = http::Version::HTTP_2;
    parts.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    parts.headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let uri = parts.uri.clone();
    let request = Request::from_parts(parts, Full::new(Bytes::from(framed)));
    let exchange = async {
        let response = match uri.scheme_str() {
            Some("https") => client()?.send(request).await.map_err(|f| SendError::Transport(f.message))?,
            Some("http") => h2c(request, &uri).await?,
            other => return Err(SendError::Url(format!("{}://…", other.unwrap_or("")))),
        };
        let (head, body) = response.into_parts();
        let collected = http_body_util::Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| SendError::Transport(format!("reading the response: {e}")))?;
        // A status in the trailers, or in the headers of a trailers-only answer.
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers
                .get(name)
                .or_else(|| head.headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = match (head.status.is_success(), field("grpc-status").as_deref()) {
            (true, Some("0")) => http::StatusCode::OK,
            (true, Some("8" | "14")) => http::StatusCode::SERVICE_UNAVAILABLE,
            (true, _) => http::StatusCode::INTERNAL_SERVER_ERROR,
            (false, _) => head.status,
        };
        let message = match status {
            http::StatusCode::OK => Bytes::new(),
            _ => Bytes::from(format!(
                "gRPC status {}: {}",
                field("grpc-status").unwrap_or_else(|| "none".into()),
                field("grpc-message").unwrap_or_default()
            )),
        };
        let mut answer = Response::new(message);
        *answer.status_mut() = status;
        Ok(answer)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| SendError::Timeout(timeout))?
}

/// One HTTP/2 request over a new cleartext connection (prior knowledge, as gRPC
/// collectors on `http://` expect): an export every few seconds needs no pool.
async fn h2c(
    request: Request<Full<Bytes>>,
    uri: &http::Uri,
) -> Result<Response<hyper::body::Incoming>, SendError> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|e| SendError::Transport(format!("connecting to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| SendError::Transport(format!("HTTP/2 with {host}:{port}: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(|e| SendError::Transport(e.to_string()))
}
