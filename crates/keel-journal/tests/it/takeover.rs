//! Two processes share one PostgreSQL: the owner of a run is killed mid-run, the
//! other takes the run over once the lease expires, and the run finishes exactly once.

use std::process::Stdio;
use std::time::Duration;

use keel_journal::{Backend, JournalEvent, JournalOptions, NewEvent, RunState, StepOutcome, open};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::url;

const STEPS: u32 = 6;

fn worker(url: &str, owner: &str) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-journal-worker"))
        // run, owner, steps, ms per step, lease ttl in ms
        .args(["work", url, "shared-run", owner, &STEPS.to_string(), "150", "1500"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn a worker");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads lines until one equals `want`, within a bound; returns the lines read.
async fn wait_for(lines: &mut Lines<BufReader<ChildStdout>>, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line == want;
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no `{want}` line; saw {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_takeover_after_owner_is_killed() {
    let (url, _dir) = url(Backend::Postgres).await;
    let journal = open(&url, JournalOptions::default()).await.unwrap();
    let created = JournalEvent::RunCreated { name: "takeover".into(), input: serde_json::json!({}) };
    journal.append(&[NewEvent::new("shared-run", created)]).await.unwrap();

    let (mut a, mut a_out) = worker(&url, "instance-a");
    wait_for(&mut a_out, "acquired 1").await;
    let (mut b, mut b_out) = worker(&url, "instance-b");
    wait_for(&mut b_out, "waiting").await; // b sees the run held and keeps trying.
    wait_for(&mut a_out, "finished 2").await;
    a.start_kill().unwrap();
    let status = a.wait().await.unwrap();
    assert!(!status.success(), "a was killed: {status}");

    let b_lines = wait_for(&mut b_out, "succeeded").await;
    assert_eq!(b_lines.first().map(String::as_str), Some("acquired 2"), "b took over with the next epoch");
    assert!(b.wait().await.unwrap().success());

    let events = journal.events("shared-run", 0, u32::MAX).await.unwrap();
    let succeeded = events
        .iter()
        .filter(|e| matches!(e.event, JournalEvent::RunStateChanged { state: RunState::Completed, .. }))
        .count();
    assert_eq!(succeeded, 1, "the run finishes exactly once");
    for step in 1..=STEPS {
        let outputs: Vec<&serde_json::Value> = events
            .iter()
            .filter_map(|e| match &e.event {
                JournalEvent::StepFinished {
                    step: s,
                    outcome: StepOutcome::Succeeded { output, shape: None },
                } if *s == step => Some(output),
                _ => None,
            })
            .collect();
        assert_eq!(outputs.len(), 1, "step {step} finishes exactly once: {outputs:?}");
        if step <= 2 {
            assert_eq!(outputs[0]["by"], "instance-a", "a did steps 1 and 2");
        }
    }
    let snapshot = journal.snapshot("shared-run").await.unwrap().unwrap();
    assert_eq!(snapshot.run.state, RunState::Completed);
    assert!(snapshot.steps.iter().all(|s| s.status == "succeeded"));
    assert_eq!(snapshot.steps.len(), STEPS as usize);
}
