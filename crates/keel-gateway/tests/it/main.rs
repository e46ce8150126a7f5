//! keel-gateway's integration tests: the gateway on loopback against fake upstreams.

mod anthropic;
mod apis;
mod azure;
mod budgets;
mod journal;
mod policy;
mod python;
mod streaming;
mod support;
mod tls;
mod toolstream;
mod validation;
