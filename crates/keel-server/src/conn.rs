//! Connections: the accept loop of `keel serve`, with the limits that keep idle and
//! slow clients from starving everyone else.
//!
//! - **header read timeout**: a request's headers must arrive within
//!   `header_read_timeout` of its first byte (a new connection: of its accept);
//! - **idle timeout**: a kept-alive connection waits `idle_timeout` for its next request;
//! - **body read timeout**: a request's body must arrive within `body_read_timeout`;
//! - **connection limit**: at `max_connections`, a new connection makes room by
//!   closing one with no request in flight (a half-sent request, an idle keep-alive);
//!   when every connection is busy, the new one is answered 503 and closed.
//!
//! So a client that opens hundreds of connections and never finishes a request
//! cannot keep another client out: its connections are the first to go.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held open at once.
    pub max_connections: usize,
    /// See the module's documentation.
    pub header_read_timeout: Duration,
    /// See the module's documentation.
    pub idle_timeout: Duration,
    /// See the module's documentation.
    pub body_read_timeout: Duration,
}

impl Limits {
    /// `[server]`'s values.
    pub fn from_config(s: &keel_runtime::config::ServerConfig) -> Self {
        Self {
            max_connections: s.max_connections.max(1),
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            body_read_timeout: s.body_read_timeout,
        }
    }
}

/// `in_flight` of a connection closed to make room: no request may start on it.
const EVICTED: i64 = -1;

/// One connection's state, shared by its task, its requests and the registry.
#[derive(Debug)]
struct Conn {
    /// Requests whose response has not been fully sent, or [`EVICTED`].
    in_flight: AtomicI64,
    /// When the connection last became idle, and when the next request's first
    /// byte arrived since.
    activity: Mutex<Activity>,
    /// Wakes the connection's task: evicted, or its activity changed.
    wake: Notify,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    idle_since: Instant,
    /// `Some` once bytes of a request arrived on an idle connection (for a new
    /// connection: its accept, so that it must send a request promptly).
    first_byte: Option<Instant>,
}

impl Conn {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicI64::new(0),
            activity: Mutex::new(Activity { idle_since: now, first_byte: Some(now) }),
            wake: Notify::new(),
        }
    }

    fn activity(&self) -> Activity {
        *self.activity.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_activity(&self, f: impl FnOnce(&mut Activity)) {
        f(&mut self.activity.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.wake.notify_one();
    }

    /// Bytes arrived: the first of a request on an idle connection starts its
    /// header timeout.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && self.activity().first_byte.is_none() {
            let now = Instant::now();
            self.set_activity(|a| {
                a.first_byte.get_or_insert(now);
            });
        }
    }

    /// A request starts: `None` when the connection was closed to make room.
    fn begin(self: &Arc<Self>) -> Option<InFlight> {
        let mut n = self.in_flight.load(Ordering::Acquire);
        loop {
            if n == EVICTED {
                return None;
            }
            match self.in_flight.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.wake.notify_one();
                    return Some(InFlight(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }

    /// Marks an idle connection closed (for room, or by its timeout): false when a
    /// request is in flight.
    fn close_if_idle(&self) -> bool {
        self.in_flight.compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// When the connection's idle or header timeout ends, if no request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        let a = self.activity();
        Some(match a.first_byte {
            Some(t) => t + limits.header_read_timeout,
            None => a.idle_since + limits.idle_timeout,
        })
    }
}

/// A request in flight; dropped once its response has been sent (or abandoned).
#[derive(Debug)]
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = Instant::now();
            self.0.set_activity(|a| {
                a.idle_since = now;
                a.first_byte = None;
            });
        }
    }
}

