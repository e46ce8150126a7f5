//! Graceful shutdown: in-flight calls finish and no journal event is lost.

use std::time::{Duration, Instant};

use keel_core::TokioClock;
use keel_examples::payments::Faults;
use keel_journal::JournalOptions;
use serde_json::json;

use crate::support::{AGENT, Server};

const SLOW: &str = r#"
[tools.slow]
kind = "command"
argv = ["sh", "-c", "sleep 1; echo '{\"done\": true}'"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_finishes_in_flight_calls_and_loses_no_event() {
    let mut s = Server::start(Faults::default(), SLOW).await;
    let (http, url) = (s.http.clone(), s.url("/api/tools/slow/invoke"));
    let call = tokio::spawn(async move {
        let resp = http.post(url).bearer_auth(AGENT).json(&json!({"params": {}})).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
    });
    // Wait (bounded) until the call is in flight: its run has started its step.
    let start = Instant::now();
    let run_id = loop {
        let (_, runs) = s.get(Some(AGENT), "/api/runs").await;
        if let Some(r) = runs.as_array().and_then(|r| r.first()) {
            let id = r["run_id"].as_str().unwrap().to_owned();
            let (_, run) = s.get(Some(AGENT), &format!("/api/runs/{id}")).await;
            if !run["state"]["steps"].as_array().unwrap().is_empty() {
                break id;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the call never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    s.shutdown().await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200, "the in-flight call finished: {body}");
    assert_eq!(body["output"]["json"]["done"], true);

    // Reopen the journal: the run and every event of it are there.
    let url = format!("sqlite://{}", s.dir.path().join("keel.db").display());
    let journal = keel_journal::open(
        &url,
        JournalOptions { clock: std::sync::Arc::new(TokioClock::new()), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    let export = journal.export_run(&run_id).await.unwrap().unwrap();
    assert_eq!(export.state.run.state.as_str(), "completed");
    let kinds: Vec<&str> = export.events.iter().map(|e| e.event.kind()).collect();
    assert!(kinds.contains(&"step_finished") && kinds.contains(&"policy.attempt_ended"), "{kinds:?}");
    let seqs: Vec<u64> = export.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap in the run's events");
}
