//! `[alerts]` of `keel.toml`: rules and sinks as plain serde values, then
//! [`AlertsConfig::resolve`] checks them and reads their secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Uri;
use keel_core::policy::Checks;
use keel_core::{ErrorClass, PolicyError, RetryConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::quiet::{QuietHours, QuietHoursConfig};

/// `[alerts]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts go, by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// The rules. None written: the default rules (from each class's `alerts()`):
    /// `unauthorized` and `forbidden` at the first failure, `server_error` at 5 in
    /// 5 minutes, per target, to every sink.
    pub rules: Vec<RuleConfig>,
    /// How often open incidents are checked for resolution (default "1s").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub check_every: Option<Duration>,
    /// Quiet hours for every rule that sets none of its own: incidents below
    /// `critical` are held until the period ends, e.g.
    /// `{ from = "22:00", to = "07:00", tz = "+01:00" }`.
    pub quiet_hours: Option<QuietHoursConfig>,
    /// `[alerts.digest]`: a periodic summary of the failures that opened no incident.
    pub digest: Option<DigestConfig>,
}

/// `[alerts.digest]`: every `every`, one delivery to `sink` counting the failures
/// (by class and target) that opened or joined no incident, and the retries
/// exhausted; nothing is sent for a period without any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DigestConfig {
    /// The period, e.g. "1h" or "1d".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub every: Duration,
    /// The sink it goes to (a Slack or webhook sink; a digest pages nobody).
    pub sink: String,
}

/// `[alerts.digest]` checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Digest {
    /// The period.
    pub every: Duration,
    /// The index of its sink in [`Alerts::sinks`].
    pub sink: usize,
}

/// One sink: PagerDuty Events v2, a Slack incoming webhook, or a generic webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `pagerduty`, `slack` or `webhook`.
    pub kind: SinkKind,
    /// Where to post (`https://` or `http://`). Give this or `url_env`.
    pub url: Option<String>,
    /// The environment variable holding the URL (a Slack webhook URL is a secret).
    pub url_env: Option<String>,
    /// PagerDuty: the environment variable holding the integration's routing key.
    pub routing_key_env: Option<String>,
    /// Deliveries retried when the sink is down: attempts, backoff (keel-core's
    /// retry policy; default 8 attempts, 500ms doubling to 30s).
    #[serde(default = "default_retry")]
    pub retry: RetryConfig,
    /// The longest one delivery attempt may take (default "10s").
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Deliveries waiting for this sink at most; past it the oldest is dropped, with a
    /// warning (default 1000).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_retry() -> RetryConfig {
    RetryConfig {
        max_attempts: 8,
        base_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(30),
        ..RetryConfig::default()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_queue() -> usize {
    1000
}

/// What a sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// PagerDuty Events API v2: `trigger` and `resolve` with a `dedup_key`.
    Pagerduty,
    /// A Slack incoming webhook: one message per trigger and per resolve.
    Slack,
    /// Any HTTP endpoint: Keel's own JSON (see the README).
    Webhook,
}

/// How bad an incident is (PagerDuty's severities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Information.
    Info,
    /// Needs a look.
    Warning,
    /// Something is failing.
    Error,
    /// Page someone.
    Critical,
}

impl Severity {
    /// The name as PagerDuty spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// What one incident is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKey {
    /// One incident per target (default).
    #[default]
    Target,
    /// One incident per target and class.
    TargetClass,
    /// One incident for the whole rule.
    Rule,
}

/// `[[alerts.rules]]`: failures of these classes on these targets, `threshold` of
/// them within `window`, open an incident; it resolves once fewer than
/// `resolve_below` remain in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name (in dedup keys and messages).
    pub name: String,
    /// The classes counted; empty: every class.
    #[serde(default)]
    pub classes: Vec<ErrorClass>,
    /// The targets (tools, models, budgets) counted; empty: every target.
    #[serde(default)]
    pub targets: Vec<String>,
    /// How bad an incident of this rule is (default "error").
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// Failures within `window` that open an incident (default 1).
    #[serde(default = "one")]
    pub threshold: u32,
    /// The sliding window, e.g. "5m" (default).
    #[serde(default = "default_window", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// An open incident resolves once the window holds fewer failures than this
    /// (default 1: a whole window without one).
    #[serde(default = "one")]
    pub resolve_below: u32,
    /// What one incident is about (default "target").
    #[serde(default)]
    pub per: IncidentKey,
    /// The sinks it goes to; empty: every sink.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Quiet hours (default: `[alerts].quiet_hours`); ignored for `critical`, which
    /// always pages.
    #[serde(default)]
    pub quiet_hours: Option<QuietHoursConfig>,
}

fn default_severity() -> Severity {
    Severity::Error
}

fn one() -> u32 {
    1
}

fn default_window() -> Duration {
    Duration::from_secs(300)
}

