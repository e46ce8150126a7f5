//! keel-journal: Keel's durable store — the append-only journal of every run, step
//! and attempt, the current state derived from it, idempotency keys, leases on runs
//! and the confidence gate's history, on SQLite (default) or PostgreSQL.
//!
//! Open a store with [`open`]; everything is behind the [`Journal`] trait, which both
//! backends implement with the same semantics. Events ([`JournalEvent`]) are ordered
//! per run and carry a schema version; the projections ([`RunSnapshot`]) are updated
//! in the same transaction as the append and can be rebuilt from the events alone
//! ([`Journal::rebuild_projections`]). Policy code records events through a
//! [`JournalWriter`]'s non-blocking [`RunSink`], which commits them in groups.
//!
//! ```
//! use keel_journal::{open, JournalEvent, JournalOptions, NewEvent, RunState};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel_journal::Result<()> {
//! let dir = std::env::temp_dir().join(format!("keel-doc-{}", std::process::id()));
//! let journal = open(&format!("sqlite:{}/journal.db", dir.display()), JournalOptions::default()).await?;
//! let seqs = journal
//!     .append(&[
//!         NewEvent::new("run-1", JournalEvent::RunCreated { name: "demo".into(), input: serde_json::json!({}) }),
//!         NewEvent::new("run-1", JournalEvent::RunStateChanged { state: RunState::Running, reason: None }),
//!     ])
//!     .await?;
//! assert_eq!(seqs, [1, 2]);
//! let run = journal.snapshot("run-1").await?.expect("the run exists").run;
//! assert_eq!(run.state, RunState::Running);
//! # journal.close().await; let _ = std::fs::remove_dir_all(dir); Ok(()) }
//! ```

pub mod alert;
pub mod error;
pub mod event;
pub mod faulty;
pub mod journal;
pub mod postgres;
pub mod sqlite;
pub mod state;
mod store;
pub mod writer;

pub use alert::{AlertRecord, IncidentEntry, IncidentView};
pub use error::{Error, Result};
pub use event::{
    ApprovalDecision, Creation, JournalEvent, NewEvent, ProgramOutcome, RecordedEvent, RunState,
    SCHEMA_VERSION, StepOutcome,
};
pub use faulty::Faulty;
pub use journal::{Backend, Journal, JournalOptions, open};
pub use postgres::PostgresJournal;
pub use sqlite::SqliteJournal;
pub use state::{
    ApprovalView, AttemptStats, AttemptView, Claim, ClaimToken, Lease, NewRun, PruneReport, RunExport,
    RunPage, RunSnapshot, RunView, StepView, TicketView,
};
pub use writer::{Ack, JournalWriter, RunSink};
