//! Durable tool invocations through `keel serve`'s own router (`keel_server::app`):
//! `POST /api/tools/{name}/invoke` of a read-only http tool on a loopback upstream,
//! each call a journaled one-step run on SQLite, at 1 and 50 concurrent clients, against
//! the same upstream called directly. The baseline for issue 15's "durable tool calls".
//!
//! Run: `cargo test -p keel-server --bench invoke` (debug) or `cargo bench -p
//! keel-server --bench invoke` (release). `KEEL_BENCH_SECONDS` (default 5) per case.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::print_stdout,
    missing_docs
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::KEY;

use keel_core::TokioClock;
use keel_journal::JournalOptions;
use serde_json::json;

static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn load(url: String, body: serde_json::Value, auth: bool, conns: usize, secs: u64) -> (f64, f64, f64) {
    let http = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                // Each call its own arguments: an agent repeating one call is what the
                // loop guard stops (`[run] loop_guard`), not what this measures.
                let mut body = body.clone();
                if auth {
                    body["params"]["n"] = json!(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                }
                let mut req = http.post(&url).json(&body);
                if auth {
                    req = req.bearer_auth(KEY);
                }
                let resp = req.send().await.unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                let _ = resp.bytes().await.unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    let rate = all.len() as f64 / secs as f64;
    (rate, all[all.len() / 2], all[all.len() * 99 / 100])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("KEEL_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    // The tool's upstream.
    let upstream =
        axum::Router::new().route("/op", axum::routing::post(|| async { axum::Json(json!({"ok": true})) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("keel.db").display());
    let text = format!(
        "[storage]\nurl = \"{db}\"\n[server]\nkeys = [{{ name = \"bot\", key_env = \"BENCH_KEY\", role = \"agent\" }}]\n\
         rate_limit = {{ per_second = 1000000, burst = 1000000 }}\n\
         [tools.op]\nkind = \"http\"\nurl = \"{up}/op\"\n"
    );
    let clock = Arc::new(TokioClock::new());
    let journal =
        keel_journal::open(&db, JournalOptions { clock: clock.clone(), ..JournalOptions::default() })
            .await
            .unwrap();
    let support::Running { base, stop, served } = support::serve(&text, dir.path(), journal, clock).await;
    println!("| target ({secs} s each) | c | calls/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for conns in [1, 50] {
        let direct = load(format!("{up}/op"), json!({}), false, conns, secs).await;
        println!("| upstream directly | {conns} | {:.0} | {:.2} | {:.2} |", direct.0, direct.1, direct.2);
        let keel =
            load(format!("{base}/api/tools/op/invoke"), json!({"params": {}}), true, conns, secs).await;
        println!("| keel: durable invoke | {conns} | {:.0} | {:.2} | {:.2} |", keel.0, keel.1, keel.2);
    }
    let _ = stop.send(());
    let _ = served.await;
}
