//! End-to-end tests of `keel` with real processes: the real binary, a real SQLite
//! journal file, and the examples' payments service on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Processes on real time: waits are bounded with the system clock.
#![allow(clippy::disallowed_methods)]

mod support;

mod agent;
mod approvals;
mod attacks_tools;
mod bad_input;
mod crash;
mod demo;
mod drill;
mod durability;
mod fault_drill;
mod mcp;
mod mcp_upstream;
mod policy_attacks;
mod runs;
mod scope;
mod serve_crash;
mod serve_log;
mod telemetry;
mod tickets;
mod timeouts;