/// The open connections.
#[derive(Debug, Default)]
struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new connection, making room when full: `None` when every
    /// connection has a request in flight.
    fn admit(&self, max: usize, now: Instant) -> Option<(u64, Arc<Conn>)> {
        let mut conns = self.lock();
        if conns.len() >= max {
            // Connections closed by their timeout whose task has not yet left.
            conns.retain(|_, c| c.in_flight.load(Ordering::Acquire) != EVICTED);
        }
        if conns.len() >= max {
            // The connection idle the longest (a half-sent request counts as idle:
            // it has not asked for anything yet) goes.
            let mut idle: Vec<(Instant, u64)> = conns
                .iter()
                .filter(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0)
                .map(|(id, c)| (c.activity().idle_since, *id))
                .collect();
            idle.sort_unstable();
            let evicted = idle.into_iter().find(|(_, id)| conns[id].close_if_idle()).map(|(_, id)| id);
            let victim = conns.remove(&evicted?)?;
            victim.wake.notify_one();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(now));
        conns.insert(id, conn.clone());
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// The answer to a connection beyond the limit (and to a request on a connection
/// closed to make room).
fn overloaded_body(max: usize) -> String {
    serde_json::json!({
        "class": "server_error",
        "message": format!("keel serve is at its connection limit ({max} connections, all busy); retry shortly"),
        "retryable": true,
        "attempts": 0,
    })
    .to_string()
}

async fn refuse(mut tcp: TcpStream, max: usize) {
    let body = overloaded_body(max);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent, so that closing does not reset the connection
        // before it has read the answer.
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await?;
            total += n;
            if n == 0 || total > 64 << 10 {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// Accepts connections on `listener` and serves `app` on each until `stop`; then
/// lets in-flight requests finish (connections close once their response is sent).
/// Connection tasks are spawned on `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<keel_http::ServerTls>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    let registry = Arc::new(Registry::default());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off a little rather
                // than spin; the connections we hold will close in time.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // No Nagle delay: a streamed token leaves at once (≈43 ms otherwise).
        let _ = tcp.set_nodelay(true);
        let Some((id, conn)) = registry.admit(limits.max_connections, Instant::now()) else {
            tracing::warn!(client = %addr, max = limits.max_connections, "connection refused: at the connection limit");
            tracker.spawn(refuse(tcp, limits.max_connections));
            continue;
        };
        let (app, stop, registry, tls) = (app.clone(), stop.clone(), registry.clone(), tls.clone());
        tracker.spawn(async move {
            let io = Counted { inner: tcp, conn: conn.clone() };
            match tls {
                None => serve_conn(TokioIo::new(io), addr, conn, app, limits, stop).await,
                // The handshake is bounded like a request's headers: a client that
                // opens a connection and says nothing holds it no longer.
                Some(tls) => match tokio::time::timeout(limits.header_read_timeout, tls.accept(io)).await {
                    Ok(Ok(stream)) => serve_conn(TokioIo::new(stream), addr, conn, app, limits, stop).await,
                    Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(client = %addr, "TLS handshake timed out"),
                },
            }
            registry.remove(id);
        });
    }
}

async fn serve_conn<I>(
    io: I,
    addr: SocketAddr,
    conn: Arc<Conn>,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc_conn = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = svc_conn.begin();
        let app = app.clone();
        async move {
            let Some(guard) = guard else {
                let mut resp = hyper::Response::new(Guarded {
                    inner: Body::from(overloaded_body(limits.max_connections)),
                    _guard: None,
                });
                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                resp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                return Ok::<_, Infallible>(resp);
            };
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(ConnectInfo(addr));
            let body = Body::new(TimedBody::new(body, limits.body_read_timeout));
            let resp = match app.oneshot(http::Request::from_parts(parts, body)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(resp.map(|inner| Guarded { inner, _guard: Some(guard) }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The timeouts are ours (they know idle from half-sent).
    builder.header_read_timeout(None);
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let mut stopping = false;
    loop {
        let deadline = conn.deadline(&limits);
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %addr, error = %e, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                served.as_mut().graceful_shutdown();
            }
            () = conn.wake.notified() => {
                if conn.in_flight.load(Ordering::Acquire) == EVICTED {
                    tracing::debug!(client = %addr, "idle connection closed to make room");
                    return;
                }
            }
            () = sleep_until(deadline) => {
                if conn.deadline(&limits).is_some_and(|d| d <= Instant::now()) && conn.close_if_idle() {
                    tracing::debug!(client = %addr, "idle or slow connection timed out");
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The socket, noting when bytes arrive.
struct Counted {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Guarded {
    inner: Body,
    _guard: Option<InFlight>,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must arrive within the body read timeout.
struct TimedBody {
    inner: Incoming,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        let deadline = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep(limit)));
        Self { inner, limit, deadline }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let limit = self.limit;
                match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(format!(
                        "the request body did not arrive within {}",
                        humantime::format_duration(limit)
                    )
                    .into()))),
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
