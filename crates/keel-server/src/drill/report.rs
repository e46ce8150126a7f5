//! The drill's report: per target what was injected and how every call ended, and the
//! invariants checked; as JSON, a terminal table, or a self-contained HTML page with
//! bar plots (inline SVG, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use keel_core::ErrorClass;
use keel_gateway::MetricsSnapshot;
use serde::Serialize;

use super::DrillOptions;
use super::proxy::{Seen, effects};

/// Policy events counted for one target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Attempts made.
    pub attempts: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Times a call left it for a fallback.
    pub fallbacks: u64,
    /// Correction rounds (an invalid answer sent back).
    pub corrections: u64,
    /// Times its breaker opened.
    pub breaker_trips: u64,
}

/// How one call ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallEnd {
    /// It ended (an answer, a classified failure, a person asked) within the bound.
    pub ended: bool,
    /// It was answered.
    pub answered: bool,
    /// The failure's class, when it was not.
    pub class: Option<ErrorClass>,
    /// It waits for an approval.
    pub waiting: bool,
    /// A ticket was opened for it.
    pub ticket: bool,
    /// Answered by a fallback.
    pub fallback: bool,
    /// What the agent got was well-formed (a non-empty answer, a stream ending with
    /// `[DONE]` or an error event, a classified error).
    pub well_formed: bool,
    /// It failed once and was made again, as an agent would.
    pub agent_retried: bool,
    /// Why it could not be made at all.
    pub error: Option<String>,
    /// How long it took.
    pub latency: Duration,
}

/// A drilled target as the report sees it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its name.
    pub name: String,
    /// A model (else a tool).
    pub model: bool,
    /// Declared write-like (`write = true`).
    pub write: bool,
    /// Its policy's attempts per call.
    pub max_attempts: u32,
    /// What its proxy saw.
    pub seen: Vec<Seen>,
}

/// One target's results.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TargetReport {
    /// Its name.
    pub name: String,
    /// `model` or `tool`.
    pub kind: &'static str,
    /// Calls made.
    pub calls: u64,
    /// Calls answered.
    pub answered: u64,
    /// Calls answered by a fallback.
    pub by_fallback: u64,
    /// Calls that failed, by class.
    pub failed: BTreeMap<String, u64>,
    /// Calls waiting for an approval.
    pub waiting_approval: u64,
    /// Tickets opened.
    pub tickets: u64,
    /// Calls made again after a failure (as an agent would).
    pub agent_retries: u64,
    /// Requests that reached the target's proxy.
    pub requests: u64,
    /// Faults injected, by kind.
    pub injected: BTreeMap<String, u64>,
    /// Policy events counted.
    pub policy: Policy,
    /// Stream rescues (prefill and splice) onto this model.
    pub rescues: u64,
    /// Requests that reached the service more than once with one idempotency key
    /// (safe only where the service honours the key).
    pub repeated_with_one_key: u64,
    /// Effects that happened more than once: one request of an unsafe method answered
    /// by its service under different idempotency keys, or none.
    pub duplicate_effects: u64,
    /// Median call latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile call latency, in milliseconds.
    pub p99_ms: f64,
}

/// An invariant checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invariant {
    /// What must hold.
    pub name: &'static str,
    /// Whether it held.
    pub held: bool,
    /// What broke it, or what was checked.
    pub detail: String,
}

impl Invariant {
    /// `name` held when no `breaches` were found: then `detail` says what was checked,
    /// else `broken(breaches)` says what broke it.
    fn check(
        name: &'static str,
        breaches: &[String],
        checked: impl Into<String>,
        broken: impl FnOnce(&[String]) -> String,
    ) -> Invariant {
        let held = breaches.is_empty();
        let detail = if held { checked.into() } else { broken(breaches) };
        Invariant { name, held, detail }
    }
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The seed (the same seed, the same faults).
    pub seed: u64,
    /// Calls per target.
    pub calls_per_target: usize,
    /// The fault rate.
    pub rate: f64,
    /// Per target.
    pub targets: Vec<TargetReport>,
    /// The invariants.
    pub invariants: Vec<Invariant>,
    /// Targets not drilled, and why.
    pub skipped: BTreeMap<String, String>,
    /// The incidents `[alerts]`' rules would have opened (rule and key: times), had the
    /// drill's failures been real. No sink is called.
    pub alerts_fired: BTreeMap<String, u64>,
    /// Every invariant held.
    pub ok: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    (sorted[rank - 1].as_secs_f64() * 1e6).round() / 1e3
}

