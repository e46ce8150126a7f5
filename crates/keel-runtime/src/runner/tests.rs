use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::TokioClock;
use keel_journal::JournalOptions;

use super::*;

async fn runner(dir: &Path, config: &str) -> Runner {
    let config = Config::parse(config, &dir.join("keel.toml"), &|_| None).unwrap();
    let clock = Arc::new(TokioClock::new());
    let journal = keel_journal::open(
        &config.storage_url,
        JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    Runner::new(Arc::new(config), journal, clock, Arc::new(NullObserver)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_drives_a_run_in_one_task_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let config = format!(
        "[tools.wait]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.05; done\"]\n",
        gate.display()
    );
    let r = Arc::new(runner(dir.path(), &config).await);
    let plan = Plan::parse("[[steps]]\ntool = \"wait\"\n", "toml").unwrap();
    let run_id = r.create(&plan).await.unwrap();
    let first = tokio::spawn({
        let (r, id) = (r.clone(), run_id.clone());
        async move { r.drive(&id).await }
    });
    // Wait (bounded) until the first drive is inside the step.
    let mut waited = 0;
    while r.snapshot(&run_id).await.unwrap().steps.is_empty() {
        assert!(waited < 400, "the step never started");
        tokio::time::sleep(Duration::from_millis(25)).await;
        waited += 1;
    }
    assert!(matches!(r.drive(&run_id).await, Err(Error::Busy(..))), "a second task is kept out");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(first.await.unwrap().unwrap(), RunStatus::Completed);
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed, "free again once the first ended");
}

/// A loopback HTTP service whose every odd request answers 503 and every even one 200:
/// each call of a tool on it fails once and succeeds on its retry.
async fn flaky_service() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let hits = Arc::new(AtomicU64::new(0));
    let seen = hits.clone();
    let app = axum::Router::new().route(
        "/op",
        axum::routing::post(move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n % 2 == 0 {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy")
                } else {
                    (axum::http::StatusCode::OK, "{\"ok\": true}")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/op"), hits)
}

/// The gate's stored history after thousands of drives of one journal, by runners
/// that restart now and then as processes do, equals the real outcomes exactly (it
/// used to double on every drive, overflow after ~63, and brick the journal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_drives_keep_the_gates_counts_exact() {
    let drives: u64 = std::env::var("KEEL_TEST_DRIVES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let (url, hits) = flaky_service().await;
    let config = format!(
        "[defaults]\nretry = {{ max_attempts = 3, base_delay = \"1ms\", max_delay = \"1ms\" }}\nbreaker = {{ enabled = false }}\n\
         [tools.op]\nkind = \"http\"\nurl = \"{url}\"\n"
    );
    let plan = Plan::parse("[[steps]]\ntool = \"op\"\n", "toml").unwrap();
    let mut r = runner(dir.path(), &config).await;
    for i in 0..drives {
        if i % 500 == 499 {
            r = runner(dir.path(), &config).await; // a restart: the history is loaded again
        }
        let run_id = r.create(&plan).await.unwrap();
        let status = r.drive(&run_id).await.unwrap();
        assert_eq!(status, RunStatus::Completed, "drive {i}: no retry may be refused");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2 * drives);
    let stored = r.journal().load_gate_history().await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].target, "op");
    assert_eq!(stored[0].class, ErrorClass::ServerError);
    assert_eq!(stored[0].outcomes, keel_core::gate::Outcomes { successes: drives, failures: 0 });
    // And a fresh runner still starts on it.
    runner(dir.path(), &config).await;
}

/// A journal whose gate rows cannot be read still opens: the runner falls back to
/// the prior instead of refusing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gate_row_never_stops_a_runner() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[tools.t]\nkind = \"command\"\nargv = [\"true\"]\n";
    let r = runner(dir.path(), config).await;
    let url = r.config().storage_url.clone();
    drop(r);
    let path = url.strip_prefix("sqlite:").unwrap_or(&url).to_owned();
    let mut conn =
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite:{path}")).await.unwrap();
    sqlx::query("INSERT INTO gate_history VALUES ('t', 'server_error', 2, 'garbage', 1e400)")
        .execute(&mut conn)
        .await
        .unwrap();
    let r = runner(dir.path(), config).await;
    let plan = Plan::parse("[[steps]]\ntool = \"t\"\n", "toml").unwrap();
    let run_id = r.create(&plan).await.unwrap();
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed);
}
