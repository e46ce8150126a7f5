//! Repeated same-class failures open a ticket; a person's answer continues the run.

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS, orders};

#[test]
fn repeated_failures_open_a_ticket_and_skip_continues_the_run() {
    let b = Bench::new(Faults { notify_down: true, ..Faults::default() }, TOOLS);
    let plan = b.write(
        "plan.toml",
        r#"
[[steps]]
id = "notify"
tool = "notify"
params = { to = "ops" }
[[steps]]
id = "charge"
tool = "charge"
params = { order = 1, amount = 5 }
"#,
    );
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(first.code, 4, "escalated: {first:?}");
    assert_eq!(first.stdout.matches("server_error after").count(), 3, "three attempts: {first:?}");
    let ticket = first.after("ticket ");
    let show = b.keel(&["tickets", "show", &ticket, "--json"]);
    let t: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let ctx = &t["ticket"]["context"];
    assert_eq!(ctx["failing_step"]["id"], "notify");
    assert_eq!(ctx["error"]["class"], "server_error");
    assert!(ctx["error"]["message"].as_str().unwrap().contains("mail relay unreachable"), "{ctx}");
    assert!(ctx["actions"].as_array().unwrap().iter().any(|a| a == "skip"));
    assert!(b.payments.charges().is_empty());

    assert_eq!(b.keel(&["tickets", "resolve", &ticket, "--action", "skip"]).code, 0);
    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(orders(&b.payments), [1]);
    let list = b.keel(&["tickets", "list"]);
    assert!(list.stdout.contains("resolved"), "{list:?}");
}

#[test]
fn abort_cancels_the_run() {
    let b = Bench::new(Faults { notify_down: true, ..Faults::default() }, TOOLS);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"notify\"\n");
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    let ticket = first.after("ticket ");
    assert_eq!(b.keel(&["tickets", "resolve", &ticket, "--action", "abort"]).code, 0);
    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 6, "{resumed:?}");
}
