//! keel-runtime's integration tests: http tools against real servers on loopback, agent
//! runs against a scripted model.

#![allow(clippy::unwrap_used)]

mod agent;
mod tls;
