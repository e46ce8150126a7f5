//! `keel.toml`: tools, policies, run limits and storage, validated with clear errors.
//!
//! Loading has two stages. [`raw`] is serde's view of the file: unknown keys are
//! errors there, with the line. [`Config::parse`] then checks what serde cannot —
//! which keys a tool's kind needs, references between tools, environment variables
//! named by `*_env` keys, parameter schemas, policy overrides, the range of every
//! policy value ([`PolicyConfig::validate`]), approval rules against the schema —
//! and reports every problem at once, each as `keel.toml:12: tools.pay.url: ...` (serde
//! stops at its first problem, so a file it refuses is read again a section, a tool,
//! a policy value at a time). Secrets are only ever read from the environment; the
//! file never holds one.

mod error;
mod mcp;
pub mod raw;

pub use error::{ConfigError, ConfigErrors};
pub use raw::{
    AgentConfig, ApprovalRule, ApprovalsConfig, ExpiryOutcome, FixedApproval, Mode, RateLimitConfig, Role,
    RunConfig, ServerConfig, ServerTlsConfig,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_core::PolicyConfig;
use keel_core::classify::CommandClassifier;
use keel_core::policy::{Checks, PolicyError};
use raw::{RawConfig, ToolConfig, ToolKindName};
use serde::Deserialize;

use crate::tool::code::Limits as CodeLimits;
use crate::tool::command::{CALL_ENV_PREFIX, INHERITED_ENV};
use crate::tool::{CodeTool, CommandTool, HttpTool, Tool, ToolKind};
use error::{Spans, line_of};

/// A validated `keel.toml`.
#[derive(Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// The journal's database URL (may hold a secret: never log it).
    pub storage_url: String,
    /// `[storage] claim_ttl`: how long an in-progress idempotency claim holds.
    pub claim_ttl: Duration,
    /// The default policy.
    pub defaults: PolicyConfig,
    /// Limits of each run.
    pub run: RunConfig,
    /// How approvals behave.
    pub approvals: ApprovalsConfig,
    /// `[agent]`: agent runs' model, turn limit and history.
    pub agent: AgentConfig,
    /// The tools, by name.
    pub tools: BTreeMap<String, Arc<Tool>>,
    /// `keel serve`'s settings.
    pub server: ServerConfig,
    /// `[server] tls` read and checked: the certificate `keel serve` shows.
    pub server_tls: Option<keel_http::ServerTls>,
    /// API keys with their secrets read from the environment (never logged).
    pub keys: Vec<ApiKey>,
    /// The models of the gateway, by name.
    pub models: BTreeMap<String, keel_gateway::ModelConfig>,
    /// Gateway-wide limits.
    pub gateway: keel_gateway::GatewayConfig,
    /// The models' upstream keys, by environment variable (never logged).
    pub model_keys: Arc<BTreeMap<String, String>>,
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` as the environment held them when the
    /// config was read: models and http tools are reached through them.
    pub proxies: keel_http::Proxies,
    /// `[telemetry]`, checked, with its secrets (never logged).
    pub telemetry: keel_telemetry::Telemetry,
    /// `[alerts]`, checked, with its secrets (never logged); the default rules when
    /// none are written.
    pub alerts: keel_telemetry::alert::Alerts,
    /// What is valid but dangerous (a parameter inside a `sh -c` script...): `keel
    /// config check` prints these; a config shipped as an example has none.
    pub warnings: Vec<ConfigError>,
    /// `[mcp_servers]`, checked but not started: [`Config::connect_mcp`] starts them
    /// and adds their tools to `tools`.
    pub mcp_servers: BTreeMap<String, Arc<crate::mcp::McpUpstream>>,
}

impl Config {
    /// The gateway for the configured models (unbuilt), with their keys.
    pub fn gateway_builder(&self) -> keel_gateway::GatewayBuilder {
        let keys = self.model_keys.clone();
        keel_gateway::Gateway::builder(self.models.clone())
            .config(self.gateway.clone())
            .proxies(self.proxies.clone())
            .env(move |var| keys.get(var).cloned())
    }
}

/// An API key of `keel serve`.
#[derive(Clone)]
pub struct ApiKey {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret.
    pub secret: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The storage URL may hold a password: only its scheme is shown.
        let scheme = self.storage_url.split("://").next().unwrap_or("");
        f.debug_struct("Config")
            .field("file", &self.file)
            .field("storage", &scheme)
            .field("defaults", &self.defaults)
            .field("run", &self.run)
            .field("approvals", &self.approvals)
            .field("tools", &self.tools)
            .field("server", &self.server)
            .field("keys", &self.keys)
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The directory relative paths of `file` are taken from.
fn config_dir(file: &Path) -> &Path {
    file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// `[storage] claim_ttl` when not set.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(300);

/// The values `[storage] claim_ttl` may take: long enough for a slow call to finish,
/// short enough that a dead holder's key is taken over the same day.
pub const CLAIM_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);

/// A kind-specific key and whether it is set.
type KeySet<'a> = (&'a str, bool);

