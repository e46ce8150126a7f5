//! keel-telemetry's integration tests: real receivers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod grpc;
mod sentry;
