//! [`CallError`]: why a call through the pipeline failed, and after how many attempts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::budget::BudgetExceeded;
use crate::class::{Classified, Disposition, ErrorClass};
use crate::classify::Failure;
use crate::event::RefusalReason;
use crate::loop_guard::LoopDetected;

/// What ended a call.
#[derive(Debug)]
pub enum ErrorKind<E> {
    /// The target's own error, from the last attempt.
    Target(E),
    /// A fault injected by the target's fault policy.
    Injected(Failure),
    /// The last attempt took longer than its timeout.
    Timeout(Duration),
    /// The step's or run's deadline passed.
    DeadlineExceeded,
    /// The target's circuit breaker is open.
    CircuitOpen(Arc<str>),
    /// A budget would have been exceeded.
    BudgetExceeded(BudgetExceeded),
    /// The loop guard stopped the call.
    LoopDetected(LoopDetected),
}

impl<E: Classified> Classified for ErrorKind<E> {
    fn class(&self) -> ErrorClass {
        match self {
            ErrorKind::Target(e) => e.class(),
            ErrorKind::Injected(f) => f.class,
            ErrorKind::Timeout(_) => ErrorClass::Timeout,
            ErrorKind::DeadlineExceeded => ErrorClass::DeadlineExceeded,
            ErrorKind::CircuitOpen(_) => ErrorClass::CircuitOpen,
            ErrorKind::BudgetExceeded(_) => ErrorClass::BudgetExceeded,
            ErrorKind::LoopDetected(_) => ErrorClass::LoopDetected,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ErrorKind::Target(e) => e.retry_after(),
            ErrorKind::Injected(f) => f.retry_after,
            ErrorKind::Timeout(_)
            | ErrorKind::DeadlineExceeded
            | ErrorKind::CircuitOpen(_)
            | ErrorKind::BudgetExceeded(_)
            | ErrorKind::LoopDetected(_) => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for ErrorKind<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Target(e) => e.fmt(f),
            ErrorKind::Injected(e) => write!(f, "injected fault: {e}"),
            ErrorKind::Timeout(d) => write!(f, "attempt timed out after {d:?}"),
            ErrorKind::DeadlineExceeded => f.write_str("the deadline passed"),
            ErrorKind::CircuitOpen(target) => write!(f, "the circuit breaker of `{target}` is open"),
            ErrorKind::BudgetExceeded(e) => e.fmt(f),
            ErrorKind::LoopDetected(e) => e.fmt(f),
        }
    }
}

/// A call that failed: its class, the attempts made, and why no further retry was
/// made when the class allowed one.
#[derive(Debug)]
pub struct CallError<E> {
    /// The class of the final failure.
    pub class: ErrorClass,
    /// Attempts made (0 when a policy refused the call before any).
    pub attempts: u32,
    /// Why a retryable failure was not retried (attempts used, low confidence, ...).
    pub refusal: Option<RefusalReason>,
    /// What ended the call.
    pub kind: ErrorKind<E>,
}

impl<E: Classified> CallError<E> {
    pub(crate) fn new(attempts: u32, kind: ErrorKind<E>, refusal: Option<RefusalReason>) -> Self {
        Self { class: kind.class(), attempts, refusal, kind }
    }
}

impl<E> CallError<E> {
    /// What to do next, by the class's default disposition. A class that was
    /// retried until refused is left to the caller's next step: fallback.
    pub fn disposition(&self) -> Disposition {
        match (self.class.default_disposition(), &self.refusal) {
            (Disposition::Retry, Some(_)) => Disposition::Fallback,
            (d, _) => d,
        }
    }

    /// The target's own error, if the call ended with one.
    pub fn target_error(&self) -> Option<&E> {
        match &self.kind {
            ErrorKind::Target(e) => Some(e),
            _ => None,
        }
    }

    /// Maps the target's error type.
    pub fn map_target<F, E2>(self, f: F) -> CallError<E2>
    where
        F: FnOnce(E) -> E2,
    {
        let kind = match self.kind {
            ErrorKind::Target(e) => ErrorKind::Target(f(e)),
            ErrorKind::Injected(x) => ErrorKind::Injected(x),
            ErrorKind::Timeout(x) => ErrorKind::Timeout(x),
            ErrorKind::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            ErrorKind::CircuitOpen(x) => ErrorKind::CircuitOpen(x),
            ErrorKind::BudgetExceeded(x) => ErrorKind::BudgetExceeded(x),
            ErrorKind::LoopDetected(x) => ErrorKind::LoopDetected(x),
        };
        CallError { class: self.class, attempts: self.attempts, refusal: self.refusal, kind }
    }
}

impl<E> Classified for CallError<E> {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        match self.attempts {
            0 => f.write_str(" (no attempt made)")?,
            1 => f.write_str(" (1 attempt)")?,
            n => write!(f, " ({n} attempts)")?,
        }
        if let Some(reason) = &self.refusal {
            write!(f, "; not retried: {reason}")?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Target(e) => Some(e),
            ErrorKind::Injected(e) => Some(e),
            ErrorKind::BudgetExceeded(e) => Some(e),
            ErrorKind::LoopDetected(e) => Some(e),
            ErrorKind::Timeout(_) | ErrorKind::DeadlineExceeded | ErrorKind::CircuitOpen(_) => None,
        }
    }
}
