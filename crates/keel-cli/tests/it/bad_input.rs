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
