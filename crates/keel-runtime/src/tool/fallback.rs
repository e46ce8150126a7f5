//! Tool fallbacks (DESIGN.md's "tool fallback to the last good cached result or a
//! read-only twin"): what a step does once its tool's own attempts have failed with a
//! class the fallback covers.
//!
//! - a **twin**: another tool, read-only, called with the same parameters under its
//!   own policy (a replica, a second provider of the same lookup);
//! - the **last good result** of the same tool for the same canonical arguments, if it
//!   is younger than the freshness window — marked as such in the journal
//!   (`fallback_taken` to `cache`), never passed off as fresh.
//!
//! A write-like tool never falls back to a cached result (config check refuses it): its
//! effect would silently not happen. Twins are tried before the cache. Every fallback
//! taken is a `fallback_taken` event: journaled, in the live view, in `/metrics`.
//!
//! The cache is this process's (bounded, newest kept): after a restart, or on another
//! instance, a tool has no last good result until it answers once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keel_core::ErrorClass;
use serde_json::Value;

/// The target name a cached fallback is journaled under (`fallback_taken` to `cache`).
pub const CACHE: &str = "cache";

/// A tool's fallback, from `fallback = { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolFallback {
    /// A read-only tool answering the same parameters.
    pub twin: Option<Arc<str>>,
    /// How old a last good result may be and still be answered.
    pub cached: Option<Duration>,
    /// The final failure classes that take the fallback.
    pub on: Vec<ErrorClass>,
}

impl ToolFallback {
    /// The classes a fallback is taken on by default: the target could not answer.
    pub const DEFAULT_ON: [ErrorClass; 5] = [
        ErrorClass::Network,
        ErrorClass::Timeout,
        ErrorClass::RateLimited,
        ErrorClass::ServerError,
        ErrorClass::CircuitOpen,
    ];

    /// Whether a call that failed with `class` takes this fallback.
    pub fn applies(&self, class: ErrorClass) -> bool {
        self.on.contains(&class)
    }
}

/// A tool and its canonical arguments.
type CallKey = (Arc<str>, String);

/// The last good result of each (tool, arguments), for cached fallbacks.
#[derive(Debug, Default)]
pub struct ResultCache {
    entries: Mutex<HashMap<CallKey, (Value, SystemTime)>>,
}

impl ResultCache {
    /// The most entries kept; beyond it the older half is dropped.
    pub const MAX_ENTRIES: usize = 10_000;

    /// Keeps `value` as the last good result of `tool` with `params`, got at `at`.
    pub fn put(&self, tool: &Arc<str>, params: &Value, value: &Value, at: SystemTime) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= Self::MAX_ENTRIES {
            let mut ages: Vec<SystemTime> = entries.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            entries.retain(|_, (_, t)| *t > cut);
        }
        entries.insert((tool.clone(), keel_core::signature::canonical_json(params)), (value.clone(), at));
    }

    /// The last good result of `tool` with `params`, and its age, if younger than
    /// `fresh` at `now`.
    pub fn get(
        &self,
        tool: &Arc<str>,
        params: &Value,
        fresh: Duration,
        now: SystemTime,
    ) -> Option<(Value, Duration)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (value, at) = entries.get(&(tool.clone(), keel_core::signature::canonical_json(params)))?;
        let age = now.duration_since(*at).unwrap_or(Duration::ZERO);
        (age <= fresh).then(|| (value.clone(), age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_answered_only_while_fresh_and_only_for_the_same_arguments() {
        let cache = ResultCache::default();
        let (tool, t0) = (Arc::<str>::from("search"), SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        cache.put(&tool, &serde_json::json!({"q": "a", "n": 1}), &serde_json::json!([1]), t0);
        let fresh = Duration::from_secs(60);
        let same_reordered = serde_json::json!({"n": 1, "q": "a"});
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            cache.get(&tool, &same_reordered, fresh, at(59)),
            Some((serde_json::json!([1]), Duration::from_secs(59)))
        );
        assert_eq!(cache.get(&tool, &same_reordered, fresh, at(61)), None, "stale past the window");
        assert_eq!(cache.get(&tool, &serde_json::json!({"q": "b", "n": 1}), fresh, at(1)), None);
        assert_eq!(cache.get(&Arc::from("other"), &same_reordered, fresh, at(1)), None);
        // A clock that went backwards is age zero, not a panic.
        assert!(cache.get(&tool, &same_reordered, fresh, t0 - Duration::from_secs(5)).is_some());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = ResultCache::default();
        let tool = Arc::<str>::from("t");
        for i in 0..(ResultCache::MAX_ENTRIES as u64 * 2) {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(i);
            cache.put(&tool, &serde_json::json!({ "i": i }), &Value::Null, at);
        }
        assert!(cache.entries.lock().unwrap().len() <= ResultCache::MAX_ENTRIES);
    }
}
