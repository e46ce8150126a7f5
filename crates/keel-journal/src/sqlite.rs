//! The SQLite backend: one file, created on first use, in WAL mode.
//!
//! Durability: WAL with `synchronous = NORMAL`. A commit is in the WAL file before it
//! is acknowledged, so a killed *process* loses nothing it acknowledged; only a power
//! loss or OS crash can roll back the last few commits (`synchronous = FULL` closes
//! that window at the cost of an fsync per commit). The hot writes go through one
//! rusqlite connection ([`Raw`]; SQLite has one writer anyway), the rare ones (rebuild,
//! prune, gate, alerts) and the checkpoints through one sqlx connection; a transaction
//! begins with `BEGIN IMMEDIATE`, so it never fails half-way to upgrade its lock; a
//! lock held elsewhere is waited out for a busy timeout and then retried with backoff.
//! Opening (WAL switch and migrations) is serialized between processes by an advisory
//! lock on `PATH.lock`.

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
    /// The hot writes' connection (appends, runs, leases, claims).
    writer: std::sync::Arc<tokio::sync::Mutex<Writer>>,
    /// The other writes' (rebuild, prune, gate history, alerts, claiming runs), and
    /// the checkpoints.
    write: SqlitePool,
    checkpoints: std::sync::Arc<Checkpoints>,
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
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(false);
        // Processes opening one new file at once would race to switch it to WAL and
        // to create its tables: one at a time opens it, under a lock on a file beside it.
        let _opening = open_lock(path).await?;
        // A file's connection does not go stale as a network one does: no ping (a round
        // trip to the connection's thread) before each use.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(options.max_connections.max(1))
            .connect_with(connect)
            .await?;
        let writer = std::sync::Arc::new(tokio::sync::Mutex::new(Writer {
            conn: open_writer(path)?,
            slots: Default::default(),
        }));
        let checkpoints =
            std::sync::Arc::new(Checkpoints { file: path.to_owned(), ..Checkpoints::default() });
        Ok(Self { writer, write, read, options, checkpoints })
    }
}

/// Events in a batch from which its write is run under `block_in_place`.
pub(crate) const HEAVY_BATCH: usize = 32;

/// Runs a write on the calling thread. A heavy one (a batch of the writer's: up to
/// thousands of events, milliseconds) on a multi-thread runtime's worker is run under
/// `block_in_place`, so that the worker's other tasks (requests) move to another
/// thread meanwhile instead of waiting behind it; a small one (a durable tool call's
/// few events) is cheaper than handing the worker over.
pub(crate) fn on_this_thread<T>(heavy: bool, write: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi { tokio::task::block_in_place(write) } else { write() }
}

/// Writes on the write connection so far, and whether a checkpoint is running.
#[derive(Debug, Default)]
struct Checkpoints {
    writes: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
    /// The database file the checkpoints copy into.
    file: std::path::PathBuf,
}

impl SqliteJournal {
    /// Counts a write on the write connection; every [`CHECKPOINT_EVERY`] writes,
    /// checkpoints the WAL in the background: most of it while writers go on
    /// (`PASSIVE`, on sqlx's connection), then what they added meanwhile with the write
    /// connection held, so that the checkpoint completes and the next write starts the
    /// WAL over. Under a steady load a checkpoint that writers always outrun never
    /// completes, and the WAL grew without bound (1.9 GB in 17,000 durable calls;
    /// every write past its end also cost the kernel zeroing new pages).
    fn wrote(&self) {
        use std::sync::atomic::Ordering;
        let c = &*self.checkpoints;
        if c.writes.fetch_add(1, Ordering::Relaxed) % CHECKPOINT_EVERY != CHECKPOINT_EVERY - 1
            || c.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (pool, writer, c) = (self.write.clone(), self.writer.clone(), self.checkpoints.clone());
        tokio::spawn(async move {
            // Passes while writers go on, each copying what they added during the last,
            // until that is little: the pass with writers held then copies only a few
            // pages.
            let mut copied = 0;
            for _ in 0..CHECKPOINT_PASSES {
                let pass = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)");
                match pass.fetch_one(&pool).await {
                    Ok((_, _, done)) if done.saturating_sub(copied) > CHECKPOINT_SMALL => copied = done,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "journal checkpoint failed; the next one retries");
                        break;
                    }
                }
            }
            // A pass that does not reach the WAL's end does not sync the database file:
            // sync what the passes copied now, or the last pass would (holding writers
            // for all of it: 30–90 ms after a busy stretch).
            let file = c.file.clone();
            let synced = tokio::task::spawn_blocking(move || std::fs::File::open(file)?.sync_data()).await;
            if let Ok(Err(e)) = synced {
                tracing::debug!(error = %e, "journal checkpoint: syncing the database file failed; the last pass does");
            }
            let conn = writer.lock().await;
            let rest = on_this_thread(true, || {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
            });
            drop(conn);
            match rest {
                Ok((frames, copied)) if frames != copied => {
                    tracing::debug!(
                        frames,
                        copied,
                        "journal checkpoint incomplete (a reader holds the WAL); the next one retries"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "journal checkpoint failed; the next one retries"),
            }
            c.running.store(false, Ordering::Release);
        });
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

