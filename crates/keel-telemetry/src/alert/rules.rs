//! The pure part of alerting: failures counted per rule and key over a sliding
//! window, incidents opened at a threshold and resolved when the window empties
//! below `resolve_below`. Takes `now`, never reads a clock; does no I/O.
//!
//! One open incident per (rule, key): a failure while it is open counts but sends
//! nothing. Memory is bounded: a window keeps at most `threshold` timestamps (the
//! count only ever matters up to it), an idle closed window is forgotten, and a rule
//! keeps at most [`MAX_KEYS`] keys (the rest count under `(other)`).

use std::collections::{HashMap, VecDeque};

use keel_core::ErrorClass;
use tokio::time::Instant;

use super::config::{IncidentKey, Rule};

/// Keys one rule tracks at most.
pub const MAX_KEYS: usize = 10_000;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An incident opened.
    Trigger {
        /// The rule's index.
        rule: usize,
        /// The incident's key (a target, `target/class`, or `*`).
        key: String,
        /// The failure that crossed the threshold.
        class: ErrorClass,
        /// Its target.
        target: String,
        /// Failures in the window.
        count: u32,
    },
    /// An open incident resolved.
    Resolve {
        /// The rule's index.
        rule: usize,
        /// The incident's key.
        key: String,
    },
}

#[derive(Debug, Default)]
struct Window {
    hits: VecDeque<Instant>,
    open: bool,
}

impl Window {
    fn prune(&mut self, now: Instant, rule: &Rule) {
        let Some(cutoff) = now.checked_sub(rule.window) else { return };
        while self.hits.front().is_some_and(|t| *t <= cutoff) {
            self.hits.pop_front();
        }
    }

    fn count(&self) -> u32 {
        u32::try_from(self.hits.len()).unwrap_or(u32::MAX)
    }
}

/// Every rule's windows.
#[derive(Debug)]
pub struct Incidents {
    rules: Vec<Rule>,
    windows: Vec<HashMap<String, Window>>,
}

impl Incidents {
    /// No failure seen yet.
    pub fn new(rules: Vec<Rule>) -> Self {
        let windows = rules.iter().map(|_| HashMap::new()).collect();
        Self { rules, windows }
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Incidents open now.
    pub fn open(&self) -> usize {
        self.windows.iter().map(|w| w.values().filter(|w| w.open).count()).sum()
    }

    /// A failure of `class` on `target` at `now`: the incidents it opens.
    pub fn observe(&mut self, now: Instant, class: ErrorClass, target: &str) -> Vec<Change> {
        let mut changes = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches(class, target) {
                continue;
            }
            let windows = &mut self.windows[i];
            let mut key = key_of(rule, class, target);
            if !windows.contains_key(&key) && windows.len() >= MAX_KEYS {
                key = "(other)".to_owned();
            }
            let window = windows.entry(key.clone()).or_default();
            window.prune(now, rule);
            window.hits.push_back(now);
            let cap = usize::try_from(rule.threshold).unwrap_or(usize::MAX).max(1);
            while window.hits.len() > cap {
                window.hits.pop_front();
            }
            if !window.open && window.count() >= rule.threshold {
                window.open = true;
                changes.push(Change::Trigger {
                    rule: i,
                    key,
                    class,
                    target: target.to_owned(),
                    count: window.count(),
                });
            }
        }
        changes
    }

    /// Takes over an incident of rule `rule` open before a restart: open from `now`,
    /// as if its failures had just been counted, so it resolves after a whole quiet
    /// window, or stays open while failures go on. No trigger is due for it.
    pub fn adopt(&mut self, now: Instant, rule: usize, key: &str) {
        let (Some(r), Some(windows)) = (self.rules.get(rule), self.windows.get_mut(rule)) else { return };
        let n = usize::try_from(r.resolve_below).unwrap_or(1).clamp(1, 10_000);
        let window = windows.entry(key.to_owned()).or_default();
        window.open = true;
        window.hits = std::iter::repeat_n(now, n).collect();
    }

    /// Whether a failure of `class` on `target` belongs to an incident open now (of
    /// any rule): such a failure is already told, and a digest leaves it out.
    pub fn covers(&self, class: ErrorClass, target: &str) -> bool {
        self.rules.iter().zip(&self.windows).any(|(rule, windows)| {
            rule.matches(class, target)
                && windows
                    .get(&key_of(rule, class, target))
                    .or_else(|| windows.get("(other)"))
                    .is_some_and(|w| w.open)
        })
    }

    /// Time passed: the incidents whose condition cleared by `now` resolve; idle
    /// windows are forgotten.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let windows = &mut self.windows[i];
            let mut resolved: Vec<String> = Vec::new();
            windows.retain(|key, window| {
                window.prune(now, rule);
                if window.open && window.count() < rule.resolve_below {
                    window.open = false;
                    resolved.push(key.clone());
                }
                window.open || !window.hits.is_empty()
            });
            resolved.sort();
            changes.extend(resolved.into_iter().map(|key| Change::Resolve { rule: i, key }));
        }
        changes
    }
}

