//! Scope fallback (a canary of one, then confirmation) and review-after-act (undo).

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS, orders};

const BATCH: &str = r#"
[tools.charge_batch]
kind = "http"
url = "{base}/charge-batch"
write = true
batch_param = "items"
canary_above = 2
undo = "refund"

[tools.refund]
kind = "http"
url = "{base}/refund"
write = true
"#;

#[test]
fn a_large_batch_runs_a_canary_of_one_and_waits_for_confirmation() {
    let b = Bench::new(Faults::default(), &format!("{TOOLS}{BATCH}"));
    let plan = b.write(
        "plan.toml",
        r#"
[[steps]]
id = "batch"
tool = "charge_batch"
params = { items = [{ order = 1, amount = 5 }, { order = 2, amount = 5 }, { order = 3, amount = 5 }, { order = 4, amount = 5 }] }
"#,
    );
    let first = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(first.code, 3, "waiting for confirmation after the canary: {first:?}");
    assert_eq!(orders(&b.payments), [1], "only the canary ran");
    let approval = first.after("waits for approval ");
    assert_eq!(b.keel(&["approvals", "approve", &approval]).code, 0);
    let done = b.keel(&["runs", "resume", &first.run_id()]);
    assert_eq!(done.code, 0, "{done:?}");
    assert_eq!(orders(&b.payments), [1, 2, 3, 4], "the canary is not charged again");
    let small = b.write(
        "small.toml",
        "[[steps]]\ntool = \"charge_batch\"\nparams = { items = [{ order = 9, amount = 1 }] }\n",
    );
    assert_eq!(b.keel(&["run", small.to_str().unwrap()]).code, 0, "a small batch needs no confirmation");
}

#[test]
fn a_reviewer_can_undo_a_step_once() {
    let b = Bench::new(Faults::default(), &format!("{TOOLS}{BATCH}"));
    let plan = b.write("plan.toml", "[[steps]]\nid = \"pay\"\ntool = \"charge_batch\"\nparams = { items = [{ order = 7, amount = 3 }] }\n");
    let run = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let undo = b.keel(&["runs", "undo", &run.run_id(), "--step", "pay"]);
    assert_eq!(undo.code, 0, "{undo:?}");
    assert_eq!(b.payments.refunds().len(), 1);
    assert_eq!(
        b.payments.refunds()[0]["result"]["body"]["charged"][0]["order"],
        7,
        "the undo saw the step's result"
    );
    let again = b.keel(&["runs", "undo", &run.run_id(), "--step", "pay"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(b.payments.refunds().len(), 1, "undoing twice refunds once");
    let show = b.keel(&["runs", "show", &run.run_id()]);
    assert!(show.stdout.contains("undo:pay"), "{show:?}");
    let nope = b.keel(&["runs", "undo", &run.run_id(), "--step", "nope"]);
    assert_eq!(nope.code, 2, "{nope:?}");
}
