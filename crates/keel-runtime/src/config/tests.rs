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
    has("tools.b.url: `ftp://x` is not an http:// or https:// URL");
    has("tools.b.headers: `Authorization` is a secret: use `headers_env`");
    has("tools.b.headers_env: environment variable `MISSING_VAR` is not set");
    has(":10: tools.b.undo: no tool named `nope`");
    has("tools.b.argv: does not apply to a tool of kind `http`");
    has(":16: tools.c.policy.retry.max_attempts:");
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
    assert!(e.contains("conf/keel.toml:9: models.gpt.fallbacks"), "{e}");
    assert!(e.contains("models.gpt.api_key_env"), "{e}");
    let e = parse("[models.gpt]\nprovider = \"openai\"\nbase_url = \"x\"\nmodel = \"m\"\ntemperature = 1\n")
        .unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
}

#[test]
fn https_tools_and_models_are_accepted_and_bad_tls_files_are_named_at_their_line() {
    let ok = parse("[tools.t]\nkind = \"http\"\nurl = \"https://api.example.com/x\"\n");
    assert!(ok.is_ok(), "{:?}", ok.err());
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let text = format!(
        r#"
[tools.t]
kind = "http"
url = "https://api.example.com/x"
ca_file = "missing-ca.pem"

[tools.u]
kind = "http"
url = "https://api.example.com/y"
client_cert_file = "{junk}"

[tools.c]
kind = "command"
argv = ["true"]
ca_file = "ca.pem"

[models.gpt]
provider = "openai"
base_url = "https://api.openai.com/v1"
model = "gpt-4o-mini"
ca_file = "{junk}"
"#,
        junk = junk.display()
    );
    let e = Config::parse(&text, &dir.path().join("keel.toml"), &|_| None).unwrap_err().to_string();
    let has = |want: &str| assert!(e.contains(want), "{want:?} in:\n{e}");
    has("keel.toml:5: tools.t.ca_file: cannot read `");
    has("missing-ca.pem`");
    has("keel.toml:10: tools.u.client_cert_file: a client certificate needs its private key");
    has("keel.toml:15: tools.c.ca_file: does not apply to a tool of kind `command`");
    has("keel.toml:21: models.gpt.ca_file: `");
    has("holds no `BEGIN CERTIFICATE` block");
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

#[test]
fn claim_ttl_is_configurable_within_its_range() {
    let c = parse("[storage]\nclaim_ttl = \"90s\"\n").unwrap();
    assert_eq!(c.claim_ttl, std::time::Duration::from_secs(90));
    assert_eq!(c.journal_options(std::sync::Arc::new(keel_core::TokioClock::new())).claim_ttl, c.claim_ttl);
    assert_eq!(parse("").unwrap().claim_ttl, super::DEFAULT_CLAIM_TTL);
    for bad in ["0s", "500ms", "25h", "100years"] {
        let e = parse(&format!("[storage]\nurl = \"sqlite://x.db\"\nclaim_ttl = \"{bad}\"\n")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("keel.toml:3: storage.claim_ttl: must be from 1s to 1day"), "{bad}: {text}");
    }
    let e = parse("[storage]\nclaim_ttl = \"soon\"\n").unwrap_err();
    assert!(e.to_string().contains("keel.toml:2"), "{e}");
}

/// The problems of `text`, as `line: key` (with the line when known).
fn problems(text: &str) -> Vec<String> {
    let mut out: Vec<String> = parse(text)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| format!("{}: {}", e.line.map_or("?".into(), |l| l.to_string()), e.key.unwrap_or_default()))
        .collect();
    out.sort();
    out
}

#[test]
fn absurd_policy_values_are_refused_each_with_its_key_and_line() {
    let text = r#"
[defaults]
timeout = { attempt = "500000000000years" }
retry = { max_attempts = 0 }

[defaults.breaker]
failure_ratio = 1.5

[tools.a]
kind = "command"
argv = ["true"]
policy = { fault = { rate = 1.7 }, timeout = { step = "0s" } }

[tools.b]
kind = "command"
argv = ["true"]

[tools.b.policy.breaker]
failure_ratio = 0.0
"#;
    assert_eq!(
        problems(text),
        [
            "12: tools.a.policy.fault.rate",
            "12: tools.a.policy.timeout.step",
            "19: tools.b.policy.breaker.failure_ratio",
            "3: defaults.timeout.attempt",
            "4: defaults.retry.max_attempts",
            "7: defaults.breaker.failure_ratio",
        ],
        "each problem once, `[defaults]`'s under defaults, not again per tool"
    );
    let e = parse(text).unwrap_err().to_string();
    assert!(e.contains("conf/keel.toml:12: tools.a.policy.timeout.step: \"0s\" would time out"), "{e}");
    assert!(e.contains("write \"off\""), "{e}");
}

