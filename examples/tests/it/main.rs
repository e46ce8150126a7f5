//! Runs every example binary and checks that it shows what its doc promises.

use std::process::Command;

#[test]
fn resilient_call_shows_each_policy_at_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_resilient-call")).output().expect("run the example");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let expect = [
        "retry after attempt 1 (server_error)",
        "wait 1s (RetryAfter)",
        "=> invalid_request: HTTP 400: amount must be positive (1 attempt)",
        "breaker of payments: closed -> open",
        "fallback payments -> payments-backup",
        "order 3 => charged by backup (from payments-backup)",
        "loop detected: the same call to `payments-backup` was made 3 times",
        "attempts charged to the run's budget:",
    ];
    for line in expect {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // A bad request is never retried.
    let section = text.split("3. a bad request").nth(1).and_then(|s| s.split("4. ").next()).unwrap_or("");
    assert!(!section.contains("retry after"), "{section}");
}
