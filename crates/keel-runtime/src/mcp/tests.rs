//! The MCP client against a real upstream written with the official Python `mcp`
//! package (keel-testkit's `python/mcp_upstream.py`), over stdio and streamable HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{ErrorClass, TokioClock};
use serde_json::{Value, json};

use crate::config::Config;
use crate::tool::Tool;

const SECRET: &str = "sk-admin-must-never-reach-a-tool";

/// A config with one MCP server `up` (`server` is its table's body), connected.
async fn connect(dir: &Path, server: &str) -> Config {
    let text =
        format!("[mcp_servers.up]\n{server}\n[mcp_servers.up.policy]\nretry = {{ max_attempts = 1 }}\n",);
    let state = dir.to_string_lossy().into_owned();
    let env = move |name: &str| match name {
        "PATH" => std::env::var("PATH").ok(),
        "HOME" => Some("/nonexistent".into()),
        "KEEL_ADMIN_KEY" => Some(SECRET.into()),
        "TEST_STATE" => Some(state.clone()),
        "UP_TOKEN" => Some("up-token-4f2a".into()),
        _ => None,
    };
    let mut config = Config::parse(&text, &dir.join("keel.toml"), &env).expect("the config is valid");
    config.connect_mcp().await.expect("the server starts and lists its tools");
    config
}

fn stdio(extra: &str) -> String {
    format!(
        "command = [{:?}, {:?}]\nenv_from = {{ STATE_DIR = \"TEST_STATE\" }}\n{extra}",
        keel_testkit::python_with_mcp().to_string_lossy(),
        keel_testkit::mcp_upstream_script().to_string_lossy(),
    )
}

fn tool(config: &Config, name: &str) -> Arc<Tool> {
    config.tools.get(name).unwrap_or_else(|| panic!("no tool {name} in {:?}", config.tools.keys())).clone()
}