#[test]
fn off_turns_the_default_attempt_timeout_off() {
    let c = parse(
        "[defaults]\ntimeout = { attempt = \"off\" }\n[tools.t]\nkind = \"command\"\nargv = [\"true\"]\n",
    )
    .unwrap();
    assert_eq!(c.tools["t"].policy.timeout.attempt, None);
    assert_eq!(c.defaults.timeout.attempt, None);
}

#[test]
fn serde_problems_in_a_policy_are_all_reported_with_their_lines() {
    let text = "[defaults]\nretry = { max_attempts = -1 }\nbreaker = { failure_ratio = \"half\" }\ntimeout = { attempt = \"soon\" }\nretri = 3\n";
    assert_eq!(
        problems(text),
        [
            "2: defaults.retry.max_attempts",
            "3: defaults.breaker.failure_ratio",
            "4: defaults.timeout.attempt",
            "5: defaults.retri"
        ]
    );
}

#[test]
fn serde_problems_in_different_sections_and_tools_are_all_reported() {
    let text = "[run]\nescalate_afterr = 3\n\n[server]\nlisen = \"x\"\n\n[tools.a]\nkind = \"command\"\nretries = 1\n\n[tools.b]\nkind = \"shell\"\n";
    let p = problems(text);
    assert_eq!(p.len(), 4, "{p:#?}");
    assert_eq!(p, ["12: tools.b", "2: run", "5: server", "9: tools.a"]);
}

#[test]
fn run_approval_and_gateway_values_have_ranges_too() {
    let text = "[run]\ndeadline = \"500000000000years\"\nlease = \"10ms\"\nescalate_after = 0\nbudget = { cost_usd = -1.0 }\nloop_guard = { max_repeats = 1 }\n\n[approvals]\nexpires_after = \"400years\"\n\n[gateway]\nrun_budget = { cost_usd = nan }\n";
    assert_eq!(
        problems(text),
        [
            "12: gateway.run_budget.cost_usd",
            "2: run.deadline",
            "3: run.lease",
            "4: run.escalate_after",
            "5: run.budget.cost_usd",
            "6: run.loop_guard.max_repeats",
            "9: approvals.expires_after",
        ]
    );
}

#[test]
fn model_policies_get_the_same_ranges_with_their_lines() {
    let text = "[models.gpt]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n\n[models.gpt.policy]\ntimeout = \"0s\"\nretry = { max_attempts = 0 }\nbreaker = { failure_ratio = 1.5 }\n";
    assert_eq!(
        problems(text),
        [
            "7: models.gpt.policy.timeout",
            "8: models.gpt.policy.retry.max_attempts",
            "9: models.gpt.policy.breaker.failure_ratio"
        ]
    );
}

#[test]
fn an_invalid_listen_address_is_refused_with_its_line() {
    for bad in ["not an address", "127.0.0.1", "127.0.0.1:99999", ":8080", "host name:80"] {
        let text = format!("[server]\nbody_limit = 1000\nlisten = \"{bad}\"\n");
        assert_eq!(problems(&text), ["3: server.listen"], "{bad}");
    }
    for good in ["127.0.0.1:0", "[::1]:8080", "0.0.0.0:80", "localhost:8080"] {
        assert!(parse(&format!("[server]\nlisten = \"{good}\"\n")).is_ok(), "{good}");
    }
}

