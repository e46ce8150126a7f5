//! keel-journal's integration tests: one suite run against SQLite and PostgreSQL,
//! the crash test with a real child process, and the lease takeover between processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod crash;
mod durability;
mod outage;
mod suite;
mod support;
mod takeover;