async fn call(config: &Config, name: &str, args: Value) -> Result<Value, keel_core::Failure> {
    let t = tool(config, name);
    t.check_params(&args)?;
    t.invoke_with_key(&args, &TokioClock::new(), "key-1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_servers_tools_are_offered_with_their_hints_and_a_clean_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = connect(dir.path(), &stdio("approval = \"writes\"\n")).await;
    let names: Vec<&String> = config.tools.keys().collect();
    assert_eq!(names, ["up_charge", "up_die", "up_fail", "up_lookup", "up_quiet", "up_slow", "up_whoami"]);
    // Annotations decide what is write-like, and `approval = "writes"` asks for those.
    let charge = tool(&config, "up_charge");
    assert!(charge.write);
    assert!(charge.needs_approval(&json!({"order": "a", "amount": 1}), crate::config::Mode::Autonomous));
    let lookup = tool(&config, "up_lookup");
    assert!(!lookup.write);
    assert!(!lookup.needs_approval(&json!({"sku": "x"}), crate::config::Mode::Autonomous));
    // The server's schema is checked before any call.
    let bad = call(&config, "up_lookup", json!({"sku": 5})).await.unwrap_err();
    assert_eq!(bad.class, ErrorClass::InvalidRequest, "{bad:?}");

    let found = call(&config, "up_lookup", json!({"sku": "A-1"})).await.unwrap();
    assert_eq!(found["structured"]["stock"], 7, "{found}");
    // Only the allow-list and what the server declares: no key of Keel's.
    let env: Vec<&str> =
        found["structured"]["env"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for name in &env {
        assert!(
            crate::tool::INHERITED_ENV.contains(name) || *name == "STATE_DIR" || *name == "LC_CTYPE",
            "{name} reached the server: {env:?}"
        );
    }
    assert!(!found.to_string().contains(SECRET));

    // A write-like call carries its idempotency key in `_meta`.
    let charged = call(&config, "up_charge", json!({"order": "o-1", "amount": 3})).await.unwrap();
    assert_eq!(charged["structured"]["charged"], "o-1", "{charged}");
    let log = std::fs::read_to_string(dir.path().join("charges.log")).unwrap();
    assert_eq!(log.trim(), "o-1 3 key-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_results_are_classified_by_the_servers_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = "classify = { stderr = [{ pattern = \"(?i)quota\", class = \"rate_limited\" }] }\n";
    let config = connect(dir.path(), &stdio(rules)).await;
    let quota = call(&config, "up_fail", json!({"message": "Quota exhausted for today"})).await.unwrap_err();
    assert_eq!(quota.class, ErrorClass::RateLimited, "{quota:?}");
    assert!(quota.message.contains("Quota exhausted"), "{quota:?}");
    // The built-in patterns, then the default class.
    let missing =
        call(&config, "up_fail", json!({"message": "no such file or directory"})).await.unwrap_err();
    assert_eq!(missing.class, ErrorClass::NotFound, "{missing:?}");
    let other = call(&config, "up_fail", json!({"message": "something odd"})).await.unwrap_err();
    assert_eq!(other.class, ErrorClass::ServerError, "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_is_circuit_open_during_its_backoff_then_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = connect(dir.path(), &stdio("restart_backoff = \"300ms\"\n")).await;
    let first = call(&config, "up_lookup", json!({"sku": "a"})).await.unwrap();
    let pid = first["structured"]["pid"].as_u64().unwrap();

    let died = call(&config, "up_die", json!({})).await.unwrap_err();
    assert_eq!(died.class, ErrorClass::Network, "{died:?}");
    // At once: the backoff holds, and says why the server went away.
    let held = call(&config, "up_lookup", json!({"sku": "a"})).await.unwrap_err();
    assert_eq!(held.class, ErrorClass::CircuitOpen, "{held:?}");
    assert!(held.message.contains("dying on purpose"), "{held:?}");
    // Then a new process answers (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let again = loop {
        match call(&config, "up_lookup", json!({"sku": "a"})).await {
            Ok(v) => break v,
            Err(f) if f.class == ErrorClass::CircuitOpen && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(f) => panic!("not restarted: {f:?}"),
        }
    };
    assert_ne!(again["structured"]["pid"].as_u64().unwrap(), pid, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_keeps_a_request_alive_and_silence_times_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = connect(dir.path(), &stdio("request_timeout = \"1s\"\n")).await;
    // 2.4 s in all, progress every 0.3 s: longer than the timeout, never silent for it.
    let done = call(&config, "up_slow", json!({"steps": 8, "every": 0.3})).await.unwrap();
    assert_eq!(done["text"], "done after 8 steps", "{done}");
    let silent = call(&config, "up_quiet", json!({"seconds": 5})).await.unwrap_err();
    assert_eq!(silent.class, ErrorClass::Timeout, "{silent:?}");
    // The server is still there for the next call.
    call(&config, "up_lookup", json!({"sku": "b"})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_never_keeps_a_request_past_its_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        connect(dir.path(), &stdio("request_timeout = \"1s\"\nmax_request_time = \"1500ms\"\n")).await;
    // Progress every 0.2 s for 10 s: never silent for a second, but past the maximum.
    let started = tokio::time::Instant::now();
    let capped = call(&config, "up_slow", json!({"steps": 50, "every": 0.2})).await.unwrap_err();
    assert_eq!(capped.class, ErrorClass::Timeout, "{capped:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "stopped at the maximum, not at the end");
    call(&config, "up_lookup", json!({"sku": "c"})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamable_http_server_is_reached_through_keels_http_stack() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new(keel_testkit::python_with_mcp())
        .arg(keel_testkit::mcp_upstream_script())
        .args(["--http", &port.to_string()])
        .env("STATE_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Bounded wait for its port.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the HTTP server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server_entry = format!(
        "url = \"http://127.0.0.1:{port}/mcp\"\nheaders_env = {{ \"X-Upstream-Token\" = \"UP_TOKEN\" }}\n"
    );
    let config = connect(dir.path(), &server_entry).await;
    // The header declared with its value from the environment reaches the upstream.
    let who = call(&config, "up_whoami", json!({})).await.unwrap();
    assert_eq!(who["structured"]["token"], "up-token-4f2a", "{who}");
    let found = call(&config, "up_lookup", json!({"sku": "h"})).await.unwrap();
    assert_eq!(found["structured"]["sku"], "h", "{found}");
    let done = call(&config, "up_slow", json!({"steps": 2, "every": 0.05})).await.unwrap();
    assert_eq!(done["text"], "done after 2 steps", "{done}");
    let quota = call(&config, "up_fail", json!({"message": "rate limit hit"})).await.unwrap_err();
    assert_eq!(quota.class, ErrorClass::RateLimited, "{quota:?}");
    let _ = server.kill().await;
}

#[test]
fn bad_mcp_server_entries_are_errors_naming_their_keys() {
    let cases = [
        ("command = []", "mcp_servers.up.command"),
        ("command = [\"x\"]\nurl = \"http://h/mcp\"", "mcp_servers.up.command"),
        ("url = \"ftp://h/mcp\"", "mcp_servers.up.url"),
        ("url = \"http://h/mcp\"\nenv = { A = \"b\" }", "mcp_servers.up.env"),
        ("command = [\"x\"]\nheaders_env = { X = \"Y\" }", "mcp_servers.up.headers_env"),
        ("url = \"http://h/mcp\"\nheaders = { Authorization = \"Bearer x\" }", "mcp_servers.up.headers"),
        ("command = [\"x\"]\nrequest_timeout = \"1ms\"", "mcp_servers.up.request_timeout"),
        ("command = [\"x\"]\nrestart_max = \"1ms\"", "mcp_servers.up.restart_max"),
        ("command = [\"x\"]\nprefix = \"a b\"", "mcp_servers.up.prefix"),
        ("command = [\"x\"]\ntools = []", "mcp_servers.up.tools"),
        ("command = [\"x\"]\nread_only = [\"a\"]\nwrite = [\"a\"]", "mcp_servers.up.write"),
        ("command = [\"x\"]\nenv_from = { A = \"UNSET_VAR\" }", "mcp_servers.up.env_from"),
        ("command = [\"x\"]\nenv = { KEEL_IDEMPOTENCY_KEY = \"x\" }", "mcp_servers.up.env"),
        (
            "command = [\"x\"]\npolicy = { retry = { max_attempts = 0 } }",
            "mcp_servers.up.policy.retry.max_attempts",
        ),
        (
            "command = [\"x\"]\nclassify = { stderr = [{ pattern = \"(\", class = \"timeout\" }] }",
            "mcp_servers.up.classify",
        ),
        ("command = [\"x\"]\nnonsense = 1", "mcp_servers.up"),
    ];
    for (body, key) in cases {
        let text = format!("[mcp_servers.up]\n{body}\n");
        let errors = Config::parse(&text, Path::new("keel.toml"), &|_| None)
            .map(|_| ())
            .expect_err(&format!("accepted: {body}"));
        assert!(
            errors.0.iter().any(|e| e.key.as_deref().is_some_and(|k| k.starts_with(key))),
            "{body}: expected {key}, got {errors:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_start_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[mcp_servers.gone]\ncommand = [\"/nonexistent/mcp-server\"]\n";
    let mut config = Config::parse(text, &dir.path().join("keel.toml"), &|_| None).unwrap();
    let errors = config.connect_mcp().await.unwrap_err();
    assert_eq!(errors.0[0].key.as_deref(), Some("mcp_servers.gone"), "{errors:?}");
    assert!(errors.0[0].message.contains("cannot start"), "{errors:?}");
}

fn received(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("received.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_gets_no_panic_no_hang_and_no_wrong_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = format!(
        "command = [{:?}, {:?}]\nenv_from = {{ STATE_DIR = \"TEST_STATE\" }}\nrequest_timeout = \"2s\"\nrestart_backoff = \"100ms\"\n",
        keel_testkit::python_with_mcp().to_string_lossy(),
        keel_testkit::mcp_hostile_script().to_string_lossy(),
    );
    // It refuses `server/discover`: the `initialize` handshake follows.
    let config = connect(dir.path(), &server).await;
    let got = received(dir.path());
    let methods: Vec<&str> = got.iter().filter_map(|m| m["method"].as_str()).collect();
    assert_eq!(methods[..3], ["server/discover", "initialize", "notifications/initialized"], "{methods:?}");

    // Noise, a stray answer and a duplicate around the real answer.
    let chatty = call(&config, "up_chatty", json!({})).await.unwrap();
    assert_eq!(chatty["text"], "chatty answer", "{chatty}");
    // The server's own requests are answered: `ping` with a result, what Keel does
    // not offer with an error; only then does the server answer the call.
    let asks = call(&config, "up_asks", json!({})).await.unwrap();
    assert_eq!(asks["text"], "both answered", "{asks}");
    let got = received(dir.path());
    let reply = |prefix: &str| {
        got.iter().find(|m| m["id"].as_str().is_some_and(|id| id.starts_with(prefix))).cloned().unwrap()
    };
    assert_eq!(reply("p-")["result"], json!({}));
    assert_eq!(reply("r-")["error"]["code"], -32601);

    // Never answered: a timeout, and the server is told the request is cancelled.
    let mute = call(&config, "up_mute", json!({})).await.unwrap_err();
    assert_eq!(mute.class, ErrorClass::Timeout, "{mute:?}");
    // (The server records it on its own time: a bounded wait.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !received(dir.path()).iter().any(|m| m["method"] == "notifications/cancelled") {
        assert!(tokio::time::Instant::now() < deadline, "never cancelled: {:?}", received(dir.path()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same session answers the next call.
    assert_eq!(call(&config, "up_chatty", json!({})).await.unwrap()["text"], "chatty answer");

    // A line past the bound ends the session (never read whole) ...
    let huge = call(&config, "up_huge", json!({})).await.unwrap_err();
    assert_eq!(huge.class, ErrorClass::Network, "{huge:?}");
    // ... and a new one starts after the backoff (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match call(&config, "up_chatty", json!({})).await {
            Ok(v) => {
                assert_eq!(v["text"], "chatty answer");
                break;
            }
            Err(f) if f.class == ErrorClass::CircuitOpen && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(f) => panic!("not restarted: {f:?}"),
        }
    }
}
