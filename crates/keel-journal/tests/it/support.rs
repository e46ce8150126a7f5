//! Stores for the tests: a temp SQLite file or a fresh PostgreSQL database, with a
//! clock the test moves by hand.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keel_core::Clock;
use keel_journal::{Backend, Journal, JournalOptions, open};

/// Wall time that only moves when told to.
#[derive(Debug)]
pub(crate) struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub(crate) fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
    fn wall(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

pub(crate) struct Store {
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) url: String,
    pub(crate) clock: Arc<ManualClock>,
    _dir: Option<tempfile::TempDir>,
}

/// A URL for a new, empty store on `backend` (and the temp dir keeping it alive).
pub(crate) async fn url(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (format!("sqlite:{}", dir.path().join("sub/journal.db").display()), Some(dir))
        }
        Backend::Postgres => (keel_testkit::postgres_database().await, None),
    }
}

pub(crate) async fn store(backend: Backend) -> Store {
    let (url, dir) = url(backend).await;
    // A fixed epoch well after 1970 keeps times readable in failures.
    let clock =
        Arc::new(ManualClock(Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))));
    let options = JournalOptions {
        clock: clock.clone(),
        claim_ttl: Duration::from_secs(60),
        idempotency_ttl: Duration::from_secs(3600),
        ..JournalOptions::default()
    };
    let journal = open(&url, options).await.unwrap();
    assert_eq!(journal.backend(), backend);
    Store { journal, url, clock, _dir: dir }
}

/// Every run's snapshot, for comparing live and rebuilt projections.
pub(crate) async fn all_snapshots(journal: &dyn Journal) -> Vec<keel_journal::RunSnapshot> {
    let mut out = Vec::new();
    for id in journal.run_ids().await.unwrap() {
        out.push(journal.snapshot(&id).await.unwrap().unwrap());
    }
    out
}
