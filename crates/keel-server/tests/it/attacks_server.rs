//! Attacks on `keel serve` itself (issue 11): slow and idle connections, framing the
//! inbox, made-up run ids to dodge a run's budget, approvals that show other
//! arguments than they cover, plain-text errors, key guessing. Each test attacks a
//! real server on loopback and asserts the refusal.

use std::time::{Duration, Instant};

use keel_examples::payments::Faults;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{ADMIN, AGENT, APPROVER, Server};

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// Connects from `from` (any address of 127/8: one client, another address).
async fn connect_from(to: &str, from: [u8; 4]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
    socket.connect(to.parse().unwrap()).await.unwrap()
}

/// Reads one response (head and a Content-Length body) or until the server closes.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("no answer within 10 s");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Waits (bounded) until the server closes `tcp`.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    let wait = async {
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.is_ok()
}

/// Whether the server still holds `tcp` open (nothing to read, no end of stream).
fn still_open(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tcp.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

fn status_of(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn body_of(response: &str) -> Value {
    serde_json::from_str(response.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap_or(Value::Null)
}

// --- Item 4: idle and slow connections ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_client_cannot_keep_a_normal_client_out() {
    let s = Server::start_server(Faults::default(), "max_connections = 32", "").await;
    let to = addr(&s);
    // 300 half-sent requests from one client (127.0.0.2), held open.
    let mut loris = Vec::new();
    for _ in 0..300 {
        let mut tcp = connect_from(&to, [127, 0, 0, 2]).await;
        let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\nX-Slow: a").await;
        loris.push(tcp);
    }
    // A normal client is served, again and again, while the attack holds.
    let normal = reqwest::Client::new();
    for i in 0..20 {
        let path = if i % 2 == 0 { "/healthz" } else { "/api/runs" };
        let resp = normal.get(s.url(path)).bearer_auth(AGENT).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i} of the normal client");
        // And the attacker's fresh half-requests keep coming.
        let mut tcp = connect_from(&to, [127, 0, 0, 2]).await;
        let _ = tcp.write_all(b"POST /api/runs HTTP/1.1\r\nHost: keel\r\n").await;
        loris.push(tcp);
    }
    // The attacker holds at most the limit: the rest were closed to make room.
    let start = Instant::now();
    let mut open;
    loop {
        open = loris.iter().filter(|t| still_open(t)).count();
        if open <= 32 || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(open <= 32, "{open} of {} half-sent requests still open", loris.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_idle_connections_and_slow_bodies_time_out() {
    let s = Server::start_server(
        Faults::default(),
        "header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"\nbody_read_timeout = \"300ms\"",
        "",
    )
    .await;
    let to = addr(&s);
    // Headers that never end.
    let mut half = TcpStream::connect(&to).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n").await.unwrap();
    assert!(closed_by_server(&mut half).await, "a half-sent request is closed");
    // A connection that never sends anything.
    let mut mute = TcpStream::connect(&to).await.unwrap();
    assert!(closed_by_server(&mut mute).await, "a connection that sends nothing is closed");
    // A kept-alive connection after its request.
    let mut idle = TcpStream::connect(&to).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&read_response(&mut idle).await), 200);
    assert!(closed_by_server(&mut idle).await, "an idle keep-alive connection is closed");
    // A body that never arrives.
    let mut slow = TcpStream::connect(&to).await.unwrap();
    let head = format!(
        "POST /api/runs HTTP/1.1\r\nHost: keel\r\nAuthorization: Bearer {AGENT}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"plan\":"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let answer = read_response(&mut slow).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert_eq!(body_of(&answer)["class"], "invalid_request", "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_with_every_connection_busy_a_new_one_gets_a_json_503() {
    let s = Server::start_server(Faults::default(), "max_connections = 3", "").await;
    let to = addr(&s);
    // Three connections, each with a call waiting for a person (busy, not idle). The
    // server's `100 Continue` says the request is in its hands before the body goes.
    let mut busy = Vec::new();
    for order in 0..3 {
        let mut tcp = TcpStream::connect(&to).await.unwrap();
        let body = json!({"params": {"order": order, "amount": 500}}).to_string();
        let head = format!(
            "POST /api/tools/charge/invoke?wait=60s HTTP/1.1\r\nHost: keel\r\nAuthorization: Bearer {AGENT}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("100 Continue\r\n\r\n") {
            let n =
                tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed before 100 Continue: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        tcp.write_all(body.as_bytes()).await.unwrap();
        busy.push(tcp);
    }
    // All three are in flight: a new connection is refused with a JSON 503.
    let mut tcp = TcpStream::connect(&to).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.unwrap();
    let refused = read_response(&mut tcp).await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    let e = body_of(&refused);
    assert_eq!(
        (e["class"].as_str(), e["retryable"].as_bool()),
        (Some("server_error"), Some(true)),
        "{refused}"
    );
    assert!(e["message"].as_str().unwrap().contains("connection limit"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
    // One busy client leaves: the next connection is served.
    drop(busy.pop());
    let start = Instant::now();
    loop {
        let mut tcp = TcpStream::connect(&to).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.unwrap();
        if status_of(&read_response(&mut tcp).await) == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the freed slot was never given out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- Item 9: the inbox cannot be framed; the key stays out of URLs and disk --------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_cannot_be_framed_and_keeps_the_key_in_the_tab() {
    let s = Server::start(Faults::default(), "").await;
    for path in ["/", "/assets/app.js", "/assets/style.css"] {
        let resp = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
    }
    let js = s.http.get(s.url("/assets/app.js")).send().await.unwrap().text().await.unwrap();
    assert!(!js.contains("localStorage.setItem"), "the key is never written to localStorage");
    assert!(js.contains("sessionStorage.setItem(\"keel-key\""), "the key lives in the tab");
    assert!(!js.contains("?key=") && !js.contains("&key="), "the key is never put in a URL");
    let html = s.http.get(s.url("/")).send().await.unwrap().text().await.unwrap();
    let input = html.split("<input id=\"key\"").nth(1).unwrap().split('>').next().unwrap();
    assert!(!input.contains("name="), "the key field has no name: a form submit cannot put it in a URL");
}

// --- Item 7: a run's model budget cannot be dodged with made-up run ids ------------

async fn upstream() -> String {
    use axum::Json;
    use axum::routing::post;
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

async fn gateway_server() -> Server {
    let base = upstream().await;
    let models = format!(
        "[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up\"\n\n\
         [gateway]\nrun_budget = {{ attempts = 1 }}\n"
    );
    Server::start(Faults::default(), &models).await
}

async fn chat(s: &Server, key: &str, run: Option<&str>) -> (u16, Value) {
    let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let mut req = s.http.post(s.url("/v1/chat/completions")).bearer_auth(key).json(&body);
    if let Some(r) = run {
        req = req.header("x-keel-run", r);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_id_must_be_issued_to_the_key_so_its_budget_cannot_be_dodged() {
    let s = gateway_server().await;
    // An agent's own run, issued by Keel to this key.
    let (status, run) = s.post(Some(AGENT), "/api/runs", Some(json!({"name": "research"}))).await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["run_id"].as_str().unwrap().to_owned();
    assert_eq!(chat(&s, AGENT, Some(&run_id)).await.0, 200);
    let (status, over) = chat(&s, AGENT, Some(&run_id)).await;
    assert_eq!(
        (status, over["error"]["keel_class"].as_str()),
        (429, Some("budget_exceeded")),
        "the run's budget (1 attempt) is spent: {over}"
    );

    // The dodge: a fresh made-up run id per call. Refused, in OpenAI's shape.
    for fresh in ["run-made-up-1", "run-made-up-2", "gateway", ""] {
        let (status, e) = chat(&s, AGENT, Some(fresh)).await;
        if fresh.is_empty() {
            assert_eq!(status, 400, "an empty run id is refused too: {e}");
            continue;
        }
        assert_eq!(status, 400, "{fresh}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("not a run Keel issued"), "{e}");
    }
    // Another key's run is refused too (an admin may name any run).
    let (_, other) = s.post(Some(ADMIN), "/api/runs", Some(json!({}))).await;
    let other = other["run_id"].as_str().unwrap().to_owned();
    assert_eq!(chat(&s, AGENT, Some(&other)).await.0, 400, "a run of another key");
    assert_eq!(chat(&s, ADMIN, Some(&run_id)).await.0, 429, "the admin names the agent's run: its budget");

    // A plan run started by the key may be named by it.
    let plan = json!({"plan": {"steps": [{"tool": "notify", "params": {}}]}});
    let (_, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    let plan_run = started["run_id"].as_str().unwrap().to_owned();
    assert_eq!(chat(&s, AGENT, Some(&plan_run)).await.0, 200);

    // The agent's run is listed under its name and is not driven by the workers;
    // the gateway's own run is neither listed nor cancellable.
    assert_eq!(chat(&s, AGENT, None).await.0, 200);
    let (_, runs) = s.get(Some(AGENT), "/api/runs").await;
    let runs = runs.as_array().unwrap();
    assert!(runs.iter().all(|r| r["run_id"] != "gateway"), "{runs:?}");
    let mine = runs.iter().find(|r| r["run_id"] == run_id.as_str()).unwrap();
    assert_eq!((mine["name"].as_str(), mine["state"].as_str()), (Some("research"), Some("running")));
    let (status, _) = s.post(Some(AGENT), "/api/runs/gateway/cancel", None).await;
    assert_eq!(status, 404, "the gateway's run cannot be cancelled");
    let (status, _) = s.get(Some(AGENT), "/api/runs/gateway").await;
    assert_eq!(status, 404);
    let (status, e) = s.post(Some(AGENT), &format!("/api/runs/{run_id}/resume"), None).await;
    assert_eq!((status, e["class"].as_str()), (400, Some("invalid_request")), "{e}");

    // A cancelled run takes no more model calls (within the recheck interval).
    let (_, fresh_run) = s.post(Some(AGENT), "/api/runs", Some(json!({}))).await;
    let fresh_run = fresh_run["run_id"].as_str().unwrap().to_owned();
    assert_eq!(chat(&s, AGENT, Some(&fresh_run)).await.0, 200);
    assert_eq!(s.post(Some(APPROVER), &format!("/api/runs/{fresh_run}/cancel"), None).await.0, 200);
    let start = Instant::now();
    let refused = loop {
        let (status, e) = chat(&s, AGENT, Some(&fresh_run)).await;
        if status == 400 {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "a cancelled run still takes calls: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused["error"]["message"].as_str().unwrap().contains("already ended (cancelled)"), "{refused}");
}

// --- Item 10: plain-text 413s, the bearer scheme's case, key guessing ---------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_answer_json_everywhere() {
    let s = gateway_server().await;
    let big = "x".repeat(8192);
    for path in ["/api/approvals/apr-x/approve", "/api/approvals/apr-x/reject"] {
        let resp = s.http.post(s.url(path)).bearer_auth(APPROVER).body(big.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 413, "{path}");
        let e: Value = resp.json().await.expect("a JSON body");
        assert_eq!(e["class"], "invalid_request", "{path}: {e}");
    }
    let huge = "x".repeat(33 << 20);
    let resp = s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).body(huge).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let e: Value = resp.json().await.expect("a JSON body");
    assert_eq!(e["error"]["keel_class"], "invalid_request", "OpenAI's shape, as every gateway error: {e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("length limit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_guessing_keys_is_rate_limited() {
    let s = Server::start_server(
        Faults::default(),
        "rate_limit = { unauthenticated_per_second = 1, unauthenticated_burst = 5 }",
        "",
    )
    .await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = s
            .http
            .get(s.url("/api/runs"))
            .header("authorization", format!("{scheme} {AGENT}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    let resp = s
        .http
        .get(s.url("/api/runs"))
        .header("authorization", format!("Basic {AGENT}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "another scheme is not a bearer key");

    // Wrong keys from one address: a few 401s, then 429s.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let resp = s.http.get(s.url("/api/runs")).bearer_auth(format!("guess-{i:016}")).send().await.unwrap();
        statuses.push(resp.status().as_u16());
    }
    // (The `Basic` request above was the first of the burst of 5.)
    assert!(statuses[..4].iter().all(|&c| c == 401), "{statuses:?}");
    // Then 429s (one cell a second comes back: a slow machine may see one more 401).
    assert!(statuses[4..].iter().filter(|&&c| c == 429).count() >= 7, "{statuses:?}");
    assert!(statuses[4..].iter().all(|&c| c == 429 || c == 401), "{statuses:?}");
    let (status, e) = s.get(None, "/api/runs").await;
    assert_eq!((status, e["class"].as_str()), (429, Some("rate_limited")), "no key at all counts too: {e}");
    // A valid key is not held back by the guesses.
    assert_eq!(s.get(Some(AGENT), "/api/runs").await.0, 200);
}

// --- Item 6: an approval shows exactly the arguments it covers, forever ------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decided_approval_keeps_showing_the_arguments_it_covered() {
    // Every charge fails: the approved charge of 150 escalates to a ticket.
    let s = Server::start(Faults { fail_first: 1000, ..Faults::default() }, "").await;
    let plan = json!({"plan": {"steps": [{"tool": "charge", "params": {"order": 7, "amount": 150}}]}});
    let (_, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "waiting_approval").await;
    let first = run["state"]["approvals"][0]["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(s.post(Some(APPROVER), &format!("/api/approvals/{first}/approve"), None).await.0, 200);
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "escalated").await;
    let ticket = run["state"]["tickets"][0]["ticket_id"].as_str().unwrap().to_owned();

    // The ticket is answered with new parameters: a charge of 99999.
    let retry = json!({"action": "retry", "params": {"order": 7, "amount": 99999}});
    let (status, e) = s.post(Some(APPROVER), &format!("/api/tickets/{ticket}/resolve"), Some(retry)).await;
    assert_eq!(status, 200, "{e}");
    let run = s
        .until_run(&run_id, |r| {
            r["state"]["run"]["state"] == "waiting_approval"
                && r["state"]["approvals"].as_array().unwrap().len() == 2
        })
        .await;
    let second = run["state"]["approvals"][1]["approval_id"].as_str().unwrap().to_owned();

    let (_, shown) = s.get(Some(APPROVER), &format!("/api/approvals/{first}")).await;
    assert_eq!(shown["approval"]["status"], "approved");
    assert_eq!(shown["args"], json!({"order": 7, "amount": 150}), "what the approval covered: {shown}");
    assert_eq!(shown["step"]["input"], json!({"order": 7, "amount": 150}), "never the retry's 99999");
    let (_, shown) = s.get(Some(APPROVER), &format!("/api/approvals/{second}")).await;
    assert_eq!(shown["approval"]["status"], "pending");
    assert_eq!(shown["args"], json!({"order": 7, "amount": 99999}));
    let (_, list) = s.get(Some(APPROVER), "/api/approvals").await;
    for item in list.as_array().unwrap() {
        let want = if item["approval"]["approval_id"] == first.as_str() { 150 } else { 99999 };
        assert_eq!(item["args"]["amount"], want, "{item}");
    }
}
