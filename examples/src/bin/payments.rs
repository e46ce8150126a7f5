//! A small payments service for Keel's examples and end-to-end tests, offline.
//!
//! Run: `cargo run -p keel-examples --bin payments -- --addr 127.0.0.1:18099 --fail-first 2`
//!
//! `POST /charge {"order": 1, "amount": 20}` records a charge and answers it. It
//! honours `Idempotency-Key` like real payment APIs: a key seen before answers the
//! stored charge (header `Idempotent-Replayed: true`) and charges nothing. It fails on
//! purpose: the first `--fail-first` new charges answer 503, then every
//! `--fail-every`-th. `POST /notify` is an endpoint that is down when `--notify-down`.
//! `GET /charges` lists what was charged: the ledger tests count.

use keel_examples::payments::{Faults, serve};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = arg(&args, "--addr").unwrap_or_else(|| "127.0.0.1:18099".into());
    let num = |name: &str| arg(&args, name).and_then(|v| v.parse().ok()).unwrap_or(0);
    let faults = Faults {
        fail_first: num("--fail-first"),
        fail_every: num("--fail-every"),
        notify_down: args.iter().any(|a| a == "--notify-down"),
        charge_delay_ms: num("--charge-delay-ms"),
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("payments listening on http://{}", listener.local_addr()?);
    serve(listener, faults).await
}
