//! `keel agent "TASK"` (issue 16) against a scripted model and the payments service:
//! the answer printed, and a SIGKILL mid-run resumed by `keel runs resume` without
//! asking the model again for journaled turns or charging twice.

use std::time::Duration;

use keel_examples::payments::Faults;
use keel_testkit::model::{Reply, ScriptedModel};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::{Bench, TOOLS, eventually, orders};

/// A tokio runtime for the scripted model, kept alive for the test.
fn model(replies: Vec<Reply>) -> (tokio::runtime::Runtime, ScriptedModel) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let m = rt.block_on(ScriptedModel::script(replies));
    (rt, m)
}

#[test]
fn keel_agent_prints_the_models_answer_after_its_tool_calls() {
    let (_rt, m) = model(vec![
        Reply::call("charge", json!({"order": 1, "amount": 10})),
        Reply::text("Charged order 1."),
    ]);
    let b = Bench::new(Faults::default(), &format!("{TOOLS}\n{}", m.config("m")));
    let run = b.keel(&["agent", "Charge order 1 for $10"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("Charged order 1."), "{}", run.stdout);
    assert!(
        run.stdout.contains("turn-1: calls charge({\"amount\":10,\"order\":1})"),
        "the live view says what the model decided: {}",
        run.stdout
    );
    assert_eq!(orders(&b.payments), [1]);

    let json = b.keel(&["--json", "agent", "--max-turns", "1", "Charge order 2 for $20"]);
    let v: Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    // The script has no third answer: the model's error stops the run, said clearly.
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["result"]["status"], "stopped", "{v}");
    assert_ne!(json.code, 0);

    let bad = b.keel(&["agent", "--model", "nope", "x"]);
    assert_eq!(bad.code, 2, "a usage error: {bad:?}");
    assert!(bad.stderr.contains("no model `nope`"), "{}", bad.stderr);
}

