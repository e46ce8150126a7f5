//! Keel as an MCP gateway: `keel serve` starts an upstream MCP server written with
//! the official Python `mcp` package (`[mcp_servers.up]`) and offers its tools on
//! its own `/mcp` and `/api/tools`. A write-like call repeated with the same
//! arguments is made once upstream; the upstream killed mid-session makes its tools
//! `circuit_open`, and they answer again once Keel has started it anew; a read-only
//! call repeated too often by one caller is stopped by the loop guard.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use keel_examples::payments::Faults;
use serde_json::{Value, json};

use crate::support::{Bench, eventually};

const AGENT: &str = "agent-key-0123456789";

fn config() -> String {
    format!(
        r#"
[server]
workers = 1
keys = [{{ name = "bot", key_env = "AGENT_KEY", role = "agent" }}]

[mcp_servers.up]
command = [{:?}, {:?}]
env_from = {{ STATE_DIR = "UPSTREAM_STATE" }}
restart_backoff = "200ms"
policy = {{ retry = {{ max_attempts = 1 }} }}
"#,
        keel_testkit::python_with_mcp().to_string_lossy(),
        keel_testkit::mcp_upstream_script().to_string_lossy(),
    )
}

/// One JSON-RPC request to `/mcp`: its `result`.
fn rpc(port: u16, id: u64, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\nauthorization: Bearer {AGENT}\r\n\
         mcp-protocol-version: 2025-11-25\r\ncontent-type: application/json\r\n\
         accept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{text}");
    let answer: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    answer["result"].clone()
}

fn call(port: u16, id: u64, tool: &str, args: Value) -> Value {
    rpc(port, id, "tools/call", json!({"name": tool, "arguments": args}))
}

#[test]
fn keel_serve_proxies_an_upstream_mcp_server_under_its_policies() {
    let b = Bench::new(Faults::default(), &config());
    let state = tempfile::tempdir().unwrap();
    let mut cmd = b.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("AGENT_KEY", AGENT)
        .env("UPSTREAM_STATE", state.path())
        .env("KEEL_ADMIN_SECRET", "sk-admin-never-for-tools")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let port: u16 = first.trim().rsplit(':').next().unwrap().parse().unwrap_or_else(|_| panic!("{first:?}"));

    // The upstream's tools, under the prefix, with Keel's hints.
    let listed = rpc(port, 1, "tools/list", json!({}));
    let tools = listed["tools"].as_array().unwrap();
    let hint = |name: &str| {
        tools.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name} in {listed}"))["annotations"]
            ["readOnlyHint"]
            .clone()
    };
    assert_eq!(hint("up_lookup"), true);
    assert_eq!(hint("up_charge"), false);

    let found = call(port, 2, "up_lookup", json!({"sku": "A-1"}));
    assert_eq!(found["isError"], false, "{found}");
    assert_eq!(found["structuredContent"]["structured"]["stock"], 7, "{found}");
    assert!(!found.to_string().contains("sk-admin"), "{found}");

    // Write-like: the repeat is answered from the first call, the upstream charged once.
    let charged = call(port, 3, "up_charge", json!({"order": "o-9", "amount": 5}));
    assert_eq!(charged["isError"], false, "{charged}");
    let again = call(port, 4, "up_charge", json!({"amount": 5, "order": "o-9"}));
    assert_eq!(again["_meta"]["keel/replayed"], true, "{again}");
    let log = std::fs::read_to_string(state.path().join("charges.log")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");

    // Bad arguments never reach the upstream.
    let bad = call(port, 5, "up_charge", json!({"order": "o-10", "amount": "lots"}));
    assert_eq!(bad["structuredContent"]["class"], "invalid_request", "{bad}");

    // The upstream dies mid-session: its tools are circuit_open, then answer again
    // from a new process.
    let pid = found["structuredContent"]["structured"]["pid"].as_u64().unwrap();
    let died = call(port, 6, "up_die", json!({}));
    assert_eq!(died["isError"], true, "{died}");
    let held = call(port, 7, "up_lookup", json!({"sku": "B-2"}));
    assert_eq!(held["structuredContent"]["class"], "circuit_open", "{held}");
    let (mut back, mut n) = (Value::Null, 0);
    eventually("the upstream started again", Duration::from_secs(30), || {
        // Other arguments each time: the same call again and again is a loop.
        n += 1;
        back = call(port, 8, "up_lookup", json!({"sku": format!("C-{n}")}));
        if back["isError"] == true {
            assert_eq!(back["structuredContent"]["class"], "circuit_open", "{back}");
        }
        back["isError"] == false
    });
    assert_ne!(back["structuredContent"]["structured"]["pid"].as_u64().unwrap(), pid, "{back}");

    // The same read-only call a third time within the caller's last ten is a loop:
    // refused before it runs (`[run] loop_guard`, 3 repeats by default).
    for id in [9, 10] {
        assert_eq!(call(port, id, "up_lookup", json!({"sku": "L"}))["isError"], false);
    }
    let looped = call(port, 11, "up_lookup", json!({"sku": "L"}));
    assert_eq!(looped["structuredContent"]["class"], "loop_detected", "{looped}");
    let _ = child.kill();
    let _ = child.wait();
}
