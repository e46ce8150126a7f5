//! One `Idempotency-Key`, one effect: clients hanging up at random points, a process
//! that died between creating the key's run and working it, another instance working
//! the run first, and a key reused with other arguments.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_examples::payments::Faults;
use keel_runtime::runner::NullObserver;
use keel_runtime::{Plan, PlanStep, Runner};
use keel_server::api::tools::{invocation_key, invocation_run_id};
use serde_json::{Value, json};

use crate::support::{AGENT, Server};

fn charge(order: i64, amount: i64) -> Value {
    json!({"params": {"order": order, "amount": amount}})
}

/// The orders charged, sorted.
fn orders(s: &Server) -> Vec<i64> {
    let mut o: Vec<i64> = s.payments.charges().iter().map(|c| c["order"].as_i64().unwrap()).collect();
    o.sort_unstable();
    o
}

/// Sends an invocation on a raw socket and hangs up `after` later, whatever happened.
fn hang_up(addr: &str, key: &str, body: &Value, after: Duration) {
    let body = body.to_string();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST /api/tools/charge/invoke HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {AGENT}\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    // The fault itself, not a wait for something: the client dies this long after sending.
    std::thread::sleep(after);
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_at_random_points_then_retrying_are_charged_once() {
    // Each charge is recorded, then answered 10 ms later: hang-ups land before the
    // run exists, while it is created, mid-charge and after the answer.
    let s = Server::start(Faults { charge_delay_ms: 10, ..Faults::default() }, "").await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    const KEYS: i64 = 30;
    let mut rng = fastrand::Rng::with_seed(10);
    let mut calls = Vec::new();
    for order in 0..KEYS {
        let after = Duration::from_micros(rng.u64(0..15_000));
        let (addr, http, url) = (addr.clone(), s.http.clone(), s.url("/api/tools/charge/invoke"));
        calls.push(tokio::spawn(async move {
            let key = format!("order-{order}");
            let body = charge(order, 10 + order);
            let (k, b) = (key.clone(), body.clone());
            tokio::task::spawn_blocking(move || hang_up(&addr, &k, &b, after)).await.unwrap();
            // The client retries under the same key until it has an answer.
            let mut answers = Vec::new();
            for _ in 0..2 {
                let resp = http
                    .post(&url)
                    .bearer_auth(AGENT)
                    .header("idempotency-key", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                answers.push((resp.status().as_u16(), resp.json::<Value>().await.unwrap()));
            }
            (order, answers)
        }));
    }
    for call in calls {
        let (order, answers) = call.await.unwrap();
        for (status, body) in &answers {
            assert_eq!(*status, 200, "order {order}: a retry is answered from the key's run: {body}");
            assert_eq!(body["output"]["body"]["order"], order, "{body}");
        }
        assert_eq!(answers[0].1["run_id"], answers[1].1["run_id"], "one run per key");
        assert_eq!(answers[1].1["replayed"], true);
        assert_eq!(answers[0].1["output"], answers[1].1["output"], "the same charge, replayed");
    }
    assert_eq!(orders(&s), (0..KEYS).collect::<Vec<_>>(), "every key charged exactly once");
    // The server's workers have nothing left: no orphan run charges later.
    let runs = s.state.journal.run_ids().await.unwrap();
    assert_eq!(runs.len(), KEYS as usize, "one run per key, no orphan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_process_died_after_creating_its_run_is_answered_from_that_run() {
    let s = Server::start(Faults::default(), "").await;
    let body = charge(41, 20);
    // A process created the key's run, took its lease, and died before charging.
    let key = invocation_key("charge", true, Some("died-41"), &body["params"]).unwrap();
    let run_id = invocation_run_id(&key);
    let dead = Runner::new(
        s.state.config.clone(),
        s.state.journal.clone(),
        s.state.clock.clone(),
        Arc::new(NullObserver),
    )
    .await
    .unwrap();
    let plan = Plan {
        name: Some("invoke charge".into()),
        input: body["params"].clone(),
        deadline: None,
        steps: vec![PlanStep {
            id: Some("charge".into()),
            tool: "charge".into(),
            params: body["params"].clone(),
        }],
    };
    // (Its lease first, so that no worker of the server takes the run in between.)
    let lease = s.state.journal.acquire_lease(&run_id, "dead-process", Duration::from_secs(2)).await.unwrap();
    assert!(lease.is_some());
    assert!(dead.create_with_id(&run_id, &plan).await.unwrap());
    assert!(s.payments.charges().is_empty());

    // The client's retry waits for the dead holder's lease to expire, then the run is
    // worked and answered: not a 504, not a second run.
    let key_header = [("idempotency-key", "died-41")];
    let (status, done) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(body.clone()), &key_header).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["run_id"], run_id.as_str());
    assert_eq!(done["replayed"], true, "the run was started by the first try");
    assert_eq!(done["output"]["body"]["order"], 41);
    let (status, again) = s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(body), &key_header).await;
    assert_eq!((status, &again["output"]), (200, &done["output"]));
    assert_eq!(orders(&s), [41], "charged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_another_instance_works_first_is_answered_from_its_real_state() {
    let s = Server::start(Faults::default(), "").await;
    let body = charge(7, 30);
    let key = invocation_key("charge", true, Some("raced-7"), &body["params"]).unwrap();
    let run_id = invocation_run_id(&key);
    // Another instance (its own lease owner on the same journal) whose worker takes the
    // run the moment it exists, before the invoking request can.
    let other = Runner::new(
        s.state.config.clone(),
        s.state.journal.clone(),
        s.state.clock.clone(),
        Arc::new(NullObserver),
    )
    .await
    .unwrap();
    let ttl = Duration::from_secs(30);
    assert!(s.state.journal.acquire_lease(&run_id, other.owner(), ttl).await.unwrap().is_some());
    let (http, url) = (s.http.clone(), s.url("/api/tools/charge/invoke"));
    let call = tokio::spawn(async move {
        let resp = http
            .post(url)
            .bearer_auth(AGENT)
            .header("idempotency-key", "raced-7")
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    let start = Instant::now();
    while s.state.journal.snapshot(&run_id).await.unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the invocation never created its run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    other.drive(&run_id).await.unwrap();
    let (status, answer) = call.await.unwrap();
    assert_eq!(status, 200, "answered from the run, not a 202 with no approval: {answer}");
    assert_eq!(answer["output"]["body"]["order"], 7);
    assert_eq!(answer["replayed"], false, "this request created the run");
    assert_eq!(orders(&s), [7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_call_past_its_wait_answers_its_state_never_an_empty_approval() {
    let s = Server::start(Faults::default(), "").await;
    let body = charge(8, 30);
    let key = invocation_key("charge", true, Some("held-8"), &body["params"]).unwrap();
    let run_id = invocation_run_id(&key);
    // Held by a live process that does not finish within the caller's wait.
    assert!(
        s.state
            .journal
            .acquire_lease(&run_id, "busy-elsewhere", Duration::from_secs(30))
            .await
            .unwrap()
            .is_some()
    );
    let (status, pending) = s
        .post_with(
            Some(AGENT),
            "/api/tools/charge/invoke?wait=300ms",
            Some(body),
            &[("idempotency-key", "held-8")],
        )
        .await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["state"], "running", "{pending}");
    assert!(pending.get("approval_id").is_none(), "no approval is claimed where there is none: {pending}");
    assert_eq!(pending["poll_url"], format!("/api/runs/{run_id}"));
    assert!(s.payments.charges().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_other_arguments_is_refused_as_a_conflict() {
    let s = Server::start(Faults::default(), "").await;
    let key = [("idempotency-key", "pay-1")];
    let (status, first) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(charge(1, 20)), &key).await;
    assert_eq!(status, 200, "{first}");
    let (status, e) = s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(charge(1, 99)), &key).await;
    assert_eq!((status, e["class"].as_str()), (422, Some("conflict")), "never the first call's result: {e}");
    assert!(e["message"].as_str().unwrap().contains("other arguments"), "{e}");
    assert!(e.get("output").is_none());
    // The same arguments written in another order are the same call.
    let (status, same) = s
        .post_with(
            Some(AGENT),
            "/api/tools/charge/invoke",
            Some(json!({"params": {"amount": 20, "order": 1}})),
            &key,
        )
        .await;
    assert_eq!((status, &same["output"], &same["replayed"]), (200, &first["output"], &json!(true)));
    assert_eq!(orders(&s), [1], "the refused call charged nothing");
}
