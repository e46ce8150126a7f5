//! The digest: failures that told nobody, summed over a period and sent as one
//! delivery.
//!
//! Why: a rule pages when failures cross its threshold; below it (a tool that times
//! out twice an hour, retries that run out now and then) nothing is sent, yet someone
//! should hear of it before it grows. The router counts, by class and target, every
//! failure that joined no open incident, and every call whose retries ran out; a
//! (class, target) that opened an incident in the period is left out (it was told).
//! Once a period it hands the counts to [`Tally::take`], which is empty (nothing
//! sent) for a quiet period. Pure: takes `wall`, never reads a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use keel_core::ErrorClass;

/// Distinct (class, target) pairs one period counts at most; the rest are summed
/// under the target `(other)`.
pub const MAX_ENTRIES: usize = 1000;

/// One line of a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestEntry {
    /// The class.
    pub class: ErrorClass,
    /// The target (tool, model, budget).
    pub target: String,
    /// Failed attempts that were part of no incident.
    pub failures: u32,
    /// Calls whose retries ran out (`max_attempts` reached).
    pub exhausted: u32,
}

/// One period's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestReport {
    /// The period's start.
    pub from: SystemTime,
    /// Its end.
    pub to: SystemTime,
    /// By failures, then exhaustions, most first; then by class and target.
    pub entries: Vec<DigestEntry>,
}

impl DigestReport {
    /// Failures in all entries.
    pub fn failures(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.failures)).sum()
    }

    /// Exhausted retries in all entries.
    pub fn exhausted(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.exhausted)).sum()
    }
}

/// The counts of the current period.
#[derive(Debug)]
pub struct Tally {
    since: SystemTime,
    counts: BTreeMap<(ErrorClass, String), (u32, u32)>,
    told: BTreeSet<(ErrorClass, String)>,
}

impl Tally {
    /// A period starting at `since`.
    pub fn new(since: SystemTime) -> Self {
        Self { since, counts: BTreeMap::new(), told: BTreeSet::new() }
    }

    fn slot(&mut self, class: ErrorClass, target: &str) -> &mut (u32, u32) {
        let mut key = (class, target.to_owned());
        if !self.counts.contains_key(&key) && self.counts.len() >= MAX_ENTRIES {
            key.1 = "(other)".to_owned();
        }
        self.counts.entry(key).or_default()
    }

    /// A failed attempt that is part of no incident.
    pub fn failure(&mut self, class: ErrorClass, target: &str) {
        let slot = self.slot(class, target);
        slot.0 = slot.0.saturating_add(1);
    }

    /// A call whose retries ran out.
    pub fn exhausted(&mut self, class: ErrorClass, target: &str) {
        let slot = self.slot(class, target);
        slot.1 = slot.1.saturating_add(1);
    }

    /// A failure of `class` on `target` opened an incident: this period's counts of
    /// it are left out of the digest.
    pub fn told(&mut self, class: ErrorClass, target: &str) {
        if self.told.len() < MAX_ENTRIES {
            self.told.insert((class, target.to_owned()));
        }
    }

    /// Ends the period at `now`: its report (`None` when nothing was counted), and a
    /// new period from `now`.
    pub fn take(&mut self, now: SystemTime) -> Option<DigestReport> {
        let from = std::mem::replace(&mut self.since, now);
        let told = std::mem::take(&mut self.told);
        let mut counts = std::mem::take(&mut self.counts);
        counts.retain(|k, _| !told.contains(k));
        if counts.is_empty() {
            return None;
        }
        let mut entries: Vec<DigestEntry> = counts
            .into_iter()
            .map(|((class, target), (failures, exhausted))| DigestEntry {
                class,
                target,
                failures,
                exhausted,
            })
            .collect();
        entries.sort_by(|a, b| {
            (b.failures, b.exhausted)
                .cmp(&(a.failures, a.exhausted))
                .then_with(|| (a.class.as_str(), &a.target).cmp(&(b.class.as_str(), &b.target)))
        });
        Some(DigestReport { from, to: now, entries })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_period_sums_by_class_and_target_and_an_empty_one_is_none() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        let mut tally = Tally::new(t0);
        assert_eq!(tally.take(t0 + hour), None, "nothing counted: nothing sent");
        for _ in 0..3 {
            tally.failure(ErrorClass::Timeout, "pay");
        }
        tally.exhausted(ErrorClass::Timeout, "pay");
        tally.failure(ErrorClass::Network, "crm");
        tally.exhausted(ErrorClass::ServerError, "search");
        tally.failure(ErrorClass::Unauthorized, "crm");
        tally.told(ErrorClass::Unauthorized, "crm");
        let report = tally.take(t0 + 2 * hour).unwrap();
        assert_eq!((report.from, report.to), (t0 + hour, t0 + 2 * hour));
        assert_eq!((report.failures(), report.exhausted()), (4, 2));
        let lines: Vec<(&str, &str, u32, u32)> = report
            .entries
            .iter()
            .map(|e| (e.class.as_str(), e.target.as_str(), e.failures, e.exhausted))
            .collect();
        assert_eq!(
            lines,
            [("timeout", "pay", 3, 1), ("network", "crm", 1, 0), ("server_error", "search", 0, 1)]
        );
        assert_eq!(tally.take(t0 + 3 * hour), None, "the next period starts empty");
        // Told in an earlier period only: counted again.
        tally.failure(ErrorClass::Unauthorized, "crm");
        assert_eq!(tally.take(t0 + 4 * hour).map(|r| r.failures()), Some(1));
    }

    #[test]
    fn entries_are_bounded() {
        let t0 = UNIX_EPOCH;
        let mut tally = Tally::new(t0);
        for n in 0..(MAX_ENTRIES + 500) {
            tally.failure(ErrorClass::Timeout, &format!("t{n}"));
        }
        let report = tally.take(t0).unwrap();
        assert_eq!(report.entries.len(), MAX_ENTRIES + 1);
        assert_eq!(report.failures(), (MAX_ENTRIES + 500) as u64);
        assert_eq!(report.entries[0].target, "(other)");
    }
}
