#![allow(clippy::unwrap_used)] // bench set-up: a failure is a broken bench.
//! What the benches share: `keel serve`'s router started in-process on loopback over
//! a journal, with one API key read from a fake environment.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::TokioClock;
use keel_journal::Journal;

/// The bench's API key (`key_env = "BENCH_KEY"` in the config).
pub(crate) const KEY: &str = "bench-key-0123456789abcdef";

/// A running server; dropping `stop` (or sending on it) shuts it down.
pub(crate) struct Running {
    pub(crate) base: String,
    pub(crate) stop: tokio::sync::oneshot::Sender<()>,
    pub(crate) served: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Parses `config` (written as if in `dir/keel.toml`) and serves it over `journal`.
pub(crate) async fn serve(
    config: &str,
    dir: &Path,
    journal: Arc<dyn Journal>,
    clock: Arc<TokioClock>,
) -> Running {
    let env = |k: &str| (k == "BENCH_KEY").then(|| KEY.to_owned());
    let config = keel_runtime::Config::parse(config, &dir.join("keel.toml"), &env).unwrap();
    let state = keel_server::state(Arc::new(config), journal, clock).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(keel_server::serve(
        state,
        listener,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    Running { base, stop, served }
}
