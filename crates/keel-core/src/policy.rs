//! [`PolicyConfig`]: how one target is called, as plain serde values.
//!
//! `keel.toml` describes defaults and per-target overrides with these types; every
//! field has a default, unknown keys are errors, durations are human strings. Every
//! numeric value has a documented range, checked by [`PolicyConfig::validate`] (serde
//! cannot: `max_attempts = 0` is a valid `u32`); each problem is a [`PolicyError`]
//! naming its dotted key.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::MAX_DURATION;

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
    /// The longest one attempt may take, e.g. "30s" (default), up to "366d"; "off"
    /// (or "none") for no attempt timeout. "0s" is refused: it would time out every
    /// attempt at once.
    #[serde(with = "off_or_duration")]
    #[schemars(with = "Option<String>")]
    pub attempt: Option<Duration>,
    /// The longest a step may take, all attempts and waits included, e.g. "2m", up to
    /// "366d"; "off" (the default) for none.
    #[serde(with = "off_or_duration")]
    #[schemars(with = "Option<String>")]
    pub step: Option<Duration>,
}

impl TimeoutConfig {
    /// Checks both timeouts: `off`, or 1 ms up to [`MAX_DURATION`].
    ///
    /// # Errors
    /// Every value out of range, by key (`attempt`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        for (key, value) in [("attempt", self.attempt), ("step", self.step)] {
            match value {
                Some(d) if d.is_zero() => c.fail(
                    key,
                    format!("\"0s\" would time out every {key} at once; write \"off\" for no {key} timeout"),
                ),
                Some(d) => c.duration(key, d),
                None => {}
            }
        }
        c.finish()
    }
}

/// Serde for an optional timeout: a human duration, or `"off"` / `"none"` for none.
mod off_or_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime_serde::re::humantime::format_duration(*d).to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        match text.as_deref().map(str::trim) {
            None => Ok(None),
            Some(t) if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") => Ok(None),
            Some(t) => humantime_serde::re::humantime::parse_duration(t).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration ({e}); write e.g. \"30s\", or \"off\""
                ))
            }),
        }
    }
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

impl PolicyConfig {
    /// Checks every value against its documented range, and values that would
    /// mislead (a breaker opening on successes, a loop guard stopping every call).
    /// A policy that passes never panics a [`Pipeline`](crate::Pipeline).
    ///
    /// # Errors
    /// Every problem at once, each naming its dotted key (`retry.max_attempts`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        c.nested("timeout", self.timeout.validate());
        c.nested("retry", self.retry.validate());
        c.nested("gate", self.gate.validate());
        c.nested("breaker", self.breaker.validate());
        c.nested("budget", self.budget.validate());
        c.nested("loop_guard", self.loop_guard.validate());
        c.nested("fault", self.fault.validate());
        c.finish()
    }
}

/// A policy value out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PolicyError {
    /// The dotted key as written in TOML, relative to the policy (`retry.max_attempts`).
    pub key: String,
    /// What is wrong, and what is allowed.
    pub message: String,
}

/// Collects [`PolicyError`]s: the one home of range checks, used by every policy's
/// `validate` (and by other crates for their own policy values).
#[derive(Debug, Default)]
pub struct Checks {
    errors: Vec<PolicyError>,
}

impl Checks {
    /// Records a problem with `key`.
    pub fn fail(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError { key: key.into(), message: message.into() });
    }

    /// Records the problems of a nested value under `prefix` (`retry` + `max_attempts`).
    pub fn nested(&mut self, prefix: &str, result: Result<(), Vec<PolicyError>>) {
        for e in result.err().unwrap_or_default() {
            self.fail(format!("{prefix}.{}", e.key), e.message);
        }
    }

    /// A duration of at most [`MAX_DURATION`].
    pub fn duration(&mut self, key: &str, d: Duration) {
        if d > MAX_DURATION {
            self.fail(key, format!("{} is too long: at most \"366d\"", human(d)));
        }
    }

    /// A duration from 1 ms to [`MAX_DURATION`]: zero would fire at once.
    pub fn positive_duration(&mut self, key: &str, d: Duration) {
        if d < Duration::from_millis(1) {
            self.fail(key, format!("{} is too short: at least \"1ms\"", human(d)));
        }
        self.duration(key, d);
    }

    /// An integer within `range`.
    pub fn count<T: PartialOrd + Display + Copy>(&mut self, key: &str, v: T, range: RangeInclusive<T>) {
        if !range.contains(&v) {
            self.fail(key, format!("{v} is out of range: must be from {} to {}", range.start(), range.end()));
        }
    }

    /// A finite number within `range`.
    pub fn number(&mut self, key: &str, v: f64, range: RangeInclusive<f64>) {
        if !v.is_finite() || !range.contains(&v) {
            self.fail(key, format!("{v} is out of range: must be from {} to {}", range.start(), range.end()));
        }
    }

    /// The problems, if any.
    ///
    /// # Errors
    /// Every problem recorded.
    pub fn finish(self) -> Result<(), Vec<PolicyError>> {
        if self.errors.is_empty() { Ok(()) } else { Err(self.errors) }
    }
}

fn human(d: Duration) -> String {
    format!("\"{}\"", humantime_serde::re::humantime::format_duration(d))
}

#[cfg(test)]
mod ranges;
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
