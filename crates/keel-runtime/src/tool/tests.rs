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
