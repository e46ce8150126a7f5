//! [`Failure`]: a classified error with a message, the common currency of targets.

use std::fmt;
use std::time::Duration;

use crate::class::{Classified, ErrorClass};

/// A failure of one attempt: its class, a message for people, and the delay the
/// target asked for, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub class: ErrorClass,
    /// What happened, in words (never a secret).
    pub message: String,
    /// The target's requested delay before the next attempt (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure of `class` with `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into(), retry_after: None }
    }

    /// The same failure, with the target's requested delay.
    pub fn with_retry_after(mut self, delay: Option<Duration>) -> Self {
        self.retry_after = delay;
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for Failure {}

impl Classified for Failure {
    fn class(&self) -> ErrorClass {
        self.class
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}