fn key_of(rule: &Rule, class: ErrorClass, target: &str) -> String {
    match rule.per {
        IncidentKey::Target => target.to_owned(),
        IncidentKey::TargetClass => format!("{target}/{class}"),
        IncidentKey::Rule => "*".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::alert::config::Severity;

    fn rule(threshold: u32, window_s: u64, per: IncidentKey) -> Rule {
        Rule {
            name: "r".into(),
            classes: vec![ErrorClass::Timeout],
            targets: Vec::new(),
            severity: Severity::Error,
            threshold,
            window: Duration::from_secs(window_s),
            resolve_below: 1,
            per,
            sinks: vec![0],
            quiet: None,
        }
    }

    fn triggers(changes: &[Change]) -> usize {
        changes.iter().filter(|c| matches!(c, Change::Trigger { .. })).count()
    }

    #[test]
    fn a_burst_opens_one_incident_and_a_quiet_window_resolves_it() {
        let t0 = Instant::now();
        let mut inc = Incidents::new(vec![rule(3, 60, IncidentKey::Target)]);
        let s = |n: u64| t0 + Duration::from_secs(n);
        assert_eq!(triggers(&inc.observe(s(0), ErrorClass::Timeout, "pay")), 0);
        assert_eq!(triggers(&inc.observe(s(1), ErrorClass::Timeout, "pay")), 0);
        let third = inc.observe(s(2), ErrorClass::Timeout, "pay");
        assert_eq!(
            third,
            [Change::Trigger {
                rule: 0,
                key: "pay".into(),
                class: ErrorClass::Timeout,
                target: "pay".into(),
                count: 3
            }]
        );
        // More failures while open: no second incident.
        for n in 3..50 {
            assert!(inc.observe(s(n), ErrorClass::Timeout, "pay").is_empty());
        }
        // Other classes and targets of other keys do not count here.
        assert!(inc.observe(s(50), ErrorClass::Network, "pay").is_empty());
        assert!(inc.covers(ErrorClass::Timeout, "pay"));
        assert!(!inc.covers(ErrorClass::Network, "pay"));
        assert!(!inc.covers(ErrorClass::Timeout, "refund"));
        assert_eq!(inc.open(), 1);
        // Still failures in the window: open.
        assert!(inc.tick(s(100)).is_empty());
        // A whole window (60s) after the last failure at 49s: resolved, once.
        assert_eq!(inc.tick(s(109)), [Change::Resolve { rule: 0, key: "pay".into() }]);
        assert!(inc.tick(s(200)).is_empty());
        assert_eq!(inc.open(), 0);
        // A new burst opens a new incident.
        for n in 300..303 {
            inc.observe(s(n), ErrorClass::Timeout, "pay");
        }
        assert_eq!(inc.open(), 1);
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_open_one() {
        let t0 = Instant::now();
        let mut inc = Incidents::new(vec![rule(3, 10, IncidentKey::Target)]);
        for n in 0..100u64 {
            let now = t0 + Duration::from_secs(n * 6);
            assert!(inc.observe(now, ErrorClass::Timeout, "pay").is_empty(), "at {n}");
            assert!(inc.tick(now).is_empty());
        }
    }

    #[test]
    fn keys_split_incidents_and_are_bounded() {
        let t0 = Instant::now();
        let mut inc = Incidents::new(vec![rule(1, 10, IncidentKey::Target)]);
        assert_eq!(triggers(&inc.observe(t0, ErrorClass::Timeout, "a")), 1);
        assert_eq!(triggers(&inc.observe(t0, ErrorClass::Timeout, "b")), 1);
        for n in 0..(MAX_KEYS + 50) {
            inc.observe(t0, ErrorClass::Timeout, &format!("t{n}"));
        }
        assert!(inc.open() <= MAX_KEYS + 1, "{}", inc.open());
        let mut whole = Incidents::new(vec![rule(1, 10, IncidentKey::Rule)]);
        assert_eq!(triggers(&whole.observe(t0, ErrorClass::Timeout, "a")), 1);
        assert_eq!(triggers(&whole.observe(t0, ErrorClass::Timeout, "b")), 0);
        // An adopted incident is open, counts as told, and resolves a window later.
        let mut adopted = Incidents::new(vec![rule(3, 10, IncidentKey::Target)]);
        adopted.adopt(t0, 0, "pay");
        assert_eq!(adopted.open(), 1);
        assert!(adopted.observe(t0, ErrorClass::Timeout, "pay").is_empty(), "no second trigger");
        assert!(adopted.tick(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(
            adopted.tick(t0 + Duration::from_secs(10)),
            [Change::Resolve { rule: 0, key: "pay".into() }]
        );
        // Everything forgotten once resolved and idle.
        inc.tick(t0 + Duration::from_secs(11));
        assert_eq!(inc.open(), 0);
        assert!(inc.windows[0].is_empty());
    }
}
