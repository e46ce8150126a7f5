//! What alert routing costs a call, with the alert sink down.
//!
//! Run: `cargo bench -p keel-telemetry --bench alert`. Each iteration is one pipeline
//! call whose target fails with a terminal class (one attempt, an `attempt_ended`
//! failure for the router). `null_sink` sends the events nowhere; `router_sink_down`
//! feeds them to the alert router, whose only sink accepts connections and never
//! answers (every delivery waits out its timeout and retries). The difference is what
//! a down sink costs the call path.

#![allow(clippy::disallowed_methods)] // A benchmark measures real time.
#![allow(missing_docs)] // criterion_group! generates undocumented items.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_core::{ErrorClass, EventSink, Failure, NullSink, Pipeline, PolicyConfig, TokioClock};
use keel_telemetry::alert::{self, AlertsConfig};

fn pipeline(sink: Arc<dyn EventSink>) -> Pipeline {
    let mut config = PolicyConfig { seed: Some(1), ..PolicyConfig::default() };
    config.breaker.enabled = false;
    Pipeline::builder("pay", config).sink(sink).build()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // A sink that is down: it accepts and never answers.
    let hole = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        format!("http://{addr}/hook")
    });
    let text = format!(
        "[sinks.down]\nkind = \"webhook\"\nurl = \"{hole}\"\ntimeout = \"1s\"\n\n\
         [[rules]]\nname = \"all\"\nthreshold = 1\nper = \"target_class\"\n"
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let (router, tasks) = rt.block_on(async { alert::spawn(alerts, Arc::new(TokioClock::new())) });

    let mut group = c.benchmark_group("alert");
    for (name, sink) in
        [("null_sink", Arc::new(NullSink) as Arc<dyn EventSink>), ("router_sink_down", router.clone())]
    {
        let p = pipeline(sink);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let r: Result<(), _> =
                    p.call(|_| async { Err(Failure::new(ErrorClass::InvalidRequest, "no")) }).await;
                black_box(r.is_err())
            })
        });
    }
    group.finish();
    eprintln!(
        "router: {} failures dropped (channel full), sink queue drops: {:?}",
        router.dropped(),
        tasks.dropped()
    );
    drop(tasks);
}

criterion_group!(benches, bench);
criterion_main!(benches);
