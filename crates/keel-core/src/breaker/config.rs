//! [`BreakerConfig`]: the circuit breaker's values.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::ErrorClass;
use crate::policy::{Checks, PolicyError};

/// The circuit breaker policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether the breaker is used at all.
    pub enabled: bool,
    /// The failure ratio over the window at which the breaker opens: above 0, up to
    /// 1.0 (0 would open it on successes alone).
    pub failure_ratio: f64,
    /// The fewest calls in the window before the ratio is judged (1–1,000,000).
    pub min_calls: u32,
    /// The sliding window's length, e.g. "30s" (1 ms to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// How many buckets the window is kept in, its resolution (1–1000).
    pub buckets: u32,
    /// How long the breaker stays open before letting probes through, e.g. "30s"
    /// (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub open_for: Duration,
    /// How many probe calls half-open lets through; all must succeed to close (1–1000).
    pub half_open_probes: u32,
    /// The classes that count as failures of the target. Others (a bad request, a
    /// refused permission) say nothing of its health and are not counted.
    pub count: Vec<ErrorClass>,
}

impl BreakerConfig {
    /// The most buckets a window is kept in.
    pub const MAX_BUCKETS: u32 = 1000;

    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`failure_ratio`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        let r = self.failure_ratio;
        if r == 0.0 {
            c.fail("failure_ratio", "0 would open the breaker on successes alone: above 0, up to 1.0");
        } else if !(r.is_finite() && r > 0.0 && r <= 1.0) {
            c.fail("failure_ratio", format!("{r} is out of range: above 0, up to 1.0"));
        }
        c.count("min_calls", self.min_calls, 1..=1_000_000);
        c.positive_duration("window", self.window);
        c.count("buckets", self.buckets, 1..=Self::MAX_BUCKETS);
        c.duration("open_for", self.open_for);
        c.count("half_open_probes", self.half_open_probes, 1..=1000);
        c.finish()
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_ratio: 0.5,
            min_calls: 10,
            window: Duration::from_secs(30),
            buckets: 10,
            open_for: Duration::from_secs(30),
            half_open_probes: 3,
            count: ErrorClass::ALL.into_iter().filter(|c| c.is_target_fault()).collect(),
        }
    }
}