/// A checked sink, with its secrets.
#[derive(Clone)]
pub struct Sink {
    /// Its name.
    pub name: String,
    /// What it speaks.
    pub kind: SinkKind,
    /// Where it is (may hold a secret: never logged).
    pub url: Uri,
    /// PagerDuty's routing key (a secret).
    pub routing_key: Option<String>,
    /// Retries of a delivery.
    pub retry: RetryConfig,
    /// One attempt's bound.
    pub timeout: Duration,
    /// The queue's bound.
    pub queue: usize,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("name", &self.name).field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// Classes counted (empty: all).
    pub classes: Vec<ErrorClass>,
    /// Targets counted (empty: all).
    pub targets: Vec<String>,
    /// Severity.
    pub severity: Severity,
    /// Failures in the window that open an incident.
    pub threshold: u32,
    /// The window.
    pub window: Duration,
    /// Below this many, an open incident resolves.
    pub resolve_below: u32,
    /// The incident's key.
    pub per: IncidentKey,
    /// Indexes into [`Alerts::sinks`].
    pub sinks: Vec<usize>,
    /// When its triggers are held (never for `critical`).
    pub quiet: Option<QuietHours>,
}

impl Rule {
    /// Whether a failure of `class` on `target` counts for this rule.
    pub fn matches(&self, class: ErrorClass, target: &str) -> bool {
        (self.classes.is_empty() || self.classes.contains(&class))
            && (self.targets.is_empty() || self.targets.iter().any(|t| t == target))
    }

    /// Until when a trigger at `wall` is held: `None` when it pages now (no quiet
    /// hours, outside them, or `critical`).
    pub fn held_until(&self, wall: std::time::SystemTime) -> Option<std::time::SystemTime> {
        let quiet = self.quiet.as_ref()?;
        (self.severity < Severity::Critical && quiet.contains(wall)).then(|| quiet.end_after(wall))
    }
}

/// `[alerts]` checked.
#[derive(Debug, Clone, Default)]
pub struct Alerts {
    /// The sinks.
    pub sinks: Vec<Sink>,
    /// The rules (the defaults when none were written).
    pub rules: Vec<Rule>,
    /// How often open incidents are checked.
    pub check_every: Duration,
    /// The digest, when configured.
    pub digest: Option<Digest>,
}

impl Alerts {
    /// Whether anything is configured to receive alerts.
    pub fn is_enabled(&self) -> bool {
        !self.sinks.is_empty()
    }
}

/// The default rules: each class whose `alerts()` is true, per target; at the first
/// failure when the class needs a person (credentials), else at 5 in 5 minutes.
pub fn default_rules(sinks: usize, quiet: Option<QuietHours>) -> Vec<Rule> {
    ErrorClass::ALL
        .into_iter()
        .filter(|c| c.alerts())
        .map(|class| {
            let (threshold, severity) =
                if class.needs_person() { (1, Severity::Critical) } else { (5, Severity::Error) };
            Rule {
                name: format!("default-{class}"),
                classes: vec![class],
                targets: Vec::new(),
                severity,
                threshold,
                window: default_window(),
                resolve_below: 1,
                per: IncidentKey::Target,
                sinks: (0..sinks).collect(),
                quiet,
            }
        })
        .collect()
}

