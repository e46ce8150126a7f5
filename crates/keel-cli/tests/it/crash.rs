//! `keel run` killed with SIGKILL mid-plan; `keel runs resume` finishes it, and the
//! payments service counts each charge exactly once.

use std::time::Duration;

use keel_examples::payments::Faults;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{Bench, TOOLS, eventually, orders};

const PLAN: &str = r#"
name = "three orders"
[[steps]]
id = "first"
tool = "charge"
params = { order = 1, amount = 10 }
[[steps]]
id = "second"
tool = "charge"
params = { order = 2, amount = 20 }
[[steps]]
id = "third"
tool = "charge"
params = { order = 3, amount = 30 }
"#;

#[test]
fn a_run_killed_mid_charge_resumes_without_charging_twice() {
    // Each charge is recorded, then answered 1.5 s later: killing keel in that window
    // leaves a charge made whose answer keel never saw.
    let b = Bench::new(Faults { charge_delay_ms: 1500, ..Faults::default() }, TOOLS);
    let plan = b.write("plan.toml", PLAN);
    let (mut child, run_id, _lines) = b.spawn(&["run", plan.to_str().unwrap()]);
    eventually("the second charge to be made", Duration::from_secs(30), || b.payments.charges().len() == 2);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_eq!(orders(&b.payments), [1, 2], "killed while order 2's answer was in flight");

    let resumed = b.keel(&["runs", "resume", &run_id]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(orders(&b.payments), [1, 2, 3], "each order charged exactly once");

    let show = b.keel(&["runs", "show", &run_id, "--json"]);
    let export: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(export["state"]["run"]["state"], "completed");
    let steps = export["state"]["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["status"] == "succeeded"), "{steps:#?}");
    assert_eq!(steps[1]["output"]["body"]["charge_id"], "ch_2", "the resumed step got the original charge");
}

#[test]
fn killed_between_steps_the_finished_ones_are_not_repeated() {
    let b = Bench::new(
        Faults::default(),
        &format!(
            "{TOOLS}\n[tools.pause]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"sleep 30\"]\npolicy = {{ timeout = {{ attempt = \"60s\" }} }}\n"
        ),
    );
    let plan = b.write(
        "plan.toml",
        r#"
[[steps]]
tool = "charge"
params = { order = 1, amount = 10 }
[[steps]]
tool = "pause"
[[steps]]
tool = "charge"
params = { order = 2, amount = 10 }
"#,
    );
    let (mut child, run_id, lines) = b.spawn(&["run", plan.to_str().unwrap()]);
    // Wait until keel is in the pause step, then kill it.
    loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("keel reports its steps");
        if line.contains("pause") {
            break;
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_eq!(orders(&b.payments), [1]);
    // Resume (the pause step runs again: a command has no idempotency key; 30 s is
    // too long for a test, so the plan's pause is cut by cancelling instead).
    let show = b.keel(&["runs", "show", &run_id, "--json"]);
    let export: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(export["state"]["steps"][0]["status"], "succeeded");
    assert_eq!(export["state"]["steps"][1]["status"], "running", "the kill left the pause step unfinished");
    let cancel = b.keel(&["runs", "cancel", &run_id]);
    assert_eq!(cancel.code, 0, "{cancel:?}");
    let resumed = b.keel(&["runs", "resume", &run_id]);
    assert_eq!(resumed.code, 6, "a cancelled run stays cancelled: {resumed:?}");
    assert_eq!(orders(&b.payments), [1]);
}
