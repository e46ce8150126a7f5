//! `keel.toml`: tools, policies, run limits and storage, validated with clear errors.
//!
//! Loading has two stages. [`raw`] is serde's view of the file: unknown keys are
//! errors there, with the line. [`Config::parse`] then checks what serde cannot —
//! which keys a tool's kind needs, references between tools, environment variables
//! named by `*_env` keys, parameter schemas, policy overrides — and reports every
//! problem at once, each as `keel.toml:12: tools.pay.url: ...`. Secrets are only ever
//! read from the environment; the file never holds one.

mod error;
pub mod raw;

pub use error::{ConfigError, ConfigErrors};
pub use raw::{
    ApprovalRule, ApprovalsConfig, ExpiryOutcome, FixedApproval, Mode, RateLimitConfig, Role, RunConfig,
    ServerConfig,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_core::PolicyConfig;
use keel_core::classify::CommandClassifier;
use raw::{RawConfig, ToolConfig, ToolKindName};

use crate::tool::{CommandTool, HttpTool, Tool, ToolKind};
use error::line_of;

/// A validated `keel.toml`.
#[derive(Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// The journal's database URL (may hold a secret: never log it).
    pub storage_url: String,
    /// The default policy.
    pub defaults: PolicyConfig,
    /// Limits of each run.
    pub run: RunConfig,
    /// How approvals behave.
    pub approvals: ApprovalsConfig,
    /// The tools, by name.
    pub tools: BTreeMap<String, Arc<Tool>>,
    /// `keel serve`'s settings.
    pub server: ServerConfig,
    /// API keys with their secrets read from the environment (never logged).
    pub keys: Vec<ApiKey>,
    /// The models of the gateway, by name.
    pub models: BTreeMap<String, keel_gateway::ModelConfig>,
    /// Gateway-wide limits.
    pub gateway: keel_gateway::GatewayConfig,
    /// The models' upstream keys, by environment variable (never logged).
    pub model_keys: Arc<BTreeMap<String, String>>,
}

impl Config {
    /// The gateway for the configured models (unbuilt), with their keys.
    pub fn gateway_builder(&self) -> keel_gateway::GatewayBuilder {
        let keys = self.model_keys.clone();
        keel_gateway::Gateway::builder(self.models.clone())
            .config(self.gateway.clone())
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

/// A kind-specific key and whether it is set.
type KeySet<'a> = (&'a str, bool);

/// The largest output kept of a command by default (each of stdout and stderr).
const DEFAULT_MAX_OUTPUT: usize = 1 << 20;

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: at.map(|at| line_of(self.text, at)),
            key: Some(key.into()),
            message: message.into(),
        });
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.to_owned(),
                line: e.span().map(|s| line_of(text, s.start)),
                key: None,
                message: e.message().trim().to_owned(),
            }])
        })?;
        let mut c = Checker { file, text, errors: Vec::new() };

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

        let base = raw.defaults.as_ref().map(|t| t.get_ref().clone()).unwrap_or_default();
        let defaults = policy_from(&mut c, &base, "defaults", raw.defaults.as_ref().map(|t| t.span().start));

        let mut tools = BTreeMap::new();
        for (name, spanned) in &raw.tools {
            let at = Some(spanned.span().start);
            if let Some(tool) = tool_from(&mut c, name, spanned.get_ref(), at, &base, &raw, env) {
                tools.insert(name.clone(), Arc::new(tool));
            }
        }

        let mut keys = Vec::new();
        for (i, k) in raw.server.keys.iter().enumerate() {
            match env(&k.key_env) {
                Some(secret) if secret.len() >= 16 => {
                    keys.push(ApiKey { name: k.name.clone(), role: k.role, secret });
                }
                Some(_) => c.error(
                    None,
                    format!("server.keys[{i}].key_env"),
                    format!("the key in `{}` is shorter than 16 characters", k.key_env),
                ),
                None => c.error(
                    None,
                    format!("server.keys[{i}].key_env"),
                    format!("environment variable `{}` is not set", k.key_env),
                ),
            }
        }

        check_server(&mut c, &raw.server);

        // Models: the gateway checks them; its problems name `models.NAME.field`.
        let models: BTreeMap<String, keel_gateway::ModelConfig> =
            raw.models.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect();
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
                .env(move |var| keys.get(var).cloned())
                .build();
            if let Err(e) = built {
                for problem in e.problems {
                    let (key, message) = problem.split_once(": ").unwrap_or(("models", problem.as_str()));
                    let name = key.split('.').nth(1).unwrap_or("");
                    let at = raw.models.get(name).map(|m| m.span().start);
                    c.error(at, key.to_owned(), message.to_owned());
                }
            }
        }

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        Ok(Config {
            file: file.to_owned(),
            storage_url,
            defaults: defaults.unwrap_or_default(),
            run: raw.run,
            approvals: raw.approvals,
            tools,
            server: raw.server,
            keys,
            models,
            gateway: raw.gateway,
            model_keys,
        })
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
    let text = c.text;
    // `[server]` is not spanned: the line is where its key is written.
    let at = |key: &str| {
        let name = key.rsplit('.').next().unwrap_or(key);
        text.match_indices(name).map(|(i, _)| i).find(|&i| {
            let before = text[..i].chars().next_back();
            let after = text[i + name.len()..].trim_start_matches([' ', '\t', '"']);
            !before.is_some_and(|b| b.is_alphanumeric() || b == '_') && after.starts_with('=')
        })
    };
    if !(1..=1_000_000).contains(&server.max_connections) {
        c.error(at("max_connections"), "server.max_connections", "must be between 1 and 1000000");
    }
    for (key, d) in [
        ("server.header_read_timeout", server.header_read_timeout),
        ("server.idle_timeout", server.idle_timeout),
        ("server.body_read_timeout", server.body_read_timeout),
    ] {
        if d < Duration::from_millis(10) || d > MAX_WAIT {
            c.error(
                at(key),
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
            c.error(at(key), key, "must be at least 1");
        }
    }
}

