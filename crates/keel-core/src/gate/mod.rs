//! The confidence gate: refuse retries that history says will not help.
//!
//! A retry costs time and tokens. For each (target, class, attempt) the gate keeps a
//! Beta distribution over "this retry succeeds": a prior (by default Beta(1, 1), a
//! coin flip) updated by every observed outcome of such a retry. The score is the
//! posterior mean; below the threshold (default 0.3) the retry is refused with a
//! reason. With the default prior, three straight failed retries and no success are
//! enough to stop retrying a class, while a class whose retries succeed keeps a high
//! score. Outcomes can be exported ([`ConfidenceGate::snapshot`]) to a store and loaded
//! back ([`ConfidenceGate::load`]) so the history survives restarts. A store that adds
//! outcomes (several processes sharing one history) takes only what is new since its
//! last save ([`ConfidenceGate::take_unsaved`]): saving the whole snapshot again would
//! count every loaded outcome twice. All counts saturate; none can overflow.

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
    history: Mutex<History>,
}

/// What the gate knows, and the part of it no store has yet.
#[derive(Debug, Default)]
struct History {
    all: HashMap<Arc<str>, HashMap<Key, Outcomes>>,
    unsaved: HashMap<Arc<str>, HashMap<Key, Outcomes>>,
}

impl Outcomes {
    fn add(&mut self, other: Outcomes) {
        self.successes = self.successes.saturating_add(other.successes);
        self.failures = self.failures.saturating_add(other.failures);
    }
}

fn entry<'a>(
    map: &'a mut HashMap<Arc<str>, HashMap<Key, Outcomes>>,
    target: &Arc<str>,
    key: Key,
) -> &'a mut Outcomes {
    map.entry(target.clone()).or_default().entry(key).or_default()
}

fn records(map: &HashMap<Arc<str>, HashMap<Key, Outcomes>>) -> Vec<GateRecord> {
    let mut records: Vec<GateRecord> = map
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

impl ConfidenceGate {
    /// A gate with `config` and no history.
    pub fn new(config: GateConfig) -> Self {
        Self { config, history: Mutex::default() }
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
        history.all.get(target).and_then(|m| m.get(&key)).copied().unwrap_or_default()
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
        let one = if succeeded {
            Outcomes { successes: 1, failures: 0 }
        } else {
            Outcomes { successes: 0, failures: 1 }
        };
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        entry(&mut history.all, target, key).add(one);
        entry(&mut history.unsaved, target, key).add(one);
    }

    /// The whole history, for a store that replaces what it holds.
    pub fn snapshot(&self) -> Vec<GateRecord> {
        records(&self.history.lock().unwrap_or_else(|e| e.into_inner()).all)
    }

    /// The outcomes recorded since the last call (or since the gate was made), for a
    /// store that adds them to what it holds; they count as saved from now on. Give
    /// them back with [`restore_unsaved`](Self::restore_unsaved) when the save fails.
    pub fn take_unsaved(&self) -> Vec<GateRecord> {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        records(&std::mem::take(&mut history.unsaved))
    }

    /// Puts back outcomes a failed save took with [`take_unsaved`](Self::take_unsaved),
    /// so the next save carries them.
    pub fn restore_unsaved(&self, records: impl IntoIterator<Item = GateRecord>) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let key = (r.class, self.bucket(r.attempt));
            entry(&mut history.unsaved, &Arc::from(r.target), key).add(r.outcomes);
        }
    }

    /// Adds stored history to what the gate knows (not to what it has to save).
    pub fn load(&self, records: impl IntoIterator<Item = GateRecord>) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let key = (r.class, self.bucket(r.attempt));
            entry(&mut history.all, &Arc::from(r.target), key).add(r.outcomes);
        }
    }
}

impl Default for ConfidenceGate {
    fn default() -> Self {
        Self::new(GateConfig::default())
    }
}
