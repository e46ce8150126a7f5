//! Keel's one HTTP stack: a pooled hyper client per process, TLS with rustls,
//! `HTTPS_PROXY`/`NO_PROXY`, and every transport error classified in one place.
//!
//! Model upstreams (keel-gateway) and http tools (keel-runtime) both call their
//! targets through a [`Client`]:
//!
//! - **TLS**: rustls on the `ring` provider, Mozilla's roots (webpki-roots), plus a
//!   target's own `ca_file` for an internal CA and an optional client certificate
//!   (`client_cert_file`, `client_key_file`) — [`TlsConfig`]. HTTP/2 is negotiated by
//!   ALPN where the server offers it, HTTP/1.1 otherwise.
//! - **Pooling**: one client per distinct TLS and proxy settings, shared by every
//!   target that has them ([`Client::shared`]), so the plain path is one pool for the
//!   whole process.
//! - **Proxies**: [`Proxies`], read from the environment once (or given by a test);
//!   `https` goes through an `http://` proxy by a CONNECT tunnel.
//! - **Errors**: [`transport_failure`] turns what went wrong into a
//!   [`keel_core::Failure`]: a refused or reset connection is `network`, a certificate
//!   the target will refuse again `invalid_request` with the fix in its message.
//!
//! ```no_run
//! # async fn call() -> Result<(), keel_core::Failure> {
//! use keel_http::{Client, Proxies, TlsConfig};
//!
//! let tls = TlsConfig { ca_file: Some("internal-ca.pem".into()), ..TlsConfig::default() };
//! let client = Client::shared(&tls, &Proxies::from_env())
//!     .map_err(|e| keel_core::Failure::new(keel_core::ErrorClass::InvalidRequest, e[0].to_string()))?;
//! let req = http::Request::get("https://models.internal:8443/v1/models")
//!     .body(http_body_util::Full::new(bytes::Bytes::new()))
//!     .map_err(|e| keel_core::Failure::new(keel_core::ErrorClass::InvalidRequest, e.to_string()))?;
//! let resp = client.send(req).await?;
//! let uri: http::Uri = "https://models.internal:8443/".parse().unwrap_or_default();
//! let body = keel_http::read_body(resp.into_body(), 1 << 20, &uri).await?;
//! # let _ = body;
//! # Ok(()) }
//! ```

mod classify;
mod client;
mod connect;
mod proxy;
mod tls;

use std::sync::Arc;

pub use classify::{Stage, transport_failure};
pub use client::{Client, read_body};
pub use proxy::Proxies;
pub use tls::{ServerTls, TlsConfig, TlsError};

/// The request body every client sends: bytes, whole.
pub type Body = http_body_util::Full<bytes::Bytes>;

/// `url` as a request URI: `http` or `https`, with a host and, if any, a usable port.
///
/// # Errors
/// What is wrong, in words.
pub fn parse_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| e.to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("only http:// and https:// URLs are supported".to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    // `http::Uri` accepts a port it cannot use (`:99999`) and reports none; hyper would
    // then take the scheme's default port instead.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let after_host = match host_port.rfind(']') {
        Some(end) => &host_port[end + 1..],
        None => host_port,
    };
    if let Some((_, port)) = after_host.rsplit_once(':') {
        if !port.is_empty() && port.parse::<u16>().is_err() {
            return Err(format!("the port `{port}` is not a number from 0 to 65535"));
        }
    }
    Ok(uri)
}

/// The crypto provider every TLS configuration is built on: `ring`.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_are_http_or_https_with_a_host_and_a_usable_port() {
        let check =
            |url: &str, ok: bool| assert_eq!(parse_url(url).is_ok(), ok, "{url}: {:?}", parse_url(url));
        check("https://api.openai.com/v1", true);
        check("http://127.0.0.1:8080/x?y=1", true);
        check("https://[::1]:8443/v1", true);
        check("https://127.0.0.1:99999/v1", false);
        check("https://127.0.0.1:/v1", true);
        check("http://127.0.0.1:-1/", false);
        check("ftp://example.com/", false);
        check("api.openai.com/v1", false);
        check("https:///v1", false);
        check("https://exa mple/", false);
        check("", false);
    }
}
