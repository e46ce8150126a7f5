use std::path::Path;
use std::time::Duration;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "PAY_AUTH" => Some("Bearer s3cret".into()),
        "DB_URL" => Some("postgres://u:p@localhost/keel".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("conf/keel.toml"), &env)
}

const GOOD: &str = r#"
[defaults]
timeout = { attempt = "5s" }
retry = { max_attempts = 2 }

[run]
deadline = "10m"
escalate_after = 2
budget = { attempts = 50 }

[approvals]
expires_after = "30m"
on_expiry = "escalate"

[tools.charge]
kind = "http"
description = "Charge a card"
url = "http://127.0.0.1:9/charge/{{order}}"
headers_env = { Authorization = "PAY_AUTH" }
write = true
approval = { param = "amount", above = 100 }
undo = "refund"
params = { type = "object", required = ["order", "amount"], properties = { order = { type = "integer" }, amount = { type = "number" } } }
policy = { retry = { max_attempts = 5 } }

[tools.refund]
kind = "http"
url = "http://127.0.0.1:9/refund"
write = true

[tools.list]
kind = "command"
argv = ["ls", "{{dir}}"]
classify = { stderr = [{ pattern = "(?i)cannot access", class = "not_found" }] }
"#;

#[test]
fn a_good_config_merges_defaults_into_each_tool() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.storage_url, "sqlite://conf/keel.db", "next to keel.toml by default");
    assert_eq!(c.run.deadline, Duration::from_secs(600));
    assert_eq!(c.approvals.on_expiry, ExpiryOutcome::Escalate);
    let charge = &c.tools["charge"];
    assert_eq!(charge.policy.retry.max_attempts, 5, "the tool's override");
    assert_eq!(
        charge.policy.timeout.attempt,
        Some(Duration::from_secs(5)),
        "the default it did not override"
    );
    assert_eq!(c.tools["list"].policy.retry.max_attempts, 2);
    assert_eq!(charge.undo.as_deref(), Some("refund"));
    assert!(charge.needs_approval(&serde_json::json!({"order": 1, "amount": 150}), Mode::Autonomous));
    assert!(!charge.needs_approval(&serde_json::json!({"order": 1, "amount": 50}), Mode::Autonomous));
    assert!(
        c.tools["refund"].needs_approval(&serde_json::json!({}), Mode::Advisory),
        "advisory asks for writes"
    );
    assert!(!c.tools["list"].needs_approval(&serde_json::json!({}), Mode::Advisory));
    let e = charge.check_params(&serde_json::json!({"order": "x"})).unwrap_err();
    assert_eq!(e.class, keel_core::ErrorClass::InvalidRequest);
    assert!(e.message.contains("/order") && e.message.contains("amount"), "{}", e.message);
    // Secrets are never in Debug output.
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn an_unknown_key_names_the_key_and_line() {
    let e = parse("[run]\ndeadline = \"1m\"\nescalate_afterr = 3\n").unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("conf/keel.toml:3: "), "{text}");
    assert!(text.contains("escalate_afterr"), "{text}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let text = r#"
[tools.a]
kind = "command"

[tools.b]
kind = "http"
url = "ftp://x"
headers = { Authorization = "Bearer literal" }
headers_env = { X-Key = "MISSING_VAR" }
undo = "nope"
argv = ["x"]

[tools.c]
kind = "command"
argv = ["true"]
policy = { retry = { max_attempts = "three" } }
"#;
    let errors = parse(text).unwrap_err();
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let has = |needle: &str| assert!(lines.iter().any(|l| l.contains(needle)), "{needle} in {lines:#?}");
    has("conf/keel.toml:2: tools.a.argv: a command tool needs `argv`");
    has("tools.b.url: `ftp://x` is not an http:// URL");
    has("tools.b.headers: `Authorization` is a secret: use `headers_env`");
    has("tools.b.headers_env: environment variable `MISSING_VAR` is not set");
    has(":10: tools.b.undo: no tool named `nope`");
    has("tools.b.argv: does not apply to a tool of kind `http`");
    has(":16: tools.c.policy:");
    assert_eq!(lines.len(), 7, "{lines:#?}");
}

#[test]
fn storage_url_can_come_from_the_environment() {
    let c = parse("[storage]\nurl_env = \"DB_URL\"\n").unwrap();
    assert_eq!(c.storage_url, "postgres://u:p@localhost/keel");
    let e = parse("[storage]\nurl_env = \"NOPE\"\n").unwrap_err();
    assert!(e.to_string().contains("storage.url_env: environment variable `NOPE` is not set"));
}

#[test]
fn the_schema_describes_tools_and_policies() {
    let schema = Config::schema().to_string();
    for needle in ["headers_env", "max_attempts", "escalate_after", "A JSON Schema of the parameters"] {
        assert!(schema.contains(needle), "{needle}");
    }
}

#[test]
fn models_are_checked_by_the_gateway_with_their_lines() {
    let ok = parse(
        "[models.gpt]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:18080/v1\"\nmodel = \"gpt-4o-mini\"\napi_key_env = \"PAY_AUTH\"\n",
    )
    .unwrap();
    assert_eq!(ok.models["gpt"].model, "gpt-4o-mini");
    assert!(ok.gateway_builder().build().is_ok());
    assert!(!format!("{ok:?}").contains("s3cret"), "model keys are never in Debug output");

    let text = "[tools.t]\nkind = \"command\"\nargv = [\"true\"]\n\n[models.gpt]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nfallbacks = [\"nope\"]\napi_key_env = \"MISSING\"\n";
    let e = parse(text).unwrap_err().to_string();
    assert!(e.contains("conf/keel.toml:5: models.gpt.fallbacks"), "{e}");
    assert!(e.contains("models.gpt.api_key_env"), "{e}");
    let e = parse("[models.gpt]\nprovider = \"openai\"\nbase_url = \"x\"\nmodel = \"m\"\ntemperature = 1\n")
        .unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
}

#[test]
fn https_tools_are_refused_up_front_in_this_build() {
    let e =
        parse("[tools.t]\nkind = \"http\"\nurl = \"https://api.example.com/x\"\n").unwrap_err().to_string();
    assert!(e.contains("tools.t.url") && e.contains("TLS"), "{e}");
}

#[test]
fn server_limits_are_checked_each_with_its_line() {
    let text = r#"
[server]
max_connections = 0
header_read_timeout = "0s"
idle_timeout = "2h"
body_read_timeout = "30s"
rate_limit = { per_second = 0, unauthenticated_burst = 0 }
"#;
    let errors = parse(text).unwrap_err();
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let has = |needle: &str| assert!(lines.iter().any(|l| l.contains(needle)), "{needle} in {lines:#?}");
    has("conf/keel.toml:3: server.max_connections: must be between 1 and 1000000");
    has("conf/keel.toml:4: server.header_read_timeout: must be between 10ms and 1h, not 0s");
    has("conf/keel.toml:5: server.idle_timeout: must be between 10ms and 1h, not 2h");
    has("conf/keel.toml:7: server.rate_limit.per_second: must be at least 1");
    has("conf/keel.toml:7: server.rate_limit.unauthenticated_burst: must be at least 1");
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let ok = parse("[server]\nmax_connections = 10\nheader_read_timeout = \"2s\"\n").unwrap();
    assert_eq!(ok.server.max_connections, 10);
}
