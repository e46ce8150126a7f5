//! The SQLite backend: one file, created on first use, in WAL mode.
//!
//! Durability: WAL with `synchronous = NORMAL`. A commit is in the WAL file before it
//! is acknowledged, so a killed *process* loses nothing it acknowledged; only a power
//! loss or OS crash can roll back the last few commits (`synchronous = FULL` closes
//! that window at the cost of an fsync per commit). Writes go through one connection
//! (SQLite has one writer anyway) and begin with `BEGIN IMMEDIATE`, so a transaction
//! never fails half-way to upgrade its lock; other processes' locks wait out a busy
//! timeout and are then retried with backoff. Opening (WAL switch and migrations) is
//! serialized between processes by an advisory lock on `PATH.lock`.

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
        // Processes opening one new file at once would race to switch it to WAL and
        // to create its tables: one at a time opens it, under a lock on a file beside it.
        let _opening = open_lock(path).await?;
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

/// How long an open waits for other processes opening the same file.
const OPEN_PATIENCE: Duration = Duration::from_secs(60);

/// Takes the exclusive lock on `PATH.lock` (an advisory `flock`, released when the
/// returned guard drops, also when the process dies), waiting up to [`OPEN_PATIENCE`].
async fn open_lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let io = |e: std::io::Error| crate::Error::Connection(sqlx::Error::Io(e));
    let mut file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&name).map_err(io)?;
    let give_up = tokio::time::Instant::now() + OPEN_PATIENCE;
    let mut delay = Duration::from_millis(2);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(guard) => return Ok(guard),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if tokio::time::Instant::now() < give_up => {
                file = f;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(50));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("another process kept {} locked for {OPEN_PATIENCE:?}", name.to_string_lossy()),
                )));
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        }
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
