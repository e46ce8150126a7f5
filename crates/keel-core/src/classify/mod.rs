//! Classify: from what a target returned to an [`ErrorClass`].
//!
//! Policies act on classes, never on raw errors, so every kind of target has one place
//! that turns its failure into a class: HTTP status and headers (with `Retry-After` in
//! both of its forms), I/O and timeout errors, a command's exit status and stderr, and
//! the checks of a model's answer. [`Failure`] is the classified error that targets
//! return to the pipeline.

mod command;
mod failure;
mod http;
mod output;
#[cfg(test)]
mod tests;

pub use command::{CommandClassifier, CommandConfig, CommandExit, PatternError, StderrRule};
pub use failure::Failure;
pub use http::{http_response, http_status, retry_after};
pub use output::{ModelOutput, model_output};

use crate::class::ErrorClass;

/// Classifies an I/O error: resets and refusals are `network`, timeouts `timeout`.
pub fn io_error(error: &std::io::Error) -> ErrorClass {
    use std::io::ErrorKind as K;
    match error.kind() {
        K::TimedOut | K::WouldBlock => ErrorClass::Timeout,
        K::NotFound => ErrorClass::NotFound,
        K::PermissionDenied => ErrorClass::Forbidden,
        K::InvalidInput | K::InvalidData => ErrorClass::InvalidRequest,
        K::AlreadyExists => ErrorClass::Conflict,
        // Resets, refusals, broken pipes, unreachable hosts, early EOF and the kinds
        // std adds later are all "the other side went away": a network failure.
        _ => ErrorClass::Network,
    }
}

/// Classifies a tokio timeout: always `timeout`.
pub fn elapsed(_: &tokio::time::error::Elapsed) -> ErrorClass {
    ErrorClass::Timeout
}
