//! The statement interface the journal's write path runs on: [`Exec`].
//!
//! The writes (appends with their projections, run creation, leases, idempotency
//! claims) are written once against `&mut dyn Exec` and run on PostgreSQL through
//! sqlx, and on SQLite on a rusqlite connection of the journal's own
//! ([`crate::sqlite`]'s `Raw`), each statement on the calling thread instead of two
//! thread switches to sqlx's connection thread and back — what bounded a durable tool
//! call on SQLite (see `bench/README.md`, "Durable tool invocations").
//! Every statement uses `$N` parameters, which both databases accept.

use async_trait::async_trait;

use crate::error::Result;

/// One bound parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    /// A NULL where an integer would be (PostgreSQL types its parameters).
    NullInt,
    /// A NULL where text would be.
    NullText,
}

/// What can be bound as an [`Arg`]: integers, text, and their options.
pub(crate) trait ToArg {
    fn arg(&self) -> Arg<'_>;
}

impl ToArg for i64 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(*self)
    }
}

impl ToArg for str {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}

impl ToArg for String {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}

impl<T: ToArg + ?Sized> ToArg for &T {
    fn arg(&self) -> Arg<'_> {
        (**self).arg()
    }
}

impl ToArg for Option<i64> {
    fn arg(&self) -> Arg<'_> {
        self.map_or(Arg::NullInt, Arg::Int)
    }
}

impl ToArg for Option<&str> {
    fn arg(&self) -> Arg<'_> {
        self.map_or(Arg::NullText, Arg::Text)
    }
}

impl ToArg for Option<String> {
    fn arg(&self) -> Arg<'_> {
        self.as_deref().map_or(Arg::NullText, Arg::Text)
    }
}

/// The parameters of one statement, in `$1, $2, …` order (each borrowed for the
/// statement: temporaries live until its end).
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(crate::store::exec::ToArg::arg(&$a)),*] };
}
pub(crate) use args;

/// One column of a fetched row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Col {
    Int(i64),
    Text(String),
    Null,
}

impl Col {
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Col::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub(crate) fn text(self) -> Option<String> {
        match self {
            Col::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A connection (or transaction) statements run on.
#[async_trait]
pub(crate) trait Exec: Send {
    /// Runs a statement; how many rows it changed.
    async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64>;

    /// The first row's columns, if the statement returned a row.
    async fn fetch_row(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Vec<Col>>>;

    /// The first row's first column as an integer (`None`: no row, or NULL).
    async fn fetch_i64(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<i64>> {
        Ok(self.fetch_row(sql, args).await?.and_then(|row| row.first().and_then(Col::int)))
    }

    /// The first row's first column as text (`None`: no row, or NULL).
    async fn fetch_text(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<String>> {
        Ok(self.fetch_row(sql, args).await?.and_then(|row| row.into_iter().next().and_then(Col::text)))
    }
}

/// `INSERT INTO {head} VALUES ($1, …), (…)`: `rows` rows of `width` parameters each.
pub(crate) fn multi_row_insert(head: &str, rows: usize, width: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(head.len() + rows * width * 5 + 16);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            let _ = write!(sql, "{}${}", if c == 0 { "" } else { ", " }, r * width + c + 1);
        }
        sql.push(')');
    }
    sql
}

/// Implements [`Exec`] for a sqlx connection type.
macro_rules! sqlx_exec {
    ($conn:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl crate::store::exec::Exec for $conn {
            async fn execute(
                &mut self,
                sql: &str,
                args: &[crate::store::exec::Arg<'_>],
            ) -> crate::Result<u64> {
                Ok(crate::store::exec::sqlx_bind::<$db>(sqlx::query(sql), args)
                    .execute(&mut *self)
                    .await?
                    .rows_affected())
            }

            async fn fetch_row(
                &mut self,
                sql: &str,
                args: &[crate::store::exec::Arg<'_>],
            ) -> crate::Result<Option<Vec<crate::store::exec::Col>>> {
                use sqlx::Row as _;
                let Some(row) = crate::store::exec::sqlx_bind::<$db>(sqlx::query(sql), args)
                    .fetch_optional(&mut *self)
                    .await?
                else {
                    return Ok(None);
                };
                let mut cols = Vec::with_capacity(row.columns().len());
                for i in 0..row.columns().len() {
                    cols.push(match row.try_get::<Option<i64>, _>(i) {
                        Ok(Some(v)) => crate::store::exec::Col::Int(v),
                        Ok(None) => crate::store::exec::Col::Null,
                        Err(_) => match row.try_get::<Option<String>, _>(i)? {
                            Some(s) => crate::store::exec::Col::Text(s),
                            None => crate::store::exec::Col::Null,
                        },
                    });
                }
                Ok(Some(cols))
            }
        }
    };
}
pub(crate) use sqlx_exec;

/// Binds `args` to a sqlx query, in order.
pub(crate) fn sqlx_bind<'q, DB>(
    mut q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    args: &[Arg<'q>],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for a in args {
        q = match *a {
            Arg::Int(v) => q.bind(v),
            Arg::Text(s) => q.bind(s),
            Arg::NullInt => q.bind(None::<i64>),
            Arg::NullText => q.bind(None::<&str>),
        };
    }
    q
}

/// Polls `fut` once: the write path over SQLite's handle never waits for anything
/// (every statement runs to its end inside the call), so its future is ready at once.
pub(crate) fn ready<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => {
            Err(crate::Error::Internal("a journal write waited inside its transaction"))
        }
    }
}
