use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::TokioClock;
use keel_journal::JournalOptions;

use super::*;

async fn runner(dir: &Path, config: &str) -> Runner {
    let config = Config::parse(config, &dir.join("keel.toml"), &|_| None).unwrap();
    let clock = Arc::new(TokioClock::new());
    let journal = keel_journal::open(
        &config.storage_url,
        JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    Runner::new(Arc::new(config), journal, clock, Arc::new(NullObserver)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_drives_a_run_in_one_task_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let config = format!(
        "[tools.wait]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.05; done\"]\n",
        gate.display()
    );
    let r = Arc::new(runner(dir.path(), &config).await);
    let plan = Plan::parse("[[steps]]\ntool = \"wait\"\n", "toml").unwrap();
    let run_id = r.create(&plan).await.unwrap();
    let first = tokio::spawn({
        let (r, id) = (r.clone(), run_id.clone());
        async move { r.drive(&id).await }
    });
    // Wait (bounded) until the first drive is inside the step.
    let mut waited = 0;
    while r.snapshot(&run_id).await.unwrap().steps.is_empty() {
        assert!(waited < 400, "the step never started");
        tokio::time::sleep(Duration::from_millis(25)).await;
        waited += 1;
    }
    assert!(matches!(r.drive(&run_id).await, Err(Error::Busy(..))), "a second task is kept out");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(first.await.unwrap().unwrap(), RunStatus::Completed);
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed, "free again once the first ended");
}

/// A loopback HTTP service whose every odd request answers 503 and every even one 200:
/// each call of a tool on it fails once and succeeds on its retry.
async fn flaky_service() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let hits = Arc::new(AtomicU64::new(0));
    let seen = hits.clone();
    let app = axum::Router::new().route(
        "/op",
        axum::routing::post(move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n % 2 == 0 {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy")
                } else {
                    (axum::http::StatusCode::OK, "{\"ok\": true}")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/op"), hits)
}

/// The gate's stored history after thousands of drives of one journal, by runners
/// that restart now and then as processes do, equals the real outcomes exactly (it
/// used to double on every drive, overflow after ~63, and brick the journal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_drives_keep_the_gates_counts_exact() {
    let drives: u64 = std::env::var("KEEL_TEST_DRIVES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let (url, hits) = flaky_service().await;
    let config = format!(
        "[defaults]\nretry = {{ max_attempts = 3, base_delay = \"1ms\", max_delay = \"1ms\" }}\nbreaker = {{ enabled = false }}\n\
         [tools.op]\nkind = \"http\"\nurl = \"{url}\"\n"
    );
    let plan = Plan::parse("[[steps]]\ntool = \"op\"\n", "toml").unwrap();
    let mut r = runner(dir.path(), &config).await;
    for i in 0..drives {
        if i % 500 == 499 {
            r = runner(dir.path(), &config).await; // a restart: the history is loaded again
        }
        let run_id = r.create(&plan).await.unwrap();
        let status = r.drive(&run_id).await.unwrap();
        assert_eq!(status, RunStatus::Completed, "drive {i}: no retry may be refused");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2 * drives);
    let stored = r.journal().load_gate_history().await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].target, "op");
    assert_eq!(stored[0].class, ErrorClass::ServerError);
    assert_eq!(stored[0].outcomes, keel_core::gate::Outcomes { successes: drives, failures: 0 });
    // And a fresh runner still starts on it.
    runner(dir.path(), &config).await;
}

/// A journal whose gate rows cannot be read still opens: the runner falls back to
/// the prior instead of refusing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gate_row_never_stops_a_runner() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[tools.t]\nkind = \"command\"\nargv = [\"true\"]\n";
    let r = runner(dir.path(), config).await;
    let url = r.config().storage_url.clone();
    drop(r);
    let path = url.strip_prefix("sqlite:").unwrap_or(&url).to_owned();
    let mut conn =
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite:{path}")).await.unwrap();
    sqlx::query("INSERT INTO gate_history VALUES ('t', 'server_error', 2, 'garbage', 1e400)")
        .execute(&mut conn)
        .await
        .unwrap();
    let r = runner(dir.path(), config).await;
    let plan = Plan::parse("[[steps]]\ntool = \"t\"\n", "toml").unwrap();
    let run_id = r.create(&plan).await.unwrap();
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed);
}

/// A paid tool that appends a line to `count` each time it runs and prints `out`.
fn paid_tool(name: &str, count: &Path, out: &str, cost: &str, extra: &str) -> String {
    let answer = count.with_file_name(format!("{name}.json"));
    std::fs::write(&answer, out).unwrap();
    format!(
        "[tools.{name}]\nkind = \"command\"\nargv = ['sh', '-c', 'echo x >> \"$1\"; cat \"$2\"', 'sh', '{}', '{}']\ncost = {cost}\n{extra}\n",
        count.display(),
        answer.display()
    )
}

/// A plan of `n` calls of `tool`, each with its own parameters (not a loop).
fn calls(tool: &str, n: usize) -> Plan {
    let text: String =
        (0..n).map(|i| format!("[[steps]]\ntool = \"{tool}\"\nparams = {{ n = {i} }}\n")).collect();
    Plan::parse(&text, "toml").unwrap()
}

