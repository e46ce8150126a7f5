//! keel-runtime's integration tests: http tools against real servers on loopback.

#![allow(clippy::unwrap_used)]

mod tls;
