//! Storage errors, each with its [`ErrorClass`], and the one place that retries them.
//!
//! A journal that swallows a failed write breaks Keel's promise that nothing is lost,
//! so every storage failure surfaces as an [`Error`] that says what kind it is: the
//! disk is full, the database is busy or locked, the connection was lost, or the data
//! is not what this version expects. Busy and lost-connection errors are transient;
//! [`with_retry`] retries them with backoff, but a lost connection only for operations
//! that are safe to repeat (an append whose `COMMIT` may or may not have landed is not).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Classified, ErrorClass};

/// The journal's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database has no room left (SQLite `SQLITE_FULL`, PostgreSQL `53100`).
    #[error("storage is full")]
    DiskFull(#[source] sqlx::Error),
    /// The database is busy or locked, or no connection was free in time.
    #[error("storage is busy or locked")]
    Busy(#[source] sqlx::Error),
    /// The connection to the database was lost or could not be made.
    #[error("storage connection lost")]
    Connection(#[source] sqlx::Error),
    /// Any other database error: a bug, or a schema this version does not know.
    #[error("storage error")]
    Database(#[source] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("migrating the journal's schema failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// An event or result could not be encoded or decoded as JSON.
    #[error("journal data is not valid JSON for its type")]
    Codec(#[source] serde_json::Error),
    /// A stored event was written by a newer version of Keel.
    #[error("event {run_id}#{seq} has schema version {version}, newer than this build's {supported}")]
    UnsupportedSchema {
        /// The run of the event.
        run_id: String,
        /// Its sequence number.
        seq: u64,
        /// Its schema version.
        version: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The database URL is not one this crate can open.
    #[error("unsupported journal URL `{0}` (expected sqlite:PATH or postgres://...)")]
    Url(String),
    /// The lease on a run is no longer held by this owner (it expired and was taken).
    #[error("the lease on run {run_id} is no longer held by {owner}")]
    LeaseLost {
        /// The run.
        run_id: String,
        /// The owner who lost it.
        owner: String,
    },
    /// An idempotency claim was completed or released by someone who no longer holds it.
    #[error("the claim on idempotency key {0} is no longer held")]
    ClaimLost(String),
    /// Waiting for another claimer's result took longer than allowed.
    #[error("idempotency key {0} is still in progress")]
    InProgress(String),
    /// The background writer stopped; events handed to it were not written.
    #[error("the journal writer has stopped")]
    WriterClosed,
    /// A bug in the journal itself (an invariant of its own code did not hold).
    #[error("journal bug: {0}")]
    Internal(&'static str),
    /// A batch written by the background writer failed; every event in it is lost.
    #[error("a batch of journal events could not be written")]
    Batch(#[source] Arc<Error>),
}

impl Error {
    /// Whether this says the journal itself could not be used (unreachable, full,
    /// locked past every retry, corrupt, from a newer build) rather than that a
    /// coordination step lost a race (a lease or claim taken by another process).
    pub fn is_storage(&self) -> bool {
        match self {
            Error::DiskFull(_)
            | Error::Busy(_)
            | Error::Connection(_)
            | Error::Database(_)
            | Error::Migrate(_)
            | Error::Codec(_)
            | Error::UnsupportedSchema { .. }
            | Error::Internal(_)
            | Error::WriterClosed => true,
            Error::Url(_) | Error::LeaseLost { .. } | Error::ClaimLost(_) | Error::InProgress(_) => false,
            Error::Batch(inner) => inner.is_storage(),
        }
    }
}

impl Classified for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::DiskFull(_) => ErrorClass::ServerError,
            Error::Busy(_) => ErrorClass::Timeout,
            Error::Connection(_) => ErrorClass::Network,
            Error::Database(_) | Error::Migrate(_) | Error::WriterClosed | Error::Internal(_) => {
                ErrorClass::ServerError
            }
            Error::Codec(_) | Error::UnsupportedSchema { .. } | Error::Url(_) => ErrorClass::InvalidRequest,
            Error::LeaseLost { .. } | Error::ClaimLost(_) => ErrorClass::Conflict,
            Error::InProgress(_) => ErrorClass::Timeout,
            Error::Batch(inner) => inner.class(),
        }
    }
}

impl Error {
    /// Whether the failure may go away by itself (busy, locked, connection lost).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Busy(_) | Error::Connection(_) => true,
            Error::Batch(inner) => inner.is_transient(),
            Error::DiskFull(_)
            | Error::Database(_)
            | Error::Migrate(_)
            | Error::Codec(_)
            | Error::UnsupportedSchema { .. }
            | Error::Url(_)
            | Error::LeaseLost { .. }
            | Error::ClaimLost(_)
            | Error::InProgress(_)
            | Error::Internal(_)
            | Error::WriterClosed => false,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match kind_of(&e) {
            Kind::DiskFull => Error::DiskFull(e),
            Kind::Busy => Error::Busy(e),
            Kind::Connection => Error::Connection(e),
            Kind::Other => Error::Database(e),
        }
    }
}

/// SQLite's own errors on the write path ([`crate::sqlite`]'s handle), classified by
/// their result code as sqlx's are; the message is kept as the source.
impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
            _ => 0,
        };
        let cause = sqlx::Error::Protocol(format!("sqlite: {e}"));
        match sqlite_kind(code) {
            Kind::DiskFull => Error::DiskFull(cause),
            Kind::Busy => Error::Busy(cause),
            Kind::Connection => Error::Connection(cause),
            Kind::Other => Error::Database(cause),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => Error::from(inner),
            other => Error::Migrate(other),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Codec(e)
    }
}

enum Kind {
    DiskFull,
    Busy,
    Connection,
    Other,
}

fn kind_of(e: &sqlx::Error) -> Kind {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            Kind::Connection
        }
        sqlx::Error::PoolTimedOut => Kind::Busy,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                sqlite_kind(code.parse().unwrap_or(0))
            } else {
                postgres_kind(&code)
            }
        }
        _ => Kind::Other,
    }
}