fn runs_of(count: &Path) -> usize {
    std::fs::read_to_string(count).map_or(0, |s| s.lines().count())
}

/// A run's cost budget covers its tools: the call that would pass it is refused
/// before it runs, and the steps done keep their results.
#[tokio::test]
async fn a_runs_cost_budget_stops_it_before_a_tool_call_that_would_pass_it() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let config = format!(
        "[run]\nbudget = {{ cost_usd = 1.0 }}\n{}",
        paid_tool("search", &count, "{\"hits\": 3}", "{ per_call_usd = 0.4 }", "")
    );
    let r = runner(dir.path(), &config).await;
    let plan = calls("search", 5);
    let run_id = r.create(&plan).await.unwrap();
    let status = r.drive(&run_id).await.unwrap();
    assert!(matches!(&status, RunStatus::Failed { class: ErrorClass::BudgetExceeded, .. }), "{status:?}");
    assert_eq!(runs_of(&count), 2, "0.4 + 0.4 fit a 1.0 budget; a third would not");
    let snap = r.snapshot(&run_id).await.unwrap();
    let done = snap.steps.iter().filter(|s| s.status == "succeeded").count();
    assert_eq!(done, 2, "the partial result is kept: {:?}", snap.steps);
    // The refusal is in the run's journal, where the live view, /metrics and alerts
    // see it.
    let events = r.journal().events(&run_id, 0, 1000).await.unwrap();
    let refused: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            JournalEvent::Policy { event: keel_core::Event::BudgetExceeded { budget, kind, .. }, .. } => {
                Some((budget.to_string(), *kind))
            }
            _ => None,
        })
        .collect();
    assert_eq!(refused, [(format!("run:{run_id}"), keel_core::BudgetKind::CostMicros)]);
}

/// A cost read from the answer; an answer without it is charged the bound, never zero.
#[tokio::test]
async fn a_cost_reported_by_the_answer_is_charged_and_a_missing_one_counts_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (reported, silent) = (dir.path().join("reported"), dir.path().join("silent"));
    let config = format!(
        "[run]\nbudget = {{ cost_usd = 1.0 }}\n{}{}",
        paid_tool(
            "priced",
            &reported,
            "{\"billing\": {\"usd\": 0.3}}",
            "{ from_field = \"json.billing.usd\", max_usd = 0.35 }",
            ""
        ),
        paid_tool(
            "unpriced",
            &silent,
            "{\"ok\": true}",
            "{ from_field = \"json.billing.usd\", max_usd = 0.6 }",
            ""
        ),
    );
    let r = runner(dir.path(), &config).await;
    // 0.3 + 0.3 + 0.3 = 0.9: a fourth reserves 0.35 and does not fit.
    let plan = calls("priced", 4);
    let run_id = r.create(&plan).await.unwrap();
    let status = r.drive(&run_id).await.unwrap();
    assert!(matches!(&status, RunStatus::Failed { class: ErrorClass::BudgetExceeded, .. }), "{status:?}");
    assert_eq!(runs_of(&reported), 3);
    // Without the field each call costs its bound, 0.6: the second does not fit.
    let plan = calls("unpriced", 3);
    let run_id = r.create(&plan).await.unwrap();
    r.drive(&run_id).await.unwrap();
    assert_eq!(runs_of(&silent), 1);
}

/// What a run spent before it paused is still spent when another process resumes it.
#[tokio::test]
async fn a_resumed_run_starts_from_what_it_already_spent() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let config = format!(
        "[run]\nbudget = {{ cost_usd = 1.0 }}\n{}{}",
        paid_tool("search", &count, "{\"hits\": 3}", "{ per_call_usd = 0.4 }", ""),
        paid_tool("buy", &count, "{\"ok\": true}", "{ per_call_usd = 0.4 }", "approval = \"always\""),
    );
    let plan = Plan::parse(
        "[[steps]]\ntool = \"search\"\n[[steps]]\ntool = \"buy\"\n[[steps]]\ntool = \"search\"\n",
        "toml",
    )
    .unwrap();
    let (run_id, approval_id) = {
        let r = runner(dir.path(), &config).await;
        let run_id = r.create(&plan).await.unwrap();
        let RunStatus::WaitingApproval { approval_id } = r.drive(&run_id).await.unwrap() else {
            panic!("the buy step asks first")
        };
        r.flush().await.unwrap();
        (run_id, approval_id)
    };
    assert_eq!(runs_of(&count), 1);
    // Another process: 0.4 spent before, 0.4 for the purchase; the last 0.4 does not fit.
    let r = runner(dir.path(), &config).await;
    crate::inbox::decide(&**r.journal(), &approval_id, true, "ops", keel_core::Clock::wall(&*r.clock))
        .await
        .unwrap();
    let status = r.drive(&run_id).await.unwrap();
    assert_eq!(runs_of(&count), 2, "{status:?}");
}