crate::store::exec::sqlx_exec!(SqliteConnection, Sqlite);

/// How long a write on the write connection waits for another *process* holding the
/// file's write lock before it fails as busy (and is retried with backoff by
/// `with_retry`, off the thread): it runs on a tokio worker, which must not sleep long.
const RAW_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// The sqlx connections' busy timeout (their waits are on sqlx's own threads).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Statements kept prepared on the write connection: the journal's writes, and the
/// multi-row inserts of the batch sizes seen lately.
const STATEMENT_CACHE: usize = 128;

/// Writes on the write connection between two checkpoints.
const CHECKPOINT_EVERY: u64 = 200;

/// At most this many checkpoint passes run while writers go on ([`SqliteJournal::wrote`]).
const CHECKPOINT_PASSES: usize = 4;

/// Frames (pages) a pass copied below which the next pass is the one with writers held.
const CHECKPOINT_SMALL: i64 = 256;

/// The size (bytes) a WAL is cut back to when it starts over.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Opens the write connection the journal's hot writes run on ([`Raw`]).
fn open_writer(path: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(RAW_BUSY_TIMEOUT)?;
    // WAL is the file's (set by the first open); durability is per connection.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Checkpoints (the WAL copied into the file, with an fsync: milliseconds) run in
    // the background every CHECKPOINT_EVERY writes (`SqliteJournal::wrote`), never
    // inside a call's write.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A WAL started over is cut back to this size (the space a burst took is returned).
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(conn)
}

/// The journal's write connection, and where each of its statements' `$N` parameters
/// sits (SQLite numbers named parameters by first appearance; asking a statement for
/// each parameter's name is a scan of its list, quadratic in a multi-row insert's
/// hundreds of parameters, and was most of binding's time).
pub(crate) struct Writer {
    conn: rusqlite::Connection,
    /// By statement: the argument (0-based) bound to each parameter slot.
    slots: std::collections::HashMap<String, Box<[usize]>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("statements", &self.slots.len()).finish_non_exhaustive()
    }
}

impl std::ops::Deref for Writer {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// One write on the journal's write connection: statements run on the calling thread,
/// prepared once per connection ([`Exec`] for SQLite). A statement on sqlx's SQLite
/// driver is two thread switches (to its connection's thread and back); a durable
/// tool call is some forty statements, and those switches were most of its time.
///
/// [`Exec`]: crate::store::exec::Exec
pub(crate) struct Raw<'c> {
    conn: &'c mut Writer,
    tx: bool,
}

impl<'c> Raw<'c> {
    /// Starts a write: `BEGIN IMMEDIATE` when `tx`, else each statement commits itself.
    pub(crate) fn begin(conn: &'c mut Writer, tx: bool) -> Result<Self> {
        if tx {
            conn.execute_batch("BEGIN IMMEDIATE")?;
        }
        Ok(Self { conn, tx })
    }

