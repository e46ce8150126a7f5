//! `[mcp_servers.NAME]`: checked into [`McpUpstream`]s (nothing is started), and
//! [`Config::connect_mcp`], which starts them and adds their tools.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keel_core::classify::CommandClassifier;

use super::raw::{McpServerConfig, RawConfig};
use super::{
    Checker, Config, ConfigError, ConfigErrors, Inherited, config_dir, merge, policy_from, program_env,
};
use crate::mcp::{Backoff, HttpSpec, McpUpstream, Offer, StdioSpec, Timeouts, Transport};

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_REQUEST_TIME: Duration = Duration::from_secs(600);
const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_RESTART_MAX: Duration = Duration::from_secs(60);

/// Whether `s` may be a tool name's part for every model API (`[A-Za-z0-9_-]`).
fn is_name(s: &str) -> bool {
    s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

/// Every `[mcp_servers]` entry, checked; problems are reported on `c`.
pub(super) fn servers_from(
    c: &mut Checker<'_>,
    raw: &RawConfig,
    base: &toml::Table,
    inherited: &Inherited,
    env: &dyn Fn(&str) -> Option<String>,
    proxies: &keel_http::Proxies,
) -> BTreeMap<String, Arc<McpUpstream>> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &raw.mcp_servers {
        let at = Some(spanned.span().start);
        if let Some(up) = server_from(c, name, spanned.get_ref(), at, base, inherited, env, proxies) {
            out.insert(name.clone(), Arc::new(up));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn server_from(
    c: &mut Checker<'_>,
    name: &str,
    s: &McpServerConfig,
    at: Option<usize>,
    base: &toml::Table,
    inherited: &Inherited,
    env: &dyn Fn(&str) -> Option<String>,
    proxies: &keel_http::Proxies,
) -> Option<McpUpstream> {
    let before = c.errors.len();
    let key = |k: &str| format!("mcp_servers.{name}.{k}");
    let line = |c: &Checker<'_>, k: &str| c.spans.find_key(&key(k)).or(at);

    let stdio_only = [
        ("cwd", s.cwd.is_some()),
        ("env", !s.env.is_empty()),
        ("env_from", !s.env_from.is_empty()),
        ("restart_backoff", s.restart_backoff.is_some()),
        ("restart_max", s.restart_max.is_some()),
    ];
    let http_only = [
        ("headers", !s.headers.is_empty()),
        ("headers_env", !s.headers_env.is_empty()),
        ("ca_file", s.ca_file.is_some()),
    ];

    let transport = match (&s.command, &s.url) {
        (Some(_), Some(_)) | (None, None) => {
            c.error(
                at,
                key("command"),
                "set `command` (a program Keel starts) or `url` (an HTTP endpoint), one of them",
            );
            None
        }
        (Some(argv), None) => {
            for (k, set) in http_only {
                if set {
                    let l = line(c, k);
                    c.error(l, key(k), "applies to a server reached by `url`, not one started by `command`");
                }
            }
            if argv.is_empty() || argv[0].is_empty() {
                c.error(
                    at,
                    key("command"),
                    "needs the program and its arguments, e.g. [\"python3\", \"server.py\"]",
                );
            }
            let vars = program_env(c, at, &key, (&s.env, &s.env_from), env);
            let dir = config_dir(c.file).to_owned();
            let cwd = match &s.cwd {
                Some(d) => {
                    let d = dir.join(d);
                    if !d.is_dir() {
                        let l = line(c, "cwd");
                        c.error(l, key("cwd"), format!("`{}` is not a directory", d.display()));
                    }
                    d
                }
                None => dir,
            };
            Some(Transport::Stdio(StdioSpec { argv: argv.clone(), cwd, env: vars }))
        }
        (None, Some(url)) => {
            for (k, set) in stdio_only {
                if set {
                    let l = line(c, k);
                    c.error(l, key(k), "applies to a server started by `command`, not one reached by `url`");
                }
            }
            http_transport(c, &key, at, s, url, proxies, env)
        }
    };

    let prefix = s.prefix.clone().unwrap_or_else(|| name.to_owned());
    if !is_name(&prefix) {
        let l = line(c, "prefix");
        c.error(
            l,
            key("prefix"),
            format!("`{prefix}` cannot begin a tool name (letters, digits, `_` and `-` only): set `prefix`"),
        );
    }
    let only = s.tools.as_ref().map(|t| t.iter().cloned().collect::<BTreeSet<_>>());
    if only.as_ref().is_some_and(BTreeSet::is_empty) {
        let l = line(c, "tools");
        c.error(l, key("tools"), "is empty: the server would offer nothing; remove the server instead");
    }
    let read_only: BTreeSet<String> = s.read_only.iter().cloned().collect();
    let write: BTreeSet<String> = s.write.iter().cloned().collect();
    if let Some(both) = read_only.intersection(&write).next() {
        let l = line(c, "write");
        c.error(l, key("write"), format!("`{both}` is in both `read_only` and `write`"));
    }

    let range =
        |c: &mut Checker<'_>, k: &str, v: Option<Duration>, default: Duration, lo: Duration, hi: Duration| {
            let v = v.unwrap_or(default);
            if !(lo..=hi).contains(&v) {
                let l = line(c, k);
                c.error(
                    l,
                    key(k),
                    format!(
                        "must be from {} to {} (got {})",
                        humantime::format_duration(lo),
                        humantime::format_duration(hi),
                        humantime::format_duration(v)
                    ),
                );
            }
            v
        };
    let day = Duration::from_secs(86_400);
    let request = range(
        c,
        "request_timeout",
        s.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
        Duration::from_millis(100),
        day,
    );
    let total = range(
        c,
        "max_request_time",
        s.max_request_time,
        DEFAULT_MAX_REQUEST_TIME.max(request),
        request,
        7 * day,
    );
    let first = range(
        c,
        "restart_backoff",
        s.restart_backoff,
        DEFAULT_RESTART_BACKOFF,
        Duration::from_millis(10),
        day,
    );
    let max = range(c, "restart_max", s.restart_max, DEFAULT_RESTART_MAX.max(first), first, day);

    let classifier = match CommandClassifier::new(&s.classify.clone().unwrap_or_default()) {
        Ok(cl) => Some(cl),
        Err(e) => {
            let l = line(c, "classify");
            c.error(l, key("classify"), e.to_string());
            None
        }
    };

    let mut merged = base.clone();
    let own = s.policy.as_ref().map(|p| p.get_ref().clone()).unwrap_or_default();
    merge(&mut merged, &own);
    let policy_at = s.policy.as_ref().map(|p| p.span().start).or(at);
    let mut policy = policy_from(c, &merged, &own, &key("policy"), policy_at, inherited).ok();
    // Progress keeps a request alive: the attempt is bounded by `max_request_time`
    // unless this server's own policy says otherwise.
    let own_attempt = own.get("timeout").and_then(|t| t.get("attempt")).is_some();
    if let (Some(p), false) = (policy.as_mut(), own_attempt) {
        p.timeout.attempt = Some(total);
    }

    if c.errors.len() > before {
        return None;
    }
    Some(McpUpstream::new(
        name.to_owned(),
        transport?,
        Offer { prefix, only, read_only, write, approval: s.approval, policy: policy? },
        Timeouts { request, total },
        Backoff { first, max },
        classifier?,
    ))
}

fn http_transport(
    c: &mut Checker<'_>,
    key: &dyn Fn(&str) -> String,
    at: Option<usize>,
    s: &McpServerConfig,
    url: &str,
    proxies: &keel_http::Proxies,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Transport> {
    let before = c.errors.len();
    let uri = match keel_http::parse_url(url) {
        Ok(u) if url.starts_with("http://") || url.starts_with("https://") => Some(u),
        Ok(_) => {
            c.error(at, key("url"), format!("`{url}` is not an http:// or https:// URL"));
            None
        }
        Err(e) => {
            c.error(at, key("url"), format!("`{url}` is not a URL: {e}"));
            None
        }
    };
    let mut headers = Vec::new();
    let mut add = |c: &mut Checker<'_>, h: &str, v: &str| match (
        http::HeaderName::from_bytes(h.as_bytes()),
        http::HeaderValue::from_str(v),
    ) {
        (Ok(name), Ok(mut value)) => {
            value.set_sensitive(true);
            headers.push((name, value));
        }
        _ => c.error(at, key("headers"), format!("`{h}` is not a valid header")),
    };
    for (h, v) in &s.headers {
        if h.eq_ignore_ascii_case("authorization") {
            c.error(at, key("headers"), "`Authorization` is a secret: use `headers_env`");
        }
        add(c, h, v);
    }
    for (h, var) in &s.headers_env {
        match env(var) {
            Some(v) => add(c, h, &v),
            None => c.error(at, key("headers_env"), format!("environment variable `{var}` is not set")),
        }
    }
    let tls = keel_http::TlsConfig { ca_file: s.ca_file.clone(), ..Default::default() }
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
    if c.errors.len() > before {
        return None;
    }
    Some(Transport::Http(HttpSpec { url: uri?, headers, client: client? }))
}

impl Config {
    /// Starts (or connects to) every `[mcp_servers]` entry, lists its tools and adds
    /// them to [`Config::tools`], each `PREFIX_TOOL` with the server's policy.
    ///
    /// # Errors
    /// Every server that could not be reached or listed, a `tools` entry the server
    /// does not list, and a name that is already a tool's — each naming its key.
    pub async fn connect_mcp(&mut self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let problem = |key: String, message: String| ConfigError {
            file: self.file.clone(),
            line: None,
            key: Some(key),
            message,
        };
        let mut added = Vec::new();
        for (name, up) in &self.mcp_servers {
            let remote = match up.list_tools().await {
                Ok(r) => r,
                Err(f) => {
                    errors.push(problem(
                        format!("mcp_servers.{name}"),
                        format!("cannot list its tools: {} ({})", f.message, f.class.as_str()),
                    ));
                    continue;
                }
            };
            for wanted in up.offer.only.iter().flatten() {
                if !remote.iter().any(|t| &t.name == wanted) {
                    let listed: Vec<&str> = remote.iter().map(|t| t.name.as_str()).collect();
                    errors.push(problem(
                        format!("mcp_servers.{name}.tools"),
                        format!("the server lists no tool `{wanted}` (it lists: {})", listed.join(", ")),
                    ));
                }
            }
            for tool in up.tools(&remote) {
                if self.tools.contains_key(&*tool.name)
                    || added.iter().any(|t: &crate::tool::Tool| t.name == tool.name)
                {
                    errors.push(problem(
                        format!("mcp_servers.{name}.prefix"),
                        format!("the server's tool becomes `{}`, which is already a tool's name: set another `prefix`", tool.name),
                    ));
                } else {
                    added.push(tool);
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        for tool in added {
            self.tools.insert(tool.name.to_string(), Arc::new(tool));
        }
        Ok(())
    }
}
