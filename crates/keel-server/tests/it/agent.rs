//! `POST /api/runs` with a task (issue 16): Keel's own agent, driven by the server's
//! workers through the server's gateway, its answer in the run.

use keel_examples::payments::Faults;
use keel_testkit::model::{Reply, ScriptedModel};
use serde_json::json;

use crate::support::{AGENT, APPROVER, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_posted_to_api_runs_is_carried_out_by_the_agent() {
    let model = ScriptedModel::script(vec![
        Reply::call("charge", json!({"order": 5, "amount": 12})),
        Reply::text("Order 5 is charged."),
    ])
    .await;
    let s = Server::start(Faults::default(), &model.config("m")).await;
    let (status, e) = s.post(Some(APPROVER), "/api/runs", Some(json!({"task": "charge order 5"}))).await;
    assert_eq!(status, 403, "an approver key starts nothing: {e}");
    let (status, e) = s.post(Some(AGENT), "/api/runs", Some(json!({"task": "x", "model": "nope"}))).await;
    assert_eq!(status, 400, "{e}");
    assert!(e.to_string().contains("no model `nope`"), "{e}");
    let (status, e) = s.post(Some(AGENT), "/api/runs", Some(json!({"model": "m"}))).await;
    assert_eq!(status, 400, "a model without a task: {e}");

    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(json!({"task": "charge order 5"}))).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap();
    let run = s.until_run(run_id, |r| r["state"]["run"]["state"] == "completed").await;
    let steps = run["state"]["steps"].as_array().unwrap();
    assert_eq!(steps.last().unwrap()["output"]["answer"], "Order 5 is charged.");
    assert_eq!(run["state"]["run"]["input"]["owner"], "bot", "the run belongs to the key that started it");
    assert_eq!(model.calls(), 2);
    let charges = s.payments.charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["order"], 5);
}

/// The task's own check comes with the task: a schema that does not compile is a 400
/// saying so, before anything is recorded; a good one is journaled with the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_result_schema_is_checked_up_front_and_journaled_with_the_run() {
    let model = ScriptedModel::script(vec![Reply::text("nothing to compute")]).await;
    let s = Server::start(Faults::default(), &model.config("m")).await;
    let bad = json!({"task": "x", "result_schema": {"type": 7}});
    let (status, e) = s.post(Some(AGENT), "/api/runs", Some(bad)).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["class"], "invalid_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("result_schema is not a valid JSON Schema"), "{e}");
    let (status, e) = s.post(Some(AGENT), "/api/runs", Some(json!({"result_schema": {}}))).await;
    assert_eq!(status, 400, "a schema without a task: {e}");

    let schema = json!({"type": "object", "required": ["total"]});
    let (status, started) =
        s.post(Some(AGENT), "/api/runs", Some(json!({"task": "the total", "result_schema": schema}))).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap();
    let run = s.until_run(run_id, |r| r["state"]["run"]["state"] == "completed").await;
    assert_eq!(run["state"]["run"]["input"]["agent"]["result_schema"], schema);
}