impl AlertsConfig {
    /// Checks every rule and sink and reads the secrets through `env`.
    ///
    /// # Errors
    /// Every problem at once, each naming its key relative to `[alerts]`
    /// (`sinks.pager.url`, `rules[0].window`).
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Alerts, Vec<PolicyError>> {
        let mut c = Checks::default();
        let mut sinks = Vec::new();
        for (name, s) in &self.sinks {
            if let Some(sink) = s.resolve(name, &mut c, env) {
                sinks.push(sink);
            }
        }
        let names: Vec<&String> = self.sinks.keys().collect();
        let quiet_default = self.quiet_hours.as_ref().and_then(|q| quiet(q, "quiet_hours", &mut c));
        let mut rules = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = |k: &str| format!("rules[{i}].{k}");
            if r.name.trim().is_empty() || r.name.len() > 100 {
                c.fail(key("name"), "must be 1 to 100 characters");
            }
            if self.rules[..i].iter().any(|o| o.name == r.name) {
                c.fail(key("name"), format!("`{}` is the name of an earlier rule", r.name));
            }
            c.count(&key("threshold"), r.threshold, 1..=1_000_000);
            c.count(&key("resolve_below"), r.resolve_below, 1..=1_000_000);
            if r.resolve_below > r.threshold {
                c.fail(
                    key("resolve_below"),
                    "must not be above `threshold` (the incident would resolve at once)",
                );
            }
            if r.window < Duration::from_secs(1) || r.window > Duration::from_secs(7 * 86_400) {
                c.fail(key("window"), "must be from \"1s\" to \"7d\"");
            }
            let mut indexes = Vec::new();
            for s in &r.sinks {
                match names.iter().position(|n| *n == s) {
                    Some(at) => indexes.push(at),
                    None => c.fail(key("sinks"), format!("no sink `{s}` in [alerts.sinks]")),
                }
            }
            if r.sinks.is_empty() {
                indexes = (0..names.len()).collect();
            }
            let quiet_hours = match &r.quiet_hours {
                Some(q) => quiet(q, &key("quiet_hours"), &mut c),
                None => quiet_default,
            };
            rules.push(Rule {
                name: r.name.clone(),
                classes: r.classes.clone(),
                targets: r.targets.clone(),
                severity: r.severity,
                threshold: r.threshold,
                window: r.window,
                resolve_below: r.resolve_below,
                per: r.per,
                sinks: indexes,
                quiet: quiet_hours,
            });
        }
        if !self.rules.is_empty() && self.sinks.is_empty() {
            c.fail("sinks", "rules need at least one sink");
        }
        let check_every = self.check_every.unwrap_or(Duration::from_secs(1));
        if check_every < Duration::from_millis(10) || check_every > Duration::from_secs(3600) {
            c.fail("check_every", "must be from \"10ms\" to \"1h\"");
        }
        let digest = self.digest.as_ref().and_then(|d| {
            if d.every < Duration::from_secs(60) || d.every > Duration::from_secs(7 * 86_400) {
                c.fail("digest.every", "must be from \"1m\" to \"7d\"");
            }
            let at = names.iter().position(|n| **n == d.sink);
            match at.map(|i| (i, self.sinks[&d.sink].kind)) {
                None => c.fail("digest.sink", format!("no sink `{}` in [alerts.sinks]", d.sink)),
                Some((_, SinkKind::Pagerduty)) => c.fail(
                    "digest.sink",
                    format!("`{}` is a PagerDuty sink; a digest goes to a Slack or webhook sink", d.sink),
                ),
                Some((_, SinkKind::Slack | SinkKind::Webhook)) => {}
            }
            Some(Digest { every: d.every, sink: at? })
        });
        c.finish()?;
        if rules.is_empty() {
            rules = default_rules(sinks.len(), quiet_default);
        }
        Ok(Alerts { sinks, rules, check_every, digest })
    }
}

/// Checks a `quiet_hours` table at `key`.
fn quiet(q: &QuietHoursConfig, key: &str, c: &mut Checks) -> Option<QuietHours> {
    match q.resolve() {
        Ok(q) => Some(q),
        Err(problems) => {
            for (k, message) in problems {
                c.fail(format!("{key}.{k}"), message);
            }
            None
        }
    }
}

impl SinkConfig {
    fn resolve(&self, name: &str, c: &mut Checks, env: &dyn Fn(&str) -> Option<String>) -> Option<Sink> {
        let key = |k: &str| format!("sinks.{name}.{k}");
        let url = match (&self.url, &self.url_env) {
            (Some(_), Some(_)) => {
                c.fail(key("url"), "set `url` or `url_env`, not both");
                None
            }
            (None, None) => {
                c.fail(key("url"), "is required (or `url_env`)");
                None
            }
            (Some(url), None) => Some((url.clone(), key("url"))),
            (None, Some(var)) => match env(var) {
                Some(url) => Some((url, key("url_env"))),
                None => {
                    c.fail(key("url_env"), format!("environment variable `{var}` is not set"));
                    None
                }
            },
        };
        let url = url.and_then(|(url, at)| match crate::config::http_url(&url, "/") {
            Ok(u) => Some(u),
            Err(problem) => {
                // A URL from the environment is a secret: its problem is told without it.
                let problem = if self.url_env.is_some() {
                    "is not a valid http:// or https:// URL".to_owned()
                } else {
                    problem
                };
                c.fail(at, problem);
                None
            }
        });
        let routing_key = match (self.kind, &self.routing_key_env) {
            (SinkKind::Pagerduty, None) => {
                c.fail(key("routing_key_env"), "is required for a PagerDuty sink");
                None
            }
            (SinkKind::Pagerduty, Some(var)) => match env(var) {
                Some(k) if !k.trim().is_empty() && k.len() <= 256 => Some(k),
                Some(_) => {
                    c.fail(key("routing_key_env"), format!("`{var}` must hold 1 to 256 characters"));
                    None
                }
                None => {
                    c.fail(key("routing_key_env"), format!("environment variable `{var}` is not set"));
                    None
                }
            },
            (SinkKind::Slack | SinkKind::Webhook, Some(_)) => {
                c.fail(key("routing_key_env"), "only a PagerDuty sink has a routing key");
                None
            }
            (SinkKind::Slack | SinkKind::Webhook, None) => None,
        };
        c.nested(&key("retry"), self.retry.validate());
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(300) {
            c.fail(key("timeout"), "must be from \"1ms\" to \"5m\"");
        }
        c.count(&key("queue"), self.queue, 1..=1_000_000);
        Some(Sink {
            name: name.to_owned(),
            kind: self.kind,
            url: url?,
            routing_key: if self.kind == SinkKind::Pagerduty { Some(routing_key?) } else { None },
            retry: self.retry.clone(),
            timeout: self.timeout,
            queue: self.queue,
        })
    }
}
