//! The gateway benchmark's server and time-to-first-token probe (see `bench/gateway.sh`).
//!
//! `keel-gateway-bench serve CONFIG ADDR JOURNAL_URL` serves the gateway's router on
//! ADDR with the `[models.*]` of CONFIG (a keel.toml subset), journaling every call
//! and every policy decision through a batched journal writer at JOURNAL_URL.
//!
//! `keel-gateway-bench ttft N` measures time to first token of N sequential streamed
//! requests, straight to an in-process streaming fake upstream and through the
//! gateway, and prints the medians and their difference.
//!
//! `keel-gateway-bench apis N` measures N sequential calls through the gateway on each
//! inbound API — chat completions, Responses, Messages — whole and streamed (20
//! tokens), against the same in-process fake, and prints each API's median and p99
//! time to the whole answer and what its translation adds over chat completions.

#![allow(clippy::print_stdout)] // a command-line tool: stdout is its output.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_gateway::journal::DecisionsOnly;
use keel_gateway::{Gateway, GatewayConfig, ModelConfig, Provider, WriterJournal, router};
use serde::Deserialize;

/// The part of keel.toml the bench reads.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchFile {
    models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    gateway: GatewayConfig,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", config, addr, journal] => rt.block_on(serve(config, addr, journal)),
        ["ttft", n] => rt.block_on(ttft(n.parse()?)),
        ["apis", n] => rt.block_on(apis(n.parse()?)),
        _ => Err("usage: keel-gateway-bench serve CONFIG ADDR JOURNAL_URL | ttft N | apis N".into()),
    }
}

async fn serve(config: &str, addr: &str, journal_url: &str) -> Result<(), Error> {
    let file: BenchFile = toml::from_str(&std::fs::read_to_string(config)?)?;
    let journal = keel_journal::open(journal_url, keel_journal::JournalOptions::default()).await?;
    let writer = keel_journal::JournalWriter::spawn(journal, 512);
    let gateway = Gateway::builder(file.models)
        .config(file.gateway)
        .sink(Arc::new(DecisionsOnly(writer.sink(keel_gateway::journal::GATEWAY_RUN))))
        .journal(Arc::new(WriterJournal::new(writer.clone())))
        .build()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("keel-gateway-bench: serving on {addr}");
    axum::serve(nodelay(listener), router(Arc::new(gateway))).await?;
    Ok(())
}

/// The listener with `TCP_NODELAY` on every accepted socket: an SSE stream is many
/// small writes, and Nagle's algorithm with the client's delayed ACK would hold the
/// second one (the first token) for ~40 ms.
fn nodelay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

const TOKENS: usize = 20;

/// A streaming upstream: the first token at once, then the rest.
async fn fake_stream() -> Result<String, Error> {
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-ttft\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    let mut body = chunk("{\"role\":\"assistant\",\"content\":\"\"}", "null");
    for i in 0..TOKENS {
        body.push_str(&chunk(&format!("{{\"content\":\"tok{i} \"}}"), "null"));
    }
    body.push_str(&chunk("{}", "\"stop\""));
    body.push_str("data: {\"id\":\"chatcmpl-ttft\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\ndata: [DONE]\n\n");
    let body = Bytes::from(body);
    let whole = Bytes::from_static(
        br#"{"id":"chatcmpl-w","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 tok15 tok16 tok17 tok18 tok19 "},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#,
    );
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |req: Bytes| {
            let body = body.clone();
            let whole = whole.clone();
            async move {
                if !req.windows(13).any(|w| w == b"\"stream\":true") {
                    let mut resp = axum::response::Response::new(axum::body::Body::from(whole));
                    resp.headers_mut()
                        .insert("content-type", http::HeaderValue::from_static("application/json"));
                    return resp;
                }
                let frames: Vec<Result<Bytes, Infallible>> = vec![Ok(body)];
                let mut resp = axum::response::Response::new(axum::body::Body::from_stream(
                    futures_util::stream::iter(frames),
                ));
                resp.headers_mut()
                    .insert("content-type", http::HeaderValue::from_static("text/event-stream"));
                resp
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn ttft(n: usize) -> Result<(), Error> {
    let upstream = fake_stream().await?;
    let mut models = BTreeMap::new();
    models.insert("gpt".to_owned(), ModelConfig::new(Provider::Openai, format!("{upstream}/v1"), "m"));
    let gateway = Arc::new(Gateway::builder(models).env(|_| None).build()?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let keel = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(nodelay(listener), router(gateway)).await });

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = Bytes::from_static(
        br#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"Count to twenty."}],"max_tokens":64}"#,
    );
    let mut direct = Vec::with_capacity(n);
    let mut through = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        for (base, out) in [(&upstream, &mut direct), (&keel, &mut through)] {
            let req = http::Request::post(format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))?;
            let start = tokio::time::Instant::now();
            let resp = client.request(req).await?;
            let mut body = resp.into_body();
            let mut first = None;
            let mut seen = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    seen.extend_from_slice(&data);
                    if first.is_none()
                        && seen.windows(9).any(|w| w == b"\"content\"")
                        && seen.windows(4).any(|w| w == b"tok0")
                    {
                        first = Some(start.elapsed());
                    }
                }
            }
            // The first tenth warms connections and caches up.
            if i >= n / 10 {
                out.push(first.ok_or("no token arrived")?);
            }
        }
    }
    direct.sort_unstable();
    through.sort_unstable();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!("ttft_ms direct p50={:.3} p99={:.3}", pct(&direct, 0.5), pct(&direct, 0.99));
    println!("ttft_ms keel   p50={:.3} p99={:.3}", pct(&through, 0.5), pct(&through, 0.99));
    println!("ttft_ms added  p50={:.3}", pct(&through, 0.5) - pct(&direct, 0.5));
    Ok(())
}