/// `--result-schema FILE`: a file that is not JSON, or a schema that does not
/// compile, is bad input (exit code 2) and starts no run; a good one is journaled
/// with the task.
#[test]
fn keel_agent_checks_the_tasks_result_schema_before_it_starts() {
    let (_rt, m) = model(vec![Reply::text("nothing to compute")]);
    let b = Bench::new(Faults::default(), &format!("{TOOLS}\n{}", m.config("m")));
    let write = |name: &str, text: &str| {
        let path = b.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (not_json, not_schema) = (write("a.json", "{type: object"), write("b.json", r#"{"type": 7}"#));
    for (file, why) in [
        (not_json.as_str(), "not JSON"),
        (not_schema.as_str(), "result_schema is not a valid JSON Schema"),
        ("/nonexistent/schema.json", "--result-schema /nonexistent/schema.json"),
    ] {
        let run = b.keel(&["agent", "--result-schema", file, "the total"]);
        assert_eq!(run.code, 2, "bad input: {run:?}");
        assert!(run.stderr.contains(why), "{why}: {}", run.stderr);
    }
    assert_eq!(m.calls(), 0, "no run started");
    let good = write("c.json", r#"{"type": "object", "required": ["total"]}"#);
    let run = b.keel(&["--json", "agent", "--result-schema", &good, "the total"]);
    assert_eq!(run.code, 0, "{run:?}");
    let v: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    let id = v["run_id"].as_str().unwrap_or_else(|| panic!("no run_id: {v}"));
    let shown = b.keel(&["--json", "runs", "show", id]);
    let shown: Value = serde_json::from_str(&shown.stdout).unwrap_or_else(|e| panic!("{e}: {shown:?}"));
    assert_eq!(
        shown.pointer("/state/run/input/agent/result_schema"),
        Some(&json!({"type": "object", "required": ["total"]})),
        "{shown}"
    );
}

#[test]
fn an_agent_killed_mid_charge_resumes_without_asking_again_or_charging_twice() {
    let (_rt, m) = model(vec![
        Reply::call("charge", json!({"order": 1, "amount": 10})),
        Reply::call("charge", json!({"order": 2, "amount": 20})),
        Reply::text("Both charged."),
    ]);
    // Each charge is recorded, then answered 1.5 s later: a kill in that window leaves
    // a charge made whose answer keel never saw.
    let b = Bench::new(
        Faults { charge_delay_ms: 1500, ..Faults::default() },
        &format!("{TOOLS}\n{}", m.config("m")),
    );
    let (mut child, run_id, _lines) = b.spawn(&["agent", "Charge orders 1 and 2"]);
    eventually("the second charge to be made", Duration::from_secs(30), || b.payments.charges().len() == 2);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_eq!(m.calls(), 2);

    let resumed = b.keel(&["runs", "resume", &run_id]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(m.calls(), 3, "turns 1 and 2 were journaled: only turn 3 was asked");
    assert_eq!(orders(&b.payments), [1, 2], "each order charged exactly once");
    let show = b.keel(&["runs", "show", &run_id, "--json"]);
    let export: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(export["state"]["run"]["state"], "completed");
    let steps = export["state"]["steps"].as_array().unwrap();
    let call2 = steps.iter().find(|s| s["name"] == "turn-2.call-1").unwrap();
    assert_eq!(call2["output"]["body"]["charge_id"], "ch_2", "the resumed call got the original charge");
    assert_eq!(steps.last().unwrap()["output"]["answer"], "Both charged.");
}

#[test]
fn corrections_are_exported_as_pairs_and_counted_per_kind_and_strategy() {
    let (_rt, m) = model(vec![
        Reply::call("code", json!({"program": "d = {}\nresult = d['total']"})),
        Reply::call("code", json!({"program": "d = {}\nresult = d.get('total', 0)"})),
        Reply::text("0"),
    ]);
    let launcher = "import json,sys\na=json.load(sys.stdin)\nns={}\ntry:\n    exec(a['program'],ns)\n    \
                    print(json.dumps({'result': ns['result']}))\nexcept Exception as e:\n    \
                    sys.stderr.write(type(e).__name__+': '+str(e)+'\\n')\n    sys.exit(3)\n";
    let code = format!(
        "[tools.code]\nkind = \"command\"\nargv = [\"python3\", \"-c\", '''{launcher}''']\nparams_on_stdin = true\n\
         classify = {{ exit_codes = {{ 3 = \"code_error\" }} }}\n"
    );
    let b = Bench::new(Faults::default(), &format!("{TOOLS}\n{}\n{code}", m.config("m")));
    let run = b.keel(&["agent", "--tools", "code", "the total"]);
    assert_eq!(run.code, 0, "{run:?}");

    let export = b.keel(&["export", "corrections"]);
    assert_eq!(export.code, 0, "{export:?}");
    let pairs: Vec<Value> = export.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pairs.len(), 1, "{}", export.stdout);
    assert!(pairs[0]["failed"]["error"].as_str().unwrap().contains("KeyError"), "{}", pairs[0]);
    assert_eq!(pairs[0]["fixed"]["program"], "d = {}\nresult = d.get('total', 0)");

    let stats = b.keel(&["--json", "stats", "corrections"]);
    let v: Value = serde_json::from_str(&stats.stdout).unwrap();
    assert_eq!(v["by_kind"]["KeyError"]["repair"]["tries"], 1, "{v}");
    assert_eq!(v["by_kind"]["KeyError"]["repair"]["fixed"], 1, "{v}");
    assert_eq!(v["chains_fixed"], 1);
    let table = b.keel(&["stats", "corrections"]);
    assert!(table.stdout.contains("KeyError") && table.stdout.contains("repair"), "{}", table.stdout);
}

#[test]
fn keel_agent_charges_each_turn_once_to_the_runs_attempt_budget() {
    let (_rt, m) = model(vec![Reply::call("charge", json!({"order": 3, "amount": 5})), Reply::text("ok")]);
    let b = Bench::new(Faults::default(), &format!("{TOOLS}\n{}", m.config("m")));
    // TOOLS has its own [run] table: the budget goes in as a sub-table.
    let config = std::fs::read_to_string(b.path("keel.toml")).unwrap();
    std::fs::write(b.path("keel.toml"), format!("{config}\n[run.budget]\nattempts = 3\n")).unwrap();
    let run = b.keel(&["--json", "agent", "--tools", "charge", "charge order 3"]);
    let v: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    assert_eq!(v["status"], "completed", "{v}");
    let show = b.keel(&["runs", "show", v["run_id"].as_str().unwrap(), "--json"]);
    let export: Value = serde_json::from_str(&show.stdout).unwrap();
    let charged: Vec<&Value> = export["state"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["target"] == "model:m")
        .map(|s| &s["output"]["charged"]["attempts"])
        .collect();
    assert_eq!(charged, [&json!(1), &json!(1)]);
}
