//! TLS on loopback for tests (feature `tls`): a CA made in the test with rcgen, server
//! and client certificates it signs (valid, expired, for another name), an HTTPS server
//! serving an axum router (HTTP/1.1, and HTTP/2 when it offers `h2`), and a CONNECT
//! proxy. Each server counts what reached it, so a test can tell "refused before any
//! request" from "retried".

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use rustls;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl Leaf {
    /// Writes `STEM.pem` and `STEM.key` into `dir`; returns their paths.
    ///
    /// # Panics
    /// When the files cannot be written.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert, &self.cert_pem).expect("write the certificate");
        std::fs::write(&key, &self.key_pem).expect("write the key");
        (cert, key)
    }
}

/// How long a certificate is valid around now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday to a year from now.
    Current,
    /// It ended yesterday.
    Expired,
}

/// A date `days` from the real now: rustls checks certificates against the system
/// clock, so a certificate's validity is made relative to it.
#[allow(clippy::disallowed_methods)]
fn days_from_now(days: i64) -> time::OffsetDateTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(now + days * 86_400).expect("a date within range")
}

impl TestCa {
    /// A new CA named `name`.
    ///
    /// # Panics
    /// When rcgen cannot make a key (never on a working system).
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = days_from_now(-1);
        params.not_after = days_from_now(365);
        let cert = params.self_signed(&key).expect("the CA's certificate");
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA's certificate, in PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA's certificate to `dir/NAME`; returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write the CA certificate");
        path
    }

    fn leaf(&self, names: &[&str], validity: Validity, purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().expect("a leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("a DNS name")),
            })
            .collect();
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (days_from_now(-1), days_from_now(365)),
            Validity::Expired => (days_from_now(-30), days_from_now(-1)),
        };
        let cert = params.signed_by(&key, &self.issuer).expect("a signed certificate");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server_cert(&self, names: &[&str], validity: Validity) -> Leaf {
        self.leaf(names, validity, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for `name`.
    pub fn client_cert(&self, name: &str) -> Leaf {
        self.leaf(&[name], Validity::Current, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS settings: its certificate, whether it requires a client certificate
/// signed by `client_ca`, and whether it offers HTTP/2.
///
/// # Panics
/// When the PEM does not parse (it was made by [`TestCa`]).
pub fn server_config(leaf: &Leaf, client_ca: Option<&TestCa>, h2: bool) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("cert");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
                roots.add(cert.expect("CA cert")).expect("a CA root");
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).expect("the server's certificate");
    config.alpn_protocols =
        if h2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Arc::new(config)
}

#[derive(Debug, Default)]
struct Counts {
    connections: AtomicUsize,
    handshakes_failed: AtomicUsize,
    requests: AtomicUsize,
    versions: Mutex<Vec<http::Version>>,
}

/// An HTTPS server on 127.0.0.1 serving an axum router. Stops when dropped.
#[derive(Debug)]
pub struct HttpsServer {
    /// Its address.
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    /// Serves `router` over TLS with `config` on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(config: Arc<rustls::ServerConfig>, router: axum::Router) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("the server's address");
        let counts = Arc::new(Counts::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = {
            let counts = counts.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    counts.connections.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, router, counts) = (acceptor.clone(), router.clone(), counts.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            counts.handshakes_failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        let service =
                            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                                counts.requests.fetch_add(1, Ordering::SeqCst);
                                counts.versions.lock().unwrap_or_else(|p| p.into_inner()).push(req.version());
                                let router = router.clone();
                                async move {
                                    use tower::ServiceExt as _;
                                    router.oneshot(req.map(axum::body::Body::new)).await
                                }
                            });
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                    });
                }
            })
        };
        HttpsServer { addr, counts, task }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `https://HOST:PORT`, for a certificate made for `host` (reached through a
    /// [`ConnectProxy`], or a name that resolves to 127.0.0.1).
    pub fn url_as(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes the server saw fail.
    pub fn handshakes_failed(&self) -> usize {
        self.counts.handshakes_failed.load(Ordering::SeqCst)
    }

    /// HTTP requests that reached the router.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// The HTTP version of each request, in order.
    pub fn versions(&self) -> Vec<http::Version> {
        self.counts.versions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An HTTP proxy on 127.0.0.1: CONNECT tunnels, and plain requests in absolute form
/// forwarded as they are. Every destination is 127.0.0.1 at the port asked for,
/// whatever its host: a test names its servers with a name no resolver knows
/// (`models.test`), so a request that bypassed the proxy fails. Stops when dropped.
#[derive(Debug)]
pub struct ConnectProxy {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConnectProxy {
    /// Starts the proxy on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> ConnectProxy {
        Self::start_inner(None).await
    }

    /// Starts a proxy that answers 407 to a request without
    /// `Proxy-Authorization: Basic` of `user:password`.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start_with_credentials(user: &str, password: &str) -> ConnectProxy {
        Self::start_inner(Some(format!("Basic {}", base64(format!("{user}:{password}").as_bytes())))).await
    }

    async fn start_inner(credentials: Option<String>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("the proxy's address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let credentials = Arc::new(credentials);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    tokio::spawn(proxy_one(client, seen.clone(), credentials.clone()));
                }
            })
        };
        ConnectProxy { addr, seen, task }
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT`.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// The request line of each connection it was asked to make, in order
    /// (`CONNECT 127.0.0.1:8443 HTTP/1.1`, `POST http://127.0.0.1:80/x HTTP/1.1`).
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn proxy_one(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>, credentials: Arc<Option<String>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let Ok(n) = client.read(&mut buf).await else { return };
        if n == 0 || head.len() > 64 << 10 {
            return;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let line = text.lines().next().unwrap_or_default().to_owned();
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(line.clone());
    if let Some(want) = credentials.as_ref() {
        let given = text.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("proxy-authorization").then(|| value.trim().to_owned())
        });
        if given.as_deref() != Some(want.as_str()) {
            let _ = client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
    }
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let authority = if method == "CONNECT" {
        target
    } else {
        let rest = target.strip_prefix("http://").unwrap_or_default();
        rest.split(['/', '?']).next().unwrap_or_default()
    };
    // Whatever the host, the destination is this machine: a test names its servers
    // `models.test:PORT` so that only the proxy can reach them.
    let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let upstream = match port {
        Some(port) => TcpStream::connect(("127.0.0.1", port)).await.ok(),
        None => None,
    };
    let Some(mut upstream) = upstream else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    if method == "CONNECT" {
        if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
            return;
        }
        if upstream.write_all(&head[end..]).await.is_err() {
            return;
        }
    } else if upstream.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
