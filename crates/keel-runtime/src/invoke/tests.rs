//! `Invoker::invoke` on a real SQLite journal with real command tools: the key scheme,
//! replay, conflict, approval, failure and the bad-input errors.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Classified as _, ErrorClass, TokioClock};
use keel_journal::JournalOptions;
use serde_json::json;

use super::*;
use crate::Config;
use crate::runner::NullObserver;

async fn invoker(dir: &Path) -> Invoker {
    let log = dir.join("calls.log");
    let text = format!(
        "[run]\nescalate_after = 100\n\n[defaults]\nretry = {{ max_attempts = 2, base_delay = \"1ms\", max_delay = \"2ms\" }}\n\n\
         [tools.pay]\nkind = \"command\"\nwrite = true\napproval = {{ param = \"n\", above = 5 }}\n\
         params = {{ type = \"object\", required = [\"n\"], properties = {{ n = {{ type = \"integer\" }} }} }}\n\
         argv = [\"sh\", \"-c\", \"echo call >> {log}; echo '{{\\\"paid\\\": true}}'\"]\n\n\
         [tools.hold]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"while [ ! -e {gate} ]; do sleep 0.02; done\"]\n\n\
         [tools.broken]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"echo nope >&2; exit 3\"]\n\n\
         [tools.flaky]\nkind = \"command\"\n\
         argv = [\"sh\", \"-c\", \"if [ -e {once} ]; then echo '{{\\\"ok\\\": 1}}'; else touch {once}; exit 124; fi\"]\n",
        log = log.display(),
        gate = dir.join("gate").display(),
        once = dir.join("once").display()
    );
    let config = Config::parse(&text, &dir.join("keel.toml"), &|_| None).unwrap();
    let clock = Arc::new(TokioClock::new());
    let journal = keel_journal::open(
        &config.storage_url,
        JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    let runner = Arc::new(
        Runner::new(Arc::new(config), journal, clock.clone(), Arc::new(NullObserver)).await.unwrap(),
    );
    Invoker::new(runner, Arc::default(), clock)
}

fn calls(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("calls.log")).map(|s| s.lines().count()).unwrap_or(0)
}

