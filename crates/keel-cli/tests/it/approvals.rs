//! Approvals: decided in another process, bound to the arguments, expiring.

use std::time::Duration;

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS, eventually, orders};

const BIG: &str = r#"
[[steps]]
id = "big"
tool = "charge"
params = { order = 7, amount = 250 }
"#;

#[test]
fn a_waiting_run_holds_no_process_and_an_approval_elsewhere_lets_it_finish() {
    let b = Bench::new(Faults::default(), TOOLS);
    let plan = b.write("plan.toml", BIG);
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(first.code, 3, "waiting for approval: {first:?}");
    assert!(b.payments.charges().is_empty(), "nothing charged before the approval");
    let approval = first.after("waits for approval ");
    let list = b.keel(&["approvals", "list"]);
    assert!(list.stdout.contains(&approval) && list.stdout.contains("\"amount\":250"), "{list:?}");

    let ok = b.keel(&["approvals", "approve", &approval]);
    assert_eq!(ok.code, 0, "{ok:?}");
    let again = b.keel(&["approvals", "approve", &approval]);
    assert_eq!(again.code, 2, "an approval is decided once: {again:?}");

    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert_eq!(orders(&b.payments), [7]);
    // A second resume finds the run completed and acts on nothing.
    assert_eq!(b.keel(&["runs", "resume", &first.run_id()]).code, 0);
    assert_eq!(orders(&b.payments), [7]);
}

#[test]
fn run_wait_blocks_until_another_process_approves() {
    let b = Bench::new(Faults::default(), TOOLS);
    let plan = b.write("plan.toml", BIG);
    let (mut child, _run_id, lines) = b.spawn(&["run", plan.to_str().unwrap(), "--wait"]);
    let approval = loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("keel asks for approval");
        if let Some(rest) = line.split("waits for approval ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    assert!(child.try_wait().unwrap().is_none(), "--wait keeps keel waiting");
    assert_eq!(b.keel(&["approvals", "approve", &approval]).code, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    eventually("the charge", Duration::from_secs(5), || orders(&b.payments) == [7]);
}

#[test]
fn a_rejection_fails_the_step_without_acting() {
    let b = Bench::new(Faults::default(), TOOLS);
    let plan = b.write("plan.toml", BIG);
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    let approval = first.after("waits for approval ");
    assert_eq!(b.keel(&["approvals", "reject", &approval]).code, 0);
    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 1, "{resumed:?}");
    assert!(resumed.stdout.contains("approval_denied"), "{resumed:?}");
    assert!(b.payments.charges().is_empty());
}

#[test]
fn an_approval_does_not_authorise_changed_arguments() {
    // The charge fails once (503, no retry) and escalates at once; the person retries
    // with a different amount: the old approval does not cover it.
    let config = TOOLS.replace("escalate_after = 3", "escalate_after = 1")
        + "\n[tools.charge.policy]\nretry = { max_attempts = 1 }\n";
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, &config);
    let plan = b.write("plan.toml", BIG);
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    let approval = first.after("waits for approval ");
    assert_eq!(b.keel(&["approvals", "approve", &approval]).code, 0);
    let failed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(failed.code, 4, "the 503 escalated: {failed:?}");
    let ticket = failed.after("ticket ");
    let retry = b.keel(&[
        "tickets",
        "resolve",
        &ticket,
        "--action",
        "retry",
        "--params",
        r#"{"order": 7, "amount": 900}"#,
    ]);
    assert_eq!(retry.code, 0, "{retry:?}");
    let again = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(again.code, 3, "new arguments need a new approval: {again:?}");
    let second = again.after("waits for approval ");
    assert_ne!(second, approval);
    assert!(b.payments.charges().is_empty(), "nothing charged on the old approval");
    assert_eq!(b.keel(&["approvals", "approve", &second]).code, 0);
    let done = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(done.code, 0, "{done:?}");
    assert_eq!(b.payments.charges()[0]["amount"], 900.0);
    assert_eq!(b.payments.charges().len(), 1);
}

#[test]
fn an_expired_approval_takes_the_configured_outcome() {
    let deny = TOOLS.to_owned() + "\n[approvals]\nexpires_after = \"0s\"\non_expiry = \"deny\"\n";
    let b = Bench::new(Faults::default(), &deny);
    let plan = b.write("plan.toml", BIG);
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(first.code, 3, "{first:?}");
    let approval = first.after("waits for approval ");
    let late = b.keel(&["approvals", "approve", &approval]);
    assert_eq!(late.code, 2, "too late to approve: {late:?}");
    assert!(late.stderr.contains("expired"), "{late:?}");
    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 1, "deny: the step fails: {resumed:?}");
    assert!(resumed.stdout.contains("approval_denied"), "{resumed:?}");

    let escalate = TOOLS.to_owned() + "\n[approvals]\nexpires_after = \"0s\"\non_expiry = \"escalate\"\n";
    let b = Bench::new(Faults::default(), &escalate);
    let plan = b.write("plan.toml", BIG);
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    let resumed = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(resumed.code, 4, "escalate: a ticket: {resumed:?}");
    assert!(b.payments.charges().is_empty());
}