/// The largest output kept of a command by default (each of stdout and stderr).
const DEFAULT_MAX_OUTPUT: usize = 1 << 20;

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    spans: Spans<'a>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Checker<'_> {
    fn problem(&self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: at.map(|at| line_of(self.text, at)),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    fn error(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let e = self.problem(at, key, message);
        self.errors.push(e);
    }

    fn warn(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let w = self.problem(at, key, message);
        self.warnings.push(w);
    }

    /// Reports each of `problems` as `prefix.key`, at the key's line when it is written
    /// (else at `at`).
    fn policy_errors(&mut self, prefix: &str, problems: &[PolicyError], at: Option<usize>) {
        for p in problems {
            let key = format!("{prefix}.{}", p.key);
            let line = self.spans.find_key(&key).or(at);
            self.error(line, key, p.message.clone());
        }
    }
}

/// Every problem serde finds in `text`, which it refused with `first`: serde stops at
/// its first problem, so each top-level section, tool and model is read again alone.
fn raw_errors(text: &str, file: &Path, first: &toml::de::Error) -> Vec<ConfigError> {
    use toml::de::{DeTable, DeValue};
    let error = |key: Option<String>, e: &toml::de::Error| ConfigError {
        file: file.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)),
        key,
        message: e.message().trim().to_owned(),
    };
    let Ok(root) = DeTable::parse(text) else {
        // Syntax errors: the parser recovers and lists each.
        let (_, syntax) = DeTable::parse_recoverable(text);
        let mut errors: Vec<ConfigError> = syntax.iter().map(|e| error(None, e)).collect();
        errors.sort_by_key(|e| e.line);
        errors.dedup();
        if errors.is_empty() {
            errors.push(error(None, first));
        }
        return errors;
    };
    let mut errors = Vec::new();
    for (section, value) in root.get_ref() {
        let name = section.get_ref().to_string();
        let parts: Vec<(String, toml::Spanned<DeValue<'_>>)> = match value.get_ref() {
            DeValue::Table(entries) if name == "tools" || name == "models" || name == "mcp_servers" => {
                entries
                    .iter()
                    .map(|(k, v)| {
                        let mut one = DeTable::new();
                        one.insert(k.clone(), v.clone());
                        (
                            format!("{name}.{}", k.get_ref()),
                            toml::Spanned::new(value.span(), DeValue::Table(one)),
                        )
                    })
                    .collect()
            }
            _ => vec![(name.clone(), value.clone())],
        };
        for (key, part) in parts {
            let mut doc = DeTable::new();
            doc.insert(section.clone(), part);
            let de = toml::de::Deserializer::from(toml::Spanned::new(root.span(), doc));
            if let Err(e) = RawConfig::deserialize(de) {
                let e = error(Some(key), &e);
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    // Policies are read by the second stage, which a refused file never reaches:
    // check them here too, so their problems are not found one fix later.
    if let Ok(doc) = text.parse::<toml::Table>() {
        let mut c = Checker { file, text, spans: Spans::new(text), errors: Vec::new(), warnings: Vec::new() };
        let none = Inherited { parsed: true, problems: Vec::new() };
        let mut tables = Vec::new();
        if let Some(toml::Value::Table(d)) = doc.get("defaults") {
            tables.push(("defaults".to_owned(), d));
        }
        if let Some(toml::Value::Table(tools)) = doc.get("tools") {
            for (name, t) in tools {
                if let Some(toml::Value::Table(p)) = t.get("policy") {
                    tables.push((format!("tools.{name}.policy"), p));
                }
            }
        }
        for (prefix, table) in tables {
            let at = c.spans.find_key(&prefix);
            let _ = policy_from(&mut c, table, table, &prefix, at, &none);
        }
        errors.extend(c.errors);
    }
    if errors.is_empty() {
        errors.push(error(None, first));
    }
    errors
}

/// The leaves of `table` (values that are not tables), by path.
fn leaves(table: &toml::Table, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in table {
        path.push(k.clone());
        match v {
            toml::Value::Table(t) => leaves(t, path, out),
            other => out.push((path.clone(), other.clone())),
        }
        path.pop();
    }
}

/// A table holding only `value`, at `path`.
fn nest(path: &[String], value: toml::Value) -> toml::Table {
    let mut value = value;
    for k in path.iter().rev() {
        value = toml::Value::Table(toml::Table::from_iter([(k.clone(), value)]));
    }
    match value {
        toml::Value::Table(t) => t,
        _ => toml::Table::new(),
    }
}

/// What a tool's policy inherits from `[defaults]`, whose problems are reported once,
/// there.
struct Inherited {
    /// Whether `[defaults]` deserialized.
    parsed: bool,
    /// Its range problems.
    problems: Vec<PolicyError>,
}

/// Checks an `address:port` to listen on.
fn listen_problem(listen: &str) -> Option<String> {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return None;
    }
    let host_ok =
        |h: &str| !h.is_empty() && h.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.');
    match listen.rsplit_once(':') {
        Some((host, port)) if host_ok(host) && port.parse::<u16>().is_ok() => None,
        _ => Some(format!(
            "`{listen}` is not an address to listen on: write host:port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""
        )),
    }
}

/// The JSON Schema `type` the `params` schema declares for the parameter at `path`.
fn declared_type<'s>(schema: Option<&'s serde_json::Value>, path: &str) -> Option<&'s serde_json::Value> {
    let mut s = schema?;
    for segment in path.split('.') {
        s = s.get("properties")?.get(segment)?;
    }
    s.get("type")
}

