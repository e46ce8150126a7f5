//! Agent runs (issue 16): a scripted model drives the tool loop through the real
//! gateway, real command and http tools, and a real SQLite journal.

use std::path::Path;
use std::sync::Arc;

use keel_core::{ErrorClass, TokioClock};
use keel_journal::{JournalEvent, JournalOptions};
use keel_runtime::agent::AgentTask;
use keel_runtime::runner::{NullObserver, RunStatus};
use keel_runtime::{Config, Runner};
use keel_testkit::model::{Reply, ScriptedModel};
use serde_json::{Value, json};

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

/// A command tool that appends its parameters to `log` and answers `{"total": 42}`.
fn lookup_tool(log: &Path) -> String {
    format!(
        "[tools.lookup]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"cat >> {log}; echo >> {log}; echo '{{\\\"total\\\": 42}}'\"]\n\
         params_on_stdin = true\n\
         params = {{ type = \"object\", properties = {{ id = {{ type = \"integer\" }} }}, required = [\"id\"], additionalProperties = false }}\n",
        log = log.display()
    )
}

fn task(t: &str) -> AgentTask {
    AgentTask { task: t.into(), ..AgentTask::default() }
}

fn calls_in(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| !l.trim().is_empty()).count()
}

/// The tool answers the model was sent in request `n`.
fn tool_messages(model: &ScriptedModel, n: usize) -> Vec<Value> {
    let requests = model.requests();
    requests[n]["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_calls_a_tool_reads_its_answer_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model =
        ScriptedModel::script(vec![Reply::call("lookup", json!({"id": 7})), Reply::text("The total is 42.")])
            .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), lookup_tool(&log))).await;
    let run = r.create_agent(&task("What is the total of order 7?"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 2);
    let first = &model.requests()[0];
    assert_eq!(first["messages"][0]["content"], "What is the total of order 7?");
    assert_eq!(first["tools"][0]["function"]["name"], "lookup", "the tools are offered with their schema");
    assert_eq!(first["tools"][0]["function"]["parameters"]["required"], json!(["id"]));
    let answer: Value =
        serde_json::from_str(tool_messages(&model, 1)[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(answer["json"]["total"], 42, "the tool's answer went back to the model: {answer}");
    assert_eq!(calls_in(&log), 1);
    let snap = r.snapshot(&run).await.unwrap();
    let names: Vec<&str> = snap.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["turn-1", "turn-1.call-1", "turn-2", "result"]);
    let result = snap.steps.last().unwrap().output.clone().unwrap();
    assert_eq!(result["answer"], "The total is 42.");
    assert_eq!(snap.steps[0].target, "model:m");
    assert!(snap.steps[0].output.as_ref().unwrap()["charged"]["tokens"].as_u64().unwrap() > 0);
    // Every model call is journaled under the run, as the gateway journals any call.
    r.flush().await.unwrap();
    let events = r.journal().events(&run, 0, 1000).await.unwrap();
    let called = events.iter().filter(|e| e.event.kind() == "model_called").count();
    assert_eq!(called, 2, "{events:?}");
    // Driving a finished run does nothing.
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_model_got_wrong_go_back_to_it_with_the_error_and_it_corrects_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model = ScriptedModel::script(vec![
        Reply::Tools(vec![("lookup".into(), "{\"id\": 7".into())]),
        Reply::call("look_up", json!({"id": 7})),
        Reply::call("lookup", json!({"id": "seven"})),
        Reply::call("lookup", json!({"id": 7})),
        Reply::text("42"),
    ])
    .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), lookup_tool(&log))).await;
    let run = r.create_agent(&task("total of 7"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 5);
    let error_of = |n: usize| -> Value {
        let m = tool_messages(&model, n);
        serde_json::from_str(m.last().unwrap()["content"].as_str().unwrap()).unwrap()
    };
    let bad_json = error_of(1);
    assert_eq!(bad_json["error"]["class"], "invalid_tool_call", "{bad_json}");
    assert!(bad_json["error"]["message"].as_str().unwrap().contains("not valid JSON"));
    let unknown = error_of(2);
    assert_eq!(unknown["error"]["class"], "unknown_tool");
    assert!(unknown["error"]["message"].as_str().unwrap().contains("the tools are: lookup"), "{unknown}");
    let schema = error_of(3);
    assert_eq!(schema["error"]["class"], "invalid_tool_call");
    assert!(
        schema["error"]["message"].as_str().unwrap().contains("/id"),
        "the path of the violation: {schema}"
    );
    assert_eq!(calls_in(&log), 1, "only the valid call ran the tool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_budget_stops_a_run_mid_flight_and_keeps_its_partial_result() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    // A model that never stops calling the tool (with new arguments each time).
    let model = ScriptedModel::serve(|n, _| Reply::call("lookup", json!({"id": n}))).await;
    let config = format!(
        "{}default_max_tokens = 100\n{}[run.budget]\ntokens = 3000\n[agent]\nmax_turns = 1000\nmax_repeats = 0\n",
        model.config("m"),
        lookup_tool(&log)
    );
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("loop forever"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let RunStatus::Failed { class, message } = &status else { panic!("{status:?}") };
    assert_eq!(*class, ErrorClass::BudgetExceeded, "{message}");
    let snap = r.snapshot(&run).await.unwrap();
    let turns: Vec<_> = snap.steps.iter().filter(|s| s.target == "model:m").collect();
    let charged: u64 = turns
        .iter()
        .filter_map(|s| s.output.as_ref())
        .map(|o| o["charged"]["tokens"].as_u64().unwrap())
        .sum();
    assert!(charged <= 3000, "the budget held: {charged} tokens charged");
    assert!(turns.len() >= 2, "it ran until the budget, not less: {} turns", turns.len());
    assert_eq!(
        model.calls(),
        turns.iter().filter(|s| s.status == "succeeded").count(),
        "a refused turn is never sent"
    );
    let result = snap.steps.last().unwrap();
    assert_eq!(result.name, "result");
    let out = result.output.clone().unwrap();
    assert_eq!(out["status"], "stopped");
    assert_eq!(out["class"], "budget_exceeded");
    assert!(!out["tool_outputs"].as_object().unwrap().is_empty(), "the partial result is kept: {out}");
    assert_eq!(calls_in(&log), turns.len() - 1, "every answered turn's call ran once");
    // The refusal itself is in the run's journal (the live view, /metrics, alerts).
    let events = r.journal().events(&run, 0, 10_000).await.unwrap();
    let refusals = events
        .iter()
        .filter(|e| {
            matches!(&e.event, JournalEvent::Policy { event: keel_core::Event::BudgetExceeded { budget, .. }, .. }
                if **budget == *format!("run:{run}"))
        })
        .count();
    assert_eq!(refusals, 1, "one refusal of the run's budget, journaled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_turns_stops_the_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model = ScriptedModel::serve(|n, _| Reply::call("lookup", json!({"id": n}))).await;
    let config = format!("{}{}[agent]\nmax_turns = 3\n", model.config("m"), lookup_tool(&log));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("go"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    assert!(
        matches!(&status, RunStatus::Failed { message, .. } if message.contains("3 turns")),
        "{status:?}"
    );
    assert_eq!((model.calls(), calls_in(&log)), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_repeating_one_successful_call_is_stopped_and_escalated() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model = ScriptedModel::serve(|_, _| Reply::call("lookup", json!({"id": 1}))).await;
    let config = format!("{}{}[agent]\nmax_repeats = 3\n", model.config("m"), lookup_tool(&log));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("go"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let RunStatus::Escalated { ticket_id } = &status else { panic!("{status:?}") };
    assert_eq!(calls_in(&log), 2, "the third identical call never ran");
    let snap = r.snapshot(&run).await.unwrap();
    let ticket = snap.tickets.iter().find(|t| &t.ticket_id == ticket_id).unwrap();
    assert_eq!(ticket.class, "loop_detected");
    assert!(ticket.summary.contains("repeating itself"), "{}", ticket.summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_an_approval_resumes_without_asking_the_model_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model =
        ScriptedModel::script(vec![Reply::call("lookup", json!({"id": 7})), Reply::text("done: 42")]).await;
    let config = format!("{}{}approval = \"always\"\n", model.config("m"), lookup_tool(&log));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("total of 7"), None).await.unwrap();
    let RunStatus::WaitingApproval { approval_id } = r.drive(&run).await.unwrap() else { panic!() };
    assert_eq!((model.calls(), calls_in(&log)), (1, 0), "nothing ran before the approval");
    keel_runtime::inbox::decide(
        &**r.journal(),
        &approval_id,
        true,
        "alice",
        keel_core::Clock::wall(&TokioClock::new()),
    )
    .await
    .unwrap();
    // A new process (a new runner on the same journal) carries the run on.
    let r2 = runner(dir.path(), &config).await;
    assert_eq!(r2.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 2, "turn 1 was journaled: it is not asked again");
    assert_eq!(calls_in(&log), 1);
}

/// An http tool whose service says 401: not retried, and a person is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorized_tool_is_not_retried_and_escalates() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let hits = Arc::new(AtomicU64::new(0));
    let seen = hits.clone();
    let app = axum::Router::new().route(
        "/op",
        axum::routing::post(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            async { (axum::http::StatusCode::UNAUTHORIZED, "bad token") }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::serve(|_, _| Reply::call("op", json!({}))).await;
    let config = format!("{}[tools.op]\nkind = \"http\"\nurl = \"http://{addr}/op\"\n", model.config("m"));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("do it"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    assert!(matches!(status, RunStatus::Escalated { .. }), "{status:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "credentials are wrong: no retry can fix that");
    assert_eq!(model.calls(), 1);
}

#[tokio::test]
async fn a_bad_task_is_refused_before_anything_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::script(Vec::new()).await;
    let r = runner(dir.path(), &model.config("m")).await;
    for (t, why) in [
        (AgentTask { task: " ".into(), ..AgentTask::default() }, "empty"),
        (AgentTask { model: Some("nope".into()), ..task("x") }, "no model `nope`"),
        (AgentTask { tools: Some(vec!["rm".into()]), ..task("x") }, "no tool named `rm`"),
        (AgentTask { max_turns: Some(0), ..task("x") }, "out of range"),
        (AgentTask { result_schema: Some(json!({"type": 7})), ..task("x") }, "not a valid JSON Schema"),
    ] {
        let e = r.create_agent(&t, None).await.unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
    assert!(r.journal().run_ids().await.unwrap().is_empty());
}

/// A `code` tool for the correction tests: runs the `program` parameter in python3,
/// counting each run in `log`; an exception is `code_error` with its type first.
fn code_tool(log: &Path) -> String {
    let launcher = format!(
        "import json,sys\na=json.load(sys.stdin)\nopen('{}','a').write('run\\n')\nns={{}}\ntry:\n    \
         exec(compile(a['program'],'<program>','exec'),ns)\n    print(json.dumps({{'result': ns['result']}}))\n\
         except Exception as e:\n    sys.stderr.write(type(e).__name__+': '+str(e)+'\\n')\n    sys.exit(3)\n",
        log.display()
    );
    format!(
        "[tools.code]\nkind = \"command\"\nargv = [\"python3\", \"-c\", '''{launcher}''']\nparams_on_stdin = true\n\
         classify = {{ exit_codes = {{ 3 = \"code_error\" }} }}\n\
         params = {{ type = \"object\", required = [\"program\"], properties = {{ program = {{ type = \"string\" }} }} }}\n"
    )
}

fn program(p: &str) -> Reply {
    Reply::call("code", json!({"program": p}))
}

fn turn_input(snap: &keel_journal::RunSnapshot, n: u32) -> Value {
    snap.steps.iter().find(|s| s.name == format!("turn-{n}")).unwrap().input.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_error_program_is_repaired_on_the_second_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model = ScriptedModel::script(vec![
        program("d = {'a': 1}\nresult = d['total']"),
        program("d = {'a': 1}\nresult = d.get('total', 0)"),
        Reply::text("0"),
    ])
    .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("the total of d"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&run).await.unwrap();
    let t2 = turn_input(&snap, 2);
    assert_eq!(t2["strategy"], "repair", "a KeyError is repaired (the prior): {t2}");
    assert_eq!(t2["after_kind"], "KeyError");
    let error = &tool_messages(&model, 1)[0]["content"];
    assert!(error.as_str().unwrap().contains("KeyError: 'total'"), "the error went back: {error}");
    assert_eq!(calls_in(&log), 2);
    assert!(model.requests()[1].get("temperature").is_none(), "repair keeps the temperature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_resubmitted_program_is_not_run_again_and_the_strategy_switches() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let failing = "x = 2\nassert x == 3, 'x is not 3'\nresult = x";
    let model = ScriptedModel::script(vec![
        program(failing),
        // The same program, comments and spacing aside.
        program("x = 2   # two\nassert x == 3, 'x is not 3'\n\nresult = x"),
        program("x = 3\nassert x == 3\nresult = x"),
        Reply::text("3"),
    ])
    .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("make x 3"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(calls_in(&log), 2, "the resubmitted program was never run");
    let snap = r.snapshot(&run).await.unwrap();
    let (t2, t3) = (turn_input(&snap, 2), turn_input(&snap, 3));
    assert_eq!(t2["strategy"], "regenerate", "an assertion failure is regenerated (the prior): {t2}");
    assert_eq!(t3["strategy"], "repair", "after a resubmission the other strategy: {t3}");
    let resubmitted = snap.steps.iter().find(|s| s.name == "turn-2.call-1").unwrap();
    assert_eq!(resubmitted.error_class.as_deref(), Some("code_error"));
    assert!(resubmitted.message.as_deref().unwrap().contains("identical"), "{resubmitted:?}");
    // Regenerating: the failed exchange is out of view, a hint stands in, warmer.
    let second = &model.requests()[1];
    assert_eq!(second["temperature"], 0.8);
    let sent = second["messages"].to_string();
    assert!(!sent.contains("assert x == 3"), "the failed program is not shown: {sent}");
    assert!(sent.contains("x is not 3") && sent.contains("fresh program"), "{sent}");
}

/// The task's own check: a program that runs but whose `result` does not match the
/// task's schema is a `code_error` whose message the model gets, corrected like any;
/// the schema is journaled with the task, so another process driving the run keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_failing_the_tasks_schema_is_a_code_error_corrected_in_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model = ScriptedModel::script(vec![
        program("result = {'total': 'three'}"),
        program("result = {'total': 3}"),
        Reply::text("3"),
    ])
    .await;
    let config = format!("{}{}", model.config("m"), code_tool(&log));
    let schema =
        json!({"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}});
    let r = runner(dir.path(), &config).await;
    let t = AgentTask { result_schema: Some(schema.clone()), ..task("the total, as a number") };
    let run = r.create_agent(&t, None).await.unwrap();
    // Driven by another process: it knows the schema from the journal alone.
    let r2 = runner(dir.path(), &config).await;
    assert_eq!(r2.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r2.snapshot(&run).await.unwrap();
    assert_eq!(snap.run.input["agent"]["result_schema"], schema, "journaled with the task");
    let failed = snap.steps.iter().find(|s| s.name == "turn-1.call-1").unwrap();
    assert_eq!(failed.error_class.as_deref(), Some("code_error"), "{failed:?}");
    let message = failed.message.as_deref().unwrap();
    assert!(
        message.starts_with("ResultSchemaError: `result` does not match the task's result_schema"),
        "{message}"
    );
    assert!(message.contains("/total"), "the path of the problem: {message}");
    assert_eq!(turn_input(&snap, 2)["after_kind"], "ResultSchemaError", "a correction followed");
    // Regenerated (the prior for a kind it cannot see in its program): the hint says why.
    let sent = model.requests()[1]["messages"].to_string();
    assert!(sent.contains("task's result_schema"), "the model was told: {sent}");
    let fixed = snap.steps.iter().find(|s| s.name == "turn-2.call-1").unwrap();
    assert_eq!(fixed.status, "succeeded", "a matching result goes through: {fixed:?}");
    assert_eq!(calls_in(&log), 2);
    // Without the task's schema the same first program is a result like any other.
    let model =
        ScriptedModel::script(vec![program("result = {'total': 'three'}"), Reply::text("three")]).await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("the total"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_error_twice_in_a_row_stops_the_run_with_its_partial_result() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model = ScriptedModel::script(vec![
        program("result = y + 1"),
        program("z = 1\nresult = y + z"),
        program("never asked"),
    ])
    .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("add"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let RunStatus::Failed { class, message } = &status else { panic!("{status:?}") };
    assert_eq!(*class, ErrorClass::CodeError);
    assert!(message.contains("same error twice"), "{message}");
    assert_eq!(model.calls(), 2, "no third program was asked for");
    let snap = r.snapshot(&run).await.unwrap();
    assert_eq!(snap.steps.last().unwrap().output.as_ref().unwrap()["status"], "stopped");
}

/// `on_unsolved = "escalate"`: a correction loop that gives up opens a ticket with the
/// context instead of failing the run; `retry` is one more correction round, `skip`
/// finishes with the partial result, `abort` ends the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_that_gives_up_escalates_and_the_persons_answer_is_carried_out() {
    use keel_runtime::inbox::{Guidance, resolve};
    for action in ["retry", "skip", "abort"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs.log");
        let model = ScriptedModel::script(vec![
            program("result = y + 1"),
            program("z = 1\nresult = y + z"),
            program("y = 1\nresult = y + 1"),
            Reply::text("2"),
        ])
        .await;
        let config = format!("{}{}[agent]\non_unsolved = \"escalate\"\n", model.config("m"), code_tool(&log));
        let r = runner(dir.path(), &config).await;
        let run = r.create_agent(&task("add one to y"), None).await.unwrap();
        let status = r.drive(&run).await.unwrap();
        let RunStatus::Escalated { ticket_id } = &status else { panic!("{action}: {status:?}") };
        assert_eq!(model.calls(), 2, "the same error twice: no third program asked for yet");
        let snap = r.snapshot(&run).await.unwrap();
        assert_eq!(snap.run.state, keel_journal::RunState::Escalated);
        let ticket = snap.tickets.iter().find(|t| &t.ticket_id == ticket_id).unwrap();
        assert_eq!(ticket.class, "code_error");
        assert!(ticket.summary.contains("same error twice"), "{}", ticket.summary);
        let c = &ticket.context;
        assert_eq!(c["task"], "add one to y");
        assert_eq!(c["last_program"], "z = 1\nresult = y + z");
        assert!(
            c["error"]["message"].as_str().unwrap().contains("NameError: name 'y' is not defined"),
            "{c}"
        );
        assert_eq!(c["strategies_tried"], json!(["repair"]), "{c}");
        assert_eq!(c["actions"], json!(["retry", "skip", "abort"]));
        // Waiting: a drive changes nothing while the ticket is open.
        assert!(matches!(r.drive(&run).await.unwrap(), RunStatus::Escalated { .. }));
        assert_eq!(model.calls(), 2);
        let guidance = match action {
            "retry" => Guidance::Retry { params: None },
            "skip" => Guidance::Skip,
            _ => Guidance::Abort,
        };
        resolve(&**r.journal(), ticket_id, &guidance, "alice").await.unwrap();
        let status = r.drive(&run).await.unwrap();
        let snap = r.snapshot(&run).await.unwrap();
        let result = snap.steps.iter().find(|s| s.name == "result").and_then(|s| s.output.clone());
        match action {
            "retry" => {
                assert_eq!(status, RunStatus::Completed, "one more round fixed it");
                assert_eq!(model.calls(), 4);
                assert_eq!(calls_in(&log), 3);
                assert_eq!(result.unwrap()["answer"], "2");
                let t3 = turn_input(&snap, 3);
                assert!(t3["strategy"].is_string(), "the extra turn is a correction round: {t3}");
            }
            "skip" => {
                assert_eq!(status, RunStatus::Completed);
                assert_eq!(model.calls(), 2, "nothing more asked");
                let result = result.unwrap();
                assert_eq!(result["status"], "partial", "{result}");
                assert!(result["reason"].as_str().unwrap().contains("alice"), "{result}");
            }
            _ => {
                assert_eq!(status, RunStatus::Cancelled, "abort ends the run, as every ticket's abort does");
                assert_eq!(model.calls(), 2);
            }
        }
    }
    // The default: the run fails with its partial result, no ticket.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model =
        ScriptedModel::script(vec![program("result = y + 1"), program("z = 1\nresult = y + z")]).await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("add one to y"), None).await.unwrap();
    assert!(matches!(r.drive(&run).await.unwrap(), RunStatus::Failed { class: ErrorClass::CodeError, .. }));
    assert!(r.snapshot(&run).await.unwrap().tickets.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_learns_which_strategy_fixes_which_error_kind_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    // Every NameError program is "repaired" into another NameError, then fixed by a
    // fresh program: repair never works here, regenerate does.
    let model = ScriptedModel::serve(|n, _| match n % 3 {
        0 => program(&format!("result = undefined_{n}")),
        1 => program(&format!("result = still_undefined_{n}")),
        _ => program("result = 1"),
    })
    .await;
    let config = format!("{}{}[agent]\nmax_turns = 4\n", model.config("m"), code_tool(&log));
    let r = runner(dir.path(), &config).await;
    use keel_runtime::agent::correct::{CorrectionMode, Strategy, choose, gate_target};
    for _ in 0..2 {
        let run = r.create_agent(&task("one"), None).await.unwrap();
        let _ = r.drive(&run).await.unwrap();
    }
    let repair = r.gate().outcomes(&gate_target(Strategy::Repair, "NameError"), ErrorClass::CodeError, 2);
    let regenerate =
        r.gate().outcomes(&gate_target(Strategy::Regenerate, "NameError"), ErrorClass::CodeError, 2);
    assert!(repair.failures >= 1 && repair.successes == 0, "{repair:?}");
    assert!(regenerate.successes >= 1, "{regenerate:?}");
    // The prior says repair for a NameError; what happened here says regenerate.
    let costs = r.correction_costs().await.unwrap();
    assert!(costs.mean(Strategy::Repair, "NameError").is_some(), "the turns' tokens were counted");
    assert_eq!(
        choose(CorrectionMode::Adaptive, r.gate(), costs, "NameError", None, false),
        Strategy::Regenerate
    );
    // Persisted with the gate, and the tokens read from the journal: a new process
    // starts from both.
    let r2 = runner(dir.path(), &config).await;
    let costs2 = r2.correction_costs().await.unwrap();
    for s in [Strategy::Repair, Strategy::Regenerate] {
        assert_eq!(
            costs2.mean(s, "NameError"),
            costs.mean(s, "NameError"),
            "{s:?}: the journal says the same"
        );
    }
    assert_eq!(
        choose(CorrectionMode::Adaptive, r2.gate(), costs2, "NameError", None, false),
        Strategy::Regenerate
    );
}

/// A tool that answers a list of orders for ids 1–3 and, for id 4, one flat order.
fn orders_tool() -> String {
    "[tools.orders]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"if [ {{id}} -lt 4 ]; then echo '[{\\\"id\\\": {{id}}, \\\"total\\\": 5}]'; \
     else echo '{\\\"id\\\": {{id}}, \\\"total\\\": 5}'; fi\"]\n\
     params = { type = \"object\", required = [\"id\"], properties = { id = { type = \"integer\" } } }\n"
        .to_owned()
}

async fn drift_events(r: &Runner, run: &str) -> Vec<keel_core::Event> {
    r.journal()
        .events(run, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            keel_journal::JournalEvent::Policy {
                event: ev @ keel_core::Event::SchemaDrift { .. }, ..
            } => Some(ev),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_an_unusual_shape_is_flagged_and_can_be_sent_back_for_correction() {
    for (policy, completes) in [("flag", true), ("correct", true), ("escalate", false)] {
        let dir = tempfile::tempdir().unwrap();
        let model = ScriptedModel::serve(|n, _| match n {
            0..=3 => Reply::call("orders", json!({"id": n + 1})),
            _ => Reply::text("done"),
        })
        .await;
        let config =
            format!("{}{}[agent]\non_schema_drift = \"{policy}\"\n", model.config("m"), orders_tool());
        let r = runner(dir.path(), &config).await;
        let run = r.create_agent(&task("totals of orders 1 to 4"), None).await.unwrap();
        let status = r.drive(&run).await.unwrap();
        assert_eq!(status == RunStatus::Completed, completes, "{policy}: {status:?}");
        let drift = drift_events(&r, &run).await;
        assert_eq!(drift.len(), 1, "{policy}: one answer drifted: {drift:?}");
        let snap = r.snapshot(&run).await.unwrap();
        let fourth = snap.steps.iter().find(|s| s.name == "turn-4.call-1").unwrap();
        match policy {
            "flag" => assert_eq!(fourth.status, "succeeded", "fed forward"),
            "correct" => {
                assert_eq!(fourth.error_class.as_deref(), Some("invalid_tool_call"));
                let sent = tool_messages(&model, 4).last().unwrap()["content"].to_string();
                assert!(sent.contains("shape it never used before"), "the model is told: {sent}");
            }
            _ => {
                assert!(matches!(status, RunStatus::Escalated { .. }));
                assert_eq!(model.calls(), 4, "nothing was fed forward");
            }
        }
    }
}

/// Each tool answer's structure hash is journaled beside it, and a run driven later
/// (another process) reads the usual shapes from those hashes, not from recomputing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shape_hash_is_journaled_with_each_answer_and_a_resumed_run_uses_it() {
    use keel_journal::{NewEvent, StepOutcome};
    use keel_runtime::agent::shape::fingerprint;
    // In the journal: every call's answer carries its hash; turns and the result do not.
    let dir = tempfile::tempdir().unwrap();
    let model =
        ScriptedModel::script(vec![Reply::call("orders", json!({"id": 1})), Reply::text("done")]).await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), orders_tool())).await;
    let run = r.create_agent(&task("order 1"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&run).await.unwrap();
    let call = snap.steps.iter().find(|s| s.name == "turn-1.call-1").unwrap();
    assert_eq!(call.shape.as_deref(), Some(fingerprint(call.output.as_ref().unwrap()).as_str()));
    assert!(snap.steps.iter().filter(|s| s.name != "turn-1.call-1").all(|s| s.shape.is_none()));
    let events = r.journal().events(&run, 0, 1000).await.unwrap();
    let journaled = events.iter().find_map(|e| match &e.event {
        JournalEvent::StepFinished { step, outcome: StepOutcome::Succeeded { shape: Some(h), .. } }
            if *step == call.step =>
        {
            Some(h.clone())
        }
        _ => None,
    });
    assert_eq!(journaled, call.shape, "the hash is in the step's finished record");

    // Resumed: three answers journaled (by an earlier process) as lists, under the hash
    // of the flat shape. The fourth, flat, answer is usual by the journaled hashes —
    // recomputed from the outputs it would be drift, and be sent back for correction.
    let dir = tempfile::tempdir().unwrap();
    let model =
        ScriptedModel::script(vec![Reply::call("orders", json!({"id": 4})), Reply::text("done")]).await;
    let config = format!("{}{}[agent]\non_schema_drift = \"correct\"\n", model.config("m"), orders_tool());
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("orders 1 to 4"), None).await.unwrap();
    let flat = fingerprint(
        &json!({"json": {"id": 4, "total": 5}, "stdout": "", "stderr": "", "exit_code": 0, "truncated": false}),
    );
    let mut events = Vec::new();
    for n in 1..=3u32 {
        let (turn, call) = (2 * (n - 1), 2 * (n - 1) + 1);
        let message = json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("c{n}"),
            "type": "function", "function": {"name": "orders", "arguments": json!({"id": n}).to_string()}}]});
        let output = json!({"message": message, "charged": {"tokens": 10, "cost_micros": 0, "attempts": 1}});
        let answer = json!({"json": [{"id": n, "total": 5}], "stdout": "", "stderr": "", "exit_code": 0, "truncated": false});
        assert_ne!(fingerprint(&answer), flat);
        for event in [
            JournalEvent::StepStarted {
                step: turn,
                name: format!("turn-{n}"),
                target: "model:m".into(),
                input: json!({"turn": n}),
            },
            JournalEvent::StepFinished {
                step: turn,
                outcome: StepOutcome::Succeeded { output, shape: None },
            },
            JournalEvent::StepStarted {
                step: call,
                name: format!("turn-{n}.call-1"),
                target: "orders".into(),
                input: json!({"id": n}),
            },
            JournalEvent::StepFinished {
                step: call,
                outcome: StepOutcome::Succeeded { output: answer, shape: Some(flat.clone()) },
            },
        ] {
            events.push(NewEvent::new(&run, event));
        }
    }
    r.journal().append(&events).await.unwrap();
    let r2 = runner(dir.path(), &config).await;
    assert_eq!(r2.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(model.calls(), 2, "the journaled turns were not asked again");
    let snap = r2.snapshot(&run).await.unwrap();
    let fourth = snap.steps.iter().find(|s| s.name == "turn-4.call-1").unwrap();
    assert_eq!(fourth.status, "succeeded", "usual by the journaled hashes: {fourth:?}");
    assert_eq!(fourth.shape.as_deref(), Some(flat.as_str()));
    assert!(drift_events(&r2, &run).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_stops_an_error_kind_whose_corrections_never_succeed() {
    use keel_runtime::agent::correct::{Strategy, gate_target};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model =
        ScriptedModel::script(vec![program("assert 1 == 2, 'impossible'"), program("never asked")]).await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    // What earlier runs taught the gate: neither strategy ever fixed an AssertionError.
    for s in [Strategy::Repair, Strategy::Regenerate] {
        for _ in 0..4 {
            r.gate().record(&gate_target(s, "AssertionError"), ErrorClass::CodeError, 2, false);
        }
    }
    let run = r.create_agent(&task("an impossible check"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let RunStatus::Failed { class, message } = &status else { panic!("{status:?}") };
    assert_eq!(*class, ErrorClass::CodeError);
    assert!(message.contains("never succeeded"), "{message}");
    assert_eq!(model.calls(), 1, "no tokens spent on a correction the record says fails");
}

/// The whole loop with the sandboxed `code` tool: the model's KeyError is repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandboxed_code_tool_in_the_loop_repairs_a_key_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::script(vec![
        Reply::call("py", json!({"program": "d = {'sum': 3}\nresult = d['total']"})),
        Reply::call("py", json!({"program": "d = {'sum': 3}\nresult = d['sum']"})),
        Reply::text("3"),
    ])
    .await;
    let config = format!("{}[tools.py]\nkind = \"code\"\ntimeout = \"20s\"\n", model.config("m"));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("the sum of d"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&run).await.unwrap();
    let failed = snap.steps.iter().find(|s| s.name == "turn-1.call-1").unwrap();
    assert_eq!(failed.error_class.as_deref(), Some("code_error"));
    assert!(failed.message.as_deref().unwrap().starts_with("KeyError: 'total'"), "{failed:?}");
    assert_eq!(turn_input(&snap, 2)["after_kind"], "KeyError");
    let fixed = snap.steps.iter().find(|s| s.name == "turn-2.call-1").unwrap();
    assert_eq!(fixed.output.as_ref().unwrap()["result"], 3, "{fixed:?}");
}

/// A ticket on an agent's call, answered by a person: `retry` carries the call out once
/// the service is fixed and the run goes on to the model's answer; `skip` goes on
/// without it, the model told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_on_an_agents_call_is_answered_and_the_run_goes_on() {
    use keel_runtime::inbox::{Guidance, resolve};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    for action in ["retry", "skip"] {
        let fixed = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (f, h) = (fixed.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/op",
            axum::routing::post(move || {
                h.fetch_add(1, Ordering::SeqCst);
                let ok = f.load(Ordering::SeqCst);
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "{\"done\": true}")
                    } else {
                        (axum::http::StatusCode::UNAUTHORIZED, "bad token")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let model = ScriptedModel::script(vec![Reply::call("op", json!({})), Reply::text("finished")]).await;
        let config =
            format!("{}[tools.op]\nkind = \"http\"\nurl = \"http://{addr}/op\"\n", model.config("m"));
        let r = runner(dir.path(), &config).await;
        let run = r.create_agent(&task("do it"), None).await.unwrap();
        let RunStatus::Escalated { ticket_id } = r.drive(&run).await.unwrap() else { panic!("{action}") };
        // Still waiting: a drive changes nothing while the ticket is open.
        assert!(matches!(r.drive(&run).await.unwrap(), RunStatus::Escalated { .. }));
        assert_eq!(model.calls(), 1);
        fixed.store(true, Ordering::SeqCst);
        let guidance = if action == "retry" { Guidance::Retry { params: None } } else { Guidance::Skip };
        resolve(&**r.journal(), &ticket_id, &guidance, "alice").await.unwrap();
        assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed, "{action}");
        assert_eq!(model.calls(), 2, "{action}: the model answered once the call was settled");
        let sent = tool_messages(&model, 1)[0]["content"].to_string();
        match action {
            "retry" => {
                assert_eq!(hits.load(Ordering::SeqCst), 2, "called again once, after the person said so");
                assert!(sent.contains("done"), "the retried call's answer went to the model: {sent}");
            }
            _ => {
                assert_eq!(hits.load(Ordering::SeqCst), 1, "a skipped call is not made");
                assert!(sent.contains("skipped"), "the model is told it was skipped: {sent}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_with_too_many_calls_runs_only_its_cap_and_answers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let calls: Vec<(String, String)> =
        (0..40).map(|i| ("lookup".to_owned(), json!({"id": i}).to_string())).collect();
    let model = ScriptedModel::script(vec![Reply::Tools(calls), Reply::text("enough")]).await;
    let config = format!("{}{}[agent]\nmax_calls_per_turn = 3\n", model.config("m"), lookup_tool(&log));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("look everything up"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    assert_eq!(calls_in(&log), 3, "only the cap ran");
    let answers = tool_messages(&model, 1);
    assert_eq!(answers.len(), 40, "every call is answered, as the API requires");
    assert!(answers[39]["content"].as_str().unwrap().contains("not carried out"), "{}", answers[39]);
}

/// One model turn is one attempt of the run's budget, one tool call another: a run of
/// two turns and a call fits in three (each charged once, never twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_and_each_call_is_one_attempt_of_the_runs_budget() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let model = ScriptedModel::script(vec![Reply::call("lookup", json!({"id": 7})), Reply::text("42")]).await;
    // The model's own policy (a timeout, no retries) changes nothing to what a turn costs.
    let config = format!(
        "{}policy = {{ timeout = \"600s\", retry = {{ max_attempts = 1 }} }}\n{}[run.budget]\nattempts = 3\n",
        model.config("m"),
        lookup_tool(&log)
    );
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("total of 7"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let snap = r.snapshot(&run).await.unwrap();
    let charged: Vec<u64> = snap
        .steps
        .iter()
        .filter(|s| s.target == "model:m")
        .filter_map(|s| s.output.as_ref().and_then(|o| o["charged"]["attempts"].as_u64()))
        .collect();
    assert_eq!(status, RunStatus::Completed, "charged per turn: {charged:?}");
    assert_eq!(charged, [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerating_after_a_repair_takes_the_whole_failed_chain_out_of_view() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let model = ScriptedModel::script(vec![
        program("d = {}\nresult = d['first']"),
        program("d = {}\nresult = d['second']"),
        program("result = 1"),
        Reply::text("1"),
    ])
    .await;
    let r = runner(dir.path(), &format!("{}{}", model.config("m"), code_tool(&log))).await;
    let run = r.create_agent(&task("one"), None).await.unwrap();
    assert_eq!(r.drive(&run).await.unwrap(), RunStatus::Completed);
    let snap = r.snapshot(&run).await.unwrap();
    assert_eq!(turn_input(&snap, 2)["strategy"], "repair");
    assert_eq!(turn_input(&snap, 3)["strategy"], "regenerate", "repair failed once: the other");
    let third = model.requests()[2]["messages"].to_string();
    assert!(
        !third.contains("d['first']") && !third.contains("d['second']"),
        "no failed program in view: {third}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_keeps_resubmitting_failed_programs_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let p = "d = {}\nresult = d['x']";
    let model = ScriptedModel::script(vec![program(p), program(p), program(p), program("never asked")]).await;
    let config = format!("{}{}[agent]\ncorrection = \"repair\"\n", model.config("m"), code_tool(&log));
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("x"), None).await.unwrap();
    let status = r.drive(&run).await.unwrap();
    let RunStatus::Failed { message, .. } = &status else { panic!("{status:?}") };
    assert!(message.contains("keeps resubmitting"), "{message}");
    assert_eq!((model.calls(), calls_in(&log)), (3, 1), "run once, refused twice, then stopped");
}

/// The run's deadline holds inside a call: a tool still running when it passes is
/// stopped, and the run ends `timed_out` with what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_deadline_stops_a_call_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::serve(|_, _| Reply::call("slow", json!({}))).await;
    let config = format!(
        "{}[tools.slow]\nkind = \"command\"\nargv = [\"sleep\", \"30\"]\npolicy = {{ timeout = {{ attempt = \"60s\" }} }}\n\
         [run]\ndeadline = \"1s\"\n",
        model.config("m")
    );
    let r = runner(dir.path(), &config).await;
    let run = r.create_agent(&task("wait"), None).await.unwrap();
    let started = tokio::time::Instant::now();
    let status = r.drive(&run).await.unwrap();
    assert_eq!(status, RunStatus::TimedOut);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the 30 s call did not run out");
    let snap = r.snapshot(&run).await.unwrap();
    let call = snap.steps.iter().find(|s| s.name == "turn-1.call-1").unwrap();
    assert_eq!(call.error_class.as_deref(), Some("deadline_exceeded"), "{call:?}");
}
