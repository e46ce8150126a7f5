//! The overhead of a full pipeline call: retry + breaker + budget + timeout + loop
//! guard around a target that answers at once.
//!
//! Run: `cargo bench -p keel-core --bench pipeline`. `direct` is the bare closure;
//! `pipeline` the same closure through every policy; the difference is Keel's overhead.
//! `contended/2 threads` runs the same shared pipeline from two OS threads at once
//! (shared breaker, budget and loop guard), reporting time per call per thread.

#![allow(clippy::disallowed_methods)] // A benchmark measures real time.
#![allow(missing_docs)] // criterion_group! generates undocumented items.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_core::{
    Budget, BudgetConfig, CallSignature, Failure, LoopGuard, LoopGuardConfig, NullSink, Pipeline,
    PolicyConfig, RunScope,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime")
}

fn pipeline() -> Pipeline {
    let config = PolicyConfig { seed: Some(1), ..PolicyConfig::default() };
    let budget = Arc::new(Budget::new(
        "bench",
        &BudgetConfig { attempts: Some(u64::MAX / 2), ..BudgetConfig::default() },
        Arc::new(NullSink),
    ));
    let guard = Arc::new(LoopGuard::new(
        LoopGuardConfig { max_calls_per_turn: None, max_turns_per_run: None, ..LoopGuardConfig::default() },
        Arc::new(NullSink),
    ));
    Pipeline::builder("bench", config).budget(budget).loop_guard(guard).build()
}

/// Distinct call signatures, cycled so the loop guard never trips.
fn signatures() -> Vec<CallSignature> {
    (0..1024).map(|i| CallSignature::new("bench", &serde_json::json!({ "order": i }))).collect()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let p = pipeline();
    let sigs = signatures();
    let next = AtomicUsize::new(0);
    let mut g = c.benchmark_group("success_path");
    g.bench_function("direct", |b| {
        b.to_async(&rt).iter(|| async { black_box(Ok::<u32, Failure>(black_box(1))) });
    });
    g.bench_function("pipeline", |b| {
        b.to_async(&rt).iter(|| {
            let sig = sigs[next.fetch_add(1, Ordering::Relaxed) % sigs.len()];
            let p = &p;
            async move { black_box(p.call_signed(sig, |_| async { Ok::<u32, Failure>(black_box(1)) }).await) }
        });
    });
    g.bench_function("pipeline_in_run_scope", |b| {
        let run = Arc::new(Budget::unlimited("run"));
        b.to_async(&rt).iter(|| {
            let sig = sigs[next.fetch_add(1, Ordering::Relaxed) % sigs.len()];
            let (p, run) = (&p, run.clone());
            RunScope::new().with_budget(run).run(async move {
                black_box(p.call_signed(sig, |_| async { Ok::<u32, Failure>(black_box(1)) }).await)
            })
        });
    });
    g.finish();

    let mut g = c.benchmark_group("contended");
    g.bench_function("2 threads", |b| {
        b.iter_custom(|iters| {
            let p = pipeline();
            let sigs = Arc::new(signatures());
            let start = Instant::now();
            let threads: Vec<_> = (0..2)
                .map(|t| {
                    let (p, sigs) = (p.clone(), sigs.clone());
                    std::thread::spawn(move || {
                        runtime().block_on(async {
                            for i in 0..iters as usize {
                                let sig = sigs[(i * 2 + t) % sigs.len()];
                                let r = p.call_signed(sig, |_| async { Ok::<u32, Failure>(1) }).await;
                                black_box(r).ok();
                            }
                        });
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("thread");
            }
            start.elapsed()
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