/// SQLite's (extended) result codes: the primary code is the low byte.
fn sqlite_kind(code: i32) -> Kind {
    match code & 0xff {
        13 => Kind::DiskFull,        // SQLITE_FULL
        5 | 6 => Kind::Busy,         // SQLITE_BUSY, SQLITE_LOCKED
        10 | 14 => Kind::Connection, // SQLITE_IOERR, SQLITE_CANTOPEN
        _ => Kind::Other,
    }
}

/// PostgreSQL's SQLSTATE codes.
fn postgres_kind(code: &str) -> Kind {
    match code {
        "53100" => Kind::DiskFull,
        // Serialization failure, deadlock, lock not available, too many connections.
        "40001" | "40P01" | "55P03" | "53300" => Kind::Busy,
        // Admin/crash shutdown, cannot connect now.
        "57P01" | "57P02" | "57P03" => Kind::Connection,
        c if c.starts_with("08") => Kind::Connection,
        _ => Kind::Other,
    }
}

/// Whether an operation may be repeated after its outcome became unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Repeating is harmless (reads, conditional updates keyed by a token).
    Safe,
    /// Only repeat when the database said the statement did not run (busy/locked).
    OnlyIfNotApplied,
}

const MAX_TRIES: u32 = 8;

/// Runs `op`, retrying transient failures with exponential backoff and full jitter.
pub(crate) async fn with_retry<T, F, Fut>(what: &'static str, repeat: Repeat, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let retry = match &e {
                    // No connection within the pool's acquire timeout: that wait was
                    // the retry; repeating it made calls hang for minutes in an outage.
                    Error::Busy(sqlx::Error::PoolTimedOut) => false,
                    Error::Busy(_) => true,
                    Error::Connection(_) => repeat == Repeat::Safe,
                    _ => false,
                };
                if !retry || tries >= MAX_TRIES {
                    return Err(e);
                }
                let cap = Duration::from_millis(5u64 << tries.min(8)).min(Duration::from_secs(1));
                let delay = cap.mul_f64(fastrand::f64());
                tracing::debug!(operation = what, tries, delay_ms = delay.as_millis() as u64, error = %e, "journal retry");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_kind_of_failure() {
        let check = |e: Error, class: ErrorClass, transient: bool| {
            assert_eq!(e.class(), class, "{e}");
            assert_eq!(e.is_transient(), transient, "{e}");
        };
        check(Error::from(sqlx::Error::PoolTimedOut), ErrorClass::Timeout, true);
        check(Error::from(sqlx::Error::PoolClosed), ErrorClass::Network, true);
        check(Error::from(sqlx::Error::RowNotFound), ErrorClass::ServerError, false);
        check(Error::ClaimLost("k".into()), ErrorClass::Conflict, false);
        check(Error::Batch(Arc::new(Error::from(sqlx::Error::PoolTimedOut))), ErrorClass::Timeout, true);
        assert!(matches!(sqlite_kind(13), Kind::DiskFull));
        assert!(matches!(sqlite_kind(517), Kind::Busy)); // SQLITE_BUSY_SNAPSHOT
        assert!(matches!(sqlite_kind(2067), Kind::Other)); // unique constraint
        assert!(matches!(postgres_kind("53100"), Kind::DiskFull));
        assert!(matches!(postgres_kind("40P01"), Kind::Busy));
        assert!(matches!(postgres_kind("08006"), Kind::Connection));
        assert!(matches!(postgres_kind("23505"), Kind::Other));
    }
}
