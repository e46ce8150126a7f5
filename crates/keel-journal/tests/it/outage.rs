//! The writer and the journal through a storage outage: a full disk (writes refused
//! on demand by `Faulty` over a real SQLite file) and a PostgreSQL server taken away
//! and given back (a proxy cut between the journal and a real server).

use std::sync::Arc;
use std::time::Duration;

use keel_core::{Classified as _, ErrorClass, Event, EventSink as _};
use keel_journal::{Error, Faulty, Journal, JournalEvent, JournalOptions, JournalWriter, NewEvent, RunState};
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
    // A group fails whole, answered by its one ack.
    let group = || vec![NewEvent::new("a", running()), NewEvent::new("a", running())];
    assert!(matches!(writer.submit_all(group()).durable().await, Err(Error::Batch(_))));
    // So does a creation in a batch: nothing of it is written.
    let creation = keel_journal::Creation {
        run_id: "c".into(),
        events: vec![created("c"), running()],
        lease: ("me".into(), Duration::from_secs(10)),
    };
    assert!(matches!(writer.create(creation.clone()).await, Err(Error::Batch(_))));
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
    assert_eq!(writer.submit_all(group()).durable().await.unwrap(), 4, "the last one's seq");
    assert!(writer.submit_all(Vec::new()).durable().await.is_err(), "an empty group is refused");
    assert!(writer.create(creation).await.unwrap().is_some(), "created once the storage is back");
    assert!(matches!(writer.flush().await, Err(Error::Batch(_))), "the global flush reports the outage once");
    writer.flush().await.unwrap();
    faulty.check_writable().await.unwrap();
    let events = real.events("a", 0, 10).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "contiguous, nothing half-written"
    );
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

/// Collects the messages of `tracing` events with their level (a subscriber of the
/// test's thread only).
#[derive(Default, Clone)]
struct Logs(Arc<std::sync::Mutex<Vec<(tracing::Level, String)>>>);

impl tracing::Subscriber for Logs {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.lock().unwrap().push((*event.metadata().level(), m.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test] // one thread: the writer task logs on the test's thread
async fn the_outage_and_its_end_are_logged_once_each() {
    let logs = Logs::default();
    let _guard = tracing::subscriber::set_default(logs.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("j.db").display());
    let faulty = Faulty::new(keel_journal::open(&url, JournalOptions::default()).await.unwrap());
    let writer = JournalWriter::spawn(faulty.clone(), 64);
    writer.append("a", created("a")).await.unwrap();
    faulty.fail_writes(true);
    for _ in 0..3 {
        assert!(writer.append("a", running()).await.is_err());
    }
    faulty.fail_writes(false);
    writer.append("a", running()).await.unwrap();
    writer.append("a", running()).await.unwrap();
    let logs = logs.0.lock().unwrap().clone();
    let count = |level: tracing::Level, text: &str| {
        logs.iter().filter(|(l, m)| *l == level && m.contains(text)).count()
    };
    assert_eq!(count(tracing::Level::WARN, "journal writes are failing"), 1, "the start, once: {logs:?}");
    assert_eq!(count(tracing::Level::ERROR, "journal batch failed"), 3, "each failed batch: {logs:?}");
    assert_eq!(count(tracing::Level::INFO, "journal writes recovered"), 1, "the end, once: {logs:?}");
}
