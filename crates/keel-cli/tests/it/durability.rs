//! Durability holes found by killing and stopping `keel`: a crash during a retry's
//! backoff, a holder stopped past its lease, a takeover that left no trace, and a
//! journal Keel cannot use.

use std::time::Duration;

use keel_examples::payments::Faults;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::{Bench, eventually, orders};

fn export(b: &Bench, run_id: &str) -> Value {
    let show = b.keel(&["runs", "show", run_id, "--json"]);
    assert_eq!(show.code, 0, "{show:?}");
    serde_json::from_str(&show.stdout).unwrap()
}

/// An event's kind, a policy event's by what it says (`retry_scheduled`).
fn kind(event: &Value) -> &str {
    match event["type"].as_str().unwrap_or("") {
        "policy" => event["event"]["type"].as_str().unwrap_or(""),
        other => other,
    }
}

fn kinds(export: &Value) -> Vec<String> {
    export["events"].as_array().unwrap().iter().map(|e| kind(&e["event"]).to_owned()).collect()
}

/// Killed while a step waits 3 s before its second attempt of two: the resume makes
/// attempt 2 (not attempt 1 again) and only once the backoff is over.
#[test]
fn a_crash_during_a_backoff_keeps_the_attempt_count_and_the_wait() {
    let config = r#"
[run]
lease = "1s"
[defaults]
retry = { max_attempts = 2, base_delay = "3s", max_delay = "3s", jitter = "none" }
breaker = { enabled = false }
"#;
    // The first two charges fail: with a fresh set of attempts the resume would
    // complete; with the run's own attempts the second one is the last.
    let b = Bench::new(Faults { fail_first: 2, ..Faults::default() }, config);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"charge\"\nparams = { order = 1, amount = 10 }\n");
    let (mut child, run_id, _lines) = b.spawn(&["run", plan.to_str().unwrap()]);
    eventually("the first attempt to fail", Duration::from_secs(30), || b.payments.attempts() == 1);
    eventually("the retry to be scheduled", Duration::from_secs(30), || {
        kinds(&export(&b, &run_id)).iter().any(|k| k == "retry_scheduled")
    });
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();

    let resumed = b.keel(&["runs", "resume", &run_id]);
    assert_ne!(resumed.code, 0, "the run's two attempts both failed: {resumed:?}");
    assert_eq!(b.payments.attempts(), 2, "one attempt after the crash, not a fresh set");
    let e = export(&b, &run_id);
    let attempts: Vec<u64> =
        e["state"]["attempts"].as_array().unwrap().iter().map(|a| a["attempt"].as_u64().unwrap()).collect();
    assert_eq!(attempts, [1, 2], "numbered on from before the crash");
    let events = e["events"].as_array().unwrap();
    let at = |pred: &dyn Fn(&Value) -> bool| {
        events.iter().find(|ev| pred(&ev["event"])).map(|ev| ev["recorded_at_ms"].as_i64().unwrap()).unwrap()
    };
    let scheduled = at(&|ev| kind(ev) == "retry_scheduled");
    let second = at(&|ev| kind(ev) == "attempt_started" && ev["event"]["attempt"] == 2);
    assert!(second - scheduled >= 2_900, "attempt 2 waited out the backoff: {} ms", second - scheduled);
}

/// `keel run` stopped (SIGSTOP) past its lease while a step runs; another `keel runs
/// resume` takes the run over and completes it; the stopped one continues (SIGCONT)
/// and must not write a single event after `completed`, nor charge again.
#[test]
fn a_stopped_holder_cannot_write_after_a_takeover() {
    let b = Bench::new(
        Faults::default(),
        &format!("{}\n[tools.pause]\nkind = \"command\"\nargv = [\"sleep\", \"2\"]\n", crate::support::TOOLS),
    );
    let plan = b.write(
        "plan.toml",
        "[[steps]]\ntool = \"charge\"\nparams = { order = 1, amount = 10 }\n\
         [[steps]]\ntool = \"pause\"\n\
         [[steps]]\ntool = \"charge\"\nparams = { order = 2, amount = 10 }\n",
    );
    let (mut stopped, run_id, lines) = b.spawn(&["run", plan.to_str().unwrap()]);
    loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("keel reports its steps");
        if line.contains("pause") {
            break;
        }
    }
    eventually("the pause attempt to be journaled", Duration::from_secs(30), || {
        export(&b, &run_id)["state"]["attempts"].as_array().unwrap().iter().any(|a| a["target"] == "pause")
    });
    let pid = Pid::from_raw(stopped.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let taker = b.keel(&["runs", "resume", &run_id]);
    assert_eq!(taker.code, 0, "the run was taken over and completed: {taker:?}");
    kill(pid, Signal::SIGCONT).unwrap();
    let status = stopped.wait().unwrap();
    assert_eq!(status.code(), Some(7), "the stale holder stops as busy (its lease was lost)");

    assert_eq!(orders(&b.payments), [1, 2], "each order charged once");
    let e = export(&b, &run_id);
    let kinds = kinds(&e);
    let last = e["events"].as_array().unwrap().last().unwrap()["event"].clone();
    assert_eq!(last["type"], "run_state_changed", "{kinds:?}");
    assert_eq!(last["state"], "completed", "nothing after completed: {kinds:?}");
    assert!(kinds.iter().any(|k| k == "run_taken_over"), "the takeover is journaled: {kinds:?}");
    let abandoned =
        e["state"]["attempts"].as_array().unwrap().iter().filter(|a| a["outcome"] == "abandoned").count();
    assert_eq!(abandoned, 1, "the stopped holder's pause attempt is closed as abandoned");
    let show = b.keel(&["runs", "show", &run_id]);
    assert!(show.stdout.contains("taken over by"), "the timeline says who took over: {}", show.stdout);
}

/// When Keel cannot use its journal, it says so with its own exit code (8), not
/// the "run failed" code.
#[test]
fn an_unusable_journal_has_its_own_exit_code() {
    let b = Bench::new(
        Faults::default(),
        "[storage]\nurl = \"sqlite:/proc/keel-cannot-write-here/journal.db\"\n",
    );
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"charge\"\nparams = { order = 1, amount = 10 }\n");
    let run = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stderr.contains("keel: error["), "{run:?}");
    assert!(orders(&b.payments).is_empty());
}
