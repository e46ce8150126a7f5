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

/// A tool's breaker is shared by every run of the process; when a run's call opens
/// it, the transition is journaled in that run and shown live (it used to go to a
/// sink that dropped it, so the journal and the dashboard said "closed").
#[test]
fn a_tool_breaker_opening_reaches_the_journal_and_the_live_view() {
    let config = "[run]\nlease = \"1s\"\nescalate_after = 5\n\
                  [defaults]\nretry = { max_attempts = 3, base_delay = \"10ms\", max_delay = \"50ms\" }\n\
                  breaker = { min_calls = 2, failure_ratio = 0.5 }\n";
    let b = Bench::new(Faults { notify_down: true, ..Faults::default() }, config);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"notify\"\n");
    let run = b.keel(&["run", plan.to_str().unwrap()]);
    assert!(run.stdout.contains("closed → open"), "the live view shows the breaker opening: {run:?}");
    let show = b.keel(&["runs", "show", &run.run_id(), "--json"]);
    let export: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let opened =
        export["events"].as_array().unwrap().iter().any(|e| {
            e["event"]["event"]["type"] == "breaker_transition" && e["event"]["event"]["to"] == "open"
        });
    assert!(opened, "the journal holds the transition: {}", show.stdout);
}
