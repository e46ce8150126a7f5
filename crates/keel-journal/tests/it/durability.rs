//! Durability holes found by attacking the journal: first opens racing on migrations,
//! the gate's counts overflowing, unreadable gate rows, and a stale lease holder's
//! events after a takeover.

use std::sync::Arc;
use std::time::Duration;

use keel_core::gate::{GateRecord, Outcomes};
use keel_core::{ConfidenceGate, ErrorClass};
use keel_journal::{Backend, Error, JournalEvent, JournalWriter, NewEvent, RunState};

use crate::support::{Store, store};

fn created() -> JournalEvent {
    JournalEvent::RunCreated { name: "run".into(), input: serde_json::json!({}) }
}

fn running() -> JournalEvent {
    JournalEvent::RunStateChanged { state: RunState::Running, reason: None }
}

/// 24 processes open one journal file that does not exist yet, all at once: every
/// one of them succeeds (before the open lock, some failed with "table already
/// exists" or "database is locked").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_opens_of_one_sqlite_file_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("fresh.db").display());
    // All spawned before any is waited for: they race for real.
    let children: Vec<_> = (0..24)
        .map(|i| {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-journal-worker"))
                .args(["open", &url, &format!("run-{i}")])
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().await.unwrap();
        if !out.status.success() {
            failures.push(format!("{i}: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    assert!(failures.is_empty(), "{} of 24 first opens failed: {failures:?}", failures.len());
    let journal = keel_journal::open(&url, keel_journal::JournalOptions::default()).await.unwrap();
    assert_eq!(journal.run_ids().await.unwrap().len(), 24);
}

async fn gate_counts_saturate_instead_of_overflowing(s: Store) {
    let j = &s.journal;
    let huge = GateRecord {
        target: "tool".into(),
        class: ErrorClass::ServerError,
        attempt: 2,
        outcomes: Outcomes { successes: u64::MAX / 2 + 7, failures: 3 },
    };
    for _ in 0..3 {
        j.add_gate_outcomes(std::slice::from_ref(&huge)).await.unwrap();
    }
    let loaded = j.load_gate_history().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].outcomes, Outcomes { successes: i64::MAX as u64, failures: 9 });
}

async fn a_stale_holder_cannot_write_through_the_writer(s: Store) {
    let j = &s.journal;
    let ttl = Duration::from_secs(10);
    j.append(&[NewEvent::new("taken", created()), NewEvent::new("other", created())]).await.unwrap();
    let a = j.acquire_lease("taken", "a", ttl).await.unwrap().unwrap();
    assert_eq!(a.taken_from, None);
    // a stalls past its lease; b takes the run over and knows from whom.
    s.clock.advance(Duration::from_secs(11));
    let b = j.acquire_lease("taken", "b", ttl).await.unwrap().unwrap();
    assert_eq!(b.taken_from.as_deref(), Some("a"));
    let writer = JournalWriter::spawn(j.clone(), 64);
    // a's events and another run's share one batch: only a's are refused.
    let stale = writer.submit_event(NewEvent::new("taken", running()).fenced(Some(Arc::new(a.clone()))));
    let fine = writer.submit_event(NewEvent::new("other", running()));
    let held = writer.submit_event(NewEvent::new("taken", running()).fenced(Some(Arc::new(b.clone()))));
    assert!(matches!(stale.durable().await, Err(Error::LeaseLost { .. })));
    assert_eq!(fine.durable().await.unwrap(), 2);
    assert_eq!(held.durable().await.unwrap(), 2);
    writer.flush().await.expect("a fenced-out event does not poison the writer");
    let events = j.events("taken", 0, 100).await.unwrap();
    assert_eq!(events.len(), 2, "nothing of a's after the takeover");
}

async fn an_abandoned_attempt_is_closed(s: Store) {
    let j = &s.journal;
    let target: Arc<str> = Arc::from("tool");
    let start = JournalEvent::Policy {
        step: Some(0),
        event: keel_core::Event::AttemptStarted { target: target.clone(), attempt: 1 },
    };
    j.append(&[NewEvent::new("r", created()), NewEvent::new("r", start)]).await.unwrap();
    let open = j.snapshot("r").await.unwrap().unwrap();
    assert_eq!(open.attempts[0].ended_at_ms, None);
    let gone = JournalEvent::AttemptAbandoned { step: Some(0), target: "tool".into(), attempt: 1 };
    j.append(&[NewEvent::new("r", gone)]).await.unwrap();
    let closed = j.snapshot("r").await.unwrap().unwrap();
    assert_eq!(closed.attempts[0].outcome.as_deref(), Some("abandoned"));
    assert!(closed.attempts[0].ended_at_ms.is_some());
    j.rebuild_projections().await.unwrap();
    assert_eq!(j.snapshot("r").await.unwrap().unwrap(), closed);
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::store(super::Backend::Sqlite).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::store(super::Backend::Postgres).await).await;
                }
            )*
        }
    };
}

both!(
    gate_counts_saturate_instead_of_overflowing,
    a_stale_holder_cannot_write_through_the_writer,
    an_abandoned_attempt_is_closed
);

/// A gate row this build cannot read (a REAL left by an overflowing older build, an
/// unknown class) costs that row's history, never the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_gate_rows_are_skipped_or_saturated() {
    let s = store(Backend::Sqlite).await;
    let path = s.url.strip_prefix("sqlite:").unwrap().to_owned();
    let mut conn =
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite:{path}")).await.unwrap();
    for stmt in [
        "INSERT INTO gate_history VALUES ('tool', 'server_error', 2, 1.8446744073709552e19, 4)",
        "INSERT INTO gate_history VALUES ('tool', 'no_such_class', 2, 1, 1)",
        "INSERT INTO gate_history VALUES ('tool', 'timeout', 2, 'garbage', 1)",
        "INSERT INTO gate_history VALUES ('tool', 'network', 2, 5, 6)",
    ] {
        sqlx::query(stmt).execute(&mut conn).await.unwrap();
    }
    let loaded = s.journal.load_gate_history().await.expect("bad rows never fail the load");
    let classes: Vec<_> = loaded.iter().map(|r| r.class).collect();
    assert_eq!(classes, [ErrorClass::Network, ErrorClass::ServerError]);
    assert_eq!(loaded[1].outcomes, Outcomes { successes: i64::MAX as u64, failures: 4 });
    // Adding to the REAL heals it to an integer.
    let gate = ConfidenceGate::default();
    gate.record(&Arc::from("tool"), ErrorClass::ServerError, 2, true);
    s.journal.add_gate_outcomes(&gate.take_unsaved()).await.unwrap();
    let kind: String =
        sqlx::query_scalar("SELECT typeof(successes) FROM gate_history WHERE class = 'server_error'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(kind, "integer");
}
