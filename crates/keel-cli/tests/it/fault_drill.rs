//! `keel drill`: faults injected on the wire of the configured targets, the real
//! binary's report checked against the ground truth (the payments service's ledger).

use std::collections::BTreeMap;

use keel_examples::payments::{Faults, spawn};
use serde_json::Value;

use crate::support::Run;

fn keel(dir: &std::path::Path, config: &str, args: &[&str]) -> Run {
    let path = dir.join("keel.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(dir)
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    Run::from(out)
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"))
}

fn target<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["targets"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()
}

fn held(report: &Value, invariant: &str) -> bool {
    report["invariants"].as_array().unwrap().iter().find(|i| i["name"] == invariant).unwrap()["held"]
        .as_bool()
        .unwrap()
}

/// How many times each order was charged, from the service's own ledger.
fn ledger(charges: &[Value]) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for c in charges {
        *out.entry(c["order"].as_i64().unwrap()).or_default() += 1;
    }
    out
}

/// The README's example, drilled: every tool fault injected and handled, every
/// invariant held, and the service's ledger agrees — each order charged once, lost
/// responses and retries included.
#[test]
fn the_examples_drill_breaks_no_invariant_and_charges_each_order_once() {
    let (base, payments) = spawn(Faults { fail_first: 2, ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/payments/keel.toml"))
            .unwrap()
            .replace("http://127.0.0.1:18099", &base)
            // CI-sized: an injected timeout costs an attempt timeout.
            .replace("timeout = { attempt = \"5s\" }", "timeout = { attempt = \"400ms\" }");
    let run = keel(
        dir.path(),
        &example,
        &[
            "--json",
            "drill",
            "--calls",
            "40",
            "--rate",
            "0.25",
            "--seed",
            "7",
            "--latency",
            "20ms",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let report = json(&run);
    assert_eq!(report["ok"], true, "{report:#}");
    for i in
        ["every call ended", "no side effect repeated", "retries within policy", "every answer well-formed"]
    {
        assert!(held(&report, i), "{i}: {report:#}");
    }
    let charge = target(&report, "charge");
    assert_eq!(charge["calls"], 40);
    for fault in ["timeout", "server_error", "latency", "lost_response"] {
        assert!(charge["injected"][fault].as_u64().unwrap_or(0) > 0, "{fault} injected: {charge:#}");
    }
    assert!(charge["policy"]["retries"].as_u64().unwrap() > 0, "{charge:#}");
    assert!(charge["repeated_with_one_key"].as_u64().unwrap() > 0, "a lost response was retried: {charge:#}");
    assert_eq!(charge["duplicate_effects"], 0);
    // The ground truth: every order the drill charged, charged exactly once.
    let counts = ledger(&payments.charges());
    assert!(!counts.is_empty());
    assert!(counts.values().all(|n| *n == 1), "an order charged twice: {counts:?}");
    // The command tool cannot be proxied: it is said, not silently passed over.
    assert!(report["skipped"]["check_stock"].as_str().unwrap().contains("command tool"), "{report:#}");
}

/// A write declared read-only (`write = false`): Keel derives no idempotency key for
/// it, so a call the agent makes again after a lost response charges again. The
/// drill finds it, says why, and exits 1 — and the ledger confirms the double charge.
#[test]
fn a_write_declared_read_only_is_reported_as_a_duplicate_effect() {
    let (base, payments) = spawn(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[defaults]\ntimeout = {{ attempt = \"300ms\" }}\n\
         retry = {{ max_attempts = 2, base_delay = \"10ms\", max_delay = \"20ms\" }}\n\
         breaker = {{ enabled = false }}\n\n\
         [tools.charge]\nkind = \"http\"\nurl = \"{base}/charge\"\nwrite = false\n\
         params = {{ type = \"object\", required = [\"order\", \"amount\"], properties = {{ order = {{ type = \"integer\" }}, amount = {{ type = \"number\" }} }} }}\n"
    );
    let run = keel(
        dir.path(),
        &config,
        &["drill", "--calls", "12", "--rate", "0.6", "--seed", "3", "--faults", "lost_response"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("FAIL no side effect repeated: charge:"), "{run:?}");
    assert!(run.stdout.contains("declare `write = true`"), "{run:?}");
    let counts = ledger(&payments.charges());
    assert!(counts.values().any(|n| *n > 1), "the drill's claim is the ledger's: {counts:?}");

    // Declared as what it is, the same drill holds.
    let fixed = config.replace("write = false", "write = true");
    let run = keel(
        dir.path(),
        &fixed,
        &["--json", "drill", "--calls", "12", "--rate", "0.6", "--seed", "3", "--faults", "lost_response"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(held(&json(&run), "no side effect repeated"));
}

/// Models: a synthetic upstream behind the fault proxy, so the gateway's parser,
/// validator, correction rounds, fallback and stream rescue meet every model fault;
/// whatever was injected, the agent gets a well-formed answer or a classified error.
#[test]
fn model_faults_reach_the_parser_the_validator_and_the_stream_rescue() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "policy = { timeout = \"400ms\", ttft_timeout = \"300ms\", stall_timeout = \"300ms\", \
                  retry = { max_attempts = 2, base_delay = \"5ms\", max_delay = \"10ms\" }, \
                  breaker = { enabled = false } }";
    let config = format!(
        "[models.gpt]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\
         fallbacks = [\"backup\"]\ncorrect = 1\n{policy}\n\n\
         [models.backup]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"b\"\n{policy}\n"
    );
    let html = dir.path().join("report.html");
    let run = keel(
        dir.path(),
        &config,
        // One call at a time: the seed's draws meet the same requests every run.
        &[
            "--json",
            "drill",
            "--calls",
            "60",
            "--rate",
            "0.4",
            "--seed",
            "11",
            "--concurrency",
            "1",
            "--latency",
            "20ms",
            "--html",
            html.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let report = json(&run);
    assert!(held(&report, "every answer well-formed"), "{report:#}");
    assert!(held(&report, "every call ended"), "{report:#}");
    let gpt = target(&report, "gpt");
    for fault in ["timeout", "server_error", "latency", "empty", "malformed", "cut", "stall"] {
        assert!(gpt["injected"][fault].as_u64().unwrap_or(0) > 0, "{fault} injected: {gpt:#}");
    }
    assert!(gpt["injected"].get("lost_response").is_none(), "a tool fault is not drawn for a model");
    // The faults were handled, not passed on: most calls were answered, some by the
    // fallback, and empty answers were sent back to be corrected.
    assert!(gpt["answered"].as_u64().unwrap() >= 45, "{gpt:#}");
    assert!(gpt["by_fallback"].as_u64().unwrap() > 0, "{gpt:#}");
    assert!(gpt["policy"]["corrections"].as_u64().unwrap() > 0, "{gpt:#}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("every answer well-formed"), "{page}");
}

/// Absurd options are refused with a clear message, not a panic or a silent default.
#[test]
fn absurd_drill_options_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[tools.t]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/t\"\n";
    for (args, expect) in [
        (vec!["drill", "--rate", "2"], "--rate 2 is not between 0 and 1"),
        (vec!["drill", "--rate", "NaN"], "--rate NaN is not between 0 and 1"),
        (vec!["drill", "--calls", "0"], "--calls 0"),
        (vec!["drill", "--faults", "earthquake"], "no fault named `earthquake`"),
        (vec!["drill", "--targets", "ghost"], "no tool or model named `ghost`"),
        (vec!["drill", "--latency", "soon"], "--latency `soon`"),
    ] {
        let run = keel(dir.path(), config, &args);
        assert_ne!(run.code, 0, "{args:?}: {run:?}");
        assert!(run.stderr.contains(expect), "{args:?}: {run:?}");
        assert!(!run.stderr.contains("panicked"), "{run:?}");
    }
}

/// The drill runs `[alerts]`' rules over its failures, calling no sink: a service
/// that answers 503 to everything would have opened the default `server_error`
/// incident, and the report says so.
#[test]
fn the_report_names_the_alerts_the_drill_would_have_fired() {
    let (base, _payments) = spawn(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[defaults]\nretry = {{ max_attempts = 2, base_delay = \"5ms\", max_delay = \"10ms\" }}\n\
         breaker = {{ enabled = false }}\n\n[tools.notify]\nkind = \"http\"\nurl = \"{base}/notify\"\n"
    );
    let run = keel(
        dir.path(),
        &config,
        &["--json", "drill", "--calls", "6", "--rate", "1", "--faults", "server_error"],
    );
    assert_eq!(run.code, 0, "failures are not broken invariants: {run:?}");
    let report = json(&run);
    let fired = report["alerts_fired"].as_object().unwrap();
    assert!(fired.keys().any(|k| k.contains("server_error") && k.contains("notify")), "{report:#}");
    assert_eq!(target(&report, "notify")["failed"]["server_error"], 6, "{report:#}");
}
