//! [`Proxy`]: a TCP proxy on loopback that a test can cut, to take a real database
//! away from the code under test (an outage) and give it back (the end of one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections to a target until [`cut`](Proxy::cut); then every open
/// connection is closed and new ones are accepted and closed at once, until
/// [`restore`](Proxy::restore). Stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("the proxy's address");
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (epoch, _) = watch::channel(0u64);
        let task = {
            let (down, refused, epoch) = (down.clone(), refused.clone(), epoch.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    if down.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    let mut cut = epoch.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else { return };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Proxy { addr, down, epoch, refused, task }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (a `postgres://` URL of the target) with its host and port replaced by
    /// the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let host_start = rest.find('@').map_or(0, |i| i + 1);
        let host_end = rest[host_start..].find(['/', '?']).map_or(rest.len(), |i| host_start + i);
        format!("{}{}{}{}", &url[..scheme_end], &rest[..host_start], self.addr, &rest[host_end..])
    }

    /// Closes every open connection and refuses new ones: the target is gone.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Connections turned away while cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host and port of a `postgres://` URL, resolved.
///
/// # Panics
/// When the URL has no host and port that resolve.
pub fn target_of(url: &str) -> SocketAddr {
    use std::net::ToSocketAddrs as _;
    let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
    let rest = &rest[rest.find('@').map_or(0, |i| i + 1)..];
    let hostport = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve {hostport}"))
}
