use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use keel_core::{ErrorClass, TokioClock};
use serde_json::{Value, json};

use crate::config::Config;

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("keel.toml"), &|n| (n == "TOKEN").then(|| "Bearer t0k".to_owned())).unwrap()
}

fn command(argv: &str, extra: &str) -> Arc<super::Tool> {
    config(&format!("[tools.t]\nkind = \"command\"\nargv = {argv}\n{extra}")).tools.remove("t").unwrap()
}

#[tokio::test]
async fn a_command_answers_with_its_output_and_parsed_json() {
    let t = command(r#"["sh", "-c", "echo '{\"n\": {{n}}}'"]"#, "");
    let out = t.invoke(&json!({"n": 4}), &TokioClock::new()).await.unwrap();
    assert_eq!(out["json"], json!({"n": 4}));
    assert_eq!(out["exit_code"], 0);
}

#[tokio::test]
async fn arguments_are_never_shell_parsed() {
    let t = command(r#"["echo", "{{text}}"]"#, "");
    let out = t.invoke(&json!({"text": "$(touch /tmp/keel-pwned); `id`"}), &TokioClock::new()).await.unwrap();
    assert_eq!(out["stdout"], "$(touch /tmp/keel-pwned); `id`\n");
}

#[tokio::test]
async fn exits_and_stderr_are_classified() {
    let t = command(r#"["sh", "-c", "echo 'user 7 not found' >&2; exit 1"]"#, "");
    let e = t.invoke(&json!({}), &TokioClock::new()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::NotFound);
    assert!(e.message.contains("user 7 not found"), "{}", e.message);
    let t = command(r#"["/no/such/program"]"#, "");
    assert_eq!(t.invoke(&json!({}), &TokioClock::new()).await.unwrap_err().class, ErrorClass::NotFound);
    let t = command(r#"["sh", "-c", "exit 3"]"#, "classify = { exit_codes = { 3 = \"conflict\" } }");
    assert_eq!(t.invoke(&json!({}), &TokioClock::new()).await.unwrap_err().class, ErrorClass::Conflict);
}

#[tokio::test]
async fn output_is_capped() {
    let t = command(r#"["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"]"#, "max_output = 1000");
    let out = t.invoke(&json!({}), &TokioClock::new()).await.unwrap();
    assert_eq!(out["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(out["truncated"], true);
}

fn alive(pid: i32) -> bool {
    // A killed process may linger as a zombie until reaped: that is not alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_hanging_command_is_killed_with_its_children_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let t = command(r#"["sh", "-c", "sleep 300 & echo $! > {{pidfile}}; sleep 300"]"#, "");
    let params = json!({"pidfile": pidfile.to_str().unwrap()});
    let clock = TokioClock::new();
    let r = tokio::time::timeout(Duration::from_millis(500), t.invoke(&params, &clock)).await;
    assert!(r.is_err(), "the command hangs");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // Wait for the kill to land, with a bound; never a fixed sleep.
    let mut waited = 0;
    while alive(pid) && waited < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert!(!alive(pid), "the background child {pid} was killed with the group");
}

#[derive(Default)]
struct Seen {
    headers: Vec<HeaderMap>,
    bodies: Vec<Value>,
}

async fn upstream() -> (String, Arc<Mutex<Seen>>) {
    use axum::routing::post;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let app = axum::Router::new()
        .route(
            "/charge/{order}",
            post(
                move |axum::extract::Path(order): axum::extract::Path<String>,
                      headers: HeaderMap,
                      axum::Json(body): axum::Json<Value>| {
                    let s = s.clone();
                    async move {
                        s.lock().unwrap().headers.push(headers);
                        s.lock().unwrap().bodies.push(body.clone());
                        axum::Json(json!({"order": order, "charged": body["amount"]}))
                    }
                },
            ),
        )
        .route(
            "/busy",
            post(|| async { (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")], "slow down") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn an_http_tool_sends_its_template_and_secret_headers() {
    let (base, seen) = upstream().await;
    let c = config(&format!(
        r#"
[tools.charge]
kind = "http"
url = "{base}/charge/{{{{order}}}}"
headers_env = {{ Authorization = "TOKEN" }}
body = {{ amount = "{{{{amount}}}}", memo = "order {{{{order}}}}" }}
"#
    ));
    let out = c.tools["charge"]
        .invoke_with_key(&json!({"order": "a/1", "amount": 12}), &TokioClock::new(), "key-1")
        .await
        .unwrap();
    assert_eq!(out, json!({"status": 200, "body": {"order": "a/1", "charged": 12}}));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.bodies[0], json!({"amount": 12, "memo": "order a/1"}));
    assert_eq!(seen.headers[0]["authorization"], "Bearer t0k");
    assert_eq!(seen.headers[0]["idempotency-key"], "key-1");
}

#[tokio::test]
async fn an_http_429_carries_its_retry_after_and_a_dead_port_is_network() {
    let (base, _) = upstream().await;
    let c = config(&format!(
        "[tools.busy]\nkind = \"http\"\nurl = \"{base}/busy\"\n[tools.dead]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n"
    ));
    let e = c.tools["busy"].invoke(&json!({}), &TokioClock::new()).await.unwrap_err();
    assert_eq!((e.class, e.retry_after), (ErrorClass::RateLimited, Some(Duration::from_secs(7))));
    let e = c.tools["dead"].invoke(&json!({}), &TokioClock::new()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Network);
    assert!(!e.message.contains("127.0.0.1:9/x"), "URLs may hold secrets: {}", e.message);
}

#[test]
fn an_above_rule_fails_closed_on_every_value_it_cannot_compare() {
    let c = config(
        "[tools.pay]\nkind = \"command\"\nargv = [\"true\"]\napproval = { param = \"amount\", above = 100 }\n\
         params = { type = \"object\", properties = { amount = { type = \"number\" } } }\n",
    );
    let pay = &c.tools["pay"];
    let asks = |params: Value| pay.needs_approval(&params, crate::config::Mode::Autonomous);
    for hostile in [
        json!({"amount": "5000"}),
        json!({"amount": [5000]}),
        json!({"amount": {"value": 5000}}),
        json!({"amount": null}),
        json!({"amount": true}),
        json!({"Amount": 5000}),
        json!({"AMOUNT": 5000, "amount ": 5000}),
        json!({}),
        json!([5000]),
        json!("amount=5000"),
        json!(null),
    ] {
        assert!(asks(hostile.clone()), "{hostile} needs approval");
    }
    assert!(asks(json!({"amount": 5000})));
    assert!(asks(json!({"amount": 100.000_001})));
    assert!(!asks(json!({"amount": 100})), "not above");
    assert!(!asks(json!({"amount": -5})));
    // A threshold that compares with nothing (only Rust can build it) asks too.
    let mut nan = (**pay).clone();
    nan.approval = crate::config::ApprovalRule::Above { param: "amount".into(), above: f64::NAN };
    assert!(nan.needs_approval(&json!({"amount": 1}), crate::config::Mode::Autonomous));
}

// ---- Least privilege: a tool gets a clean environment and its own directory. ----

/// A host environment for `Config::parse`: the allow-listed few, and secrets.
fn host(name: &str) -> Option<String> {
    match name {
        "PATH" => Some("/usr/local/bin:/usr/bin:/bin".to_owned()),
        "HOME" => Some("/home/keel".to_owned()),
        "AGENT_KEY" => Some("agent-secret-0123456789".to_owned()),
        "PAYMENTS_TOKEN" => Some("payments-secret-42".to_owned()),
        _ => None,
    }
}

fn env_lines(out: &Value) -> Vec<String> {
    let mut lines: Vec<String> = out["stdout"].as_str().unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn a_command_sees_only_the_allow_list_what_it_declares_and_its_call_key() {
    let c = Config::parse(
        r#"
[server]
keys = [{ name = "bot", key_env = "AGENT_KEY", role = "agent" }]
[tools.env]
kind = "command"
argv = ["/usr/bin/env"]
env = { MODE = "test" }
env_from = { API_TOKEN = "PAYMENTS_TOKEN" }
[tools.bare]
kind = "command"
argv = ["/usr/bin/env"]
"#,
        Path::new("keel.toml"),
        &host,
    )
    .unwrap();
    let out = c.tools["env"].invoke_with_key(&json!({}), &TokioClock::new(), "k-1").await.unwrap();
    assert_eq!(
        env_lines(&out),
        [
            "API_TOKEN=payments-secret-42",
            "HOME=/home/keel",
            "KEEL_IDEMPOTENCY_KEY=k-1",
            "MODE=test",
            "PATH=/usr/local/bin:/usr/bin:/bin"
        ]
    );
    let out = c.tools["bare"].invoke(&json!({}), &TokioClock::new()).await.unwrap();
    assert_eq!(env_lines(&out), ["HOME=/home/keel", "PATH=/usr/local/bin:/usr/bin:/bin"]);

    // The real process environment (this test's: CARGO_*, the shell's...) is not
    // inherited either: Keel's own environment is where its secrets live.
    let c = Config::parse(
        "[tools.t]\nkind = \"command\"\nargv = [\"/usr/bin/env\"]\n",
        Path::new("keel.toml"),
        &|n| std::env::var(n).ok(),
    )
    .unwrap();
    let out = c.tools["t"].invoke(&json!({}), &TokioClock::new()).await.unwrap();
    let stdout = out["stdout"].as_str().unwrap();
    let foreign: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| !super::INHERITED_ENV.contains(&k.as_str())).collect();
    assert!(!foreign.is_empty(), "this test needs a variable outside the allow-list in its environment");
    for (k, _) in &foreign {
        assert!(
            !stdout.lines().any(|l| l.starts_with(&format!("{k}="))),
            "`{k}` leaked into the tool: {stdout}"
        );
    }
}

#[tokio::test]
async fn without_cwd_a_command_runs_in_a_fresh_private_directory_removed_after() {
    let t = command(r#"["sh", "-c", "pwd; ls -a | wc -l; stat -c %a ."]"#, "");
    let out = t.invoke(&json!({}), &TokioClock::new()).await.unwrap();
    let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    let dir = std::path::PathBuf::from(lines[0]);
    assert!(dir.starts_with(std::env::temp_dir()), "{dir:?}");
    assert_ne!(dir, std::env::current_dir().unwrap());
    assert_eq!(lines[1].trim(), "2", "empty: only . and ..");
    assert_eq!(lines[2], "700", "private to Keel's user");
    assert!(!dir.exists(), "removed when the attempt ended");
    let again = t.invoke(&json!({}), &TokioClock::new()).await.unwrap();
    assert_ne!(again["stdout"].as_str().unwrap().lines().next(), Some(lines[0]), "one per attempt");
}

#[tokio::test]
async fn a_relative_cwd_is_the_config_files_directory() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("work")).unwrap();
    let file = d.path().join("keel.toml");
    let c = Config::parse("[tools.t]\nkind = \"command\"\nargv = [\"pwd\"]\ncwd = \"work\"\n", &file, &host)
        .unwrap();
    let out = c.tools["t"].invoke(&json!({}), &TokioClock::new()).await.unwrap();
    assert_eq!(out["stdout"].as_str().unwrap().trim(), d.path().join("work").to_str().unwrap());
}

#[test]
fn bad_env_and_cwd_are_refused_at_config_time_with_key_and_line() {
    let text = r#"
[tools.ok]
kind = "command"
argv = ["true"]

[tools.t]
kind = "command"
argv = ["true"]
cwd = "no/such/dir"
env = { KEEL_IDEMPOTENCY_KEY = "forged", "A=B" = "x" }
env_from = { TOKEN = "NOT_SET_ANYWHERE" }
"#;
    let e = Config::parse(text, Path::new("keel.toml"), &host).unwrap_err().to_string();
    for want in [
        "keel.toml:6: tools.t.cwd: `no/such/dir` is not a directory",
        "keel.toml:6: tools.t.env: `KEEL_IDEMPOTENCY_KEY`: `KEEL_*` variables are set by Keel",
        "keel.toml:6: tools.t.env: `A=B` is not a valid environment variable name",
        "keel.toml:6: tools.t.env_from: environment variable `NOT_SET_ANYWHERE` is not set",
    ] {
        assert!(e.contains(want), "missing `{want}` in:\n{e}");
    }
}

// ---- Parameters never become code: a template inside `sh -c` is warned about. ----

fn warnings(argv: &str) -> Vec<String> {
    let c = Config::parse(
        &format!("\n[tools.t]\nkind = \"command\"\nargv = {argv}\n"),
        Path::new("keel.toml"),
        &host,
    )
    .unwrap();
    c.warnings.iter().map(ToString::to_string).collect()
}

#[test]
fn a_template_inside_interpreted_code_is_warned_about_and_data_arguments_are_not() {
    let w = warnings(r#"["sh", "-c", "echo '{{sku}}'"]"#);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("keel.toml:2: tools.t.argv[2]: a `{{param}}` inside the code `sh -c` runs"),
        "{w:?}"
    );
    for argv in [
        r#"["/bin/bash", "-ec", "curl {{url}}"]"#,
        r#"["timeout", "5", "dash", "-x", "-c", "x={{v}}"]"#,
        r#"["/usr/bin/env", "zsh", "-c", "{{cmd}}"]"#,
        r#"["python3.12", "-c", "print('{{name}}')"]"#,
        r#"["perl", "-e", "print '{{name}}'"]"#,
        r#"["node", "-e", "console.log('{{name}}')"]"#,
        r#"["awk", "-F,", "{ print \"{{x}}\" }"]"#,
        r#"["{{program}}", "--help"]"#,
    ] {
        assert_eq!(warnings(argv).len(), 1, "{argv}: {:?}", warnings(argv));
    }
    for argv in [
        r#"["sh", "-c", "echo \"$1\"", "sh", "{{sku}}"]"#,
        r#"["echo", "{{sku}}"]"#,
        r#"["python3", "script.py", "{{sku}}"]"#,
        r#"["awk", "-f", "prog.awk", "{{file}}"]"#,
        r#"["shred", "-c", "{{x}}"]"#,
    ] {
        assert_eq!(warnings(argv), Vec::<String>::new(), "{argv}");
    }
}

#[tokio::test]
async fn the_example_config_is_not_injectable_and_has_no_warning() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/payments/keel.toml");
    let c = Config::parse(&std::fs::read_to_string(&path).unwrap(), &path, &host).unwrap();
    assert_eq!(c.warnings, [], "the example shows the safe way");
    let t = &c.tools["check_stock"];
    let out = t.invoke(&json!({"sku": "KEEL-42"}), &TokioClock::new()).await.unwrap();
    assert_eq!(out["json"], json!({"sku": "KEEL-42", "in_stock": true}));
    let attack = json!({"sku": "'; printenv AGENT_KEY; echo '"});
    let e = t.check_params(&attack).unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest);
    // Even past the schema, the value is one argument of printf, never shell code.
    let out = t.invoke(&attack, &TokioClock::new()).await.unwrap();
    assert_eq!(out["stdout"], r#"{"sku": "'; printenv AGENT_KEY; echo '", "in_stock": true}"#);
}

// ---- A parameter never moves an http tool's request to another path or host. ----

/// A loopback server recording the raw path of every request it gets, and whether it
/// carried the secret header.
async fn recorder() -> (String, Arc<Mutex<Vec<(String, bool)>>>) {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap| {
        let h = h.clone();
        async move {
            let secret = headers.get("authorization").is_some_and(|v| v == "Bearer t0k");
            h.lock().unwrap().push((uri.path().to_owned(), secret));
            axum::Json(json!({"ok": true}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

#[tokio::test]
async fn dot_segments_in_parameters_cannot_move_the_secret_header_to_another_path() {
    let (base, hits) = recorder().await;
    let c = config(&format!(
        r#"
[tools.file]
kind = "http"
method = "GET"
url = "{base}/files/{{{{name}}}}/meta?v={{{{name}}}}"
headers_env = {{ Authorization = "TOKEN" }}
[tools.ext]
kind = "http"
method = "GET"
url = "{base}/files/.{{{{ext}}}}"
headers_env = {{ Authorization = "TOKEN" }}
"#
    ));
    let clock = TokioClock::new();
    // Refused before any request: these would resolve to /files/meta or /meta.
    for name in ["..", "."] {
        let e = c.tools["file"].invoke(&json!({"name": name}), &clock).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest, "{name}: {e:?}");
        assert!(e.message.contains("change its path"), "{}", e.message);
    }
    let e = c.tools["ext"].invoke(&json!({"ext": "."}), &clock).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest, "`.` + `.` is `..` too");
    assert_eq!(*hits.lock().unwrap(), [], "nothing was sent");

    // Everything else stays one segment of the configured path.
    for (name, path) in [
        ("../admin", "/files/..%2Fadmin/meta"),
        ("a/../../admin", "/files/a%2F..%2F..%2Fadmin/meta"),
        ("%2e%2e", "/files/%252e%252e/meta"),
        ("..\\admin", "/files/..%5Cadmin/meta"),
        ("...", "/files/.../meta"),
        ("a?b#c", "/files/a%3Fb%23c/meta"),
    ] {
        c.tools["file"].invoke(&json!({"name": name}), &clock).await.unwrap();
        let last = hits.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last, (path.to_owned(), true), "{name}");
    }
    c.tools["ext"].invoke(&json!({"ext": "json"}), &clock).await.unwrap();
    assert_eq!(hits.lock().unwrap().last().unwrap().0, "/files/.json");
    assert!(hits.lock().unwrap().iter().all(|(p, _)| p.starts_with("/files/")), "{:?}", hits.lock().unwrap());
}

#[test]
fn the_scheme_and_host_never_come_from_a_parameter_and_bad_urls_are_config_errors() {
    for (url, want) in [
        ("http://{{host}}/x", "never come from a parameter"),
        ("http://api.example{{suffix}}/x", "never come from a parameter"),
        ("http://user:{{pw}}@api.example/x", "never come from a parameter"),
        ("http://127.0.0.1:8080{{path}}", "never come from a parameter"),
        ("http://127.0.0.1:99999/x", "is not a valid URL"),
        ("http://exa mple/x", "is not a valid URL"),
        ("http://127.0.0.1/a/../admin", "holds the segment `..`"),
        ("{{base}}/x", "is not an http:// or https:// URL"),
    ] {
        let text = format!("\n[tools.t]\nkind = \"http\"\nurl = \"{url}\"\n");
        let e = Config::parse(&text, Path::new("keel.toml"), &|_| None).unwrap_err().to_string();
        assert!(e.starts_with("keel.toml:2: tools.t.url: ") && e.contains(want), "{url}: {e}");
    }
    config("[tools.t]\nkind = \"http\"\nurl = \"http://127.0.0.1:8080/a/{{b}}?c={{d}}#{{e}}\"\n");
}

#[tokio::test]
async fn an_invalid_url_is_invalid_request_and_not_retried() {
    use keel_core::{Pipeline, PolicyConfig};
    // Past the config's check (a Rust caller building the tool itself).
    let client =
        keel_http::Client::shared(&keel_http::TlsConfig::default(), &keel_http::Proxies::none()).unwrap();
    let tool =
        super::HttpTool::new(http::Method::POST, "http://127.0.0.1:99999/x".into(), Vec::new(), None, client);
    let clock = TokioClock::new();
    let e = tool.send(&json!({}), &clock, None).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest, "{e:?}");
    let mut policy = PolicyConfig::default();
    policy.retry.base_delay = Duration::from_millis(1);
    let calls = std::sync::atomic::AtomicU32::new(0);
    let none = json!({});
    let err = Pipeline::builder("t", policy)
        .build()
        .call(|_| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tool.send(&none, &clock, None)
        })
        .await
        .unwrap_err();
    assert_eq!((err.class, err.attempts), (ErrorClass::InvalidRequest, 1));
    assert_eq!(calls.into_inner(), 1, "never retried");
}

#[test]
fn a_cwd_holding_the_journal_is_warned_about() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("work")).unwrap();
    let file = d.path().join("keel.toml");
    let tool = |cwd: &str| format!("\n[tools.t]\nkind = \"command\"\nargv = [\"true\"]\ncwd = \"{cwd}\"\n");
    let c = Config::parse(&tool("."), &file, &host).unwrap();
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("keel.toml:2: tools.t.cwd: the journal lives in this directory"), "{w:?}");
    assert_eq!(Config::parse(&tool("work"), &file, &host).unwrap().warnings, []);
}

#[tokio::test]
async fn params_on_stdin_reach_the_program_as_one_json_document() {
    let t = command(r#"["cat"]"#, "params_on_stdin = true");
    let params = json!({"sku": "'; printenv; '", "items": [1, 2], "note": "$(id)"});
    let out = t.invoke(&params, &TokioClock::new()).await.unwrap();
    assert_eq!(out["json"], params);
    // A program that never reads its input still runs; without the key stdin is empty.
    let t = command(r#"["true"]"#, "params_on_stdin = true");
    t.invoke(&json!({"big": "x".repeat(1 << 20)}), &TokioClock::new()).await.unwrap();
    let t = command(r#"["cat"]"#, "");
    assert_eq!(t.invoke(&params, &TokioClock::new()).await.unwrap()["stdout"], "");
}