#[test]
fn an_above_rule_needs_its_param_declared_a_number() {
    let tool = |params: &str| {
        format!(
            "[tools.pay]\nkind = \"command\"\nargv = [\"true\"]\napproval = {{ param = \"amount\", above = 100 }}\n{params}"
        )
    };
    assert_eq!(problems(&tool("")), ["4: tools.pay.approval.param"], "no schema at all");
    let e = parse(&tool("")).unwrap_err().to_string();
    assert!(e.contains("does not declare `amount`"), "{e}");
    let string = "params = { type = \"object\", properties = { amount = { type = \"string\" } } }\n";
    assert_eq!(problems(&tool(string)), ["4: tools.pay.approval.param"]);
    let other = "params = { type = \"object\", properties = { Amount = { type = \"number\" } } }\n";
    assert_eq!(problems(&tool(other)), ["4: tools.pay.approval.param"], "names are exact");
    let mixed =
        "params = { type = \"object\", properties = { amount = { type = [\"number\", \"string\"] } } }\n";
    assert_eq!(problems(&tool(mixed)), ["4: tools.pay.approval.param"]);
    for ok in ["number", "integer"] {
        let schema =
            format!("params = {{ type = \"object\", properties = {{ amount = {{ type = \"{ok}\" }} }} }}\n");
        assert!(parse(&tool(&schema)).is_ok(), "{ok}");
    }
    let nested = "[tools.pay]\nkind = \"command\"\nargv = [\"true\"]\napproval = { param = \"order.total\", above = 5 }\nparams = { type = \"object\", properties = { order = { type = \"object\", properties = { total = { type = \"number\" } } } } }\n";
    assert!(parse(nested).is_ok());
    let nan = "[tools.pay]\nkind = \"command\"\nargv = [\"true\"]\napproval = { param = \"amount\", above = nan }\nparams = { type = \"object\", properties = { amount = { type = \"number\" } } }\n";
    assert_eq!(problems(nan), ["4: tools.pay.approval.above"]);
}

#[test]
fn key_problems_name_their_line_in_an_array_of_tables() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n\n[[server.keys]]\nname = \"a\"\nkey_env = \"PAY_AUTH\"\nrole = \"agent\"\n\n[[server.keys]]\nname = \"b\"\nkey_env = \"NOT_SET\"\nrole = \"admin\"\n";
    assert_eq!(problems(text), ["11: server.keys[1].key_env", "6: server.keys[0].key_env"]);
}

#[test]
fn every_syntax_error_is_reported() {
    let e = parse("[run]\ndeadline = \"1m\n\n[tools.a]\nkind = = \"command\"\n").unwrap_err();
    let lines: Vec<Option<usize>> = e.0.iter().map(|e| e.line).collect();
    assert!(lines.contains(&Some(2)) && lines.contains(&Some(5)), "{e}");
}

#[test]
fn tool_costs_are_checked_each_with_its_key_and_line() {
    let tool = |cost: &str| format!("[tools.t]\nkind = \"command\"\nargv = [\"true\"]\ncost = {cost}\n");
    let c = parse(&tool("{ per_call_usd = 0.25 }")).unwrap();
    assert_eq!(
        c.tools["t"].cost,
        Some(crate::tool::ToolCost { per_call_micros: 250_000, from_field: None, max_micros: 250_000 })
    );
    let c = parse(&tool("{ from_field = \"usage.usd\", max_usd = 2 }")).unwrap();
    assert_eq!(c.tools["t"].cost.as_ref().map(|c| c.max_micros), Some(2_000_000));
    for (cost, key) in [
        ("{ per_call_usd = -1 }", "4: tools.t.cost.per_call_usd"),
        ("{ per_call_usd = nan }", "4: tools.t.cost.per_call_usd"),
        ("{ per_call_usd = 1e300 }", "4: tools.t.cost.per_call_usd"),
        ("{ from_field = \"usd\" }", "4: tools.t.cost.max_usd"),
        ("{ from_field = \" \", max_usd = 1 }", "4: tools.t.cost.from_field"),
        ("{}", "4: tools.t.cost"),
    ] {
        assert_eq!(problems(&tool(cost)), [key], "{cost}");
    }
    assert!(parse(&tool("{ per_call = 1 }")).is_err(), "an unknown key is refused");
}

