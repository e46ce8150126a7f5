//! Attacks on keel.toml's values and on approval rules, through the real binary: every
//! absurd value is refused by `config check` with its key and line (and by `keel run`
//! before anything is touched), none panics; an approval rule asks for every value it
//! cannot compare.

use keel_examples::payments::Faults;
use serde_json::Value;

use crate::support::{Bench, exists};

const RUN: &str = "[run]\nlease = \"1s\"\n\n";
const NOTIFY: &str = "[[steps]]\ntool = \"notify\"\nparams = { text = \"hi\" }\n";

/// Each absurd value, the line it is on (after `RUN`'s three lines) and its key.
const ABSURD: &[(&str, usize, &str)] = &[
    ("[defaults]\ntimeout = { attempt = \"500000000000years\" }\n", 5, "defaults.timeout.attempt"),
    ("[defaults]\ntimeout = { step = \"18446744073709551615s\" }\n", 5, "defaults.timeout.step"),
    ("[defaults]\ntimeout = { attempt = \"0s\" }\n", 5, "defaults.timeout.attempt"),
    ("[defaults]\nretry = { max_attempts = 0 }\n", 5, "defaults.retry.max_attempts"),
    (
        "[defaults]\nretry = { multiplier = 1e300, max_delay = \"500000000000years\" }\n",
        5,
        "defaults.retry.max_delay",
    ),
    ("[defaults]\nbreaker = { failure_ratio = 1.5 }\n", 5, "defaults.breaker.failure_ratio"),
    ("[defaults]\nbreaker = { failure_ratio = 0.0 }\n", 5, "defaults.breaker.failure_ratio"),
    ("[defaults]\nbreaker = { buckets = 4000000000 }\n", 5, "defaults.breaker.buckets"),
    ("[defaults.fault]\nrate = 1.7\n", 5, "defaults.fault.rate"),
    ("[defaults]\nloop_guard = { max_repeats = 1 }\n", 5, "defaults.loop_guard.max_repeats"),
    ("[defaults]\nbudget = { cost_usd = nan }\n", 5, "defaults.budget.cost_usd"),
    (
        "[tools.t]\nkind = \"command\"\nargv = [\"true\"]\npolicy = { timeout = { attempt = \"500000000000years\" } }\n",
        7,
        "tools.t.policy.timeout.attempt",
    ),
    ("[approvals]\nexpires_after = \"500000000000years\"\n", 5, "approvals.expires_after"),
    ("[server]\nlisten = \"nowhere\"\n", 5, "server.listen"),
    (
        "[models.m]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"x\"\npolicy = { ttft_timeout = \"500000000000years\" }\n",
        8,
        "models.m.policy.ttft_timeout",
    ),
    ("[gateway]\nrun_budget = { cost_usd = -5.0 }\n", 5, "gateway.run_budget.cost_usd"),
];

#[test]
fn every_absurd_value_is_refused_with_key_and_line_and_panics_nothing() {
    for &(snippet, line, key) in ABSURD {
        let b = Bench::new(Faults::default(), &format!("{RUN}{snippet}"));
        let check = b.keel(&["config", "check"]);
        assert_eq!(check.code, 2, "{snippet}: {check:?}");
        assert!(check.stderr.contains(&format!("keel.toml:{line}: {key}: ")), "{snippet}: {check:?}");
        assert!(!check.stderr.contains("panicked"), "{check:?}");

        let json = b.keel(&["--json", "config", "check"]);
        assert_eq!(json.code, 2, "{json:?}");
        let v: Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json:?}"));
        assert_eq!(v["ok"], false);
        assert_eq!(v["class"], "invalid_request");
        assert!(
            v["errors"].as_array().unwrap().iter().any(|e| e["key"] == key && e["line"] == line),
            "{snippet}: {v:#}"
        );

        let plan = b.write("plan.toml", NOTIFY);
        let run = b.keel(&["run", plan.to_str().unwrap()]);
        assert_eq!(run.code, 2, "{snippet}: refused before anything runs: {run:?}");
        assert!(!run.stderr.contains("panicked") && run.stderr.contains(key), "{run:?}");
        assert!(!exists(&b.path("keel.db")), "no journal was created");
    }
}