/// Whether a schema `type` admits numbers only.
fn is_numeric(ty: &serde_json::Value) -> bool {
    let numeric = |t: &serde_json::Value| matches!(t.as_str(), Some("number" | "integer"));
    match ty {
        serde_json::Value::Array(types) => !types.is_empty() && types.iter().all(numeric),
        t => numeric(t),
    }
}

/// Merges `over` into `base`, tables recursively, other values replaced.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Config {
    /// Reads and validates `path`; `*_env` keys read the process environment.
    ///
    /// # Errors
    /// Every problem found, each naming the line and key.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                line: None,
                key: None,
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates `text` as if read from `file`, with `env` as the environment.
    ///
    /// # Errors
    /// Every problem found, each naming the line and key.
    pub fn parse(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors(raw_errors(text, file, &e)))?;
        let mut c = Checker { file, text, spans: Spans::new(text), errors: Vec::new(), warnings: Vec::new() };

        let storage_url = match (&raw.storage.url, &raw.storage.url_env) {
            (Some(_), Some(_)) => {
                c.error(None, "storage", "set `url` or `url_env`, not both");
                String::new()
            }
            (Some(url), None) => url.clone(),
            (None, Some(var)) => env(var).unwrap_or_else(|| {
                c.error(None, "storage.url_env", format!("environment variable `{var}` is not set"));
                String::new()
            }),
            (None, None) => {
                let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                format!("sqlite://{}", dir.join("keel.db").display())
            }
        };

        let claim_ttl = raw.storage.claim_ttl.unwrap_or(DEFAULT_CLAIM_TTL);
        if !CLAIM_TTL_RANGE.contains(&claim_ttl) {
            c.error(
                c.spans.find_key("storage.claim_ttl"),
                "storage.claim_ttl",
                format!(
                    "must be from {} to {} (got {})",
                    humantime::format_duration(*CLAIM_TTL_RANGE.start()),
                    humantime::format_duration(*CLAIM_TTL_RANGE.end()),
                    humantime::format_duration(claim_ttl)
                ),
            );
        }

        let base = raw.defaults.as_ref().map(|t| t.get_ref().clone()).unwrap_or_default();
        let defaults_at = raw.defaults.as_ref().map(|t| t.span().start);
        let none = Inherited { parsed: true, problems: Vec::new() };
        let (defaults, inherited) = match policy_from(&mut c, &base, &base, "defaults", defaults_at, &none) {
            Ok(p) => (Some(p), Inherited { parsed: true, problems: Vec::new() }),
            Err(problems) => {
                (None, Inherited { parsed: problems.is_some(), problems: problems.unwrap_or_default() })
            }
        };

        // Proxies are read once, here, from the environment the config is read in.
        let proxies = keel_http::Proxies::from_lookup(env);
        let mut tools = BTreeMap::new();
        for (name, spanned) in &raw.tools {
            let at = Some(spanned.span().start);
            let tool = tool_from(&mut c, name, spanned.get_ref(), at, &base, &inherited, &raw, env, &proxies);
            if let Some(tool) = tool {
                tools.insert(name.clone(), Arc::new(tool));
            }
        }

        let mcp_servers = mcp::servers_from(&mut c, &raw, &base, &inherited, env, &proxies);

        // Run, approval, gateway and server values (serde read them; ranges are checked here).
        let mut run = Checks::default();
        run.positive_duration("deadline", raw.run.deadline);
        if raw.run.lease < std::time::Duration::from_secs(1) {
            run.fail("lease", "must be at least \"1s\": a shorter lease is lost between renewals");
        }
        run.duration("lease", raw.run.lease);
        run.count("escalate_after", raw.run.escalate_after, 1..=1000);
        run.nested("budget", raw.run.budget.validate());
        run.nested("loop_guard", raw.run.loop_guard.validate());
        c.policy_errors("run", &run.finish().err().unwrap_or_default(), None);
        let mut approvals = Checks::default();
        // "0s" is allowed: every request expires at once (and takes `on_expiry`).
        approvals.duration("expires_after", raw.approvals.expires_after);
        c.policy_errors("approvals", &approvals.finish().err().unwrap_or_default(), None);
        c.policy_errors("gateway", &raw.gateway.validate().err().unwrap_or_default(), None);
        c.policy_errors("agent", &raw.agent.validate().err().unwrap_or_default(), None);
        if let Some(model) = &raw.agent.model {
            if !raw.models.contains_key(model) {
                let at = c.spans.find(&["agent", "model"]);
                let known: Vec<&str> = raw.models.keys().map(String::as_str).collect();
                c.error(
                    at,
                    "agent.model",
                    format!("no model `{model}` in [models] (known: {})", known.join(", ")),
                );
            }
        }
        // A server's tools are known once it is started (`connect_mcp`).
        let from_mcp = |name: &str| {
            mcp_servers
                .values()
                .any(|m| m.offer.prefix.is_empty() || name.starts_with(&format!("{}_", m.offer.prefix)))
        };
        for name in raw.agent.tools.iter().flatten() {
            if !raw.tools.contains_key(name) && !from_mcp(name) {
                let at = c.spans.find(&["agent", "tools"]);
                c.error(at, "agent.tools", format!("no tool named `{name}`"));
            }
        }
        if let Some(problem) = listen_problem(&raw.server.listen) {
            let at = c.spans.find(&["server", "listen"]);
            c.error(at, "server.listen", problem);
        }

        // A tool working in the journal's directory can read and rewrite the journal.
        if let Some(db) = storage_url.strip_prefix("sqlite://").and_then(|p| Path::new(p).parent()) {
            let db = std::fs::canonicalize(db).ok();
            for (name, tool) in &tools {
                if let ToolKind::Command(CommandTool { cwd: Some(dir), .. }) = &tool.kind {
                    if db.is_some() && std::fs::canonicalize(dir).ok() == db {
                        let at = raw.tools.get(name).map(|t| t.span().start);
                        c.warn(
                            at,
                            format!("tools.{name}.cwd"),
                            "the journal lives in this directory: the tool could read and rewrite it; \
                             give the tool a directory of its own",
                        );
                    }
                }
            }
        }

        let mut keys = Vec::new();
        for (i, k) in raw.server.keys.iter().enumerate() {
            let at = c.spans.find_key(&format!("server.keys[{i}].key_env"));
            match env(&k.key_env) {
                Some(secret) if secret.len() >= 16 => {
                    keys.push(ApiKey { name: k.name.clone(), role: k.role, secret });
                }
                Some(_) => c.error(
                    at,
                    format!("server.keys[{i}].key_env"),
                    format!("the key in `{}` is shorter than 16 characters", k.key_env),
                ),
                None => c.error(
                    at,
                    format!("server.keys[{i}].key_env"),
                    format!("environment variable `{}` is not set", k.key_env),
                ),
            }
        }

        check_server(&mut c, &raw.server);
        let server_tls = raw.server.tls.as_ref().and_then(|t| {
            let dir = config_dir(file);
            match keel_http::ServerTls::from_files(&dir.join(&t.cert_file), &dir.join(&t.key_file)) {
                Ok(tls) => Some(tls),
                Err(problems) => {
                    for p in problems {
                        let key = format!("server.tls.{}", p.key);
                        let at = c.spans.find_key(&key).or_else(|| c.spans.find_key("server.tls"));
                        c.error(at, key, p.message);
                    }
                    None
                }
            }
        });

        // Models: the gateway checks them; its problems name `models.NAME.field`.
        // TLS files are keel.toml's directory's when relative.
        let models: BTreeMap<String, keel_gateway::ModelConfig> = raw
            .models
            .iter()
            .map(|(k, v)| {
                let mut m = v.get_ref().clone();
                let dir = config_dir(file);
                let join = |p: &mut Option<PathBuf>| {
                    if let Some(path) = p.as_mut() {
                        *path = dir.join(&*path);
                    }
                };
                join(&mut m.ca_file);
                join(&mut m.client_cert_file);
                join(&mut m.client_key_file);
                (k.clone(), m)
            })
            .collect();
        let mut model_keys = BTreeMap::new();
        for m in models.values() {
            if let Some(var) = &m.api_key_env {
                if let Some(v) = env(var) {
                    model_keys.insert(var.clone(), v);
                }
            }
        }
        let model_keys = Arc::new(model_keys);
        if !models.is_empty() {
            let keys = model_keys.clone();
            let built = keel_gateway::Gateway::builder(models.clone())
                .config(raw.gateway.clone())
                .proxies(proxies.clone())
                .env(move |var| keys.get(var).cloned())
                .build();
            if let Err(e) = built {
                for problem in e.problems {
                    let (key, message) = problem.split_once(": ").unwrap_or(("models", problem.as_str()));
                    if key.starts_with("gateway.") {
                        continue; // checked above, with or without models
                    }
                    let name = key.split('.').nth(1).unwrap_or("");
                    let at = c.spans.find_key(key).or_else(|| raw.models.get(name).map(|m| m.span().start));
                    c.error(at, key.to_owned(), message.to_owned());
                }
            }
        }

        let telemetry = match raw.telemetry.resolve(env) {
            Ok(t) => t,
            Err(problems) => {
                let at = c.spans.find(&["telemetry"]);
                c.policy_errors("telemetry", &problems, at);
                keel_telemetry::Telemetry::default()
            }
        };
        let alerts = match raw.alerts.resolve(env) {
            Ok(a) => a,
            Err(problems) => {
                let at = c.spans.find(&["alerts"]);
                c.policy_errors("alerts", &problems, at);
                keel_telemetry::alert::Alerts::default()
            }
        };

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        Ok(Config {
            file: file.to_owned(),
            storage_url,
            claim_ttl,
            defaults: defaults.unwrap_or_default(),
            run: raw.run,
            approvals: raw.approvals,
            agent: raw.agent,
            tools,
            server: raw.server,
            server_tls,
            keys,
            models,
            gateway: raw.gateway,
            model_keys,
            proxies,
            telemetry,
            alerts,
            warnings: c.warnings,
            mcp_servers,
        })
    }

    /// How the journal is opened: `clock`, and the claim TTL of `[storage]`.
    pub fn journal_options(&self, clock: Arc<dyn keel_core::Clock>) -> keel_journal::JournalOptions {
        keel_journal::JournalOptions {
            clock,
            claim_ttl: self.claim_ttl,
            ..keel_journal::JournalOptions::default()
        }
    }

    /// The JSON Schema of `keel.toml`, for editors.
    pub fn schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(RawConfig)).unwrap_or_default()
    }
}