/// The report of a drill.
pub(super) fn build(
    opts: &DrillOptions,
    targets: &[Target],
    ends: Vec<(usize, CallEnd)>,
    policy: &std::collections::HashMap<String, Policy>,
    metrics: Option<&MetricsSnapshot>,
    skipped: Vec<(String, String)>,
) -> Report {
    let mut reports: Vec<TargetReport> = targets
        .iter()
        .map(|t| TargetReport {
            name: t.name.clone(),
            kind: if t.model { "model" } else { "tool" },
            policy: policy.get(&t.name).cloned().unwrap_or_default(),
            ..TargetReport::default()
        })
        .collect();
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let (mut unended, mut malformed) = (Vec::new(), Vec::new());
    for (i, end) in &ends {
        let (Some(r), Some(l)) = (reports.get_mut(*i), latencies.get_mut(*i)) else { continue };
        r.calls += 1;
        l.push(end.latency);
        if end.answered {
            r.answered += 1;
        } else if end.waiting {
            r.waiting_approval += 1;
        } else if let Some(class) = end.class {
            *r.failed.entry(class.to_string()).or_default() += 1;
        }
        r.by_fallback += u64::from(end.answered && end.fallback);
        r.tickets += u64::from(end.ticket);
        r.agent_retries += u64::from(end.agent_retried);
        if !end.ended {
            unended.push(r.name.clone());
        }
        if !end.well_formed && end.ended {
            malformed.push(r.name.clone());
        }
    }
    let mut over_policy = Vec::new();
    let mut duplicates = Vec::new();
    for ((r, t), l) in reports.iter_mut().zip(targets).zip(&mut latencies) {
        l.sort_unstable();
        r.p50_ms = percentile(l, 0.50);
        r.p99_ms = percentile(l, 0.99);
        r.requests = t.seen.len() as u64;
        for s in &t.seen {
            if let Some(f) = s.fault {
                *r.injected.entry(f.as_str().to_owned()).or_default() += 1;
            }
        }
        if let Some(m) = metrics.and_then(|m| m.models.get(&t.name)) {
            r.rescues = m.rescued_prefill + m.rescued_splice;
        }
        if t.model {
            continue;
        }
        // Retries within the policy: one key (one call's attempts) never reaches the
        // proxy more often than the policy's attempts.
        let mut per_key: BTreeMap<&str, u32> = BTreeMap::new();
        for s in &t.seen {
            if let Some(k) = &s.key {
                *per_key.entry(k).or_default() += 1;
            }
        }
        if let Some((k, n)) = per_key.iter().find(|(_, n)| **n > t.max_attempts.max(1)) {
            over_policy.push(format!("{}: {n} requests under key {k} (policy: {})", t.name, t.max_attempts));
        }
        for keys in effects(&t.seen).values().filter(|k| k.len() > 1) {
            let mut distinct: Vec<&Option<String>> = keys.iter().collect();
            distinct.sort();
            distinct.dedup();
            if distinct.len() > 1 || distinct.first().is_some_and(|k| k.is_none()) {
                r.duplicate_effects += 1;
            } else {
                r.repeated_with_one_key += 1;
            }
        }
        if r.duplicate_effects > 0 {
            let why = if t.write {
                ""
            } else {
                " (declared `write = false`: Keel derives no key for its calls, so a call made again acts again; \
                 if it changes anything, declare `write = true`)"
            };
            duplicates.push(format!(
                "{}: {} request(s) acted on more than once under different idempotency keys{why}",
                t.name, r.duplicate_effects
            ));
        }
    }
    let total = ends.len();
    let invariants = vec![
        Invariant::check(
            "every call ended",
            &unended,
            format!(
                "{total} calls answered, failed cleanly or handed to a person within {:?}",
                opts.call_bound
            ),
            |u| format!("{} call(s) still going at the bound: {}", u.len(), u.join(", ")),
        ),
        Invariant::check(
            "no side effect repeated",
            &duplicates,
            "no effect (a POST, PUT, PATCH or DELETE answered) happened twice under different keys",
            |d| d.join("; "),
        ),
        Invariant::check(
            "retries within policy",
            &over_policy,
            "no call's attempts exceeded its tool's policy",
            |o| o.join("; "),
        ),
        Invariant::check(
            "every answer well-formed",
            &malformed,
            "whole answers non-empty, streams ended with [DONE] or an error event",
            |m| format!("malformed answers from: {}", m.join(", ")),
        ),
    ];
    let ok = invariants.iter().all(|i| i.held);
    Report {
        seed: opts.seed,
        calls_per_target: opts.calls,
        rate: opts.rate,
        targets: reports,
        invariants,
        skipped: skipped.into_iter().collect(),
        alerts_fired: BTreeMap::new(),
        ok,
    }
}

