//! [`BreakerConfig`]: the circuit breaker's values.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::ErrorClass;

/// The circuit breaker policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether the breaker is used at all.
    pub enabled: bool,
    /// The failure ratio over the window at which the breaker opens (0.0–1.0).
    pub failure_ratio: f64,
    /// The fewest calls in the window before the ratio is judged.
    pub min_calls: u32,
    /// The sliding window's length, e.g. "30s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// How many buckets the window is kept in (its resolution).
    pub buckets: u32,
    /// How long the breaker stays open before letting probes through, e.g. "30s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub open_for: Duration,
    /// How many probe calls half-open lets through; all must succeed to close.
    pub half_open_probes: u32,
    /// The classes that count as failures of the target. Others (a bad request, a
    /// refused permission) say nothing of its health and are not counted.
    pub count: Vec<ErrorClass>,
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
