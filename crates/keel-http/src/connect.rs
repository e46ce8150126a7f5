//! The connector under the pooled client: TCP, a CONNECT tunnel or a plain proxy hop
//! when a proxy applies, then TLS for `https` with ALPN (HTTP/2 when the server offers
//! it).
//!
//! TLS is tokio-rustls. The CONNECT handshake is written here (`tunnel`, 40 lines):
//! hyper-util's `Tunnel` answers every refusal as "unsuccessful" with an error type it
//! does not export, and a user whose proxy refuses needs its status (407: credentials,
//! 403: the destination is not allowed) to know what to fix. Nothing here runs per
//! request: the pool calls the connector only to open a connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use crate::proxy::Proxies;

/// How long opening a TCP connection may take (a policy's attempt timeout bounds the
/// rest of the call).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens connections for the pool.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: TlsConnector,
    proxies: Proxies,
}

impl Connector {
    pub(crate) fn new(tls: Arc<rustls::ClientConfig>, proxies: Proxies) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Self { tcp, tls: TlsConnector::from(tls), proxies }
    }

    async fn connect(mut self, dst: Uri) -> Result<Conn, BoxError> {
        let https = dst.scheme() == Some(&Scheme::HTTPS);
        if !https && dst.scheme() != Some(&Scheme::HTTP) {
            return Err(Box::new(UnsupportedScheme));
        }
        let (io, proxied) = match self.proxies.proxy_for(&dst) {
            None => (self.tcp.call(dst.clone()).await?, false),
            Some(proxy) => {
                if proxy.uri().scheme() != Some(&Scheme::HTTP) {
                    return Err(Box::new(UnsupportedProxy));
                }
                if https {
                    let io = self.tcp.call(proxy.uri().clone()).await?;
                    (tunnel(io, &dst, proxy.basic_auth()).await?, false)
                } else {
                    (self.tcp.call(proxy.uri().clone()).await?, true)
                }
            }
        };
        if !https {
            return Ok(Conn::Plain { io, proxied });
        }
        let host = dst.host().unwrap_or_default();
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let name = ServerName::try_from(host.to_owned()).map_err(|_| Box::new(UnsupportedScheme))?;
        let tls = self.tls.connect(name, io.into_inner()).await?;
        Ok(Conn::Tls(TokioIo::new(tls)))
    }
}

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready; so is a fresh clone of it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

/// A URL whose scheme is neither `http` nor `https`, or whose host cannot be a TLS
/// server name.
#[derive(Debug)]
pub(crate) struct UnsupportedScheme;

impl std::fmt::Display for UnsupportedScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("only http:// and https:// URLs with a host name or an IP address can be reached")
    }
}

impl std::error::Error for UnsupportedScheme {}

/// A proxy URL whose scheme this stack does not speak (https://, socks5://).
#[derive(Debug)]
pub(crate) struct UnsupportedProxy;

impl std::fmt::Display for UnsupportedProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the proxy's URL must be http:// (HTTPS_PROXY=http://proxy:3128): TLS or SOCKS proxies are not supported")
    }
}

impl std::error::Error for UnsupportedProxy {}

/// Opens a CONNECT tunnel to `dst` through the proxy connection `io`.
async fn tunnel(
    io: TokioIo<TcpStream>,
    dst: &Uri,
    auth: Option<&HeaderValue>,
) -> Result<TokioIo<TcpStream>, ProxyError> {
    let mut tcp = io.into_inner();
    let host = dst.host().unwrap_or_default();
    let port = dst.port_u16().unwrap_or(443);
    let mut head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
    if let Some(auth) = auth {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    tcp.write_all(&head).await.map_err(ProxyError::Io)?;
    // The proxy says nothing after its answer until the client speaks (TLS's hello), so
    // reading up to the blank line reads the answer alone.
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await.map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        answer.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&answer) {
            Ok(httparse::Status::Complete(_)) => {
                let code = resp.code.unwrap_or(0);
                if (200..300).contains(&code) {
                    return Ok(TokioIo::new(tcp));
                }
                return Err(ProxyError::Refused(code, resp.reason.unwrap_or_default().to_owned()));
            }
            Ok(httparse::Status::Partial) if answer.len() < 16 << 10 => {}
            Ok(httparse::Status::Partial) | Err(_) => return Err(ProxyError::Malformed),
        }
    }
}

/// The proxy did not open a tunnel.
#[derive(Debug)]
pub(crate) enum ProxyError {
    /// It answered CONNECT with this status.
    Refused(u16, String),
    /// It closed the connection without answering.
    Closed,
    /// Its answer was not HTTP, or too long.
    Malformed,
    /// Talking to it failed.
    Io(io::Error),
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Refused(code, reason) => write!(f, "the proxy answered CONNECT with {code} {reason}"),
            ProxyError::Closed => f.write_str("the proxy closed the connection without answering CONNECT"),
            ProxyError::Malformed => f.write_str("the proxy's answer to CONNECT is not HTTP"),
            ProxyError::Io(e) => write!(f, "talking to the proxy failed: {e}"),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Io(e) => Some(e),
            ProxyError::Refused(..) | ProxyError::Closed | ProxyError::Malformed => None,
        }
    }
}

/// One connection: plain TCP (maybe to a proxy that forwards it) or TLS.
// One per pooled connection, next to hyper's own buffers (8 KiB and more): 1 KiB more
// for a plain one costs less than a pointer chase on every TLS read and write.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Conn {
    Plain { io: TokioIo<TcpStream>, proxied: bool },
    Tls(TokioIo<TlsStream<TcpStream>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain { io, proxied } => io.connected().proxy(*proxied),
            Conn::Tls(io) => {
                let (tcp, session) = io.inner().get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") { connected.negotiated_h2() } else { connected }
            }
        }
    }
}

impl Read for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain { io, .. } => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain { io, .. } => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain { io, .. } => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain { io, .. } => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain { io, .. } => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain { io, .. } => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }
}
