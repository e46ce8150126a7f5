//! Retry: how many attempts, which classes, and how long to wait between them.
//!
//! A retry must change something or wait for something. This module decides the
//! waiting: exponential backoff with full jitter (so that many clients failing together
//! do not retry together), capped, unless the target said how long to wait
//! (`Retry-After`), which wins over backoff. Whether to retry at all also depends on the
//! confidence gate and the deadline; the pipeline combines them.

mod config;
#[cfg(test)]
mod tests;

pub use config::{Jitter, RetryConfig};

use std::time::Duration;

use crate::class::ErrorClass;
use crate::clock::saturating_secs;
use crate::event::{DelayReason, RefusalReason};
use crate::rng::SharedRng;

/// What the retry policy says about one failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    /// Retry after `delay`.
    Retry {
        /// How long to wait.
        delay: Duration,
        /// Where the delay comes from.
        reason: DelayReason,
    },
    /// The class may be retried, but not this time.
    Refused(RefusalReason),
    /// The class is not retried by this policy.
    NotRetryable,
}

impl RetryConfig {
    /// Whether failures of `class` are retried.
    pub fn retries(&self, class: ErrorClass) -> bool {
        self.retry_on.contains(&class)
    }

    /// The backoff delay before attempt `attempt + 1`, after attempt `attempt` (≥ 1)
    /// failed: `base * multiplier^(attempt-1)`, capped at `max_delay`, then jittered.
    /// Never more than `max_delay`.
    pub fn backoff(&self, attempt: u32, rng: &SharedRng) -> Duration {
        let exp = self.multiplier.max(1.0).powi(attempt.saturating_sub(1).min(64) as i32);
        let ceiling = self.base_delay.as_secs_f64() * exp;
        // 0 × ∞ is NaN: a zero base stays zero however large the growth.
        let ceiling = if ceiling.is_nan() { 0.0 } else { ceiling.min(self.max_delay.as_secs_f64()) };
        let secs = match self.jitter {
            Jitter::Full => rng.f64() * ceiling,
            Jitter::None => ceiling,
        };
        saturating_secs(secs).min(self.max_delay)
    }

    /// Decides about attempt `attempt` (1-based), which failed with `class`; the target
    /// asked for `retry_after`, if anything.
    pub fn decide(
        &self,
        attempt: u32,
        class: ErrorClass,
        retry_after: Option<Duration>,
        rng: &SharedRng,
    ) -> RetryDecision {
        if !self.retries(class) {
            return RetryDecision::NotRetryable;
        }
        if attempt >= self.max_attempts {
            return RetryDecision::Refused(RefusalReason::AttemptsExhausted {
                max_attempts: self.max_attempts,
            });
        }
        match retry_after {
            Some(requested) if requested > self.max_retry_after => {
                RetryDecision::Refused(RefusalReason::RetryAfterTooLong {
                    requested,
                    cap: self.max_retry_after,
                })
            }
            Some(delay) => RetryDecision::Retry { delay, reason: DelayReason::RetryAfter },
            None => {
                let mut delay = self.backoff(attempt, rng);
                if class == ErrorClass::RateLimited {
                    delay = delay.saturating_add(self.rate_limit_floor);
                }
                RetryDecision::Retry { delay, reason: DelayReason::Backoff }
            }
        }
    }
}