#[test]
fn off_turns_the_attempt_timeout_off_end_to_end() {
    let b = Bench::new(
        Faults::default(),
        &format!("{RUN}[defaults]\ntimeout = {{ attempt = \"off\", step = \"none\" }}\n"),
    );
    assert_eq!(b.keel(&["config", "check"]).code, 0);
    let plan = b.write("plan.toml", NOTIFY);
    let run = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
}

/// A write tool with an `above` rule whose schema declares `amount` a number but does
/// not require it, so a call without it reaches the rule.
const PAY: &str = r#"[tools.pay]
kind = "http"
url = "{base}/charge"
write = true
approval = { param = "amount", above = 100 }
params = { type = "object", properties = { order = { type = "integer" }, amount = { type = "number" } } }
"#;

#[test]
fn an_approval_rule_asks_for_every_value_it_cannot_compare() {
    let b = Bench::new(Faults::default(), &format!("{RUN}{PAY}"));
    // Values that pass the schema but cannot be compared: the rule asks.
    for params in ["{ order = 1, Amount = 5000 }", "{ order = 2 }", "{ order = 3, AMOUNT = 5000.0 }"] {
        let plan = b.write("plan.toml", &format!("[[steps]]\ntool = \"pay\"\nparams = {params}\n"));
        let run = b.keel(&["run", plan.to_str().unwrap()]);
        assert_eq!(run.code, 3, "{params} waits for approval: {run:?}");
    }
    // Values of the wrong type never reach the tool: the schema refuses them.
    for params in [
        "{ order = 4, amount = \"5000\" }",
        "{ order = 5, amount = [5000] }",
        "{ order = 6, amount = { v = 5000 } }",
    ] {
        let plan = b.write("plan.toml", &format!("[[steps]]\ntool = \"pay\"\nparams = {params}\n"));
        let run = b.keel(&["run", plan.to_str().unwrap()]);
        assert!(run.code != 0 && run.code != 3, "{params} is refused: {run:?}");
        assert!(run.stderr.contains("amount") || run.stdout.contains("amount"), "{params}: {run:?}");
    }
    assert_eq!(b.payments.attempts(), 0, "no request ever reached the payments service");
    // A number within the rule runs without asking (the rule is not simply "always").
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"pay\"\nparams = { order = 7, amount = 50 }\n");
    assert_eq!(b.keel(&["run", plan.to_str().unwrap()]).code, 0);
    assert_eq!(b.payments.charges().len(), 1);
}

#[test]
fn config_check_refuses_a_rule_whose_param_is_not_declared_a_number() {
    let loose = PAY.replace("amount = { type = \"number\" }", "amount = { type = \"string\" }");
    let b = Bench::new(Faults::default(), &format!("{RUN}{loose}"));
    let check = b.keel(&["config", "check"]);
    assert_eq!(check.code, 2, "{check:?}");
    assert!(check.stderr.contains("keel.toml:8: tools.pay.approval.param: "), "{check:?}");
}

#[test]
fn an_absurd_plan_deadline_is_refused_before_the_run_starts() {
    let b = Bench::new(Faults::default(), RUN);
    for deadline in ["500000000000years", "0s"] {
        let plan = b.write("plan.toml", &format!("deadline = \"{deadline}\"\n{NOTIFY}"));
        let run = b.keel(&["run", plan.to_str().unwrap()]);
        assert_eq!(run.code, 2, "{deadline}: {run:?}");
        assert!(run.stderr.contains("deadline: ") && !run.stderr.contains("panicked"), "{run:?}");
        assert!(!exists(&b.path("keel.db")), "no run was created to crash on every resume");
    }
}