fn policy_from(
    c: &mut Checker<'_>,
    table: &toml::Table,
    key: &str,
    at: Option<usize>,
) -> Option<PolicyConfig> {
    match toml::Value::Table(table.clone()).try_into::<PolicyConfig>() {
        Ok(p) => Some(p),
        Err(e) => {
            c.error(at, key, e.message().trim().to_owned());
            None
        }
    }
}

fn tool_from(
    c: &mut Checker<'_>,
    name: &str,
    t: &ToolConfig,
    at: Option<usize>,
    base: &toml::Table,
    raw: &RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Tool> {
    let before = c.errors.len();
    let key = |k: &str| format!("tools.{name}.{k}");

    let mut merged = base.clone();
    if let Some(over) = &t.policy {
        merge(&mut merged, over.get_ref());
    }
    let policy_at = t.policy.as_ref().map(|p| p.span().start).or(at);
    let policy = policy_from(c, &merged, &key("policy"), policy_at);

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

    let (command_only, http_only): (&[KeySet<'_>], &[KeySet<'_>]) = (
        &[
            ("argv", t.argv.is_some()),
            ("cwd", t.cwd.is_some()),
            ("env", !t.env.is_empty()),
            ("env_from", !t.env_from.is_empty()),
            ("max_output", t.max_output.is_some()),
            ("classify", t.classify.is_some()),
        ],
        &[
            ("method", t.method.is_some()),
            ("url", t.url.is_some()),
            ("headers", !t.headers.is_empty()),
            ("headers_env", !t.headers_env.is_empty()),
            ("body", t.body.is_some()),
        ],
    );
    let (wrong, kind_name) = match t.kind {
        ToolKindName::Command => (http_only, "command"),
        ToolKindName::Http => (command_only, "http"),
    };
    for (k, set) in wrong {
        if *set {
            c.error(at, key(k), format!("does not apply to a tool of kind `{kind_name}`"));
        }
    }

    let kind = match t.kind {
        ToolKindName::Command => {
            let argv = t.argv.clone().unwrap_or_default();
            if argv.is_empty() {
                c.error(at, key("argv"), "a command tool needs `argv`, the program and its arguments");
            }
            let mut vars = t.env.clone();
            for (var, from) in &t.env_from {
                match env(from) {
                    Some(v) => {
                        vars.insert(var.clone(), v);
                    }
                    None => c.error(at, key("env_from"), format!("environment variable `{from}` is not set")),
                }
            }
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
                    cwd: t.cwd.clone(),
                    env: vars,
                    max_output: t.max_output.unwrap_or(DEFAULT_MAX_OUTPUT),
                    classifier,
                })
            })
        }
        ToolKindName::Http => {
            let url = t.url.clone().unwrap_or_default();
            if url.is_empty() {
                c.error(at, key("url"), "an http tool needs `url`");
            } else if url.starts_with("https://") {
                // This build's HTTP client carries no TLS stack (it would double the
                // build on 2 cores); say so now rather than fail every call later.
                c.error(
                    at,
                    key("url"),
                    format!(
                        "`{url}`: https tools need a TLS-terminating hop in this build (e.g. a local proxy)"
                    ),
                );
            } else if !url.starts_with("http://") {
                c.error(at, key("url"), format!("`{url}` is not an http:// URL"));
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
            method.map(|method| ToolKind::Http(HttpTool::new(method, url, headers, t.body.clone())))
        }
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
        policy: policy?,
        params_schema: t.params.clone(),
        validator: validator.map(Arc::new),
        kind: kind?,
    })
}

#[cfg(test)]
mod tests;
