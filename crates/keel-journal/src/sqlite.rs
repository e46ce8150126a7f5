//! The SQLite backend: one file, created on first use, in WAL mode.
//!
//! Durability: WAL with `synchronous = NORMAL`. A commit is in the WAL file before it
//! is acknowledged, so a killed *process* loses nothing it acknowledged; only a power
//! loss or OS crash can roll back the last few commits (`synchronous = FULL` closes
//! that window at the cost of an fsync per commit). Writes go through one connection
//! (SQLite has one writer anyway) and begin with `BEGIN IMMEDIATE`, so a transaction
//! never fails half-way to upgrade its lock; other processes' locks wait out a busy
//! timeout and are then retried with backoff.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use crate::error::Result;
use crate::journal::JournalOptions;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A journal in one SQLite file.
#[derive(Debug)]
pub struct SqliteJournal {
    write: SqlitePool,
    read: SqlitePool,
    options: JournalOptions,
}

impl SqliteJournal {
    /// Opens (creating if missing, with its parent directories) the journal at `path`
    /// and applies the embedded migrations.
    ///
    /// # Errors
    ///
    /// Storage errors; `network` when the file cannot be created or opened.
    pub async fn open(path: &Path, options: JournalOptions) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::Connection(sqlx::Error::Io(e)))?;
        }
        let connect = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(false);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .connect_with(connect)
            .await?;
        Ok(Self { write, read, options })
    }
}

crate::store::sql_journal!(
    SqliteJournal,
    Sqlite,
    SqliteConnection,
    backend = crate::Backend::Sqlite,
    begin = "BEGIN IMMEDIATE",
    lock_lease = "",
    claim_candidates = crate::store::sql::CLAIM_CANDIDATES,
);