/// A command tool that "times out" (exit 124) while `down` exists, else prints `out`.
fn switchable_tool(name: &str, down: &Path, out: &str, extra: &str) -> String {
    let answer = down.with_file_name(format!("{name}.out.json"));
    std::fs::write(&answer, out).unwrap();
    format!(
        "[tools.{name}]\nkind = \"command\"\nargv = ['sh', '-c', 'if [ -e \"$1\" ]; then exit 124; fi; cat \"$2\"', 'sh', '{}', '{}']\npolicy = {{ retry = {{ max_attempts = 1 }} }}\n{extra}\n",
        down.display(),
        answer.display()
    )
}

async fn fallbacks_taken(r: &Runner, run_id: &str) -> Vec<(String, String, ErrorClass)> {
    r.flush().await.unwrap();
    r.journal()
        .events(run_id, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            JournalEvent::Policy { event: keel_core::Event::FallbackTaken { from, to, class }, .. } => {
                Some((from.to_string(), to.to_string(), class))
            }
            _ => None,
        })
        .collect()
}

fn one_call(tool: &str, q: &str) -> Plan {
    Plan::parse(&format!("[[steps]]\ntool = \"{tool}\"\nparams = {{ q = \"{q}\" }}\n"), "toml").unwrap()
}

/// A read tool that cannot answer falls back to its last good result for the same
/// arguments, journaled as a fallback to `cache`; other arguments have none.
#[tokio::test]
async fn a_read_tool_falls_back_to_its_last_good_result() {
    let dir = tempfile::tempdir().unwrap();
    let down = dir.path().join("down");
    let config = switchable_tool("search", &down, "{\"hits\": 7}", "fallback = { cached = \"10m\" }");
    let r = runner(dir.path(), &config).await;
    let first = r.create(&one_call("search", "keel")).await.unwrap();
    assert_eq!(r.drive(&first).await.unwrap(), RunStatus::Completed);
    assert!(fallbacks_taken(&r, &first).await.is_empty());

    std::fs::write(&down, "").unwrap();
    let second = r.create(&one_call("search", "keel")).await.unwrap();
    assert_eq!(r.drive(&second).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&second).await.unwrap();
    let output = finished_output(&snap.steps[0]).unwrap();
    assert_eq!(output["json"]["hits"], 7, "{output}");
    assert_eq!(
        fallbacks_taken(&r, &second).await,
        [("search".to_owned(), "cache".to_owned(), ErrorClass::Timeout)],
        "the stale answer is marked in the journal"
    );

    let other = r.create(&one_call("search", "other")).await.unwrap();
    let status = r.drive(&other).await.unwrap();
    assert!(matches!(status, RunStatus::Failed { class: ErrorClass::Timeout, .. }), "{status:?}");
}

/// A tool whose twin answers in its place: the twin's result, journaled.
#[tokio::test]
async fn a_tool_falls_back_to_its_read_only_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (down, replica_down) = (dir.path().join("down"), dir.path().join("replica-down"));
    std::fs::write(&down, "").unwrap();
    let config = format!(
        "{}{}",
        switchable_tool("primary", &down, "{\"from\": \"primary\"}", "fallback = { twin = \"replica\" }"),
        switchable_tool("replica", &replica_down, "{\"from\": \"replica\"}", ""),
    );
    let r = runner(dir.path(), &config).await;
    let run = r.create(&one_call("primary", "x")).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&run).await.unwrap();
    assert_eq!(finished_output(&snap.steps[0]).unwrap()["json"]["from"], "replica");
    assert_eq!(
        fallbacks_taken(&r, &run).await,
        [("primary".to_owned(), "replica".to_owned(), ErrorClass::Timeout)]
    );
    // Both down: the original failure is the step's, not the twin's.
    std::fs::write(&replica_down, "").unwrap();
    let run = r.create(&one_call("primary", "y")).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    assert!(matches!(status, RunStatus::Failed { class: ErrorClass::Timeout, .. }), "{status:?}");
}

/// A write-like call is claimed under its idempotency key (a repeat answers from the
/// stored result); a read-only call is not (nothing to keep from repeating), so its
/// key is free after the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_write_like_calls_are_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[tools.look]\nkind = \"command\"\nargv = [\"echo\", \"seen\"]\n\n\
                  [tools.pay]\nkind = \"command\"\nargv = [\"echo\", \"paid\"]\nwrite = true\n";
    let r = runner(dir.path(), config).await;
    let plan = Plan::parse(
        "[[steps]]\nid = \"a\"\ntool = \"look\"\nparams = { q = 1 }\n\n\
         [[steps]]\nid = \"b\"\ntool = \"pay\"\nparams = { q = 1 }\n",
        "toml",
    )
    .unwrap();
    let run_id = r.create(&plan).await.unwrap();
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed);
    let params = serde_json::json!({ "q": 1 });
    let paid = r.journal().claim(&idempotency_key(&run_id, "b", "pay", &params)).await.unwrap();
    assert!(matches!(paid, keel_journal::Claim::Done(_)), "the write's result is stored: {paid:?}");
    let looked = r.journal().claim(&idempotency_key(&run_id, "a", "look", &params)).await.unwrap();
    assert!(matches!(looked, keel_journal::Claim::Won(_)), "the read was never claimed: {looked:?}");
}
