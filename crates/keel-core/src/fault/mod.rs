//! Fault injection: make a target fail on purpose, to drill the policies.
//!
//! A policy that never fires in staging is untested. Per target, a rate of injected
//! faults (timeouts, 5xx, added latency, empty model output) exercises retries,
//! breakers and fallbacks for real. Draws come from a seedable generator, so a drill
//! can be replayed.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{Checks, PolicyError};
use crate::rng::SharedRng;

/// A kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The target hangs until the attempt times out.
    Timeout,
    /// The target answers 503.
    ServerError,
    /// The target answers, `latency` later.
    Latency,
    /// A model answers with empty content.
    EmptyOutput,
}

/// Fault injection for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// The share of attempts that get a fault (0.0–1.0).
    pub rate: f64,
    /// The kinds drawn from, uniformly.
    pub kinds: Vec<FaultKind>,
    /// The latency added by a `latency` fault, e.g. "2s" (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub latency: Duration,
    /// A seed for reproducible drills.
    pub seed: Option<u64>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            rate: 0.0,
            kinds: vec![FaultKind::Timeout, FaultKind::ServerError],
            latency: Duration::from_secs(1),
            seed: None,
        }
    }
}

impl FaultConfig {
    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`rate`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        c.number("rate", self.rate, 0.0..=1.0);
        if self.rate > 0.0 && self.kinds.is_empty() {
            c.fail("kinds", "a fault rate above 0 needs at least one kind");
        }
        c.duration("latency", self.latency);
        c.finish()
    }
}

/// Draws faults according to a [`FaultConfig`].
#[derive(Debug)]
pub struct FaultInjector {
    config: FaultConfig,
    rng: SharedRng,
}

impl FaultInjector {
    /// An injector, or `None` when `config` injects nothing.
    pub fn new(config: FaultConfig) -> Option<Self> {
        if config.rate <= 0.0 || config.kinds.is_empty() {
            return None;
        }
        let rng = SharedRng::new(config.seed);
        Some(Self { config, rng })
    }

    /// The latency of a `latency` fault.
    pub fn latency(&self) -> Duration {
        self.config.latency
    }

    /// The fault for the next attempt, if any.
    pub fn draw(&self) -> Option<FaultKind> {
        if self.rng.f64() >= self.config.rate {
            return None;
        }
        Some(self.config.kinds[self.rng.below(self.config.kinds.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_draws_repeat_and_follow_the_rate() {
        let config = FaultConfig { rate: 0.25, seed: Some(7), ..FaultConfig::default() };
        let a: Vec<_> = (0..1000)
            .map({
                let i = FaultInjector::new(config.clone()).unwrap();
                move |_| i.draw()
            })
            .collect();
        let b: Vec<_> = (0..1000)
            .map({
                let i = FaultInjector::new(config.clone()).unwrap();
                move |_| i.draw()
            })
            .collect();
        assert_eq!(a, b, "the same seed gives the same faults");
        let hits = a.iter().filter(|f| f.is_some()).count();
        assert!((180..320).contains(&hits), "{hits} faults in 1000 at rate 0.25");
        assert!(a.contains(&Some(FaultKind::Timeout)) && a.contains(&Some(FaultKind::ServerError)));
        assert!(FaultInjector::new(FaultConfig::default()).is_none(), "rate 0 injects nothing");
    }
}
