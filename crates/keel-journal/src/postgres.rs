//! The PostgreSQL backend: for several Keel instances sharing runs.
//!
//! Same statements and semantics as SQLite; what differs is concurrency. Sequence
//! numbers come from a row lock on the run (`UPDATE ... RETURNING`), idempotency
//! claims and lease takeovers are single conditional upserts (atomic under
//! concurrency), fenced appends hold a share lock on the lease row, and
//! [`claim_runs`](crate::Journal::claim_runs) picks candidates with
//! `FOR UPDATE SKIP LOCKED` so instances never queue behind each other.
//! Durability is the server's (`synchronous_commit = on` by default: a commit is
//! acknowledged once flushed to the server's WAL).

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool, Postgres};

use crate::error::Result;
use crate::journal::JournalOptions;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A journal in a PostgreSQL database.
#[derive(Debug)]
pub struct PostgresJournal {
    write: PgPool,
    read: PgPool,
    options: JournalOptions,
}

impl PostgresJournal {
    /// Connects to `url` and applies the embedded migrations (under PostgreSQL's
    /// advisory lock, so instances starting together migrate once).
    ///
    /// # Errors
    ///
    /// Storage errors; `network` when the server cannot be reached.
    pub async fn connect(url: &str, options: JournalOptions) -> Result<Self> {
        let connect: PgConnectOptions = url.parse()?;
        // One plain connection first: an unreachable server fails now, with its cause,
        // instead of as a pool timeout.
        let mut conn = PgConnection::connect_with(&connect).await?;
        MIGRATOR.run(&mut conn).await?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self { write: pool.clone(), read: pool, options })
    }
}

crate::store::exec::sqlx_exec!(PgConnection, Postgres);

/// Runs `$body` (a `Result<T>` using `$conn: &mut dyn Exec`) on a pooled connection:
/// `tx` in a transaction (committed when it is `Ok`; an early `return` or `?` rolls it
/// back), `auto` statement by statement.
macro_rules! pg_write {
    ($self:ident, batch($n:expr), $conn:ident => $body:expr) => {
        pg_write!($self, tx, $conn => $body)
    };
    ($self:ident, tx, $conn:ident => $body:expr) => {{
        let mut tx = $self.write.begin().await?;
        let value: crate::Result<_> = {
            let $conn: &mut dyn crate::store::exec::Exec = &mut *tx;
            $body
        };
        let value = value?;
        tx.commit().await?;
        Ok(value)
    }};
    ($self:ident, auto, $conn:ident => $body:expr) => {{
        let mut pooled = $self.write.acquire().await?;
        let $conn: &mut dyn crate::store::exec::Exec = &mut *pooled;
        $body
    }};
}

crate::store::sql_journal!(
    PostgresJournal,
    Postgres,
    PgConnection,
    backend = crate::Backend::Postgres,
    begin = "BEGIN",
    write = pg_write,
    lock_lease = " FOR SHARE",
    claim_candidates = "\
SELECT r.run_id FROM runs r LEFT JOIN leases l ON l.run_id = r.run_id \
WHERE r.state IN ('created', 'running', 'waiting') AND r.name <> '' AND (l.run_id IS NULL OR l.expires_at <= $1) \
ORDER BY r.updated_at, r.run_id LIMIT $2 FOR UPDATE OF r SKIP LOCKED",
);