#[test]
fn tool_fallbacks_are_checked_each_with_its_key() {
    let tools = |write: bool, fallback: &str| {
        format!(
            "[tools.t]\nkind = \"command\"\nargv = [\"true\"]\nwrite = {write}\nfallback = {fallback}\n\
             [tools.reader]\nkind = \"command\"\nargv = [\"true\"]\n\
             [tools.writer]\nkind = \"command\"\nargv = [\"true\"]\nwrite = true\n"
        )
    };
    let c = parse(&tools(false, "{ twin = \"reader\", cached = \"10m\" }")).unwrap();
    let f = c.tools["t"].fallback.clone().unwrap();
    assert_eq!((f.twin.as_deref(), f.cached), (Some("reader"), Some(Duration::from_secs(600))));
    assert_eq!(f.on, crate::tool::ToolFallback::DEFAULT_ON);
    assert!(
        parse(&tools(true, "{ twin = \"reader\" }")).is_ok(),
        "a write may fall back to a read-only twin"
    );
    for (write, fallback, key) in [
        (true, "{ cached = \"10m\" }", "tools.t.fallback.cached"),
        (false, "{ twin = \"writer\" }", "tools.t.fallback.twin"),
        (false, "{ twin = \"nope\" }", "tools.t.fallback.twin"),
        (false, "{ twin = \"t\" }", "tools.t.fallback.twin"),
        (false, "{ cached = \"1ms\" }", "tools.t.fallback.cached"),
        (false, "{}", "tools.t.fallback"),
        (false, "{ cached = \"1m\", on = [] }", "tools.t.fallback.on"),
    ] {
        let found = problems(&tools(write, fallback));
        assert_eq!(found, [format!("5: {key}")], "{fallback}");
    }
}

/// Issue 17: `[telemetry]` and `[alerts]` problems name their key and line, all at once.
#[test]
fn telemetry_and_alert_problems_name_key_and_line() {
    let text = r#"
[telemetry.otlp]
endpoint = "ftp://collector:4318"
timeout = "0s"

[alerts.sinks.pager]
kind = "pagerduty"
url = "http://127.0.0.1:9/enqueue"
routing_key_env = "NOPE"

[[alerts.rules]]
name = "r"
window = "0s"
sinks = ["nope"]
"#;
    let e = parse(text).unwrap_err().to_string();
    for expected in [
        "conf/keel.toml:3: telemetry.otlp.endpoint: `ftp://collector:4318` must start with http:// or https://",
        "conf/keel.toml:4: telemetry.otlp.timeout: must be from",
        "conf/keel.toml:9: alerts.sinks.pager.routing_key_env: environment variable `NOPE` is not set",
        "conf/keel.toml:13: alerts.rules[0].window: must be from",
        "conf/keel.toml:14: alerts.rules[0].sinks: no sink `nope`",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    // Unknown keys are refused with their line too.
    let e = parse("[telemetry.otlp]\nendpoint = \"http://c:4318\"\nbogus = 1\n").unwrap_err().to_string();
    assert!(e.contains("conf/keel.toml:3") && e.contains("bogus"), "{e}");
    // A good one: the endpoint gets the signal's path, header secrets from the env.
    let c = parse(
        "[telemetry.otlp]\nendpoint = \"http://127.0.0.1:4318\"\nheaders_env = { authorization = \"PAY_AUTH\" }\n",
    )
    .unwrap();
    let otlp = c.telemetry.otlp.as_ref().unwrap();
    assert_eq!(otlp.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
    assert!(!format!("{:?}", c.telemetry).contains("s3cret"));
    assert!(!c.alerts.is_enabled(), "no sinks, no alerts");
}

#[test]
fn agent_choices_are_checked_with_their_key_and_line() {
    let c = parse("[agent]\non_unsolved = \"escalate\"\n").unwrap();
    assert_eq!(c.agent.on_unsolved, crate::agent::correct::Unsolved::Escalate);
    assert_eq!(parse("").unwrap().agent.on_unsolved, crate::agent::correct::Unsolved::Fail, "the default");
    let e = parse("[agent]\nmax_turns = 5\non_unsolved = \"maybe\"\n").unwrap_err();
    assert_eq!(problems("[agent]\nmax_turns = 5\non_unsolved = \"maybe\"\n"), ["3: agent"]);
    let text = e.to_string();
    assert!(
        text.contains("conf/keel.toml:3: agent: unknown variant `maybe`, expected `fail` or `escalate`"),
        "{text}"
    );
}
