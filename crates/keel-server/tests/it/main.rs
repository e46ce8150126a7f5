//! `keel serve`'s API on a real loopback socket, with a real SQLite journal and the
//! examples' payments service.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // real time: waits are bounded with the system clock

mod support;

mod agent;
mod alerts;
mod api;
mod attacks_server;
mod attacks_tools;
mod auth;
mod breakers;
mod browser;
mod gateway;
mod idempotency;
mod reference;
mod shutdown;
mod storage;
mod tls;
