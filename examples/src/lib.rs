//! Offline examples of Keel. Each binary under `src/bin/` opens with how to run it; the
//! tests under `tests/` run every one.

pub mod agent;
pub mod demo;
pub mod payments;
