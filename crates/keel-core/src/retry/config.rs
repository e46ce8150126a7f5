//! [`RetryConfig`]: the retry policy's values.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::{Disposition, ErrorClass};
use crate::policy::{Checks, PolicyError};

/// How backoff delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `[0, backoff]` ("full jitter"): spreads a crowd of retries best.
    Full,
    /// The backoff itself, no randomness.
    None,
}

/// The retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in total, the first one included: 1 means no retry (1–100).
    pub max_attempts: u32,
    /// The backoff before the first retry, e.g. "200ms" (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub base_delay: Duration,
    /// The growth of the backoff per attempt (1.0–100.0).
    pub multiplier: f64,
    /// The cap on any backoff delay, e.g. "10s" (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_delay: Duration,
    /// How delays are randomised.
    pub jitter: Jitter,
    /// The longest `Retry-After` that is honoured; a target asking for more is not
    /// retried (waiting less than it asked would only fail again), e.g. "60s" (up to
    /// "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_retry_after: Duration,
    /// The classes that are retried.
    pub retry_on: Vec<ErrorClass>,
    /// The shortest wait before retrying a `rate_limited` failure that came without
    /// `Retry-After`: the wait is this plus the backoff, so a persistent rate limit is
    /// never hit more than a few times a second, e.g. "250ms" (up to "366d"; "0s",
    /// the default, adds nothing).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub rate_limit_floor: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: Jitter::Full,
            max_retry_after: Duration::from_secs(60),
            retry_on: ErrorClass::ALL
                .into_iter()
                .filter(|c| c.default_disposition() == Disposition::Retry)
                .collect(),
            rate_limit_floor: Duration::ZERO,
        }
    }
}

impl RetryConfig {
    /// The most attempts a policy may make.
    pub const MAX_ATTEMPTS: u32 = 100;

    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`max_attempts`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        if self.max_attempts == 0 {
            c.fail("max_attempts", "0 would never call the target: 1 is one attempt and no retry");
        } else {
            c.count("max_attempts", self.max_attempts, 1..=Self::MAX_ATTEMPTS);
        }
        c.duration("base_delay", self.base_delay);
        c.number("multiplier", self.multiplier, 1.0..=100.0);
        c.duration("max_delay", self.max_delay);
        c.duration("max_retry_after", self.max_retry_after);
        c.duration("rate_limit_floor", self.rate_limit_floor);
        c.finish()
    }

    /// A policy that makes exactly one attempt.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }
}