fn call(tool: &str, params: serde_json::Value, key: Option<&str>) -> Call {
    Call { tool: tool.into(), params, key: key.map(str::to_owned), wait: None, caller: None, minted: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_call_repeated_is_replayed_and_a_key_reused_with_other_arguments_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    let first = inv.invoke(call("pay", json!({"n": 1}), None)).await.unwrap();
    let Outcome::Completed { run_id, output, attempts: 1, replayed: false } = &first else {
        panic!("{first:?}")
    };
    assert_eq!(output["json"]["paid"], true, "{output}");
    // The derived key: the same arguments are the same call.
    let again = inv.invoke(call("pay", json!({"n": 1}), None)).await.unwrap();
    assert!(
        matches!(&again, Outcome::Completed { run_id: r, replayed: true, .. } if r == run_id),
        "{again:?}"
    );
    assert_eq!(calls(dir.path()), 1, "acted once");
    assert_eq!(run_id, &invocation_run_id(&invocation_key("pay", true, None, &json!({"n": 1})).unwrap()));

    // A client's key is a call of its own; reused with other arguments it is refused.
    let keyed = inv.invoke(call("pay", json!({"n": 1}), Some("k-1"))).await.unwrap();
    assert!(matches!(keyed, Outcome::Completed { replayed: false, .. }), "{keyed:?}");
    assert_eq!(calls(dir.path()), 2);
    let other = inv.invoke(call("pay", json!({"n": 2}), Some("k-1"))).await;
    assert!(matches!(other, Err(InvokeError::Conflict)), "{other:?}");
    assert_eq!(calls(dir.path()), 2, "a conflict acts on nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_needing_approval_answers_at_once_then_completes_once_approved() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    let waiting = inv.invoke(call("pay", json!({"n": 9}), None)).await.unwrap();
    let Outcome::WaitingApproval { approval_id, replayed: false, .. } = &waiting else {
        panic!("{waiting:?}")
    };
    assert_eq!(calls(dir.path()), 0);
    // Asked again before the decision: the same approval, nothing done.
    let still = inv.invoke(call("pay", json!({"n": 9}), None)).await.unwrap();
    assert!(
        matches!(&still, Outcome::WaitingApproval { approval_id: a, replayed: true, .. } if a == approval_id)
    );
    crate::inbox::decide(
        inv.runner().journal().as_ref(),
        approval_id,
        true,
        "tester",
        keel_core::Clock::wall(&TokioClock::new()),
    )
    .await
    .unwrap();
    let done = inv.invoke(call("pay", json!({"n": 9}), None)).await.unwrap();
    assert!(matches!(done, Outcome::Completed { replayed: true, .. }), "{done:?}");
    assert_eq!(calls(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_is_a_classified_outcome_and_bad_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    let failed = inv.invoke(call("broken", json!({}), None)).await.unwrap();
    let Outcome::Failed { class, attempts, message, .. } = &failed else { panic!("{failed:?}") };
    // A non-zero exit is the tool's server_error, retried under the policy.
    assert_eq!(*attempts, 2, "{failed:?}");
    assert!(message.contains("nope"), "the step's own message: {message}");
    assert_eq!(*class, ErrorClass::ServerError, "{failed:?}");

    let unknown = inv.invoke(call("nosuch", json!({}), None)).await.unwrap_err();
    assert_eq!(unknown.class(), ErrorClass::NotFound);
    let bad = inv.invoke(call("pay", json!({"n": "x"}), None)).await.unwrap_err();
    assert!(matches!(bad, InvokeError::InvalidParams(_)), "{bad:?}");
    assert_eq!(bad.class(), ErrorClass::InvalidRequest);
    assert_eq!(calls(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_bound_answers_a_running_call_with_its_state_and_a_retry_gets_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    // The tool holds until the gate file exists: the bound passes first.
    let mut c = call("hold", json!({}), Some("slow"));
    c.wait = Some(Duration::from_millis(50));
    let answered = inv.invoke(c.clone()).await.unwrap();
    let Outcome::Running { run_id, state: RunState::Running, replayed: false } = &answered else {
        panic!("{answered:?}")
    };
    std::fs::write(dir.path().join("gate"), "").unwrap();
    // The drive went on without the caller; the key's retry answers from it.
    c.wait = None;
    let done = inv.invoke(c).await.unwrap();
    assert!(matches!(&done, Outcome::Completed { run_id: r, replayed: true, .. } if r == run_id), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_repeating_a_call_that_acts_anew_is_stopped_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    let by = |who: &str, params: serde_json::Value, key: Option<&str>| Call {
        caller: Some(who.into()),
        ..call("broken", params, key)
    };
    // `broken` is read-only: each call acts anew. The default guard: 3 repeats in 10.
    for _ in 0..2 {
        let r = inv.invoke(by("bot", json!({"x": 1}), None)).await.unwrap();
        assert!(matches!(r, Outcome::Failed { .. } | Outcome::Escalated { .. }), "{r:?}");
    }
    let third = inv.invoke(by("bot", json!({"x": 1}), None)).await;
    assert!(
        matches!(&third, Err(e @ InvokeError::LoopDetected(_)) if e.class() == ErrorClass::LoopDetected),
        "{third:?}"
    );
    // Other arguments, another caller, or a keyed call (answered from its first run).
    assert!(inv.invoke(by("bot", json!({"x": 2}), None)).await.is_ok());
    assert!(inv.invoke(by("other", json!({"x": 1}), None)).await.is_ok());
    for _ in 0..3 {
        assert!(inv.invoke(by("bot", json!({"x": 1}), Some("k-9"))).await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_call_is_answered_by_its_drive_as_the_journal_then_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let inv = invoker(dir.path()).await;
    // Read-only and retried once: its start is committed while it runs.
    let first = inv.invoke(call("flaky", json!({}), Some("f-1"))).await.unwrap();
    let Outcome::Completed { run_id, output, attempts: 2, replayed: false } = &first else {
        panic!("{first:?}")
    };
    assert_eq!(output["json"]["ok"], 1, "{output}");
    // The answer read back from the journal is the same one.
    let again = inv.invoke(call("flaky", json!({}), Some("f-1"))).await.unwrap();
    let replay =
        Outcome::Completed { run_id: run_id.clone(), output: output.clone(), attempts: 2, replayed: true };
    assert_eq!(again, replay);
    let journal = inv.runner().journal();
    let kinds: Vec<&str> =
        journal.events(run_id, 0, 100).await.unwrap().iter().map(|e| e.event.kind()).collect();
    let first_of = |k: &str| kinds.iter().position(|x| x.starts_with(k)).unwrap();
    assert_eq!(kinds.first(), Some(&"run_created"), "{kinds:?}");
    assert!(first_of("step_started") < first_of("policy."), "the start precedes the attempts: {kinds:?}");
    assert_eq!(&kinds[kinds.len() - 2..], ["step_finished", "run_state_changed"], "{kinds:?}");
    // The last event gave the lease up: another process can take the run at once.
    assert!(journal.acquire_lease(run_id, "other", Duration::from_secs(5)).await.unwrap().is_some());
}
