//! The official `mcp` Python package (`python/mcp_client.py`) as a real client of
//! Keel's MCP server, over streamable HTTP against `keel serve` on loopback and over
//! stdio against `keel mcp`: it lists the tools, calls one whose upstream fails once
//! and is retried, repeats that call (answered from the first: the payments ledger is
//! charged once), calls one that fails with a classified error and one whose
//! arguments do not fit the schema, and one that needs approval (answered at once as
//! pending, then completed once approved). Two instances on one PostgreSQL answer
//! one client's consecutive requests in turn.
//!
//! Both eras: pinned to the `initialize` handshake (2025-11-25), and in the client's
//! default mode, which finds `server/discover` and speaks 2026-07-28 — where the call
//! needing approval is an input-required round trip (a form naming the approval, a
//! `requestState` the retry echoes), decided only in Keel's journal. Raw requests
//! check that a 2026-07-28 request's headers must mirror its body.
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

/// How long the Python client may take (it answers in seconds).
const CLIENT_BOUND: Duration = Duration::from_secs(180);

/// Runs the client with `args` (killed past [`CLIENT_BOUND`]); its steps by name.
fn client(b: &Bench, args: &[&str]) -> HashMap<String, Value> {
    let child = Command::new(python())
        .arg(script())
        .args(args)
        .current_dir(b.dir.path())
        .env("KEEL_CONFIG", b.path("keel.toml"))
        .env("USER", "tester")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(CLIENT_BOUND) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the client did not finish within {CLIENT_BOUND:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .map(|v| (v["step"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// Which revision the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Era {
    /// `initialize`, 2025-11-25.
    Legacy,
    /// `server/discover`, 2026-07-28.
    Modern,
}

/// What both transports must show in `era`, with the payments ledger.
fn check(steps: &HashMap<String, Value>, b: &Bench, era: Era) {
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));
    let connected = step("connected");
    assert_eq!(connected["server"], "keel", "{connected}");
    assert!(connected["instructions"].as_str().unwrap().contains("approval"), "{connected}");
    if era == Era::Modern {
        assert_eq!(connected["version"], "2026-07-28", "{connected}");
        check_input_required(steps, b);
    } else {
        assert_eq!(connected["version"], "2025-11-25", "{connected}");
        assert!(steps.contains_key("ping"));
    }

    let tools = &step("list")["tools"];
    assert_eq!(tools["charge"]["schema"]["required"], serde_json::json!(["order", "amount"]), "{tools}");
    assert_eq!(tools["charge"]["read_only"], false);
    assert_eq!(tools["notify"]["read_only"], true);
    assert_eq!(tools["notify"]["schema"]["type"], "object");

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

    // The same call that acts anew, a third time within the window: stopped by the
    // loop guard before it runs.
    let loops = step("notify_loop")["calls"].as_array().unwrap().clone();
    assert_eq!(
        loops.iter().map(|c| c["is_error"].as_bool().unwrap()).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert_eq!(loops[2]["structured"]["class"], "loop_detected", "{:?}", loops[2]);
    if era == Era::Modern {
        return;
    }

    // Approval: answered at once, naming the approval; the result once approved.
    let big = step("charge_big");
    assert_eq!(big["is_error"], true, "{big}");
    assert_eq!(big["structured"]["status"], "waiting_approval", "{big}");
    let approval = big["structured"]["approval_id"].as_str().unwrap();
    assert!(big["text"].as_str().unwrap().contains(approval), "{big}");
    assert!(big["text"].as_str().unwrap().starts_with("pending approval"), "{big}");
    let done = step("charge_big_approved");
    assert_eq!(done["is_error"], false, "{done}");

    // Order 1 charged once (not twice), order 2 refused, order 3 once approved.
    assert_eq!(orders(&b.payments), vec![1, 3], "{:?}", b.payments.charges());
}

/// The 2026-07-28 approval round trips: by hand, then by the client's own driver with
/// a person answering Keel's form.
fn check_input_required(steps: &HashMap<String, Value>, b: &Bench) {
    let step = |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step {name} in {steps:#?}"));
    let big = step("charge_big");
    assert_eq!(big["result_type"], "input_required", "{big}");
    assert_eq!((big["key"].as_str(), big["more"].as_u64()), (Some("keel.approval"), Some(0)), "{big}");
    assert_eq!((big["method"].as_str(), big["mode"].as_str()), (Some("elicitation/create"), Some("form")));
    assert_eq!(big["has_state"], true, "{big}");
    let approval = big["approval_id"].as_str().unwrap();
    let message = big["message"].as_str().unwrap();
    assert!(message.contains(approval) && message.contains("`charge`"), "{message}");
    assert!(message.contains("does not approve"), "{message}");
    // "Accept" without a decision in Keel: asked again, the same approval.
    let again = step("charge_big_accepted_unapproved");
    assert_eq!(again["result_type"], "input_required", "{again}");
    assert_eq!(again["approval_id"], approval, "{again}");
    // A state altered, or presented with other arguments: refused.
    for name in ["charge_big_tampered", "charge_big_other_args"] {
        let refused = step(name);
        assert_eq!(refused["code"], -32602, "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("requestState"), "{refused}");
    }
    let done = step("charge_big_approved");
    assert_eq!(
        (done["result_type"].as_str(), done["is_error"].as_bool()),
        (Some("complete"), Some(false)),
        "{done}"
    );

    // The person sees Keel's form once per call; what they do in Keel decides.
    let approved = step("charge_auto_approved");
    assert_eq!(approved["is_error"], false, "{approved}");
    let rejected = step("charge_auto_rejected");
    assert_eq!(rejected["is_error"], true, "{rejected}");
    assert_eq!(rejected["structured"]["class"], "approval_denied", "{rejected}");
    // Declining to wait decides nothing: the call is still pending in Keel.
    let declined = step("charge_auto_declined");
    assert_eq!(declined["is_error"], true, "{declined}");
    assert_eq!(declined["structured"]["status"], "waiting_approval", "{declined}");
    for s in [approved, rejected, declined] {
        let seen = s["seen"].as_array().unwrap();
        assert_eq!(seen.len(), 1, "{s}");
        let id = seen[0]["approval_id"].as_str().unwrap();
        assert!(seen[0]["message"].as_str().unwrap().contains(id), "{s}");
    }
    assert_eq!(declined["seen"][0]["approval_id"], declined["structured"]["approval_id"]);

    // Orders 1 (once), 3 and 4 (approved); 2 refused, 5 rejected, 6 still waiting.
    assert_eq!(orders(&b.payments), vec![1, 3, 4], "{:?}", b.payments.charges());
}

#[test]
fn the_official_mcp_client_calls_tools_through_keel_serve() {
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, &format!("{TOOLS}\n{KEYS}"));
    let (mut child, port) = serve(&b, None);
    let base = format!("http://127.0.0.1:{port}");

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

    let steps = client(&b, &["legacy", "http", &format!("{base}/mcp"), AGENT, &base, APPROVER]);
    assert_eq!(steps["approved"]["status"], 200, "{steps:#?}");
    check(&steps, &b, Era::Legacy);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_official_mcp_client_calls_tools_through_keel_mcp_on_stdio() {
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, TOOLS);
    let steps = client(&b, &["legacy", "stdio", env!("CARGO_BIN_EXE_keel")]);
    assert_eq!(steps["approved"]["status"], 0, "{steps:#?}");
    check(&steps, &b, Era::Legacy);
}

/// The official client in its default mode: it finds `server/discover`, speaks
/// 2026-07-28 with no `initialize`, and meets approvals as input-required results.
/// A tool whose arguments a 2026-07-28 client mirrors into `Mcp-Param-*` headers.
const ROUTED: &str = r#"
[tools.routed]
kind = "command"
argv = ["echo", "{}"]
params = { type = "object", properties = { region = { type = "string", "x-mcp-header" = "Region" }, count = { type = "integer", "x-mcp-header" = "Count" }, deep = { type = "object", properties = { flag = { type = "boolean", "x-mcp-header" = "Flag" } } } } }
"#;

#[test]
fn the_official_mcp_client_speaks_2026_07_28_to_keel_serve() {
    let config = format!("{TOOLS}\n{KEYS}\n{ROUTED}");
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, &config);
    let (mut child, port) = serve(&b, None);
    let base = format!("http://127.0.0.1:{port}");

    // The headers must mirror the body; a version not served is named with those that are.
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
    let list = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{{meta}}}}}"#);
    let v = "mcp-protocol-version: 2026-07-28\r\n";
    let (status, body) = raw_with(port, Some(AGENT), &format!("{v}mcp-method: tools/list\r\n"), &list);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""resultType":"complete""#), "{body}");
    for extra in ["mcp-method: tools/list\r\n", v, &format!("{v}mcp-method: tools/call\r\n")] {
        let (status, body) = raw_with(port, Some(AGENT), extra, &list);
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body.contains("-32020"), "{body}");
    }
    let call = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"notify","arguments":{{"to":"x"}},{meta}}}}}"#
    );
    let c = format!("{v}mcp-method: tools/call\r\n");
    let (status, body) = raw_with(port, Some(AGENT), &format!("{c}mcp-name: charge\r\n"), &call);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32020"), "{body}");
    let (status, body) = raw_with(port, Some(AGENT), &c, &call);
    assert_eq!(status, 400, "no Mcp-Name: {body}");
    let future = list.replace("2026-07-28", "2099-01-01");
    let (status, body) = raw_with(
        port,
        Some(AGENT),
        "mcp-protocol-version: 2099-01-01\r\nmcp-method: tools/list\r\n",
        &future,
    );
    assert_eq!(status, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], -32022, "{body}");
    assert_eq!(e["error"]["data"]["supported"][0], "2026-07-28", "{body}");
    let nope = list.replace("tools/list", "resources/list");
    let (status, body) = raw_with(port, Some(AGENT), &format!("{v}mcp-method: resources/list\r\n"), &nope);
    assert_eq!(status, 404, "{body}");
    assert_eq!(raw(port, "GET", Some(AGENT), "").0, 405);
    assert_eq!(raw(port, "POST", Some(APPROVER), &list).0, 403);

    let steps = client(&b, &["auto", "http", &format!("{base}/mcp"), AGENT, &base, APPROVER]);
    assert_eq!(steps["approved"]["status"], 200, "{steps:#?}");
    assert_eq!(steps["rejected"]["status"], 200, "{steps:#?}");
    check(&steps, &b, Era::Modern);
    // The official client's Mcp-Param-* headers (one base64-wrapped) fit Keel's check.
    let routed = &steps["routed"];
    assert_eq!(routed["is_error"], false, "{routed}");
    // What the person declined to wait for is still pending in Keel.
    let approval = steps["charge_auto_declined"]["structured"]["approval_id"].as_str().unwrap();
    let (status, body) = api(port, "GET", &format!("/api/approvals/{approval}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"pending""#), "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_official_mcp_client_speaks_2026_07_28_to_keel_mcp_on_stdio() {
    let b = Bench::new(Faults { fail_first: 1, ..Faults::default() }, TOOLS);
    let steps = client(&b, &["auto", "stdio", env!("CARGO_BIN_EXE_keel")]);
    assert_eq!(steps["approved"]["status"], 0, "{steps:#?}");
    assert_eq!(steps["rejected"]["status"], 0, "{steps:#?}");
    check(&steps, &b, Era::Modern);
}

/// One request to Keel's API with the approver's key: status and body.
fn api(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
         authorization: Bearer {APPROVER}\r\ncontent-length: 0\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}

/// Starts `keel serve` on a free loopback port (on `storage` when given); returns it
/// and its port.
fn serve(b: &Bench, storage: Option<&str>) -> (std::process::Child, u16) {
    let mut cmd = b.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("AGENT_KEY", AGENT).env("APPROVER_KEY", APPROVER).stdout(Stdio::piped()).stderr(Stdio::null());
    if let Some(url) = storage {
        cmd.env("KEEL_TEST_STORAGE", url);
    }
    let mut child = cmd.spawn().unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    // Drained, so that later lines never meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let port =
        first.trim().rsplit(':').next().unwrap().parse().unwrap_or_else(|_| panic!("no port in {first:?}"));
    (child, port)
}

/// One JSON-RPC request to `port`'s `/mcp`: its `result`.
fn rpc(port: u16, id: u64, method: &str, params: Value) -> Value {
    let body =
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let (status, answer) = raw_with(port, Some(AGENT), "mcp-protocol-version: 2025-11-25\r\n", &body);
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["id"], id, "{answer}");
    answer["result"].clone()
}