/// `[server]`'s limits: each in its range, so that no value can disable a defence
/// by accident (a zero timeout, no connection at all).
fn check_server(c: &mut Checker<'_>, server: &ServerConfig) {
    const MAX_WAIT: Duration = Duration::from_secs(3600);
    if !(1..=1_000_000).contains(&server.max_connections) {
        c.error(
            c.spans.find_key("server.max_connections"),
            "server.max_connections",
            "must be between 1 and 1000000",
        );
    }
    for (key, d) in [
        ("server.header_read_timeout", server.header_read_timeout),
        ("server.idle_timeout", server.idle_timeout),
        ("server.body_read_timeout", server.body_read_timeout),
    ] {
        if d < Duration::from_millis(10) || d > MAX_WAIT {
            c.error(
                c.spans.find_key(key),
                key,
                format!("must be between 10ms and 1h, not {}", humantime::format_duration(d)),
            );
        }
    }
    let r = &server.rate_limit;
    for (key, v) in [
        ("server.rate_limit.per_second", r.per_second),
        ("server.rate_limit.burst", r.burst),
        ("server.rate_limit.unauthenticated_per_second", r.unauthenticated_per_second),
        ("server.rate_limit.unauthenticated_burst", r.unauthenticated_burst),
    ] {
        if v == 0 {
            c.error(c.spans.find_key(key), key, "must be at least 1");
        }
    }
}

