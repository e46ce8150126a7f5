//! A tool's breaker belongs to the process, not a run: its opening reaches the journal
//! (under the process's run), `/metrics` and the dashboard while it is open (issue 12).

use keel_examples::payments::Faults;
use serde_json::json;

use crate::support::{ADMIN, AGENT, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_breaker_opening_is_journaled_counted_and_shown() {
    // `notify` is down; its breaker opens after a few failed calls.
    let s = Server::start(
        Faults { notify_down: true, ..Faults::default() },
        "[defaults.breaker]\nfailure_ratio = 0.5\nmin_calls = 2\nopen_for = \"60s\"\n",
    )
    .await;
    for i in 0..3 {
        let plan = json!({"plan": {"steps": [{"tool": "notify", "params": {"order": i}}]}});
        let (status, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
        assert_eq!(status, 201, "{started}");
        let id = started["run_id"].as_str().unwrap().to_owned();
        s.until_run(&id, |r| {
            r["state"]["run"]["state"] != "running" && r["state"]["run"]["state"] != "created"
        })
        .await;
    }
    let (_, metrics) = s.get(Some(ADMIN), "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(metrics.contains("keel_breaker_state{target=\"notify\"} 2"), "{metrics}");
    let (_, dashboard) = s.get(Some(ADMIN), "/api/dashboard").await;
    assert_eq!(dashboard["targets"]["notify"]["breaker"], "open", "{dashboard}");
    // Journaled: in the run whose call opened it (a transition no call caused, such as
    // open → half-open seen by a reader, goes under the process's run).
    s.state.runner.flush().await.unwrap();
    let journal = &s.state.journal;
    let mut opened = false;
    for id in journal.run_ids().await.unwrap() {
        for e in journal.events(&id, 0, 1000).await.unwrap() {
            let v = serde_json::to_value(&e.event).unwrap().to_string();
            opened |=
                v.contains("breaker_transition") && v.contains("notify") && v.contains("\"to\":\"open\"");
        }
    }
    assert!(opened, "the opening is in the journal");
}