impl Report {
    /// The report as a terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>8} {:>8}  injected",
            "target",
            "calls",
            "ok",
            "failed",
            "retry",
            "fallb",
            "corr",
            "rescu",
            "trips",
            "ticket",
            "p50 ms",
            "p99 ms"
        );
        for t in &self.targets {
            let failed: u64 = t.failed.values().sum();
            let injected: Vec<String> = t.injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(
                out,
                "{:<16} {:>5} {:>5} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>8.1} {:>8.1}  {}",
                truncate(&t.name, 16),
                t.calls,
                t.answered,
                failed,
                t.policy.retries,
                t.policy.fallbacks,
                t.policy.corrections,
                t.rescues,
                t.policy.breaker_trips,
                t.tickets,
                t.p50_ms,
                t.p99_ms,
                if injected.is_empty() { "-".to_owned() } else { injected.join(", ") }
            );
            if !t.failed.is_empty() {
                let by: Vec<String> = t.failed.iter().map(|(c, n)| format!("{c} {n}")).collect();
                let _ = writeln!(out, "{:<16} failed: {}", "", by.join(", "));
            }
        }
        for (name, why) in &self.skipped {
            let _ = writeln!(out, "skipped {name}: {why}");
        }
        if self.alerts_fired.is_empty() {
            let _ = writeln!(out, "alerts: no rule of [alerts] would have fired");
        }
        for (rule, n) in &self.alerts_fired {
            let _ = writeln!(out, "alert would have fired: {rule} ×{n}");
        }
        let _ = writeln!(out);
        for i in &self.invariants {
            let _ = writeln!(out, "{} {}: {}", if i.held { "ok  " } else { "FAIL" }, i.name, i.detail);
        }
        out
    }

    /// The report as one HTML page: the table, the invariants, and per target a bar
    /// plot of how its calls ended and what was injected.
    pub fn html(&self) -> String {
        let mut out = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>keel drill</title><style>\
             body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}\
             td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}\
             .ok{color:#070}.fail{color:#b00;font-weight:bold}svg text{font-size:12px}</style></head><body>",
        );
        let _ = write!(
            out,
            "<h1>keel drill</h1><p>{} calls per target, fault rate {}, seed {}</p><h2>Invariants</h2><ul>",
            self.calls_per_target, self.rate, self.seed
        );
        for i in &self.invariants {
            let _ = write!(
                out,
                "<li class=\"{}\">{} {}: {}</li>",
                if i.held { "ok" } else { "fail" },
                if i.held { "✓" } else { "✗" },
                esc(i.name),
                esc(&i.detail)
            );
        }
        out.push_str("</ul><h2>Targets</h2><table><tr><th>target</th><th>kind</th><th>calls</th><th>answered</th><th>failed</th><th>retries</th><th>fallbacks</th><th>corrections</th><th>rescues</th><th>breaker trips</th><th>tickets</th><th>p50 ms</th><th>p99 ms</th></tr>");
        for t in &self.targets {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                esc(&t.name),
                t.kind,
                t.calls,
                t.answered,
                t.failed.values().sum::<u64>(),
                t.policy.retries,
                t.policy.fallbacks,
                t.policy.corrections,
                t.rescues,
                t.policy.breaker_trips,
                t.tickets,
                t.p50_ms,
                t.p99_ms
            );
        }
        out.push_str("</table>");
        for t in &self.targets {
            let _ = write!(out, "<h3>{}</h3>", esc(&t.name));
            let mut ended: Vec<(String, u64)> = vec![("answered".into(), t.answered)];
            ended.extend(t.failed.iter().map(|(c, n)| (format!("failed: {c}"), *n)));
            if t.waiting_approval > 0 {
                ended.push(("waiting approval".into(), t.waiting_approval));
            }
            out.push_str(&bars("how the calls ended", &ended, "#4a7"));
            let injected: Vec<(String, u64)> = t.injected.iter().map(|(k, n)| (k.clone(), *n)).collect();
            out.push_str(&bars("faults injected", &injected, "#c74"));
        }
        out.push_str("<h2>Alerts that would have fired</h2><ul>");
        if self.alerts_fired.is_empty() {
            out.push_str("<li>none</li>");
        }
        for (rule, n) in &self.alerts_fired {
            let _ = write!(out, "<li>{} ×{n}</li>", esc(rule));
        }
        out.push_str("</ul>");
        if !self.skipped.is_empty() {
            out.push_str("<h2>Not drilled</h2><ul>");
            for (name, why) in &self.skipped {
                let _ = write!(out, "<li>{}: {}</li>", esc(name), esc(why));
            }
            out.push_str("</ul>");
        }
        out.push_str("</body></html>\n");
        out
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_owned() } else { s.chars().take(n - 1).chain(['…']).collect() }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar plot of `rows` (label, count) as inline SVG.
fn bars(title: &str, rows: &[(String, u64)], color: &str) -> String {
    if rows.is_empty() {
        return format!("<p>{}: none</p>", esc(title));
    }
    let max = rows.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let height = 22 * rows.len() + 24;
    let mut svg = format!(
        "<svg width=\"520\" height=\"{height}\" role=\"img\" aria-label=\"{0}\"><text x=\"0\" y=\"14\">{0}</text>",
        esc(title)
    );
    for (i, (label, n)) in rows.iter().enumerate() {
        let y = 24 + i * 22;
        let w = (*n as f64 / max as f64 * 300.0).round().max(1.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{}\">{}</text><rect x=\"160\" y=\"{y}\" width=\"{w}\" height=\"16\" fill=\"{color}\"></rect><text x=\"{}\" y=\"{}\">{n}</text>",
            y + 12,
            esc(label),
            165.0 + w,
            y + 12
        );
    }
    svg.push_str("</svg>");
    svg
}