    /// Commits `result`'s write (or rolls it back when it failed): no transaction is
    /// left open.
    pub(crate) fn finish<T>(self, result: Result<T>) -> Result<T> {
        let result = match result {
            Ok(v) if self.tx => self.conn.execute_batch("COMMIT").map(|()| v).map_err(crate::Error::from),
            other => other,
        };
        if !self.conn.is_autocommit() {
            // Failed, or its COMMIT did: nothing of it stays.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result
    }

    fn statement(
        &mut self,
        sql: &str,
        args: &[crate::store::exec::Arg<'_>],
    ) -> Result<rusqlite::CachedStatement<'_>> {
        use crate::store::exec::Arg;
        use rusqlite::types::Null;
        let Writer { conn, slots } = &mut *self.conn;
        let mut stmt = conn.prepare_cached(sql)?;
        if !slots.contains_key(sql) {
            // `$N` is the N-th argument wherever it appears.
            let found: Option<Box<[usize]>> = (1..=stmt.parameter_count())
                .map(|i| {
                    let name = stmt.parameter_name(i)?.strip_prefix('$')?;
                    name.parse::<usize>().ok()?.checked_sub(1)
                })
                .collect();
            let found =
                found.ok_or(crate::Error::Internal("a journal statement has a parameter that is not $N"))?;
            if slots.len() >= 4 * STATEMENT_CACHE {
                slots.clear();
            }
            slots.insert(sql.to_owned(), found);
        }
        let order = slots.get(sql).ok_or(crate::Error::Internal("a statement's parameters were not kept"))?;
        for (i, &n) in order.iter().enumerate() {
            match args.get(n).ok_or(crate::Error::Internal("a journal statement lacks an argument"))? {
                Arg::Int(v) => stmt.raw_bind_parameter(i + 1, v)?,
                Arg::Text(s) => stmt.raw_bind_parameter(i + 1, s)?,
                Arg::NullInt | Arg::NullText => stmt.raw_bind_parameter(i + 1, Null)?,
            }
        }
        Ok(stmt)
    }
}

#[async_trait::async_trait]
impl crate::store::exec::Exec for Raw<'_> {
    async fn execute(&mut self, sql: &str, args: &[crate::store::exec::Arg<'_>]) -> Result<u64> {
        let mut stmt = self.statement(sql, args)?;
        let n = stmt.raw_execute()?;
        Ok(n as u64)
    }

    async fn fetch_row(
        &mut self,
        sql: &str,
        args: &[crate::store::exec::Arg<'_>],
    ) -> Result<Option<Vec<crate::store::exec::Col>>> {
        use crate::store::exec::Col;
        use rusqlite::types::ValueRef;
        let mut stmt = self.statement(sql, args)?;
        let width = stmt.column_count();
        let mut rows = stmt.raw_query();
        let Some(row) = rows.next()? else { return Ok(None) };
        let mut cols = Vec::with_capacity(width);
        for i in 0..width {
            cols.push(match row.get_ref(i)? {
                ValueRef::Integer(v) => Col::Int(v),
                ValueRef::Text(t) => Col::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Null => Col::Null,
                ValueRef::Real(f) => Col::Int(f as i64),
                ValueRef::Blob(b) => Col::Text(String::from_utf8_lossy(b).into_owned()),
            });
        }
        // A statement returning more rows (a RETURNING of many) is run to its end.
        while rows.next()?.is_some() {}
        Ok(Some(cols))
    }
}

/// Runs `$body` (an expression of type `Result<T>` using `$conn: &mut dyn Exec`) on the
/// journal's write connection: `tx` in one `BEGIN IMMEDIATE` transaction, `auto`
/// statement by statement. Only `Exec` calls may be awaited in it.
macro_rules! sqlite_write {
    ($self:ident, batch($n:expr), $conn:ident => $body:expr) => {
        sqlite_write!(@run $self, tx, $n >= crate::sqlite::HEAVY_BATCH, $conn => $body)
    };
    ($self:ident, $mode:ident, $conn:ident => $body:expr) => {
        sqlite_write!(@run $self, $mode, false, $conn => $body)
    };
    (@run $self:ident, $mode:ident, $heavy:expr, $conn:ident => $body:expr) => {{
        let mut writer = $self.writer.lock().await;
        let write = || {
            let mut raw = crate::sqlite::Raw::begin(&mut writer, sqlite_write!(@tx $mode))?;
            let result = {
                let $conn: &mut dyn crate::store::exec::Exec = &mut raw;
                crate::store::exec::ready(async { $body })
            };
            raw.finish(result)
        };
        let result = crate::sqlite::on_this_thread($heavy, write);
        drop(writer);
        $self.wrote();
        result
    }};
    (@tx tx) => { true };
    (@tx auto) => { false };
}

crate::store::sql_journal!(
    SqliteJournal,
    Sqlite,
    SqliteConnection,
    backend = crate::Backend::Sqlite,
    begin = "BEGIN IMMEDIATE",
    write = sqlite_write,
    lock_lease = "",
    claim_candidates = crate::store::sql::CLAIM_CANDIDATES,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Journal as _, JournalEvent, NewEvent, RunState};

    /// Under a steady stream of writes (each one committed, as durable calls are),
    /// the WAL is checkpointed to the end and started over: its file stays the size of
    /// the writes between two checkpoints instead of growing with every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_a_steady_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = SqliteJournal::open(&path, JournalOptions::default()).await.unwrap();
        let wal = || std::fs::metadata(dir.path().join("j.db-wal")).map_or(0, |m| m.len());
        let reason = Some("r".repeat(2000));
        let event = |i: u64| {
            let state = RunState::Running;
            NewEvent::new(
                format!("run-{}", i % 50),
                JournalEvent::RunStateChanged { state, reason: reason.clone() },
            )
        };
        // What a write adds to the WAL, before any checkpoint.
        let first = CHECKPOINT_EVERY / 2;
        for i in 0..first {
            journal.append(&[event(i)]).await.unwrap();
        }
        let per_write = wal() / first;
        assert!(per_write >= 4096, "at least a page per write: {per_write}");
        let mut largest = 0;
        let writes = CHECKPOINT_EVERY * 25;
        for i in first..writes {
            journal.append(&[event(i)]).await.unwrap();
            largest = largest.max(wal());
        }
        // Never more than a few checkpoints' worth, of the 25 written.
        let bound = per_write * CHECKPOINT_EVERY * 8;
        assert!(largest < bound, "the WAL grew to {largest} bytes (bound {bound}; {per_write} per write)");
    }

