//! A server and a payments service for one test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::TokioClock;
use keel_examples::payments::{Faults, Handle, spawn};
use keel_journal::{Journal, JournalOptions};
use keel_runtime::Config;
use serde_json::Value;

pub(crate) const AGENT: &str = "agent-key-0123456789";
pub(crate) const APPROVER: &str = "approver-key-0123456789";
pub(crate) const ADMIN: &str = "admin-key-0123456789";

pub(crate) struct Server {
    pub(crate) base: String,
    pub(crate) payments: Handle,
    pub(crate) state: keel_server::AppState,
    pub(crate) http: reqwest::Client,
    pub(crate) dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

const SERVER: &str = r#"
[run]
lease = "2s"
escalate_after = 2

[defaults]
retry = { max_attempts = 2, base_delay = "10ms", max_delay = "20ms" }

[server]
body_limit = 4096
keys = [
  { name = "bot", key_env = "AGENT_KEY", role = "agent" },
  { name = "alice", key_env = "APPROVER_KEY", role = "approver" },
  { name = "root", key_env = "ADMIN_KEY", role = "admin" },
]
"#;

/// Wraps a journal (to make it fail on demand).
pub(crate) type Wrap = Box<dyn FnOnce(Arc<dyn Journal>) -> Arc<dyn Journal> + Send>;

/// Where a test server keeps its journal.
pub(crate) struct Storage {
    /// A journal URL; a SQLite file in the server's temp dir when `None`.
    pub(crate) url: Option<String>,
    /// Wraps the opened journal (to make it fail on demand).
    pub(crate) wrap: Wrap,
}

impl Default for Storage {
    fn default() -> Self {
        Self { url: None, wrap: Box::new(|j| j) }
    }
}

impl Server {
    pub(crate) async fn start(faults: Faults, extra: &str) -> Server {
        Self::start_with(faults, extra, Storage::default()).await
    }

    pub(crate) async fn start_with(faults: Faults, extra: &str, storage: Storage) -> Server {
        let (base, handle) = spawn(faults);
        let dir = tempfile::tempdir().unwrap();
        Self::launch(&base, handle, dir, extra, storage).await
    }

    /// Like [`start`](Self::start), with `server` lines added to `[server]`.
    pub(crate) async fn start_server(faults: Faults, server: &str, extra: &str) -> Server {
        let (base, handle) = spawn(faults);
        let dir = tempfile::tempdir().unwrap();
        Self::launch_with(&base, handle, dir, server, extra, Storage::default()).await
    }

    /// A server in front of an existing payments service and directory (a restart).
    pub(crate) async fn launch(
        payments_base: &str,
        payments: Handle,
        dir: tempfile::TempDir,
        extra: &str,
        storage: Storage,
    ) -> Server {
        Self::launch_with(payments_base, payments, dir, "", extra, storage).await
    }

    /// [`launch`](Self::launch), with `server` lines added to `[server]`.
    pub(crate) async fn launch_with(
        payments_base: &str,
        payments: Handle,
        dir: tempfile::TempDir,
        server: &str,
        extra: &str,
        storage: Storage,
    ) -> Server {
        let server_section = SERVER.replace("body_limit = 4096\n", &format!("body_limit = 4096\n{server}\n"));
        let tools = format!("{server_section}{}", keel_examples::payments::TOOLS_TOML);
        let text = format!("{}\n{extra}", tools.replace("{base}", payments_base));
        let env = |name: &str| match name {
            "AGENT_KEY" => Some(AGENT.to_owned()),
            "APPROVER_KEY" => Some(APPROVER.to_owned()),
            "ADMIN_KEY" => Some(ADMIN.to_owned()),
            _ => None,
        };
        let mut config = Config::parse(&text, &dir.path().join("keel.toml"), &env).unwrap();
        config.storage_url =
            storage.url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("keel.db").display()));
        let clock = Arc::new(TokioClock::new());
        let journal = keel_journal::open(
            &config.storage_url,
            JournalOptions {
                clock: clock.clone(),
                acquire_timeout: Duration::from_secs(1),
                ..JournalOptions::default()
            },
        )
        .await
        .unwrap();
        let journal = (storage.wrap)(journal);
        let state = keel_server::state(Arc::new(config), journal, clock).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(keel_server::serve(
            state.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Server {
            base: format!("http://{addr}"),
            payments,
            http: reqwest::Client::new(),
            dir,
            state,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Asks the server to stop and waits until it has (in-flight work finished).
    pub(crate) async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn get(&self, key: Option<&str>, path: &str) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub(crate) async fn post(&self, key: Option<&str>, path: &str, body: Option<Value>) -> (u16, Value) {
        self.post_with(key, path, body, &[]).await
    }

    pub(crate) async fn post_with(
        &self,
        key: Option<&str>,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.post(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        for (h, v) in headers {
            req = req.header(*h, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Polls a run until `done` says so, with a bound.
    pub(crate) async fn until_run(&self, run_id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (_, run) = self.get(Some(ADMIN), &format!("/api/runs/{run_id}")).await;
            if done(&run) {
                return run;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "run {run_id} never got there: {run:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET /api/incidents` until `done` says so, with a bound (the alert
    /// record is written off the call path, by its own task).
    pub(crate) async fn until_incidents(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(Some(AGENT), "/api/incidents").await;
            assert_eq!(status, 200, "{body}");
            let list = body.as_array().cloned().unwrap_or_default();
            if done(&list) {
                return list;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "the incidents never got there: {body:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
