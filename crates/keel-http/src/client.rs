//! [`Client`]: the pooled HTTP client, one per process and distinct TLS and proxy
//! settings.
//!
//! hyper-util's legacy client costs 15–20 µs less per request than reqwest here, and
//! Keel needs nothing reqwest adds: bodies are bytes, connections are pooled and kept
//! alive. A client is looked up once, when a target is built from config (a mutex
//! guards the table of clients, never a request); a call clones nothing but the
//! request's authority (a reference count) for its error message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::PROXY_AUTHORIZATION;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as Pooled;
use hyper_util::rt::TokioExecutor;
use keel_core::{ErrorClass, Failure};

use crate::classify::{Stage, transport_failure};
use crate::connect::Connector;
use crate::proxy::{Proxies, ProxyValues};
use crate::tls::{TlsConfig, TlsError, TlsFiles};

/// A pooled HTTP/1.1 and HTTP/2 client over TCP or TLS, through a proxy where one
/// applies. Cloning it shares its pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    pooled: Pooled<Connector, Full<Bytes>>,
    /// Set when a plain-http proxy takes credentials: they go in each request proxied.
    plain_proxy_auth: Option<Proxies>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

type Key = (TlsFiles, ProxyValues);

fn clients() -> &'static Mutex<HashMap<Key, Client>> {
    static CLIENTS: OnceLock<Mutex<HashMap<Key, Client>>> = OnceLock::new();
    CLIENTS.get_or_init(Mutex::default)
}

impl Client {
    /// The process's client for `tls` and `proxies`: built the first time these
    /// settings (the bytes of their files) are asked for, the same pool after.
    ///
    /// # Errors
    /// Every problem of `tls`, by key: a file that cannot be read, holds no usable PEM
    /// item, a key that does not match its certificate.
    pub fn shared(tls: &TlsConfig, proxies: &Proxies) -> Result<Client, Vec<TlsError>> {
        let (files, mut problems) = TlsFiles::read(tls);
        let key = (files, proxies.values().clone());
        let mut table = clients().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if problems.is_empty() {
            if let Some(client) = table.get(&key) {
                return Ok(client.clone());
            }
        }
        // What was read is checked too, so that every problem is listed at once.
        let config = match key.0.client_config(tls) {
            Ok(config) if problems.is_empty() => config,
            Ok(_) => return Err(problems),
            Err(found) => {
                problems.extend(found);
                return Err(problems);
            }
        };
        let client = Client::build(config, proxies.clone());
        table.insert(key, client.clone());
        Ok(client)
    }

    /// The process's client with the built-in roots and the process's proxies.
    ///
    /// # Errors
    /// None in practice: the built-in roots always load.
    pub fn default_shared() -> Result<Client, Vec<TlsError>> {
        Self::shared(&TlsConfig::default(), &Proxies::from_env())
    }

    fn build(tls: Arc<rustls::ClientConfig>, proxies: Proxies) -> Client {
        let plain_proxy_auth = proxies.plain_proxy_has_credentials().then(|| proxies.clone());
        let pooled = Pooled::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(Connector::new(tls, proxies));
        Client { inner: Arc::new(Inner { pooled, plain_proxy_auth }) }
    }

    /// Sends `req` and returns the response head, whatever its status.
    ///
    /// # Errors
    /// A [`Failure`] classified by [`transport_failure`]: `network` and `timeout` for
    /// what another attempt may fix, `invalid_request` for a certificate that will be
    /// refused again (never retried), `unauthorized` for a proxy wanting credentials.
    ///
    /// # Cancel safety
    /// Dropping the future drops the request; the pool discards its connection.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Failure> {
        let authority = req.uri().authority().cloned();
        if let Some(proxies) = &self.inner.plain_proxy_auth {
            proxies.authorize(req.uri().clone(), req.headers_mut());
        }
        self.inner
            .pooled
            .request(req)
            .await
            .map_err(|e| transport_failure(&e, &host_of(authority.as_ref()), Stage::Request))
    }
}

/// Reads a whole body, up to `max` bytes, from `uri`'s host.
///
/// # Errors
/// A [`Failure`] (`network` for a broken connection or a body over `max`).
pub async fn read_body(body: Incoming, max: usize, uri: &Uri) -> Result<Bytes, Failure> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let host = host_of(uri.authority());
            if e.is::<http_body_util::LengthLimitError>() {
                return Err(Failure::new(
                    ErrorClass::Network,
                    format!("the answer of {host} is larger than {max} bytes"),
                ));
            }
            Err(transport_failure(&*e, &host, Stage::Body))
        }
    }
}

/// `host[:port]` of an authority, without user information.
pub(crate) fn host_of(authority: Option<&Authority>) -> String {
    match authority {
        None => "the server".to_owned(),
        Some(a) => match a.port_u16() {
            Some(port) => format!("{}:{port}", a.host()),
            None => a.host().to_owned(),
        },
    }
}

impl Proxies {
    /// Whether a plain-http destination's proxy may take credentials (its URL holds
    /// user information): only then does a request look its proxy up.
    fn plain_proxy_has_credentials(&self) -> bool {
        self.values().plain_has_credentials()
    }

    /// Adds the proxy's credentials to a plain-http request that goes through it.
    fn authorize(&self, uri: Uri, headers: &mut http::HeaderMap) {
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) || headers.contains_key(PROXY_AUTHORIZATION) {
            return;
        }
        if let Some(auth) = self.proxy_for(&uri).as_ref().and_then(|i| i.basic_auth()) {
            headers.insert(PROXY_AUTHORIZATION, auth.clone());
        }
    }
}
