//! `[telemetry]` of `keel.toml`: plain serde values, then [`TelemetryConfig::resolve`]
//! checks them and reads their secrets from the environment.
//!
//! keel-runtime reads the file; the types live here, beside the code they configure.
//! Problems are [`PolicyError`]s naming the dotted key under `telemetry`, so the
//! config reader can give each its line.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Uri;
use http::header::{HeaderName, HeaderValue};
use keel_core::PolicyError;
use keel_core::policy::Checks;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[telemetry]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The `service.name` of Keel's spans (default "keel").
    pub service_name: Option<String>,
    /// Export traces over OTLP. Absent: no spans leave the process.
    pub otlp: Option<OtlpConfig>,
    /// Capture terminal failures, refused retries and escalations in Sentry.
    pub sentry: Option<SentryConfig>,
}

/// `[telemetry.sentry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SentryConfig {
    /// The project's DSN (`https://` or `http://`). Give this or `dsn_env`.
    pub dsn: Option<String>,
    /// The environment variable holding the DSN (it holds the project's key).
    pub dsn_env: Option<String>,
    /// The `environment` of every event, e.g. "production".
    pub environment: Option<String>,
}

/// `[telemetry.otlp]`: where traces go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector, e.g. "http://127.0.0.1:4318". A URL with no path gets the
    /// signal's path (`/v1/traces`); a URL with a path is used as written. For
    /// "grpc", the collector's address ("http://127.0.0.1:4317"; `https://` for TLS):
    /// the path is the trace service's.
    pub endpoint: String,
    /// The wire protocol: "http/protobuf" (default, port 4318) or "grpc" (port 4317;
    /// HTTP/2, cleartext for `http://`).
    #[serde(default)]
    pub protocol: Protocol,
    /// How long one export may take (default "10s").
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Request headers whose values come from environment variables, e.g.
    /// `{ authorization = "OTLP_AUTH" }` (never logged).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// Protobuf over HTTP/1.1 (`POST /v1/traces`).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC (`TraceService/Export` over HTTP/2).
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[telemetry]` checked, with its secrets.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// The `service.name` of Keel's spans.
    pub service_name: String,
    /// Where traces go, if anywhere.
    pub otlp: Option<Otlp>,
    /// Sentry, if configured.
    pub sentry: Option<crate::sentry::Sentry>,
}

/// A checked `[telemetry.otlp]`.
#[derive(Clone)]
pub struct Otlp {
    /// The full URL spans are posted to.
    pub endpoint: Uri,
    /// The bound of one export.
    pub timeout: Duration,
    /// Extra headers (secrets: never logged).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Spans go over gRPC (`endpoint` is the trace service's method).
    pub grpc: bool,
}

/// The gRPC method spans are exported to.
pub const GRPC_TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Otlp")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("headers", &names)
            .field("grpc", &self.grpc)
            .finish()
    }
}

impl TelemetryConfig {
    /// Checks every value and reads the secrets through `env`.
    ///
    /// # Errors
    /// Every problem at once, each naming its key relative to `[telemetry]`
    /// (`otlp.endpoint`).
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Telemetry, Vec<PolicyError>> {
        let mut c = Checks::default();
        let service_name = match &self.service_name {
            Some(name) if name.trim().is_empty() || name.len() > 255 => {
                c.fail("service_name", "must be 1 to 255 characters");
                String::new()
            }
            Some(name) => name.clone(),
            None => "keel".to_owned(),
        };
        let otlp = self.otlp.as_ref().and_then(|o| o.resolve(&mut c, env));
        let sentry = self.sentry.as_ref().and_then(|s| s.resolve(&mut c, env));
        c.finish().map(|()| Telemetry { service_name, otlp, sentry })
    }
}

impl OtlpConfig {
    fn resolve(&self, c: &mut Checks, env: &dyn Fn(&str) -> Option<String>) -> Option<Otlp> {
        let grpc = self.protocol == Protocol::Grpc;
        let endpoint = match http_url(&self.endpoint, "/v1/traces") {
            // gRPC names its method in the path: the URL gives the collector only.
            Ok(uri) if grpc => match uri.authority() {
                Some(authority) => {
                    let scheme = uri.scheme_str().unwrap_or("http");
                    match format!("{scheme}://{authority}{GRPC_TRACE_EXPORT}").parse() {
                        Ok(uri) => Some(uri),
                        Err(e) => {
                            c.fail("otlp.endpoint", format!("`{}`: {e}", self.endpoint));
                            None
                        }
                    }
                }
                None => {
                    c.fail("otlp.endpoint", format!("`{}` has no host", self.endpoint));
                    None
                }
            },
            Ok(uri) => Some(uri),
            Err(problem) => {
                c.fail("otlp.endpoint", problem);
                None
            }
        };
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(300) {
            c.fail("otlp.timeout", "must be from \"1ms\" to \"5m\"");
        }
        let mut headers = Vec::new();
        for (name, var) in &self.headers_env {
            let key = format!("otlp.headers_env.{name}");
            let Ok(header) = HeaderName::try_from(name.as_str()) else {
                c.fail(key, "is not a valid HTTP header name");
                continue;
            };
            match env(var) {
                None => c.fail(key, format!("environment variable `{var}` is not set")),
                Some(value) => match HeaderValue::try_from(value) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        headers.push((header, v));
                    }
                    Err(_) => c.fail(key, format!("the value of `{var}` is not a valid header value")),
                },
            }
        }
        Some(Otlp { endpoint: endpoint?, timeout: self.timeout, headers, grpc })
    }
}

impl SentryConfig {
    fn resolve(&self, c: &mut Checks, env: &dyn Fn(&str) -> Option<String>) -> Option<crate::sentry::Sentry> {
        let (dsn, key) = match (&self.dsn, &self.dsn_env) {
            (Some(_), Some(_)) => {
                c.fail("sentry.dsn", "set `dsn` or `dsn_env`, not both");
                return None;
            }
            (None, None) => {
                c.fail("sentry.dsn", "is required (or `dsn_env`)");
                return None;
            }
            (Some(dsn), None) => (dsn.clone(), "sentry.dsn"),
            (None, Some(var)) => match env(var) {
                Some(dsn) => (dsn, "sentry.dsn_env"),
                None => {
                    c.fail("sentry.dsn_env", format!("environment variable `{var}` is not set"));
                    return None;
                }
            },
        };
        if let Some(e) = &self.environment {
            if e.trim().is_empty() || e.len() > 64 {
                c.fail("sentry.environment", "must be 1 to 64 characters");
            }
        }
        match crate::sentry::parse_dsn(&dsn) {
            Ok(dsn) => Some(crate::sentry::Sentry { dsn, environment: self.environment.clone() }),
            Err(problem) => {
                c.fail(key, problem);
                None
            }
        }
    }
}

/// `url` as a plain-HTTP URL, with `default_path` when it has no path.
///
/// # Errors
/// What is wrong with it, in words.
pub fn http_url(url: &str, default_path: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri.path() == "/" && uri.query().is_none() && !url.ends_with('/') {
        let base = url.trim_end_matches('/');
        return format!("{base}{default_path}").parse().map_err(|e| format!("`{url}`: {e}"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Telemetry, Vec<String>> {
        let config: TelemetryConfig = toml_from(toml_text);
        config
            .resolve(&|var| (var == "AUTH").then(|| "Bearer x".to_owned()))
            .map_err(|e| e.into_iter().map(|p| format!("{}: {}", p.key, p.message)).collect())
    }

    fn toml_from(text: &str) -> TelemetryConfig {
        serde_json::from_value(toml_value(text)).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    // A tiny TOML subset is enough for these cases: `key = "value"` lines under
    // `[otlp]`, turned into JSON.
    fn toml_value(text: &str) -> serde_json::Value {
        let mut otlp = serde_json::Map::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(" = ").unwrap_or_else(|| panic!("{line}"));
            let v: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|_| panic!("{v}"));
            otlp.insert(k.to_owned(), v);
        }
        serde_json::json!({ "otlp": otlp })
    }

    #[test]
    fn endpoints() {
        let t = parse(r#"endpoint = "http://127.0.0.1:4318""#).unwrap_or_else(|e| panic!("{e:?}"));
        let otlp = t.otlp.unwrap_or_else(|| panic!("no otlp"));
        assert_eq!(otlp.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(t.service_name, "keel");
        let t = parse(r#"endpoint = "http://c:4318/custom/path""#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(t.otlp.map(|o| o.endpoint.to_string()).as_deref(), Some("http://c:4318/custom/path"));
        // gRPC: the collector's address; the path is the trace service's method.
        let t = parse("endpoint = \"http://c:4317/ignored\"\nprotocol = \"grpc\"")
            .unwrap_or_else(|e| panic!("{e:?}"));
        let otlp = t.otlp.unwrap_or_else(|| panic!("no otlp"));
        assert!(otlp.grpc);
        assert_eq!(otlp.endpoint.to_string(), format!("http://c:4317{GRPC_TRACE_EXPORT}"));
    }

    #[test]
    fn hostile_values_are_errors_naming_the_key() {
        for (text, key) in [
            (r#"endpoint = "ftp://x""#, "otlp.endpoint"),
            (r#"endpoint = "not a url""#, "otlp.endpoint"),
            (r#"endpoint = "http://""#, "otlp.endpoint"),
            ("endpoint = \"http://x\"\ntimeout = \"0s\"", "otlp.timeout"),
            ("endpoint = \"http://x\"\ntimeout = \"10000d\"", "otlp.timeout"),
            ("endpoint = \"http://x\"\nheaders_env = {\"a b\": \"AUTH\"}", "otlp.headers_env.a b"),
            (
                "endpoint = \"http://x\"\nheaders_env = {\"authorization\": \"NOPE\"}",
                "otlp.headers_env.authorization",
            ),
        ] {
            let errors = parse(text).err().unwrap_or_else(|| panic!("{text} was accepted"));
            assert!(errors.iter().any(|e| e.starts_with(&format!("{key}: "))), "{text}: {errors:?}");
        }
    }

    #[test]
    fn header_secrets_are_not_in_debug_output() {
        let t = parse("endpoint = \"http://x\"\nheaders_env = {\"authorization\": \"AUTH\"}")
            .unwrap_or_else(|e| panic!("{e:?}"));
        let shown = format!("{t:?}");
        assert!(shown.contains("authorization") && !shown.contains("Bearer"), "{shown}");
    }
}
