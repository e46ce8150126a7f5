//! [`PolicyConfig`]: how one target is called, as plain serde values.
//!
//! `keel.toml` describes defaults and per-target overrides with these types; every
//! field has a default, unknown keys are errors, durations are human strings.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
use crate::budget::BudgetConfig;
use crate::class::ErrorClass;
use crate::fault::FaultConfig;
use crate::gate::GateConfig;
use crate::loop_guard::LoopGuardConfig;
use crate::retry::RetryConfig;

/// Timeouts of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// The longest one attempt may take, e.g. "30s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub attempt: Option<Duration>,
    /// The longest a step may take, all attempts and waits included, e.g. "2m".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub step: Option<Duration>,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self { attempt: Some(Duration::from_secs(30)), step: None }
    }
}

/// When a fallback chain moves to its next alternative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// The classes of a final failure that send the call to the next alternative.
    pub on: Vec<ErrorClass>,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        use ErrorClass as C;
        Self {
            on: vec![
                C::Network,
                C::Timeout,
                C::RateLimited,
                C::ServerError,
                C::Unauthorized,
                C::Forbidden,
                C::EmptyOutput,
                C::TruncatedOutput,
                C::Refusal,
                C::ContextOverflow,
                C::CircuitOpen,
            ],
        }
    }
}

/// The whole policy of one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Attempt and step timeouts.
    pub timeout: TimeoutConfig,
    /// Retries.
    pub retry: RetryConfig,
    /// The confidence gate on retries.
    pub gate: GateConfig,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// Limits of each step (one logical call) on this target.
    pub budget: BudgetConfig,
    /// The loop guard of runs using this target.
    pub loop_guard: LoopGuardConfig,
    /// When to fall back to the next alternative.
    pub fallback: FallbackConfig,
    /// Injected faults.
    pub fault: FaultConfig,
    /// A seed for backoff jitter, to replay decisions exactly.
    pub seed: Option<u64>,
}
