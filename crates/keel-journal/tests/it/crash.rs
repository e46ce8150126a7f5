//! The crash test: a real child process appends as fast as it can and is killed with
//! SIGKILL at a random moment; on reopen every acknowledged event is there, the
//! projections agree with the events, and the journal takes new writes.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use keel_journal::{Backend, JournalEvent, JournalOptions, NewEvent, RunState, open};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{all_snapshots, url};

const ROUNDS: usize = 4;

/// Runs the writer until it has printed `kill_after` acks, kills it, and returns every
/// ack it printed (including those printed between the decision and the kill).
async fn run_and_kill(url: &str, prefix: &str, kill_after: usize) -> Vec<(String, u64)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-journal-worker"))
        .args(["append", url, prefix])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the writer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acks = Vec::new();
    let mut killed = false;
    let read_all = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let mut parts = line.split_whitespace();
            assert_eq!(parts.next(), Some("ack"), "unexpected output: {line}");
            let run = parts.next().unwrap().to_owned();
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            acks.push((run, seq));
            if !killed && acks.len() >= kill_after {
                child.start_kill().expect("SIGKILL the writer");
                killed = true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("the writer acknowledged too slowly");
    let status = child.wait().await.unwrap();
    assert!(killed, "the writer exited by itself: {status}");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status}");
    acks
}

async fn crash_and_recover(backend: Backend) {
    let (url, _dir) = url(backend).await;
    for round in 0..ROUNDS {
        let prefix = format!("crash{round}");
        let kill_after = fastrand::usize(1..3000);
        let acks = run_and_kill(&url, &prefix, kill_after).await;

        let journal = open(&url, JournalOptions::default()).await.unwrap();
        let mut acked: BTreeMap<String, u64> = BTreeMap::new();
        for (run, seq) in &acks {
            let max = acked.entry(run.clone()).or_default();
            *max = (*max).max(*seq);
        }
        for (run, max_acked) in &acked {
            let events = journal.events(run, 0, u32::MAX).await.unwrap();
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "{run}: sequence numbers are contiguous from 1");
            assert!(seqs.len() as u64 >= *max_acked, "{run}: acknowledged {max_acked}, found {}", seqs.len());
            // The projections agree with the events.
            let snap = journal.snapshot(run).await.unwrap().unwrap();
            assert_eq!(snap.run.last_seq, seqs.len() as u64);
            let started =
                events.iter().filter(|e| matches!(e.event, JournalEvent::StepStarted { .. })).count();
            assert_eq!(snap.steps.len(), started, "{run}: one step row per started step");
            let attempts = events
                .iter()
                .filter(|e| {
                    matches!(
                        &e.event,
                        JournalEvent::Policy { event: keel_core::Event::AttemptStarted { .. }, .. }
                    )
                })
                .count();
            assert_eq!(snap.attempts.len(), attempts, "{run}: one attempt row per started attempt");
        }
        // The whole store: projections kept live equal projections rebuilt from events.
        let live = all_snapshots(&*journal).await;
        journal.rebuild_projections().await.unwrap();
        assert_eq!(all_snapshots(&*journal).await, live, "round {round}: rebuilt projections differ");
        // And the journal takes new writes after the crash.
        let run = format!("{prefix}-0");
        let last = journal.events(&run, 0, u32::MAX).await.unwrap().len() as u64;
        let done =
            JournalEvent::RunStateChanged { state: RunState::Cancelled, reason: Some("crashed".into()) };
        assert_eq!(journal.append(&[NewEvent::new(run.clone(), done)]).await.unwrap(), [last + 1]);
        assert_eq!(journal.snapshot(&run).await.unwrap().unwrap().run.state, RunState::Cancelled);
        journal.close().await;
        println!(
            "{backend:?} round {round}: killed after {} acks ({kill_after} asked), all present",
            acks.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_sigkill_of_the_writer() {
    crash_and_recover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_sigkill_of_the_writer() {
    crash_and_recover(Backend::Postgres).await;
}
