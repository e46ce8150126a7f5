//! The official `mcp` Python package (`python/mcp_client.py`) as a real client of
//! Keel's MCP server, over streamable HTTP against `keel serve` on loopback and over
//! stdio against `keel mcp`: it lists the tools, calls one whose upstream fails once
//! and is retried, repeats that call (answered from the first: the payments ledger is
//! charged once), calls one that fails with a classified error and one whose
//! arguments do not fit the schema, and one that needs approval (answered at once as
//! pending, then completed once approved).
//!
//! The interpreter is `KEEL_TEST_PYTHON` when set (`.ci/python.sh` installs `openai`
//! and `mcp` in it); otherwise a venv with `mcp` is made once under the target dir.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_examples::payments::Faults;
use serde_json::Value;

use crate::support::{Bench, TOOLS, orders};

const AGENT: &str = "agent-key-0123456789";
const APPROVER: &str = "approver-key-0123456789";

const KEYS: &str = r#"
[server]
workers = 1
keys = [
  { name = "bot", key_env = "AGENT_KEY", role = "agent" },
  { name = "alice", key_env = "APPROVER_KEY", role = "approver" },
]
"#;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("mcp-venv");
    let bin = venv.join("bin").join("python");
    if bin.exists() {
        return bin;
    }
    let building = root.join(format!("mcp-venv.{}", std::process::id()));
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&building));
    run(Command::new(building.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "mcp",
    ]));
    // Whoever renames first wins; a loser uses the winner's venv.
    if std::fs::rename(&building, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    bin
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/python/mcp_client.py")
}

/// Runs the client with `args`; its steps by name.
fn client(b: &Bench, args: &[&str]) -> HashMap<String, Value> {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .current_dir(b.dir.path())
        .env("KEEL_CONFIG", b.path("keel.toml"))
        .env("USER", "tester")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .map(|v| (v["step"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// What both transports must show, with the payments ledger.
fn check(steps: &HashMap<String, Value>, b: &Bench) {
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));
    assert_eq!(step("connected")["version"], "2025-11-25");

    let tools = &step("list")["tools"];
    assert_eq!(tools["charge"]["schema"]["required"], serde_json::json!(["order", "amount"]), "{tools}");
    assert_eq!(tools["charge"]["read_only"], false);
    assert_eq!(tools["notify"]["read_only"], true);
    assert_eq!(tools["notify"]["schema"]["type"], "object");
    assert!(steps.contains_key("ping"));

    // The upstream failed once, Keel retried it.
    let ok = step("charge");
    assert_eq!(ok["is_error"], false, "{ok}");
    assert_eq!(ok["meta"]["keel/attempts"], 2, "{ok}");
    assert_eq!(ok["meta"]["keel/replayed"], false, "{ok}");
    // The same arguments (spelled in another order) again: answered from the first.
    let again = step("charge_again");
    assert_eq!(again["is_error"], false, "{again}");
    assert_eq!(again["meta"]["keel/replayed"], true, "{again}");
    assert_eq!(again["meta"]["keel/runId"], ok["meta"]["keel/runId"]);
    assert_eq!(again["structured"], ok["structured"]);

    // A classified failure is a tool result, not a protocol error.
    let bad = step("charge_negative");
    assert_eq!(bad["is_error"], true, "{bad}");
    let class = bad["structured"]["class"].as_str().unwrap();
    assert!(bad["text"].as_str().unwrap().starts_with(&format!("{class}: ")), "{bad}");
    assert_ne!(class, "server_error", "{bad}");
    let invalid = step("charge_invalid");
    assert_eq!(invalid["is_error"], true, "{invalid}");
    assert_eq!(invalid["structured"]["class"], "invalid_request", "{invalid}");

    // Approval: answered at once, naming the approval; the result once approved.
    let big = step("charge_big");
    assert_eq!(big["is_error"], true, "{big}");
    assert_eq!(big["structured"]["status"], "waiting_approval", "{big}");
    let approval = big["structured"]["approval_id"].as_str().unwrap();
    assert!(big["text"].as_str().unwrap().contains(approval), "{big}");
    assert!(big["text"].as_str().unwrap().starts_with("pending approval"), "{big}");
    let done = step("charge_big_approved");
    assert_eq!(done["is_error"], false, "{done}");

    // The client's own key in `_meta`: a repeat is replayed, the key with other
    // arguments is refused.
    let keyed = step("notify_keyed");
    assert_eq!(keyed["is_error"], false, "{keyed}");
    assert_eq!(keyed["meta"]["keel/replayed"], false, "{keyed}");
    let again = step("notify_keyed_again");
    assert_eq!(again["meta"]["keel/replayed"], true, "{again}");
    assert_eq!(again["meta"]["keel/runId"], keyed["meta"]["keel/runId"]);
    let other = step("notify_keyed_other");
    assert_eq!(other["is_error"], true, "{other}");
    assert_eq!(other["structured"]["class"], "conflict", "{other}");

    // Order 1 charged once (not twice), order 2 refused, order 3 once approved.
    assert_eq!(orders(&b.payments), vec![1, 3], "{:?}", b.payments.charges());
}

#[test]
fn the_official_mcp_client_calls_tools_through_keel_serve() {
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, &format!("{TOOLS}\n{KEYS}"));
    let mut child = b
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .env("AGENT_KEY", AGENT)
        .env("APPROVER_KEY", APPROVER)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    // Drained, so that later lines never meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = first.trim().rsplit("http://").next().unwrap().to_owned();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let base = format!("http://{addr}");

    // Behind the agent keys like /api; no stream and no session to end.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;
    assert_eq!(raw(port, "POST", None, init).0, 401);
    assert_eq!(raw(port, "POST", Some(APPROVER), init).0, 403);
    assert_eq!(raw(port, "GET", Some(AGENT), "").0, 405);
    let (status, body) = raw(port, "POST", Some(AGENT), "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32700"), "{body}");
    let (status, body) =
        raw(port, "POST", Some(AGENT), r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        raw(port, "POST", Some(AGENT), r#"{"jsonrpc":"2.0","id":2,"method":"resources/list"}"#);
    assert_eq!(status, 200);
    assert!(body.contains("-32601"), "{body}");

    let (status, body) = raw_with(port, Some(AGENT), "mcp-protocol-version: 1999-01-01\r\n", init);
    assert_eq!(status, 400, "{body}");
    let (status, body) = raw_with(port, Some(AGENT), "origin: http://evil.example\r\n", init);
    assert_eq!(status, 403, "{body}");

    let steps = client(&b, &["http", &format!("{base}/mcp"), AGENT, &base, APPROVER]);
    assert_eq!(steps["approved"]["status"], 200, "{steps:#?}");
    check(&steps, &b);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_official_mcp_client_calls_tools_through_keel_mcp_on_stdio() {
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, TOOLS);
    let steps = client(&b, &["stdio", env!("CARGO_BIN_EXE_keel")]);
    assert_eq!(steps["approved"]["status"], 0, "{steps:#?}");
    check(&steps, &b);
}

/// One raw request to `/mcp`: status and body.
fn raw(port: u16, method: &str, key: Option<&str>, body: &str) -> (u16, String) {
    request(port, method, key, "", body)
}

/// A raw POST with `extra` header lines.
fn raw_with(port: u16, key: Option<&str>, extra: &str, body: &str) -> (u16, String) {
    request(port, "POST", key, extra, body)
}

fn request(port: u16, method: &str, key: Option<&str>, extra: &str, body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n{auth}{extra}\
         content-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}
