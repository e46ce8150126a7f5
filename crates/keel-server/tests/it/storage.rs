//! `keel serve` through a storage outage: a journal that refuses writes (a full disk)
//! and a PostgreSQL server taken away (a proxy cut). While the journal cannot be
//! written `/readyz` answers 503 within its bound and calls fail with a clear class;
//! when it can again, both recover without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_examples::payments::Faults;
use keel_journal::{Faulty, Journal};
use serde_json::{Value, json};

use crate::support::{AGENT, Server, Storage};

fn charge(order: i64) -> Value {
    json!({"params": {"order": order, "amount": 10}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_the_server_recovers_and_readyz_tells_the_truth() {
    let faulty: Arc<std::sync::OnceLock<Arc<Faulty>>> = Arc::default();
    let slot = faulty.clone();
    let storage = Storage {
        url: None,
        wrap: Box::new(move |j| {
            let f = Faulty::new(j);
            let _ = slot.set(f.clone());
            f as Arc<dyn Journal>
        }),
    };
    let s = Server::start_with(Faults::default(), "", storage).await;
    let faulty = faulty.get().unwrap().clone();
    let invoke = |order: i64| {
        let key = format!("disk-{order}");
        let s = &s;
        async move {
            s.post_with(
                Some(AGENT),
                "/api/tools/charge/invoke",
                Some(charge(order)),
                &[("idempotency-key", &key)],
            )
            .await
        }
    };
    assert_eq!(invoke(1).await.0, 200);
    assert_eq!(s.get(Some(AGENT), "/readyz").await.0, 200);

    faulty.fail_writes(true);
    let (status, e) = invoke(2).await;
    assert_eq!((status, e["class"].as_str()), (502, Some("server_error")), "{e}");
    let (status, ready) = s.get(Some(AGENT), "/readyz").await;
    assert_eq!(
        (status, ready["class"].as_str()),
        (503, Some("server_error")),
        "not ready while full: {ready}"
    );
    assert!(ready["message"].as_str().unwrap().contains("cannot be written"), "{ready}");

    faulty.fail_writes(false);
    let (status, ready) = s.get(Some(AGENT), "/readyz").await;
    assert_eq!(status, 200, "ready again without a restart: {ready}");
    for order in 3..6 {
        let (status, done) = invoke(order).await;
        assert_eq!(status, 200, "calls succeed again: {done}");
    }
    // The key that failed mid-outage is answered from its run on retry, charged once.
    let (status, retried) = invoke(2).await;
    assert_eq!(status, 200, "{retried}");
    let mut orders: Vec<i64> = s.payments.charges().iter().map(|c| c["order"].as_i64().unwrap()).collect();
    orders.sort_unstable();
    assert_eq!(orders, [1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_answers_503_fast_bounded_errors_and_recovers() {
    let url = keel_testkit::postgres_database().await;
    let proxy = keel_testkit::Proxy::start(keel_testkit::target_of(&url)).await;
    let storage = Storage { url: Some(proxy.url_for(&url)), ..Storage::default() };
    let s = Server::start_with(Faults::default(), "", storage).await;
    let (status, ready) = s.get(Some(AGENT), "/readyz").await;
    assert_eq!((status, ready["storage"].as_str()), (200, Some("postgres")), "{ready}");
    let key = [("idempotency-key", "pg-1")];
    assert_eq!(s.post_with(Some(AGENT), "/api/tools/charge/invoke", Some(charge(1)), &key).await.0, 200);

    proxy.cut();
    // Bounds, not measurements: the probe gives up after 1 s; hanging 10 s+ fails.
    let start = Instant::now();
    let (status, ready) = s.get(Some(AGENT), "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(matches!(ready["class"].as_str(), Some("timeout" | "network")), "{ready}");
    assert!(start.elapsed() < Duration::from_secs(5), "readyz answered within its bound");
    let start = Instant::now();
    let key = [("idempotency-key", "pg-2")];
    let (status, e) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke?wait=2s", Some(charge(2)), &key).await;
    assert!(matches!(status, 502 | 504), "{status} {e}");
    assert!(matches!(e["class"].as_str(), Some("timeout" | "network" | "server_error")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10), "the invocation honoured ?wait=2s");

    proxy.restore();
    let start = Instant::now();
    loop {
        let (status, _) = s.get(Some(AGENT), "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "ready again after the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, done) =
        s.post_with(Some(AGENT), "/api/tools/charge/invoke?wait=10s", Some(charge(2)), &key).await;
    assert_eq!(status, 200, "the retried key is answered after the outage: {done}");
    let (status, done) = s
        .post_with(Some(AGENT), "/api/tools/charge/invoke", Some(charge(3)), &[("idempotency-key", "pg-3")])
        .await;
    assert_eq!(status, 200, "{done}");
    let mut orders: Vec<i64> = s.payments.charges().iter().map(|c| c["order"].as_i64().unwrap()).collect();
    orders.sort_unstable();
    assert_eq!(orders, [1, 2, 3], "each key charged once across the outage");
}
