//! Every call is journaled through keel-journal, its prompt hashed.

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_gateway::journal::{DecisionsOnly, GATEWAY_RUN};
use keel_gateway::{Gateway, WriterJournal, router};
use keel_journal::{JournalEvent, JournalOptions, JournalWriter};

use crate::support::{Fake, Reply, ask, model, post_chat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_decisions_land_in_the_journal_with_prompts_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let journal =
        keel_journal::open(&format!("sqlite:{}/j.db", dir.path().display()), JournalOptions::default())
            .await
            .unwrap();
    let writer = JournalWriter::spawn(journal.clone(), 64);
    let fake = Fake::start().await;
    fake.script([Reply::Status { code: 500, retry_after: None, body: "x" }]);
    let models: BTreeMap<String, _> = [("gpt".to_owned(), model(&fake, "m"))].into_iter().collect();
    let gateway = Gateway::builder(models)
        .env(|_| None)
        .sink(Arc::new(DecisionsOnly(writer.sink(GATEWAY_RUN))))
        .journal(Arc::new(WriterJournal::new(writer.clone())))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(gateway))).await.unwrap() });

    assert_eq!(post_chat(&url, ask("gpt"), &[("x-keel-run", "run-9")]).await.status, 200);
    assert_eq!(post_chat(&url, ask("gpt"), &[]).await.status, 200);
    writer.flush().await.unwrap();

    let events = journal.events("run-9", 0, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.kind()).collect();
    assert_eq!(kinds, ["model_called"], "one event a call");
    let JournalEvent::ModelCalled { model, record: output } = &events[0].event else { panic!() };
    assert_eq!(model, "gpt");
    let text = output["prompt"].to_string();
    assert!(text.contains("sha256:") && !text.contains("Say hello"), "the prompt is hashed: {text}");
    assert_eq!((output["attempts"].as_u64(), output["answered_by"].as_str()), (Some(2), Some("gpt")));
    assert!(output.get("failures").is_none(), "a retried attempt is not a model failure: {output}");

    // Policy decisions (the retry) go to the gateway's run, with the call without a run.
    let gateway_run: Vec<&str> = journal
        .events(GATEWAY_RUN, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.kind())
        .collect::<Vec<_>>()
        .leak()
        .to_vec();
    assert!(gateway_run.contains(&"policy.retry_scheduled"), "{gateway_run:?}");
    assert!(gateway_run.contains(&"policy.attempt_ended"), "the failed attempt: {gateway_run:?}");
    assert!(!gateway_run.contains(&"policy.attempt_started"), "{gateway_run:?}");
    assert_eq!(gateway_run.iter().filter(|k| **k == "model_called").count(), 1);
}

/// A journal that is as far behind as it is told.
#[derive(Debug)]
struct Behind(std::sync::atomic::AtomicUsize);

impl keel_gateway::CallJournal for Behind {
    fn record(&self, _: keel_gateway::CallRecord) {}

    fn backlog(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_too_far_behind_sheds_calls_with_503_and_retry_after() {
    let fake = Fake::start().await;
    let models: BTreeMap<String, _> = [("gpt".to_owned(), model(&fake, "m"))].into_iter().collect();
    let behind = Arc::new(Behind(std::sync::atomic::AtomicUsize::new(0)));
    let config = keel_gateway::GatewayConfig { max_journal_backlog: 1_000, ..Default::default() };
    let gateway =
        Gateway::builder(models).env(|_| None).config(config).journal(behind.clone()).build().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(gateway))).await.unwrap() });

    assert_eq!(post_chat(&url, ask("gpt"), &[]).await.status, 200);
    behind.0.store(5_000, std::sync::atomic::Ordering::Relaxed);
    let shed = post_chat(&url, ask("gpt"), &[]).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.headers["retry-after"], "1");
    let calls_before = fake.hits();
    behind.0.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(post_chat(&url, ask("gpt"), &[]).await.status, 200, "served again once the journal caught up");
    assert_eq!(fake.hits(), calls_before + 1, "the shed call never reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_is_journaled_in_its_run_and_as_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let journal =
        keel_journal::open(&format!("sqlite:{}/j.db", dir.path().display()), JournalOptions::default())
            .await
            .unwrap();
    let writer = JournalWriter::spawn(journal.clone(), 64);
    let fake = Fake::start().await;
    let models: BTreeMap<String, _> = [("gpt".to_owned(), model(&fake, "m"))].into_iter().collect();
    let config = keel_gateway::GatewayConfig {
        run_budget: keel_core::BudgetConfig { tokens: Some(5), ..Default::default() },
        ..Default::default()
    };
    let gateway = Gateway::builder(models)
        .env(|_| None)
        .config(config)
        .sink(Arc::new(DecisionsOnly(writer.sink(GATEWAY_RUN))))
        .journal(Arc::new(WriterJournal::new(writer.clone())))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(Arc::new(gateway))).await.unwrap() });

    assert_eq!(post_chat(&url, ask("gpt"), &[("x-keel-run", "run-b")]).await.status, 429);
    writer.flush().await.unwrap();
    let events = journal.events("run-b", 0, 100).await.unwrap();
    let JournalEvent::ModelCalled { record, .. } = &events[0].event else { panic!("{events:?}") };
    assert_eq!(record["error"]["class"], "budget_exceeded", "{record}");
    let decisions = journal.events(GATEWAY_RUN, 0, 100).await.unwrap();
    let refusal = decisions.iter().find(|e| e.event.kind() == "policy.budget_exceeded");
    let refusal = refusal.unwrap_or_else(|| panic!("no budget_exceeded event: {decisions:?}"));
    assert!(serde_json::to_string(&refusal.event).unwrap().contains("run:run-b"), "{:?}", refusal.event);
    assert_eq!(fake.hits(), 0);
}
