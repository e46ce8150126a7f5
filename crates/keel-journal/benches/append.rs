//! Events appended per second, on SQLite and PostgreSQL, batched and one by one.
//!
//! Run: `cargo bench -p keel-journal --bench append` (starts its own PostgreSQL from
//! Debian's binaries, fsync on, unless `KEEL_TEST_POSTGRES_URL` is set).
//!
//! - `batched`: 1,000 events recorded through the [`JournalWriter`] (the `EventSink`
//!   path), then one `flush` — group commit, as policy code produces them.
//! - `one_by_one`: 100 events, each its own `append` (one transaction) awaited
//!   before the next.
//!
//! Events are a realistic mix: per step `step_started`, `attempt_started`,
//! `attempt_ended`, `step_finished`, so every projection write is included.
//! Durability: SQLite WAL + `synchronous=NORMAL` (crash-safe against a killed process,
//! not against power loss); PostgreSQL `fsync=on`, `synchronous_commit=on`.

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_core::{AttemptOutcome, Event};
use keel_journal::{Journal, JournalEvent, JournalOptions, JournalWriter, NewEvent, StepOutcome, open};
use serde_json::json;

fn step_event(i: u64) -> JournalEvent {
    let step = (i / 4) as u32;
    let target: Arc<str> = Arc::from("search");
    match i % 4 {
        0 => JournalEvent::StepStarted {
            step,
            name: "search".into(),
            target: "search".into(),
            input: json!({"q": i}),
        },
        1 => JournalEvent::Policy { step: Some(step), event: Event::AttemptStarted { target, attempt: 1 } },
        2 => JournalEvent::Policy {
            step: Some(step),
            event: Event::AttemptEnded {
                target,
                attempt: 1,
                outcome: AttemptOutcome::Ok,
                latency: Duration::from_millis(12),
            },
        },
        _ => JournalEvent::StepFinished {
            step,
            outcome: StepOutcome::Succeeded { output: json!({"hits": 3}), shape: None },
        },
    }
}

fn bench_backend(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, journal: Arc<dyn Journal>) {
    let mut group = c.benchmark_group(format!("append/{name}"));
    group.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));

    let writer =
        rt.block_on(async { JournalWriter::spawn(journal.clone(), keel_journal::writer::DEFAULT_MAX_BATCH) });
    let mut n = 0u64;
    group.throughput(Throughput::Elements(1000));
    group.bench_function("batched", |b| {
        b.to_async(rt).iter(|| {
            let writer = writer.clone();
            let start = n;
            n += 1000;
            async move {
                for i in start..start + 1000 {
                    writer.record(NewEvent::new(format!("batched-{}", i / 4000), step_event(i)));
                }
                writer.flush().await.expect("flush");
            }
        });
    });

    let mut m = 0u64;
    group.throughput(Throughput::Elements(100));
    group.bench_function("one_by_one", |b| {
        b.to_async(rt).iter(|| {
            let journal = journal.clone();
            let start = m;
            m += 100;
            async move {
                for i in start..start + 100 {
                    journal
                        .append(&[NewEvent::new(format!("single-{}", i / 4000), step_event(i))])
                        .await
                        .expect("append");
                }
            }
        });
    });
    group.finish();
}

fn append(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = rt
        .block_on(open(
            &format!("sqlite:{}", dir.path().join("bench.db").display()),
            JournalOptions::default(),
        ))
        .expect("sqlite");
    bench_backend(c, &rt, "sqlite", sqlite);

    let server = match std::env::var(keel_testkit::POSTGRES_URL_ENV) {
        Ok(url) if !url.is_empty() => None,
        _ => Some(keel_testkit::start_postgres_server(true).expect("postgres for the bench")),
    };
    let url = rt.block_on(async {
        match &server {
            Some(server) => keel_testkit::create_database(server).await,
            None => keel_testkit::postgres_database().await,
        }
    });
    let postgres = rt.block_on(open(&url, JournalOptions::default())).expect("postgres");
    bench_backend(c, &rt, "postgres", postgres);
}

criterion_group!(benches, append);
criterion_main!(benches);
