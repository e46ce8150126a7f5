//! The inbox's and the dashboard's queries at a large journal: `keel serve`'s own
//! router (the `keel_server::app` a `keel serve` runs) over a SQLite journal of
//! `KEEL_BENCH_RUNS` runs (default 100,000), each a plan run with a step and two
//! attempts, every 50th waiting for an approval and every 70th escalated.
//!
//! Run: `cargo bench -p keel-server --bench queries` (`KEEL_BENCH_RUNS=3000` for a
//! quick one). Prints, per endpoint, the median and the slowest of 20 requests and the
//! body size; the target is ≤ 50 ms each at 100,000 runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::print_stdout,
    missing_docs
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::KEY;

use keel_core::{AttemptOutcome, ErrorClass, Event, TokioClock};
use keel_journal::{JournalEvent, JournalOptions, NewEvent, RunState, StepOutcome};
use serde_json::json;

fn run_events(i: u64) -> Vec<NewEvent> {
    let run = format!("run-{i:012}");
    let t: Arc<str> = Arc::from("charge");
    let mut e = vec![
        JournalEvent::RunCreated {
            name: "bench".into(),
            input: json!({"plan": {"steps": []}, "input": {"i": i}}),
        },
        JournalEvent::RunStateChanged { state: RunState::Running, reason: None },
        JournalEvent::StepStarted {
            step: 0,
            name: "charge".into(),
            target: "charge".into(),
            input: json!({"order": i}),
        },
        JournalEvent::Policy {
            step: Some(0),
            event: Event::AttemptStarted { target: t.clone(), attempt: 1 },
        },
        JournalEvent::Policy {
            step: Some(0),
            event: Event::AttemptEnded {
                target: t.clone(),
                attempt: 1,
                outcome: AttemptOutcome::Failed(ErrorClass::Timeout),
                latency: Duration::from_millis(30),
            },
        },
        JournalEvent::Policy {
            step: Some(0),
            event: Event::AttemptStarted { target: t.clone(), attempt: 2 },
        },
        JournalEvent::Policy {
            step: Some(0),
            event: Event::AttemptEnded {
                target: t,
                attempt: 2,
                outcome: AttemptOutcome::Ok,
                latency: Duration::from_millis(3),
            },
        },
    ];
    if i % 50 == 0 {
        e.push(JournalEvent::ApprovalRequested {
            approval_id: format!("apr-{i}"),
            step: 0,
            tool: "charge".into(),
            args_digest: "d".into(),
            expires_at_ms: i64::MAX,
            args: json!({"order": i}),
        });
        e.push(JournalEvent::RunStateChanged { state: RunState::WaitingApproval, reason: None });
    } else if i % 70 == 0 {
        e.push(JournalEvent::TicketOpened {
            ticket_id: format!("tkt-{i}"),
            step: Some(0),
            class: ErrorClass::Timeout,
            summary: "charge kept timing out".into(),
            context: json!({}),
        });
        e.push(JournalEvent::RunStateChanged { state: RunState::Escalated, reason: None });
    } else {
        e.push(JournalEvent::StepFinished {
            step: 0,
            outcome: StepOutcome::Succeeded { output: json!({"ok": true}), shape: None },
        });
        e.push(JournalEvent::RunStateChanged { state: RunState::Completed, reason: None });
    }
    e.into_iter().map(|ev| NewEvent::new(run.clone(), ev)).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: u64 = std::env::var("KEEL_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("keel.db").display());
    let clock = Arc::new(TokioClock::new());
    let journal =
        keel_journal::open(&db, JournalOptions { clock: clock.clone(), ..JournalOptions::default() })
            .await
            .unwrap();
    let t = Instant::now();
    let mut batch = Vec::new();
    for i in 0..runs {
        batch.extend(run_events(i));
        if batch.len() >= 5_000 {
            journal.append(&batch).await.unwrap();
            batch.clear();
        }
    }
    if !batch.is_empty() {
        journal.append(&batch).await.unwrap();
    }
    eprintln!("built a journal of {runs} runs in {:.1} s", t.elapsed().as_secs_f64());

    let text = format!(
        "[storage]\nurl = \"{db}\"\n[server]\nkeys = [{{ name = \"root\", key_env = \"BENCH_KEY\", role = \"admin\" }}]\n\
         [tools.charge]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/charge\"\n"
    );
    let support::Running { base, stop, served } = support::serve(&text, dir.path(), journal, clock).await;
    let http = reqwest::Client::new();
    println!("| endpoint ({runs} runs) | median ms | slowest ms | bytes |");
    println!("|---|---:|---:|---:|");
    for path in [
        "/api/runs",
        "/api/runs?state=escalated&limit=50",
        "/api/approvals",
        "/api/tickets",
        "/api/dashboard",
        "/metrics",
        "/readyz",
        "/api/runs/run-000000000050",
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let resp = http.get(format!("{base}{path}")).bearer_auth(KEY).send().await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            bytes = resp.bytes().await.unwrap().len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!("| `{path}` | {:.1} | {:.1} | {bytes} |", times[times.len() / 2], times[times.len() - 1]);
    }
    let _ = stop.send(());
    let _ = served.await;
}