    /// A database that runs out of room in the middle of a write (SQLite's
    /// `max_page_count`, the file's own "disk full") fails that write as `DiskFull`,
    /// keeps none of it, leaves no transaction open, and takes writes again once
    /// there is room.
    #[tokio::test]
    async fn a_full_database_fails_the_write_whole_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(&dir.path().join("j.db"), JournalOptions::default()).await.unwrap();
        let created = |run: &str| {
            NewEvent::new(run, JournalEvent::RunCreated { name: "t".into(), input: serde_json::Value::Null })
        };
        journal.append(&[created("small")]).await.unwrap();
        let pages: i64 =
            journal.writer.lock().await.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        journal.writer.lock().await.pragma_update(None, "max_page_count", pages + 2).unwrap();
        // Far more than two pages of events, in one transaction.
        let big = "x".repeat(4096);
        let batch: Vec<NewEvent> = (0..64)
            .map(|_| {
                NewEvent::new(
                    "big",
                    JournalEvent::RunStateChanged { state: RunState::Running, reason: Some(big.clone()) },
                )
            })
            .collect();
        let err = journal.append(&batch).await.unwrap_err();
        assert!(matches!(err, crate::Error::DiskFull(_)), "{err:?}");
        assert!(journal.writer.lock().await.is_autocommit(), "no transaction is left open");
        assert!(journal.snapshot("big").await.unwrap().is_none(), "none of the failed write stays");
        journal.writer.lock().await.pragma_update(None, "max_page_count", 1_000_000).unwrap();
        assert_eq!(journal.append(&batch).await.unwrap().len(), 64, "room again: the write goes in");
        assert_eq!(journal.snapshot("big").await.unwrap().unwrap().run.state, RunState::Running);
    }
}
