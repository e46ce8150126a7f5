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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_toml_with_human_durations_and_defaults() {
        let text = r#"
            timeout = { attempt = "2s", step = "1m 30s" }
            seed = 9
            [retry]
            max_attempts = 5
            base_delay = "250ms"
            retry_on = ["rate_limited", "server_error"]
            [breaker]
            min_calls = 20
            count = ["server_error", "timeout"]
            [budget]
            cost_usd = 2.5
        "#;
        let c: PolicyConfig = toml::from_str(text).unwrap();
        assert_eq!(c.timeout.attempt, Some(Duration::from_secs(2)));
        assert_eq!(c.timeout.step, Some(Duration::from_secs(90)));
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.base_delay, Duration::from_millis(250));
        assert_eq!(c.retry.max_delay, RetryConfig::default().max_delay, "unset keys keep defaults");
        assert_eq!(c.retry.retry_on, [ErrorClass::RateLimited, ErrorClass::ServerError]);
        assert_eq!(c.breaker.min_calls, 20);
        assert_eq!(c.budget.cost_usd, Some(2.5));
        assert_eq!(c.seed, Some(9));
        let back: PolicyConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c, "round trip");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_them() {
        let e = toml::from_str::<PolicyConfig>("[retry]\nmax_attempt = 3\n").unwrap_err().to_string();
        assert!(e.contains("max_attempt") && e.contains("line 2"), "{e}");
        let e = toml::from_str::<PolicyConfig>("[retry]\nbase_delay = \"soon\"\n").unwrap_err().to_string();
        assert!(e.contains("base_delay") || e.contains("line 2"), "{e}");
        let e = toml::from_str::<PolicyConfig>("[retry]\nretry_on = [\"flaky\"]\n").unwrap_err().to_string();
        assert!(e.contains("flaky"), "{e}");
    }

    #[test]
    fn has_a_json_schema_with_docs() {
        let schema = serde_json::to_string(&schemars::schema_for!(PolicyConfig)).unwrap();
        assert!(
            schema.contains("Attempts in total, the first one included"),
            "doc comments become descriptions"
        );
        assert!(schema.contains("rate_limited"));
    }
}