/// The policy `merged` describes, every value in range; problems are reported as
/// `prefix.key`. `own` is the table written under `prefix` (a tool's overrides, or
/// `[defaults]` itself): what is wrong only in `inherited` is `[defaults]`'s to report.
///
/// # Errors
/// `Some` of the range problems when it deserialized, `None` when it did not.
fn policy_from(
    c: &mut Checker<'_>,
    merged: &toml::Table,
    own: &toml::Table,
    prefix: &str,
    at: Option<usize>,
    inherited: &Inherited,
) -> Result<PolicyConfig, Option<Vec<PolicyError>>> {
    let policy = match toml::Value::Table(merged.clone()).try_into::<PolicyConfig>() {
        Ok(p) => p,
        Err(e) => {
            // serde stops at its first problem: read each value alone to find them all.
            let mut written = Vec::new();
            leaves(own, &mut Vec::new(), &mut written);
            let mut found = false;
            for (path, value) in written {
                if let Err(e) = toml::Value::Table(nest(&path, value)).try_into::<PolicyConfig>() {
                    let key = format!("{prefix}.{}", path.join("."));
                    let line = c.spans.find_key(&key).or(at);
                    c.error(line, key, e.message().trim().to_owned());
                    found = true;
                }
            }
            if !found && inherited.parsed {
                c.error(at, prefix, e.message().trim().to_owned());
            }
            return Err(None);
        }
    };
    match policy.validate() {
        Ok(()) => Ok(policy),
        Err(problems) => {
            let own: Vec<PolicyError> =
                problems.iter().filter(|p| !inherited.problems.contains(p)).cloned().collect();
            c.policy_errors(prefix, &own, at);
            Err(Some(problems))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn tool_from(
    c: &mut Checker<'_>,
    name: &str,
    t: &ToolConfig,
    at: Option<usize>,
    base: &toml::Table,
    inherited: &Inherited,
    raw: &RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    proxies: &keel_http::Proxies,
) -> Option<Tool> {
    let before = c.errors.len();
    let key = |k: &str| format!("tools.{name}.{k}");

    let mut merged = base.clone();
    let own = t.policy.as_ref().map(|p| p.get_ref().clone()).unwrap_or_default();
    merge(&mut merged, &own);
    let policy_at = t.policy.as_ref().map(|p| p.span().start).or(at);
    // When only `[defaults]` is wrong, it says so; this tool is not built either.
    let policy = policy_from(c, &merged, &own, &key("policy"), policy_at, inherited).ok();

    // An `above` rule compares a number: the schema must promise one, so a call
    // that sends anything else is refused before the rule is asked.
    if let Some(ApprovalRule::Above { param, above }) = &t.approval {
        let approval_at = c.spans.find(&["tools", name, "approval"]).or(at);
        if !above.is_finite() {
            c.error(approval_at, key("approval.above"), format!("{above} is not a finite number"));
        }
        match declared_type(t.params.as_ref(), param) {
            Some(ty) if is_numeric(ty) => {}
            Some(ty) => c.error(
                approval_at,
                key("approval.param"),
                format!(
                    "`params` declares `{param}` as {ty}: a rule `above` needs it declared \
                     {{ type = \"number\" }} (or \"integer\")"
                ),
            ),
            None => c.error(
                approval_at,
                key("approval.param"),
                format!(
                    "`params` does not declare `{param}`: declare it {{ type = \"number\" }} (or \
                     \"integer\") so a call is checked before the rule compares it"
                ),
            ),
        }
    }

    let validator = t.params.as_ref().and_then(|schema| match jsonschema::validator_for(schema) {
        Ok(v) => Some(v),
        Err(e) => {
            c.error(at, key("params"), format!("not a valid JSON Schema: {e}"));
            None
        }
    });
    if let Some(undo) = &t.undo {
        if !raw.tools.contains_key(undo.get_ref()) {
            c.error(Some(undo.span().start), key("undo"), format!("no tool named `{}`", undo.get_ref()));
        }
    }
    if t.canary_above.is_some() && t.batch_param.is_none() {
        c.error(at, key("canary_above"), "needs `batch_param`, the parameter holding the batch");
    }
    let cost = t.cost.as_ref().and_then(|cost| {
        let before = c.errors.len();
        let cost_at = c.spans.find(&["tools", name, "cost"]).or(at);
        let mut usd = |k: &str, v: Option<f64>| match v {
            Some(v) if v.is_finite() && (0.0..=1e6).contains(&v) => Some(keel_core::budget::usd_to_micros(v)),
            Some(v) => {
                c.error(
                    cost_at,
                    key(&format!("cost.{k}")),
                    format!("{v} is not a cost in 0..=1000000 dollars"),
                );
                None
            }
            None => None,
        };
        let per_call = usd("per_call_usd", cost.per_call_usd);
        let max = usd("max_usd", cost.max_usd);
        if c.errors.len() > before {
            return None;
        }
        match (&cost.from_field, per_call, max) {
            (Some(f), _, _) if f.trim().is_empty() => {
                c.error(cost_at, key("cost.from_field"), "is empty: name the answer's field, `a.b.c`");
                None
            }
            (Some(_), None, None) => {
                c.error(
                    cost_at,
                    key("cost.max_usd"),
                    "is needed with `from_field`: the most one call can cost, reserved before it",
                );
                None
            }
            (None, None, _) => {
                c.error(cost_at, key("cost"), "needs `per_call_usd`, or `from_field` with `max_usd`");
                None
            }
            (field, per_call, max) => Some(crate::tool::ToolCost {
                per_call_micros: per_call.unwrap_or(0),
                from_field: field.clone(),
                max_micros: max.or(per_call).unwrap_or(0),
            }),
        }
    });

    let fallback = t.fallback.as_ref().and_then(|f| {
        let before = c.errors.len();
        let f_at = c.spans.find(&["tools", name, "fallback"]).or(at);
        if let Some(twin) = &f.twin {
            match raw.tools.get(twin) {
                None => c.error(f_at, key("fallback.twin"), format!("no tool named `{twin}`")),
                Some(_) if twin == name => c.error(f_at, key("fallback.twin"), "a tool cannot be its own twin"),
                Some(other) if other.get_ref().write => c.error(
                    f_at,
                    key("fallback.twin"),
                    format!("`{twin}` is write-like: a twin answers in the tool's place, so it must be read-only"),
                ),
                Some(_) => {}
            }
        }
        if let Some(fresh) = f.cached {
            if t.write {
                c.error(
                    f_at,
                    key("fallback.cached"),
                    "a write-like tool never falls back to a cached result: its effect would silently not happen",
                );
            } else if !(Duration::from_secs(1)..=Duration::from_secs(366 * 86_400)).contains(&fresh) {
                c.error(f_at, key("fallback.cached"), "must be from 1s to 366days");
            }
        }
        if f.twin.is_none() && f.cached.is_none() {
            c.error(f_at, key("fallback"), "needs `twin` (a read-only tool) or `cached` (a freshness window)");
        }
        if f.on.as_ref().is_some_and(Vec::is_empty) {
            c.error(f_at, key("fallback.on"), "is empty: the fallback would never be taken; remove it instead");
        }
        (c.errors.len() == before).then(|| crate::tool::ToolFallback {
            twin: f.twin.as_deref().map(Arc::from),
            cached: f.cached,
            on: f.on.clone().unwrap_or_else(|| crate::tool::ToolFallback::DEFAULT_ON.to_vec()),
        })
    });

    let (command_only, http_only, code_only): (&[KeySet<'_>], &[KeySet<'_>], &[KeySet<'_>]) = (
        &[
            ("argv", t.argv.is_some()),
            ("cwd", t.cwd.is_some()),
            ("env", !t.env.is_empty()),
            ("env_from", !t.env_from.is_empty()),
            ("params_on_stdin", t.params_on_stdin),
            ("classify", t.classify.is_some()),
        ],
        &[
            ("method", t.method.is_some()),
            ("url", t.url.is_some()),
            ("headers", !t.headers.is_empty()),
            ("headers_env", !t.headers_env.is_empty()),
            ("body", t.body.is_some()),
            ("ca_file", t.ca_file.is_some()),
            ("client_cert_file", t.client_cert_file.is_some()),
            ("client_key_file", t.client_key_file.is_some()),
        ],
        &[
            ("timeout", t.timeout.is_some()),
            ("cpu_seconds", t.cpu_seconds.is_some()),
            ("memory_mb", t.memory_mb.is_some()),
            ("max_processes", t.max_processes.is_some()),
            ("max_file_mb", t.max_file_mb.is_some()),
            ("isolation", t.isolation.is_some()),
            ("result_schema", t.result_schema.is_some()),
            ("python", t.python.is_some()),
        ],
    );
    let max_output: &[KeySet<'_>] = &[("max_output", t.max_output.is_some())];
    let (wrong, kind_name): (Vec<&[KeySet<'_>]>, &str) = match t.kind {
        ToolKindName::Command => (vec![http_only, code_only], "command"),
        ToolKindName::Http => (vec![command_only, code_only, max_output], "http"),
        ToolKindName::Code => (vec![command_only, http_only], "code"),
    };
    for (k, set) in wrong.into_iter().flatten() {
        if *set {
            let line = c.spans.find_key(&key(k)).or(at);
            c.error(line, key(k), format!("does not apply to a tool of kind `{kind_name}`"));
        }
    }
    let mut params_schema = t.params.clone();
    let mut validator = validator;
    if t.kind == ToolKindName::Code {
        if t.params.is_some() {
            let line = c.spans.find_key(&key("params")).or(at);
            c.error(line, key("params"), "is fixed for a tool of kind `code`: `{ program, input }`");
        }
        let schema = crate::tool::code::params_schema();
        validator = jsonschema::validator_for(&schema).ok();
        params_schema = Some(schema);
    }

    let kind = match t.kind {
        ToolKindName::Command => {
            let argv = t.argv.clone().unwrap_or_default();
            if argv.is_empty() {
                c.error(at, key("argv"), "a command tool needs `argv`, the program and its arguments");
            }
            for (i, message) in crate::tool::command::shell_templates(&argv) {
                c.warn(at, key(&format!("argv[{i}]")), message);
            }
            // The program's whole environment: the safe few of Keel's, then the tool's.
            let vars = program_env(c, at, &key, (&t.env, &t.env_from), env);
            // A relative `cwd` is the config file's directory's; it must exist now.
            let cwd = t.cwd.as_ref().map(|d| {
                let dir = c.file.parent().map_or_else(|| PathBuf::from(d), |p| p.join(d));
                if !dir.is_dir() {
                    c.error(at, key("cwd"), format!("`{}` is not a directory", dir.display()));
                }
                dir.to_string_lossy().into_owned()
            });
            let classifier = match CommandClassifier::new(&t.classify.clone().unwrap_or_default()) {
                Ok(cl) => Some(cl),
                Err(e) => {
                    c.error(at, key("classify"), e.to_string());
                    None
                }
            };
            classifier.map(|classifier| {
                ToolKind::Command(CommandTool {
                    argv,
                    cwd,
                    env: vars,
                    params_on_stdin: t.params_on_stdin,
                    max_output: t.max_output.unwrap_or(DEFAULT_MAX_OUTPUT),
                    classifier,
                })
            })
        }
        ToolKindName::Http => {
            let url = t.url.clone().unwrap_or_default();
            if url.is_empty() {
                c.error(at, key("url"), "an http tool needs `url`");
            } else if !url.starts_with("http://") && !url.starts_with("https://") {
                c.error(at, key("url"), format!("`{url}` is not an http:// or https:// URL"));
            } else if let Err(problem) = crate::tool::http::check_url_template(&url) {
                c.error(at, key("url"), problem);
            }
            let method = t.method.clone().unwrap_or_else(|| "POST".into()).to_ascii_uppercase();
            let method = match http::Method::from_bytes(method.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    c.error(at, key("method"), format!("`{method}` is not an HTTP method"));
                    None
                }
            };
            let mut headers = Vec::new();
            for (h, v) in &t.headers {
                if h.eq_ignore_ascii_case("authorization") {
                    c.error(at, key("headers"), "`Authorization` is a secret: use `headers_env`");
                }
                headers.push((h.clone(), v.clone()));
            }
            for (h, var) in &t.headers_env {
                match env(var) {
                    Some(v) => headers.push((h.clone(), v)),
                    None => {
                        c.error(at, key("headers_env"), format!("environment variable `{var}` is not set"))
                    }
                }
            }
            for (h, v) in &headers {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                    || http::HeaderValue::from_str(v).is_err()
                {
                    c.error(at, key("headers"), format!("`{h}` is not a valid header"));
                }
            }
            // The process's client for this tool's TLS settings; a bad file is named
            // at its key's line.
            let tls = keel_http::TlsConfig {
                ca_file: t.ca_file.clone(),
                client_cert_file: t.client_cert_file.clone(),
                client_key_file: t.client_key_file.clone(),
            }
            .relative_to(config_dir(c.file));
            let client = match keel_http::Client::shared(&tls, proxies) {
                Ok(client) => Some(client),
                Err(problems) => {
                    for p in problems {
                        let k = key(p.key);
                        c.error(c.spans.find_key(&k).or(at), k, p.message);
                    }
                    None
                }
            };
            method.zip(client).map(|(method, client)| {
                ToolKind::Http(HttpTool::new(method, url, headers, t.body.clone(), client))
            })
        }
        ToolKindName::Code => code_tool(c, name, t, at, policy.as_ref(), env).map(ToolKind::Code),
    };

    if c.errors.len() > before {
        return None;
    }
    Some(Tool {
        name: Arc::from(name),
        description: t.description.clone(),
        write: t.write,
        approval: t.approval.clone().unwrap_or(ApprovalRule::Fixed(FixedApproval::Never)),
        undo: t.undo.as_ref().map(|u| u.get_ref().clone()),
        batch_param: t.batch_param.clone(),
        canary_above: t.canary_above,
        cost,
        fallback,
        policy: policy?,
        params_schema,
        validator: validator.map(Arc::new),
        kind: kind?,
    })
}

/// A program's whole environment: the safe few of Keel's ([`INHERITED_ENV`]), then
/// its own `env` and `env_from` (checked: valid names, no `KEEL_*`, no NUL, every
/// `env_from` variable set). Problems are reported at `key("env")`/`key("env_from")`.
fn program_env(
    c: &mut Checker<'_>,
    at: Option<usize>,
    key: &dyn Fn(&str) -> String,
    (own, from): (&BTreeMap<String, String>, &BTreeMap<String, String>),
    env: &dyn Fn(&str) -> Option<String>,
) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> =
        INHERITED_ENV.iter().filter_map(|n| env(n).map(|v| ((*n).to_owned(), v))).collect();
    for (table, names) in [("env", own.keys()), ("env_from", from.keys())] {
        for var in names {
            if var.is_empty() || var.contains(['=', '\0']) {
                c.error(at, key(table), format!("`{var}` is not a valid environment variable name"));
            } else if var.starts_with(CALL_ENV_PREFIX) {
                c.error(
                    at,
                    key(table),
                    format!("`{var}`: `{CALL_ENV_PREFIX}*` variables are set by Keel for each call"),
                );
            }
        }
    }
    for (var, value) in own {
        if value.contains('\0') {
            c.error(at, key("env"), format!("the value of `{var}` holds a NUL byte"));
        }
        vars.insert(var.clone(), value.clone());
    }
    for (var, name) in from {
        match env(name) {
            Some(v) => {
                vars.insert(var.clone(), v);
            }
            None => c.error(at, key("env_from"), format!("environment variable `{name}` is not set")),
        }
    }
    vars
}

/// A `kind = "code"` tool's limits, result schema and sandbox; every absurd value
/// named by its key.
fn code_tool(
    c: &mut Checker<'_>,
    name: &str,
    t: &ToolConfig,
    at: Option<usize>,
    policy: Option<&PolicyConfig>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<CodeTool> {
    let before = c.errors.len();
    let key = |k: &str| format!("tools.{name}.{k}");
    let d = CodeLimits::default();
    let mut range = |k: &str, v: Option<u64>, lo: u64, hi: u64, default: u64, unit: &str| match v {
        Some(v) if !(lo..=hi).contains(&v) => {
            let line = c.spans.find_key(&key(k)).or(at);
            c.error(line, key(k), format!("must be from {lo} to {hi}{unit} (got {v})"));
            default
        }
        Some(v) => v,
        None => default,
    };
    let cpu_seconds = range("cpu_seconds", t.cpu_seconds, 1, 3600, d.cpu_seconds, " seconds");
    let memory_mb = range("memory_mb", t.memory_mb, 64, 65_536, d.memory_mb, " MiB");
    let max_processes =
        range("max_processes", t.max_processes.map(u64::from), 1, 4096, u64::from(d.max_processes), "");
    let max_file_mb = range("max_file_mb", t.max_file_mb, 1, 65_536, d.max_file_mb, " MiB");
    let max_output =
        range("max_output", t.max_output.map(|v| v as u64), 1, 64 << 20, d.max_output as u64, " bytes");
    let timeout = t.timeout.unwrap_or(d.timeout);
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&timeout) {
        let line = c.spans.find_key(&key("timeout")).or(at);
        c.error(
            line,
            key("timeout"),
            format!("must be from 100ms to 1h (got {})", humantime::format_duration(timeout)),
        );
    }
    if let Some(attempt) = policy.and_then(|p| p.timeout.attempt).filter(|a| *a < timeout) {
        c.warn(
            at,
            key("timeout"),
            format!(
                "the tool's policy ends an attempt at {} (`policy.timeout.attempt`), before the program's own {} \
                 limit: a long program fails as `timeout`, not as a `code_error` a model can repair",
                humantime::format_duration(attempt),
                humantime::format_duration(timeout)
            ),
        );
    }
    let result_schema =
        t.result_schema.as_ref().and_then(|schema| match crate::tool::code::compile_result_schema(schema) {
            Ok(v) => Some(v),
            Err(e) => {
                let line = c.spans.find_key(&key("result_schema")).or(at);
                c.error(line, key("result_schema"), e);
                None
            }
        });
    let python = t.python.clone().unwrap_or_else(|| "python3".to_owned());
    if python.trim().is_empty() || python.contains('\0') {
        c.error(at, key("python"), "must name an interpreter (\"python3\" or a path)");
    }
    if c.errors.len() > before {
        return None;
    }
    let wanted = t.isolation.unwrap_or_default();
    let sandbox = match crate::tool::code::sandbox::resolve(&python, wanted, env) {
        Ok(s) => s,
        Err(problem) => {
            let k = if t.isolation.is_some() { "isolation" } else { "python" };
            let line = c.spans.find_key(&key(k)).or(at);
            c.error(line, key(k), problem);
            return None;
        }
    };
    tracing::info!(tool = name, isolation = sandbox.isolation.as_str(), sandbox = %sandbox.describe(), "code tool");
    for w in sandbox.warnings() {
        tracing::warn!(tool = name, isolation = sandbox.isolation.as_str(), "code tool: {w}");
        c.warn(at, key("isolation"), w);
    }
    Some(CodeTool {
        limits: CodeLimits {
            timeout,
            cpu_seconds,
            memory_mb,
            max_processes: u32::try_from(max_processes).unwrap_or(d.max_processes),
            max_file_mb,
            max_output: usize::try_from(max_output).unwrap_or(d.max_output),
        },
        sandbox,
        result_schema,
        lang: env("LANG"),
    })
}

#[cfg(test)]
mod tests;