/// One sequential call's time to its whole answer (body read to the end).
async fn timed(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Bytes,
) -> Result<Duration, Error> {
    let req =
        http::Request::post(url).header("content-type", "application/json").body(Full::new(body.clone()))?;
    let start = tokio::time::Instant::now();
    let resp = client.request(req).await?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()).into());
    }
    let bytes = resp.into_body().collect().await?.to_bytes();
    let elapsed = start.elapsed();
    if !bytes.windows(5).any(|w| w == b"tok19") {
        return Err(format!("{url}: an incomplete answer").into());
    }
    Ok(elapsed)
}

async fn apis(n: usize) -> Result<(), Error> {
    let upstream = fake_stream().await?;
    let mut models = BTreeMap::new();
    models.insert("gpt".to_owned(), ModelConfig::new(Provider::Openai, format!("{upstream}/v1"), "m"));
    let gateway = Arc::new(Gateway::builder(models).env(|_| None).build()?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let keel = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(nodelay(listener), router(gateway)).await });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let ask = "Count to twenty.";
    let calls: Vec<(&str, &str, String)> = vec![
        (
            "chat",
            "/v1/chat/completions",
            format!(r#"{{"model":"gpt","messages":[{{"role":"user","content":"{ask}"}}],"max_tokens":64}}"#),
        ),
        (
            "responses",
            "/v1/responses",
            format!(r#"{{"model":"gpt","input":"{ask}","store":false,"max_output_tokens":64}}"#),
        ),
        (
            "messages",
            "/v1/messages",
            format!(r#"{{"model":"gpt","max_tokens":64,"messages":[{{"role":"user","content":"{ask}"}}]}}"#),
        ),
    ];
    for stream in [false, true] {
        let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); calls.len()];
        for i in 0..n + n / 10 {
            // Each API in turn, so drift hits all alike; the first tenth warms up.
            for (k, (_, path, body)) in calls.iter().enumerate() {
                let body = if stream { body.replacen("{", r#"{"stream":true,"#, 1) } else { body.clone() };
                let t = timed(&client, &format!("{keel}{path}"), &Bytes::from(body)).await?;
                if i >= n / 10 {
                    times[k].push(t);
                }
            }
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort_unstable();
            v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3
        };
        let chat = pct(&mut times[0], 0.5);
        for (k, (name, _, _)) in calls.iter().enumerate() {
            let (p50, p99) = (pct(&mut times[k], 0.5), pct(&mut times[k], 0.99));
            let kind = if stream { "streamed" } else { "whole" };
            println!(
                "{kind:8} {name:9} p50_ms={p50:.3} p99_ms={p99:.3} added_vs_chat_p50_ms={:.3}",
                p50 - chat
            );
        }
    }
    Ok(())
}
