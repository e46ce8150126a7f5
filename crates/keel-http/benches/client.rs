//! The plain-http path: one request over a kept-alive loopback connection, through
//! keel-http's `Client` and through the bare hyper-util client the gateway used before
//! (an `HttpConnector`, the same pool settings). The difference is keel-http's cost on
//! the path every `http://` upstream takes.
//!
//! Run: `cargo bench -p keel-http --bench client`. Both clients share one runtime and
//! one server and take turns request by request, so that the noise of a shared machine
//! falls on both.

#![allow(clippy::disallowed_methods)] // A benchmark measures real time.
#![allow(missing_docs)] // criterion_group! generates undocumented items.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_http::{Client, Proxies, TlsConfig};

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"Say hello"}]}"#;

fn request(uri: &http::Uri) -> http::Request<Full<Bytes>> {
    http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

struct Clients {
    uri: http::Uri,
    legacy: Legacy<HttpConnector, Full<Bytes>>,
    keel: Client,
}

impl Clients {
    async fn legacy(&self) -> Bytes {
        let resp = self.legacy.request(request(&self.uri)).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    async fn keel(&self) -> Bytes {
        let resp = self.keel.send(request(&self.uri)).await.unwrap();
        keel_http::read_body(resp.into_body(), 32 << 20, &self.uri).await.unwrap()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let uri: http::Uri = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(|| async { "{\"ok\":true}" }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1/chat/completions").parse().unwrap()
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    let legacy = Legacy::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(connector);
    let keel = Client::shared(&TlsConfig::default(), &Proxies::none()).unwrap();
    let clients = &Clients { uri, legacy, keel };

    // Each measured request follows one of the other client, so that the load of a
    // shared machine drifts over both alike; only the measured one is counted.
    let mut group = c.benchmark_group("plain http request");
    group.bench_function("hyper-util HttpConnector (before)", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                clients.keel().await;
                let start = Instant::now();
                std::hint::black_box(clients.legacy().await);
                total += start.elapsed();
            }
            total
        });
    });
    group.bench_function("keel-http Client", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                clients.legacy().await;
                let start = Instant::now();
                std::hint::black_box(clients.keel().await);
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
