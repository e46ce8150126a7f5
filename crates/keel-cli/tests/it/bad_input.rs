//! Bad plans and configs: clear errors, exit code 2, nothing touched.

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS, exists};

#[test]
fn a_plan_naming_an_unknown_tool_touches_nothing() {
    let b = Bench::new(Faults::default(), TOOLS);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"chrage\"\nparams = {}\n");
    let out = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("error[invalid_request]") && out.stderr.contains("no tool named `chrage`"),
        "{out:?}"
    );
    assert!(!exists(&b.path("keel.db")), "no journal was created");
}

#[test]
fn a_plan_with_a_syntax_error_names_the_line() {
    let b = Bench::new(Faults::default(), TOOLS);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"charge\"\nparams = { order = 1,, }\n");
    let out = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("line 3"), "{out:?}");
    let yaml = b.write("plan.yaml", "steps:\n  - tool: charge\n    bogus: 1\n");
    let out = b.keel(&["run", yaml.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("bogus"), "{out:?}");
}

#[test]
fn a_bad_config_names_key_and_line_and_check_agrees() {
    let b = Bench::new(
        Faults::default(),
        &format!("{TOOLS}\n[tools.x]\nkind = \"command\"\nargv = []\nretries = 3\n"),
    );
    let out = b.keel(&["config", "check"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("keel.toml:") && out.stderr.contains("retries"), "{out:?}");
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"charge\"\n");
    assert_eq!(b.keel(&["run", plan.to_str().unwrap()]).code, 2);
    assert!(!exists(&b.path("keel.db")));
}

#[test]
fn schema_and_check_work() {
    let b = Bench::new(Faults::default(), TOOLS);
    let out = b.keel(&["config", "check"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("ok (2 tools)"));
    let schema = b.keel(&["config", "schema"]);
    let v: serde_json::Value = serde_json::from_str(&schema.stdout).unwrap();
    assert!(v.to_string().contains("headers_env"));
}

#[test]
fn config_check_reports_every_problem_at_once() {
    // Serde problems in three places, a range problem and a bad address.
    let b = Bench::new(
        Faults::default(),
        "[run]\nescalate_afterr = 3\n\n[server]\nlisten = \"localhost\"\n\n[tools.x]\nkind = \"command\"\nretries = 3\n\n\
         [tools.y]\nkind = \"command\"\nargv = [\"true\"]\npolicy = { retry = { max_attempts = 0 } }\n\n\
         [defaults]\nbreaker = { failure_ratio = \"half\" }\n",
    );
    let out = b.keel(&["config", "check"]);
    assert_eq!(out.code, 2, "{out:?}");
    for needle in
        ["keel.toml:2: run: ", "keel.toml:9: tools.x: ", "keel.toml:17: defaults.breaker.failure_ratio: "]
    {
        assert!(out.stderr.contains(needle), "{needle}: {out:?}");
    }
    // Once serde accepts the file, the second stage reports all of its problems too.
    let b = Bench::new(
        Faults::default(),
        "[server]\nlisten = \"localhost\"\n\n[tools.y]\nkind = \"command\"\nargv = [\"true\"]\npolicy = { retry = { max_attempts = 0 }, fault = { rate = 1.7 } }\n",
    );
    let out = b.keel(&["config", "check"]);
    assert_eq!(out.code, 2, "{out:?}");
    for needle in [
        "keel.toml:2: server.listen: `localhost` is not an address",
        "keel.toml:7: tools.y.policy.retry.max_attempts: ",
        "keel.toml:7: tools.y.policy.fault.rate: ",
    ] {
        assert!(out.stderr.contains(needle), "{needle}: {out:?}");
    }
}

#[test]
fn config_check_honours_json_for_errors() {
    let b =
        Bench::new(Faults::default(), "[server]\nlisten = \"not an address\"\n\n[run]\ndeadline = \"0s\"\n");
    let out = b.keel(&["config", "check", "--json"]);
    assert_eq!(out.code, 2, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["ok"], false, "{v:#}");
    assert_eq!(v["exit_code"], 2);
    let errors = v["errors"].as_array().unwrap();
    let keys: Vec<(&str, u64)> =
        errors.iter().map(|e| (e["key"].as_str().unwrap(), e["line"].as_u64().unwrap())).collect();
    assert_eq!(keys, [("run.deadline", 5), ("server.listen", 2)], "{v:#}");
    assert!(
        errors.iter().all(|e| e["file"].as_str().unwrap().ends_with("keel.toml") && e["message"].is_string())
    );
    // The good case is JSON too.
    let good = Bench::new(Faults::default(), TOOLS);
    let ok: serde_json::Value =
        serde_json::from_str(&good.keel(&["config", "check", "--json"]).stdout).unwrap();
    assert_eq!(ok["ok"], true);
}
