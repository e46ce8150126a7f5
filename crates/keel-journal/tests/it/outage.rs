//! The writer and the journal through a storage outage: a full disk (writes refused
//! on demand by `Faulty` over a real SQLite file) and a PostgreSQL server taken away
//! and given back (a proxy cut between the journal and a real server).

use std::sync::Arc;
use std::time::Duration;

use keel_core::{Classified as _, ErrorClass, Event, EventSink as _};
use keel_journal::{Error, Faulty, Journal, JournalEvent, JournalOptions, JournalWriter, RunState};
use serde_json::json;

fn created(name: &str) -> JournalEvent {
    JournalEvent::RunCreated { name: name.into(), input: json!({}) }
}

fn running() -> JournalEvent {
    JournalEvent::RunStateChanged { state: RunState::Running, reason: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_recovers_when_its_storage_does() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("j.db").display());
    let real = keel_journal::open(&url, JournalOptions::default()).await.unwrap();
    let faulty = Faulty::new(real.clone());
    let writer = JournalWriter::spawn(faulty.clone(), 64);
    assert_eq!(writer.append("a", created("a")).await.unwrap(), 1);
    assert!(writer.healthy());

    faulty.fail_writes(true);
    let lost = writer.append("a", running()).await.unwrap_err();
    assert_eq!(lost.class(), ErrorClass::ServerError, "the failed batch's caller gets its error: {lost}");
    // An event with no ack (the policy sink's path) is reported to its run's flush.
    writer.sink("b").record(&Event::AttemptStarted { target: Arc::from("t"), attempt: 1 });
    assert!(matches!(writer.flush_run("b").await, Err(Error::Batch(_))), "b's lost event is reported");
    assert!(writer.flush_run("b").await.is_ok(), "once");
    assert!(writer.flush_run("a").await.is_ok(), "a's caller already had its error");
    assert!(!writer.healthy(), "the last batch failed");
    assert!(faulty.check_writable().await.is_err());

    faulty.fail_writes(false);
    // The storage is back: the next batch is tried afresh and commits.
    assert_eq!(writer.append("a", running()).await.unwrap(), 2);
    assert!(writer.healthy());
    assert!(matches!(writer.flush().await, Err(Error::Batch(_))), "the global flush reports the outage once");
    writer.flush().await.unwrap();
    faulty.check_writable().await.unwrap();
    let events = real.events("a", 0, 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2], "contiguous, nothing half-written");
    assert!(faulty.refused() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_calls_within_their_bound_and_the_writer_recovers() {
    let url = keel_testkit::postgres_database().await;
    let proxy = keel_testkit::Proxy::start(keel_testkit::target_of(&url)).await;
    let options = JournalOptions { acquire_timeout: Duration::from_secs(1), ..JournalOptions::default() };
    let journal: Arc<dyn Journal> = keel_journal::open(&proxy.url_for(&url), options).await.unwrap();
    let writer = JournalWriter::spawn(journal.clone(), 64);
    assert_eq!(writer.append("p", created("p")).await.unwrap(), 1);

    proxy.cut();
    // Every call fails, none hangs: the acquire timeout bounds it and is not retried.
    let bound = Duration::from_secs(20);
    let e = tokio::time::timeout(bound, writer.append("p", running())).await.expect("bounded").unwrap_err();
    assert!(matches!(e.class(), ErrorClass::Network | ErrorClass::Timeout), "{e}");
    let e = tokio::time::timeout(bound, journal.check_writable()).await.expect("bounded").unwrap_err();
    assert!(matches!(e.class(), ErrorClass::Network | ErrorClass::Timeout), "{e}");
    let e = tokio::time::timeout(bound, journal.snapshot("p")).await.expect("bounded").unwrap_err();
    assert!(matches!(e.class(), ErrorClass::Network | ErrorClass::Timeout), "{e}");
    assert!(!writer.healthy());
    assert!(proxy.refused() > 0, "the journal tried to reconnect");

    proxy.restore();
    // Back: the writer's next batch commits (the pool replaces its dead connections).
    assert_eq!(writer.append("p", running()).await.unwrap(), 2);
    assert!(writer.healthy());
    journal.check_writable().await.unwrap();
    let events = journal.events("p", 0, 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
}
