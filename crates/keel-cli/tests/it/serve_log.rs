//! `keel serve`'s log (issue 11, "Logs"): the real binary, real requests — 401s, a
//! 413, 429s, tool and model calls — then the log and the journal file are searched
//! for every configured secret (none may appear) and for the request lines.

use std::process::{Child, Stdio};

use axum::Json;
use axum::routing::post;
use keel_examples::payments::Faults;
use serde_json::{Value, json};

use crate::support::{Bench, spawn_listening, stop_gracefully};

const AGENT: &str = "agent-secret-5d0c1a9e7b";
const APPROVER: &str = "approver-secret-41f7e2c0aa";
const MODEL_KEY: &str = "sk-upstream-secret-9e33b1";
const TOOL_TOKEN: &str = "tool-header-secret-77ac02";

fn config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit = 2048
rate_limit = {{ per_second = 1, burst = 6 }}
keys = [
  {{ name = "bot", key_env = "T_AGENT_KEY", role = "agent" }},
  {{ name = "alice", key_env = "T_APPROVER_KEY", role = "approver" }},
]

[models.small]
provider = "openai"
base_url = "{upstream}"
api_key_env = "T_MODEL_KEY"
model = "up"

[tools.ping]
kind = "http"
url = "{{base}}/notify"
headers_env = {{ "X-Token" = "T_TOOL_TOKEN" }}
"#
    )
}

/// An OpenAI-compatible upstream that answers every completion.
async fn upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|Json(req): Json<Value>| async move {
            Json(json!({
                "id": "c", "object": "chat.completion", "created": 1, "model": req["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

/// Starts `keel serve` with `args`, its stderr into `log`; returns it and its URL.
fn serve(bench: &Bench, args: &[&str], log: &std::path::Path) -> (Child, String) {
    serve_filtered(bench, args, log, "info")
}

/// [`serve`] with `RUST_LOG` set to `filter`.
fn serve_filtered(bench: &Bench, args: &[&str], log: &std::path::Path, filter: &str) -> (Child, String) {
    let mut cmd = bench.command(&[&["serve"], args].concat());
    cmd.env("T_AGENT_KEY", AGENT)
        .env("T_APPROVER_KEY", APPROVER)
        .env("T_MODEL_KEY", MODEL_KEY)
        .env("T_TOOL_TOKEN", TOOL_TOKEN)
        .env("RUST_LOG", filter)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    let (child, url) = spawn_listening(&mut cmd);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_has_a_line_per_request_and_no_secret_and_neither_has_the_journal() {
    let up = upstream().await;
    let bench = Bench::new(Faults::default(), &config(&up));
    let log = bench.path("serve.log");
    let (child, url) = serve(&bench, &["--log-format", "json"], &log);
    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(format!("{url}{path}"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(get("/api/runs", None).await.unwrap().status(), 401);
    assert_eq!(get("/api/runs", Some("not-a-key-not-a-key")).await.unwrap().status(), 401);
    let big = http.post(format!("{url}/api/runs")).bearer_auth(AGENT).body("x".repeat(4096));
    assert_eq!(big.header("content-type", "application/json").send().await.unwrap().status(), 413);
    let tool = http
        .post(format!("{url}/api/tools/ping/invoke"))
        .bearer_auth(AGENT)
        .json(&json!({"params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(tool.status(), 200, "{:?}", tool.text().await);
    let run = http.post(format!("{url}/api/runs")).bearer_auth(AGENT).json(&json!({})).send().await.unwrap();
    let run_id = run.json::<Value>().await.unwrap()["run_id"].as_str().unwrap().to_owned();
    let chat = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let model = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(AGENT)
        .header("x-keel-run", &run_id)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), 200);
    let made_up = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(AGENT)
        .header("x-keel-run", "run-made-up")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(made_up.status(), 400);
    // The agent's burst is spent: 429s.
    let mut limited = 0;
    for _ in 0..10 {
        if get("/api/runs", Some(AGENT)).await.unwrap().status() == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "the rate limit answered 429");
    stop_gracefully(child);

    let text = std::fs::read_to_string(&log).unwrap();
    let mut journal = Vec::new();
    for entry in std::fs::read_dir(bench.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("keel.db") {
            journal.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(journal.len() > 4096, "the journal was written");
    let journal = String::from_utf8_lossy(&journal);
    for secret in [AGENT, APPROVER, MODEL_KEY, TOOL_TOKEN, "not-a-key-not-a-key"] {
        assert!(!text.contains(secret), "a secret in the log:\n{text}");
        assert!(!journal.contains(secret), "a secret in the journal file");
    }

    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines.iter().filter(|l| l["target"] == "keel::request").collect();
    let has = |route: &str, status: u64, class: &str, key: &str| {
        requests.iter().any(|l| {
            l["route"] == route
                && l["status"] == status
                && l["class"] == class
                && l["key"] == key
                && l["ms"].is_u64()
        })
    };
    assert!(has("/api/runs", 401, "unauthorized", "-"), "{text}");
    assert!(has("/api/runs", 413, "invalid_request", "bot"), "{text}");
    assert!(has("/api/runs", 429, "rate_limited", "bot"), "{text}");
    assert!(has("/api/tools/{name}/invoke", 200, "-", "bot"), "{text}");
    assert!(has("/v1/chat/completions", 200, "-", "bot"), "{text}");
    assert!(has("/v1/chat/completions", 400, "invalid_request", "bot"), "{text}");
    assert!(
        requests.iter().any(|l| l["route"] == "/v1/chat/completions" && l["run"] == run_id.as_str()),
        "the run of a model call: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["message"].as_str().unwrap_or("").contains("not issued")),
        "the refused run id is a decision worth a look: {text}"
    );
    assert_eq!(requests.len(), 17, "one line per request: {text}");

    // The default format is for people.
    let log = bench.path("serve-text.log");
    let (child, url) = serve(&bench, &[], &log);
    assert_eq!(reqwest::get(format!("{url}/api/runs")).await.unwrap().status(), 401);
    stop_gracefully(child);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("keel::request")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("INFO") && line.contains("route=/api/runs") && line.contains("status=401"),
        "{line}"
    );

    // RUST_LOG filters: the request lines off (the same request was logged above).
    let log = bench.path("serve-filtered.log");
    let (child, url) = serve_filtered(&bench, &[], &log, "info,keel::request=off");
    assert_eq!(reqwest::get(format!("{url}/api/runs")).await.unwrap().status(), 401);
    stop_gracefully(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("keel::request"), "the request lines are filtered out: {text}");
}

/// A reader of the log that stops (a full pipe, a stalled log shipper) costs log
/// lines, never requests: the log is written by a thread of its own. Before, the
/// 225th logged request blocked on the full stderr pipe, and so did the server.
#[test]
fn a_log_reader_that_stops_reading_costs_lines_never_requests() {
    use std::io::{Read as _, Write as _};
    let b = Bench::new(
        Faults::default(),
        "[server]\nkeys = [{ name = \"bot\", key_env = \"T_AGENT_KEY\", role = \"agent\" }]\n",
    );
    let mut cmd = b.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("T_AGENT_KEY", AGENT).env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::piped());
    let (mut child, url) = spawn_listening(&mut cmd);
    // Held and never read: the pipe fills after a few hundred lines.
    let _stalled = child.stderr.take().unwrap();
    let addr = url.trim_start_matches("http://").to_owned();
    for i in 0..2000 {
        let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        let read = tcp.read_to_string(&mut answer);
        assert!(read.is_ok() && answer.starts_with("HTTP/1.1 200"), "request {i}: {read:?} {answer:?}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