/// One 2026-07-28 request to `port`'s `/mcp` (the envelope in `_meta`, a client that
/// can show a form; the headers mirroring the body): its `result`.
fn rpc_modern(port: u16, id: u64, method: &str, mut params: Value) -> Value {
    params["_meta"] = serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}},
    });
    let name = params["name"].as_str().map(|n| format!("mcp-name: {n}\r\n")).unwrap_or_default();
    let body =
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let headers = format!("mcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n{name}");
    let (status, answer) = raw_with(port, Some(AGENT), &headers, &body);
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["id"], id, "{answer}");
    answer["result"].clone()
}

/// Approves `approval` through `port`'s API.
fn approve_on(port: u16, approval: &str) {
    let (status, body) = api(port, "POST", &format!("/api/approvals/{approval}/approve"));
    assert_eq!(status, 200, "{body}");
}

/// Two `keel serve` instances on one PostgreSQL, and one client whose consecutive
/// requests land on either: no session lives in one instance's memory. A call
/// waiting for approval on one is approved and answered on the other (as a
/// 2026-07-28 input-required round trip too: the retry's `requestState` is checked
/// against the shared journal, not against either process), and a retried charge is
/// made once.
#[test]
fn two_keel_serve_instances_on_postgres_answer_one_mcp_client_in_turn() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = rt.block_on(keel_testkit::postgres_database());
    let config = format!("{TOOLS}\n{KEYS}\n[storage]\nurl_env = \"KEEL_TEST_STORAGE\"\n");
    let b = Bench::new(Faults::default(), &config);
    let (mut one, a) = serve(&b, Some(&url));
    let (mut two, z) = serve(&b, Some(&url));

    let init = serde_json::json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}});
    assert_eq!(rpc(a, 1, "initialize", init)["protocolVersion"], "2025-11-25");
    // No handshake state: the other instance answers the next request.
    let tools = rpc(z, 2, "tools/list", serde_json::json!({}));
    assert_eq!(tools["tools"].as_array().unwrap().len(), 2, "{tools}");

    let big = serde_json::json!({"name": "charge", "arguments": {"order": 7, "amount": 150}});
    let pending = rpc(a, 3, "tools/call", big.clone());
    assert_eq!(pending["structuredContent"]["status"], "waiting_approval", "{pending}");
    let approval = pending["structuredContent"]["approval_id"].as_str().unwrap().to_owned();
    // An approver's key is not an agent's.
    assert_eq!(request(z, "POST", Some(APPROVER), "", "{}").0, 403);
    approve_on(z, &approval);
    let done = rpc(z, 4, "tools/call", big.clone());
    assert_eq!(done["isError"], false, "{done}");
    let again = rpc(a, 5, "tools/call", big);
    assert_eq!(again["isError"], false, "{again}");
    assert_eq!(again["_meta"]["keel/replayed"], true, "{again}");
    assert_eq!(again["_meta"]["keel/runId"], done["_meta"]["keel/runId"]);

    let small = serde_json::json!({"name": "charge", "arguments": {"order": 8, "amount": 10}});
    let first = rpc(z, 6, "tools/call", small.clone());
    let retried = rpc(a, 7, "tools/call", small);
    assert_eq!(first["isError"], false, "{first}");
    assert_eq!(retried["_meta"]["keel/replayed"], true, "{retried}");

    // 2026-07-28: asked on one instance, approved and retried on the other.
    let big = serde_json::json!({"name": "charge", "arguments": {"order": 9, "amount": 150}});
    let asked = rpc_modern(a, 8, "tools/call", big.clone());
    assert_eq!(asked["resultType"], "input_required", "{asked}");
    let approval = asked["_meta"]["keel/approvalId"].as_str().unwrap().to_owned();
    let mut retry = big.clone();
    retry["inputResponses"] = serde_json::json!({"keel.approval": {"action": "accept"}});
    retry["requestState"] = asked["requestState"].clone();
    let still = rpc_modern(z, 9, "tools/call", retry.clone());
    assert_eq!(still["resultType"], "input_required", "{still}");
    approve_on(a, &approval);
    retry["requestState"] = still["requestState"].clone();
    let done = rpc_modern(z, 10, "tools/call", retry);
    assert_eq!(
        (done["resultType"].as_str(), done["isError"].as_bool()),
        (Some("complete"), Some(false)),
        "{done}"
    );
    assert_eq!(orders(&b.payments), vec![7, 8, 9], "{:?}", b.payments.charges());
    for child in [&mut one, &mut two] {
        let _ = child.kill();
        let _ = child.wait();
    }
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
