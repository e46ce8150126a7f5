//! The confidence gate: refuse retries that history says will not help.
//!
//! A retry costs time and tokens. For each (target, class, attempt) the gate keeps a
//! Beta distribution over "this retry succeeds": a prior (by default Beta(1, 1), a
//! coin flip) updated by every observed outcome of such a retry. The score is the
//! posterior mean; below the threshold (default 0.3) the retry is refused with a
//! reason. With the default prior, three straight failed retries and no success are
//! enough to stop retrying a class, while a class whose retries succeed keeps a high
//! score. Outcomes can be exported ([`ConfidenceGate::snapshot`]) to a store and loaded
//! back ([`ConfidenceGate::load`]) so the history survives restarts.

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::ErrorClass;
use crate::policy::{Checks, PolicyError};

/// The gate's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Whether the gate may refuse retries at all.
    pub enabled: bool,
    /// Retries scoring below this are refused (0.0–1.0).
    pub threshold: f64,
    /// The prior's pseudo-count of successful retries, Beta α (0–1,000,000).
    pub prior_successes: f64,
    /// The prior's pseudo-count of failed retries, Beta β (0–1,000,000).
    pub prior_failures: f64,
    /// Attempts from this number on share one history (a 7th retry says about as much
    /// as a 5th) (2–1000).
    pub max_attempt_bucket: u32,
}

impl GateConfig {
    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`threshold`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        c.number("threshold", self.threshold, 0.0..=1.0);
        c.number("prior_successes", self.prior_successes, 0.0..=1e6);
        c.number("prior_failures", self.prior_failures, 0.0..=1e6);
        c.count("max_attempt_bucket", self.max_attempt_bucket, 2..=1000);
        c.finish()
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 0.3,
            prior_successes: 1.0,
            prior_failures: 1.0,
            max_attempt_bucket: 5,
        }
    }
}

/// Observed outcomes of one kind of retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Retries that succeeded.
    pub successes: u64,
    /// Retries that failed.
    pub failures: u64,
}

/// One row of the gate's history, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRecord {
    /// The target retried.
    pub target: String,
    /// The class of the failure that was retried.
    pub class: ErrorClass,
    /// The attempt number of the retry (2 for the first retry), bucketed.
    pub attempt: u32,
    /// What happened.
    pub outcomes: Outcomes,
}

/// The gate's verdict on one retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The posterior mean of "this retry succeeds".
    pub score: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// Whether the retry may go ahead.
    pub allowed: bool,
}

type Key = (ErrorClass, u32);

/// Learns which retries pay off and refuses the ones that do not.
///
/// Shared by all pipelines (one history per target inside). Locks are held for one
/// map operation, never across an `.await`.
#[derive(Debug)]
pub struct ConfidenceGate {
    config: GateConfig,
    history: Mutex<HashMap<Arc<str>, HashMap<Key, Outcomes>>>,
}

impl ConfidenceGate {
    /// A gate with `config` and no history.
    pub fn new(config: GateConfig) -> Self {
        Self { config, history: Mutex::new(HashMap::new()) }
    }

    /// The gate's values.
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    fn bucket(&self, attempt: u32) -> u32 {
        attempt.clamp(2, self.config.max_attempt_bucket.max(2))
    }

    /// The observed outcomes for retry number `attempt` of `class` on `target`.
    pub fn outcomes(&self, target: &str, class: ErrorClass, attempt: u32) -> Outcomes {
        let key = (class, self.bucket(attempt));
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.get(target).and_then(|m| m.get(&key)).copied().unwrap_or_default()
    }

    /// The score of making attempt `attempt` (≥ 2) after a failure of `class`.
    pub fn score(&self, target: &str, class: ErrorClass, attempt: u32) -> f64 {
        let o = self.outcomes(target, class, attempt);
        let alpha = self.config.prior_successes + o.successes as f64;
        let beta = self.config.prior_failures + o.failures as f64;
        if alpha + beta <= 0.0 { 1.0 } else { alpha / (alpha + beta) }
    }

    /// Whether attempt `attempt` after a failure of `class` on `target` may go ahead.
    pub fn check(&self, target: &str, class: ErrorClass, attempt: u32) -> Verdict {
        let score = self.score(target, class, attempt);
        let threshold = self.config.threshold;
        Verdict { score, threshold, allowed: !self.config.enabled || score >= threshold }
    }

    /// Records that attempt `attempt`, a retry after a failure of `class`, succeeded or not.
    pub fn record(&self, target: &Arc<str>, class: ErrorClass, attempt: u32, succeeded: bool) {
        let key = (class, self.bucket(attempt));
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match history.get_mut(&**target) {
            Some(m) => m.entry(key).or_default(),
            None => history.entry(target.clone()).or_default().entry(key).or_default(),
        };
        if succeeded {
            entry.successes += 1;
        } else {
            entry.failures += 1;
        }
    }

    /// The whole history, for a store.
    pub fn snapshot(&self) -> Vec<GateRecord> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<GateRecord> = history
            .iter()
            .flat_map(|(target, m)| {
                m.iter().map(|(&(class, attempt), &outcomes)| GateRecord {
                    target: target.to_string(),
                    class,
                    attempt,
                    outcomes,
                })
            })
            .collect();
        records.sort_by(|a, b| (&a.target, a.class, a.attempt).cmp(&(&b.target, b.class, b.attempt)));
        records
    }

    /// Adds stored history to what the gate knows.
    pub fn load(&self, records: impl IntoIterator<Item = GateRecord>) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let key = (r.class, self.bucket(r.attempt));
            let entry = history.entry(Arc::from(r.target)).or_default().entry(key).or_default();
            entry.successes = entry.successes.saturating_add(r.outcomes.successes);
            entry.failures = entry.failures.saturating_add(r.outcomes.failures);
        }
    }
}

impl Default for ConfidenceGate {
    fn default() -> Self {
        Self::new(GateConfig::default())
    }
}
