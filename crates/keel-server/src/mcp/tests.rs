//! The MCP server's unit tests: both eras, hostile input, approvals.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keel_core::TokioClock;
use keel_journal::JournalOptions;
use keel_runtime::Runner;
use keel_runtime::runner::NullObserver;
use tokio::io::AsyncReadExt as _;

use super::*;

/// A read-only and a write-like tool that always need approval, and one whose
/// arguments are mirrored into `Mcp-Param-*` headers.
const MORE_TOOLS: &str = r#"
[tools.gated]
kind = "command"
argv = ["echo", "{}"]
approval = "always"
params = { type = "object", properties = { x = { type = "integer" } } }

[tools.gated_write]
kind = "command"
argv = ["echo", "{}"]
write = true
approval = "always"
params = { type = "object", properties = { x = { type = "integer" } } }

[tools.region]
kind = "command"
argv = ["echo", "{}"]
params = { type = "object", properties = { region = { type = "string", "x-mcp-header" = "Region" }, count = { type = "integer", "x-mcp-header" = "Count" }, deep = { type = "object", properties = { flag = { type = "boolean", "x-mcp-header" = "Flag" } } } } }
"#;

async fn server(dir: &std::path::Path) -> McpServer {
    server_with(dir, "").await
}

/// [`server`]'s tools and `extra`.
async fn server_with(dir: &std::path::Path, extra: &str) -> McpServer {
    let text = format!(
        "[tools.echo]\nkind = \"command\"\nargv = [\"echo\", \"{{}}\"]\n\
                        params = {{ type = \"object\", properties = {{ x = {{ type = \"integer\" }} }} }}\n{MORE_TOOLS}{extra}"
    );
    let config = Config::parse(&text, &dir.join("keel.toml"), &|_| None).unwrap();
    let clock = Arc::new(TokioClock::new());
    let journal = keel_journal::open(
        &config.storage_url,
        JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    let runner = Arc::new(
        Runner::new(Arc::new(config), journal, clock.clone(), Arc::new(NullObserver)).await.unwrap(),
    );
    McpServer::new(Invoker::new(runner, Arc::default(), clock))
}

fn code(answer: &Option<Value>) -> i64 {
    answer.as_ref().unwrap()["error"]["code"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn hostile_messages_get_json_rpc_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    assert_eq!(code(&s.handle_raw(b"{nope").await), PARSE_ERROR);
    assert_eq!(
        code(&s.handle_raw(b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]").await),
        INVALID_REQUEST
    );
    assert_eq!(code(&s.handle_raw(b"{\"id\":1,\"method\":\"ping\"}").await), INVALID_REQUEST);
    assert_eq!(
        code(&s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nope\"}").await),
        METHOD_NOT_FOUND
    );
    // Notifications and responses get no answer.
    assert!(s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}").await.is_none());
    assert!(s.handle_raw(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}").await.is_none());
    let call = |p: &str| format!("{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{p}}}");
    assert_eq!(code(&s.handle_raw(call("{}").as_bytes()).await), INVALID_PARAMS);
    assert_eq!(code(&s.handle_raw(call("{\"name\":\"nosuch\"}").as_bytes()).await), INVALID_PARAMS);
    // Arguments of the wrong shape are the tool's `invalid_request`, as a result.
    for args in ["5", "\"x\"", "[1]", "{\"x\":\"one\"}"] {
        let answer =
            s.handle_raw(call(&format!("{{\"name\":\"echo\",\"arguments\":{args}}}")).as_bytes()).await;
        let r = &answer.as_ref().unwrap()["result"];
        assert_eq!(r["isError"], true, "{args}: {answer:?}");
        assert_eq!(r["structuredContent"]["class"], "invalid_request", "{args}: {answer:?}");
    }
}

#[tokio::test]
async fn initialize_answers_a_known_revision_in_kind_and_any_other_with_ours() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let init = |v: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
    };
    let answer = s.handle(init("2025-06-18")).await.unwrap();
    assert_eq!(answer["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(answer["result"]["capabilities"]["tools"]["listChanged"], false);
    let answer = s.handle(init("2099-01-01")).await.unwrap();
    assert_eq!(answer["result"]["protocolVersion"], PROTOCOL_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_answers_each_request_on_its_own_line_and_stops_at_eof() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let input = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n\n{broken\n\
                  {\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":\"b\",\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"x\":1}}}\n";
    let (out, mut read) = tokio::io::duplex(1 << 16);
    serve_stdio(s, &input[..], out).await.unwrap();
    let mut text = String::new();
    read.read_to_string(&mut text).await.unwrap();
    let answers: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 3, "{text}");
    let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(by_id(json!(1))["result"], json!({}));
    assert_eq!(by_id(Value::Null)["error"]["code"], PARSE_ERROR);
    assert_eq!(by_id(json!("b"))["result"]["isError"], false, "{text}");
}

/// A 2026-07-28 request: `params` with the envelope in `_meta` (`caps`: the client's
/// capabilities).
fn modern(method: &str, mut params: Value, caps: Value) -> Value {
    let meta = params.as_object_mut().unwrap().entry("_meta").or_insert_with(|| json!({}));
    meta[envelope::PROTOCOL_VERSION_META] = json!(MODERN_VERSION);
    meta[envelope::CLIENT_CAPABILITIES_META] = caps;
    meta[envelope::CLIENT_INFO_META] = json!({"name": "t", "version": "0"});
    json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
}

fn form() -> Value {
    json!({"elicitation": {"form": {}}})
}

#[tokio::test]
async fn a_2026_client_discovers_lists_and_calls_without_initialize() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let found = s.handle(modern("server/discover", json!({}), json!({}))).await.unwrap();
    let r = &found["result"];
    assert_eq!(r["resultType"], "complete", "{found}");
    assert_eq!(r["supportedVersions"], json!(["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26"]));
    assert_eq!(r["capabilities"], json!({"tools": {}}));
    assert_eq!(r["_meta"][SERVER_INFO_META]["name"], "keel");
    assert_eq!((r["ttlMs"].as_u64(), r["cacheScope"].as_str()), (Some(0), Some("private")), "{found}");
    assert!(r["instructions"].as_str().unwrap().contains("approval"));

    let listed = s.handle(modern("tools/list", json!({}), json!({}))).await.unwrap();
    assert_eq!(listed["result"]["resultType"], "complete", "{listed}");
    assert_eq!(listed["result"]["tools"].as_array().unwrap().len(), 4, "{listed}");
    assert!(listed["result"]["ttlMs"].is_u64(), "{listed}");

    let called = s
        .handle(modern("tools/call", json!({"name": "echo", "arguments": {"x": 1}}), json!({})))
        .await
        .unwrap();
    let r = &called["result"];
    assert_eq!(
        (r["resultType"].as_str(), r["isError"].as_bool()),
        (Some("complete"), Some(false)),
        "{called}"
    );
    assert!(r["_meta"]["keel/runId"].is_string(), "{called}");
    assert_eq!(r["_meta"][SERVER_INFO_META]["name"], "keel", "{called}");

    // Gone in 2026-07-28; the handshake era keeps it, and its results are untagged.
    assert_eq!(code(&s.handle(modern("ping", json!({}), json!({}))).await), METHOD_NOT_FOUND);
    let legacy = s.handle(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).await.unwrap();
    assert!(legacy["result"].get("resultType").is_none(), "{legacy}");
    let legacy = s.handle(json!({"jsonrpc": "2.0", "id": 2, "method": "server/discover"})).await;
    assert_eq!(code(&legacy), INVALID_PARAMS);
    // `initialize` is the handshake's, whatever its `_meta` says, and never answers 2026-07-28.
    let init = modern("initialize", json!({"protocolVersion": "2026-07-28"}), json!({}));
    assert_eq!(s.handle(init).await.unwrap()["result"]["protocolVersion"], PROTOCOL_VERSION);
}

#[tokio::test]
async fn an_unknown_version_or_a_malformed_envelope_is_refused_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let with_version = |v: Value| {
        let mut m = modern("tools/list", json!({}), json!({}));
        m["params"]["_meta"][envelope::PROTOCOL_VERSION_META] = v;
        m
    };
    for v in ["2099-01-01", "2025-11-25", ""] {
        let answer = s.handle(with_version(json!(v))).await.unwrap();
        let e = &answer["error"];
        assert_eq!(e["code"], envelope::UNSUPPORTED_PROTOCOL_VERSION, "{answer}");
        assert_eq!(e["data"]["supported"], json!(SUPPORTED_VERSIONS), "{answer}");
        assert_eq!(e["data"]["requested"], v, "{answer}");
    }
    // A huge version is refused without echoing it whole; a multi-byte one is cut on a
    // character boundary.
    for v in ["9".repeat(1 << 20), "é".repeat(100_000)] {
        let answer = s.handle(with_version(json!(v))).await.unwrap();
        assert_eq!(answer["error"]["code"], envelope::UNSUPPORTED_PROTOCOL_VERSION);
        assert!(answer.to_string().len() < 1000, "{}", answer.to_string().len());
    }
    for v in [json!(5), json!(null), json!({}), json!(["2026-07-28"]), json!(true)] {
        assert_eq!(code(&s.handle(with_version(v.clone())).await), INVALID_PARAMS, "{v}");
    }
    let mut m = modern("tools/list", json!({}), json!({}));
    m["params"]["_meta"].as_object_mut().unwrap().remove(envelope::CLIENT_CAPABILITIES_META);
    assert_eq!(code(&s.handle(m).await), INVALID_PARAMS);
    for caps in [json!("all"), json!(5), json!(null), json!([])] {
        assert_eq!(
            code(&s.handle(modern("tools/list", json!({}), caps.clone())).await),
            INVALID_PARAMS,
            "{caps}"
        );
    }
    let mut m = modern("tools/list", json!({}), json!({}));
    m["params"]["_meta"][envelope::CLIENT_INFO_META] = json!("x".repeat(1 << 16));
    assert_eq!(code(&s.handle(m).await), INVALID_PARAMS);
    // Elicitation of the wrong shape is simply not declared.
    // (Other arguments each time: the same call a third time would be a loop.)
    for (x, caps) in [
        json!({"elicitation": 5}),
        json!({"elicitation": {"form": "yes"}}),
        json!({"elicitation": {"url": {}}}),
    ]
    .into_iter()
    .enumerate()
    {
        let answer =
            s.handle(modern("tools/call", json!({"name": "gated", "arguments": {"x": x}}), caps)).await;
        assert_eq!(
            answer.as_ref().unwrap()["result"]["structuredContent"]["status"],
            "waiting_approval",
            "{answer:?}"
        );
    }
    // `_meta` that is no object, or `params` that is none: the handshake era, as before.
    for params in [json!({"_meta": "x"}), json!({"_meta": [1]}), json!({"_meta": 5})] {
        let answer =
            s.handle(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": params})).await;
        assert!(answer.as_ref().unwrap()["result"]["tools"].is_array(), "{answer:?}");
    }
    let answer = s.handle(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": 5})).await;
    assert_eq!(code(&answer), INVALID_PARAMS);
    // A tool name of any size or script: refused, its echo bounded.
    let answer = s.handle(modern("tools/call", json!({"name": "ü".repeat(100_000)}), json!({}))).await;
    assert_eq!(code(&answer), INVALID_PARAMS);
    assert!(answer.unwrap().to_string().len() < 1000);
    // The retry's fields, of every wrong shape.
    let call = |extra: Value| {
        let mut p = json!({"name": "gated", "arguments": {"x": 1}});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        modern("tools/call", p, form())
    };
    for extra in [
        json!({"requestState": 5}),
        json!({"requestState": {}}),
        json!({"requestState": "garbage"}),
        json!({"requestState": "keel1.!!!!"}),
        json!({"requestState": "keel1.e30="}),
        json!({"requestState": format!("keel1.{}", "A".repeat(1 << 20))}),
        json!({"inputResponses": 5}),
        json!({"inputResponses": []}),
        json!({"inputResponses": {"keel.approval": 5}}),
        json!({"inputResponses": {"other": "x"}}),
        json!({"inputResponses": {"keel.approval": {"action": 5}}}),
        json!({"inputResponses": {"keel.approval": {"action": "approve"}}}),
    ] {
        assert_eq!(code(&s.handle(call(extra.clone())).await), INVALID_PARAMS, "{extra}");
    }
    // Answers to requests never made are ignored.
    let answer = s.handle(call(json!({"inputResponses": {"other": {"action": "accept"}}}))).await.unwrap();
    assert_eq!(answer["result"]["resultType"], "input_required", "{answer}");
}

/// The request `body` (a 2026-07-28 one for `method`) with headers `h`, through
/// [`McpServer::answer_http`]: status and error code (0 for none).
async fn http(s: &McpServer, h: &[(&str, &[u8])], body: &Value) -> (u16, i64) {
    let mut headers = HeaderMap::new();
    for (name, value) in h {
        headers.append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let (status, answer) = s.answer_http(&headers, body.to_string().as_bytes()).await;
    let code = answer.as_ref().and_then(|a| a["error"]["code"].as_i64()).unwrap_or(0);
    (status.as_u16(), code)
}

#[tokio::test]
async fn a_2026_request_whose_headers_do_not_mirror_its_body_is_a_400_header_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    const V: (&str, &[u8]) = ("mcp-protocol-version", b"2026-07-28");
    let mismatch = (400, envelope::HEADER_MISMATCH);
    let list = modern("tools/list", json!({}), json!({}));
    let m = |v: &'static str| ("mcp-method", v.as_bytes());
    assert_eq!(http(&s, &[V, m("tools/list")], &list).await, (200, 0));
    assert_eq!(http(&s, &[m("tools/list")], &list).await, mismatch, "no version header");
    assert_eq!(http(&s, &[("mcp-protocol-version", b"2025-11-25"), m("tools/list")], &list).await, mismatch);
    assert_eq!(http(&s, &[V], &list).await, mismatch, "no Mcp-Method");
    assert_eq!(http(&s, &[V, m("tools/call")], &list).await, mismatch);
    assert_eq!(http(&s, &[V, m("Tools/List")], &list).await, mismatch, "values are case-sensitive");
    assert_eq!(http(&s, &[V, m("tools/list"), m("tools/list")], &list).await, mismatch, "twice");
    assert_eq!(http(&s, &[V, V, m("tools/list")], &list).await, mismatch, "twice");
    assert_eq!(http(&s, &[V, ("mcp-method", b"tools/list\xff")], &list).await, mismatch, "not ASCII");
    // A version that is no string can match no header.
    let mut odd = list.clone();
    odd["params"]["_meta"][envelope::PROTOCOL_VERSION_META] = json!(20260728);
    assert_eq!(http(&s, &[("mcp-protocol-version", b"20260728"), m("tools/list")], &odd).await, mismatch);
    // Headers agree with a version not served: -32022, still a 400.
    let mut future = list.clone();
    future["params"]["_meta"][envelope::PROTOCOL_VERSION_META] = json!("2099-01-01");
    let got = http(&s, &[("mcp-protocol-version", b"2099-01-01"), m("tools/list")], &future).await;
    assert_eq!(got, (400, envelope::UNSUPPORTED_PROTOCOL_VERSION));
    let nope = modern("resources/list", json!({}), json!({}));
    assert_eq!(http(&s, &[V, m("resources/list")], &nope).await, (404, METHOD_NOT_FOUND));

    // tools/call: `Mcp-Name` too, decoded from its base64 sentinel.
    let call = modern("tools/call", json!({"name": "echo", "arguments": {"x": 1}}), json!({}));
    let c = m("tools/call");
    assert_eq!(http(&s, &[V, c, ("mcp-name", b"echo")], &call).await, (200, 0));
    assert_eq!(http(&s, &[V, c], &call).await, mismatch, "no Mcp-Name");
    assert_eq!(http(&s, &[V, c, ("mcp-name", b"gated")], &call).await, mismatch);
    assert_eq!(http(&s, &[V, c, ("mcp-name", b"=?base64?ZWNobw==?=")], &call).await, (200, 0));
    for bad in [
        &b"=?base64?ZWNobw=?="[..],
        b"=?base64?ZWNob?=",
        b"=?base64?ZWNodw==?=",
        b"=?base64?!!!!?=",
        b"=?base64??=",
    ] {
        assert_eq!(
            http(&s, &[V, c, ("mcp-name", bad)], &call).await,
            mismatch,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(http(&s, &[V, c, ("mcp-name", b"echo"), ("mcp-name", b"echo")], &call).await, mismatch);
    let unknown = modern("tools/call", json!({"name": "nosuch"}), json!({}));
    assert_eq!(http(&s, &[V, c, ("mcp-name", b"nosuch")], &unknown).await, (400, INVALID_PARAMS));

    // `x-mcp-header` arguments are mirrored: present exactly when the argument is, equal to it.
    let region = |args: Value| modern("tools/call", json!({"name": "region", "arguments": args}), json!({}));
    let r = [V, c, ("mcp-name", b"region")];
    let with = |more: &[(&'static str, &'static [u8])]| [&r[..], more].concat();
    let args = json!({"region": "eu-west", "count": 3, "deep": {"flag": true}});
    let all = [("mcp-param-region", &b"eu-west"[..]), ("Mcp-Param-Count", b"3"), ("mcp-param-flag", b"true")];
    assert_eq!(http(&s, &with(&all), &region(args.clone())).await, (200, 0));
    assert_eq!(http(&s, &with(&all[1..]), &region(args.clone())).await, mismatch, "Region missing");
    assert_eq!(http(&s, &with(&all[..2]), &region(args.clone())).await, mismatch, "Flag missing");
    let other = [("mcp-param-region", &b"us-east"[..]), all[1], all[2]];
    assert_eq!(http(&s, &with(&other), &region(args.clone())).await, mismatch);
    let float = [all[0], ("mcp-param-count", b"3.0"), all[2]];
    assert_eq!(http(&s, &with(&float), &region(args.clone())).await, (200, 0), "integers compare as numbers");
    let encoded = [("mcp-param-region", &b"=?base64?IGV1LXdlc3Qg?="[..]), all[1], all[2]];
    let padded = json!({"region": " eu-west ", "count": 3, "deep": {"flag": true}});
    assert_eq!(http(&s, &with(&encoded), &region(padded)).await, (200, 0));
    assert_eq!(
        http(&s, &with(&all), &region(json!({"count": 3, "deep": {"flag": true}}))).await,
        mismatch,
        "no argument"
    );
    assert_eq!(
        http(&s, &with(&all[1..]), &region(json!({"region": null, "count": 3, "deep": {"flag": true}})))
            .await,
        (200, 0)
    );
    let twice = [all[0], all[0], all[1], all[2]];
    assert_eq!(http(&s, &with(&twice), &region(args)).await, mismatch);

    // The handshake era, as before: its version header checked, nothing else.
    let old = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"});
    assert_eq!(http(&s, &[], &old).await, (200, 0));
    assert_eq!(http(&s, &[("mcp-protocol-version", b"2025-06-18")], &old).await, (200, 0));
    assert_eq!(http(&s, &[("mcp-protocol-version", b"1999-01-01")], &old).await, (400, INVALID_REQUEST));
    assert_eq!(http(&s, &[V], &old).await, mismatch, "the header says 2026-07-28, the body does not");
    let unknown = json!({"jsonrpc": "2.0", "id": 9, "method": "resources/list"});
    assert_eq!(http(&s, &[], &unknown).await, (200, METHOD_NOT_FOUND));
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(http(&s, &[V], &note).await, (202, 0));
    let (status, answer) = s.answer_http(&HeaderMap::new(), b"{nope").await;
    assert_eq!((status.as_u16(), code(&answer)), (400, PARSE_ERROR));
}

/// The approvals waiting in the journal.
async fn pending(s: &McpServer) -> Vec<String> {
    let items = keel_runtime::inbox::approvals(&**s.invoker.runner().journal()).await.unwrap();
    items.into_iter().filter(|i| i.approval.status == "pending").map(|i| i.approval.approval_id).collect()
}

async fn decide(s: &McpServer, approval: &str, approve: bool) {
    let now = keel_core::Clock::wall(&TokioClock::new());
    keel_runtime::inbox::decide(&**s.invoker.runner().journal(), approval, approve, "alice", now)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_2026_call_waiting_for_approval_is_input_required_and_only_the_journal_decides() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let call = |tool: &str, args: Value, extra: Value, caps: Value| {
        let mut p = json!({"name": tool, "arguments": args});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        modern("tools/call", p, caps)
    };
    let accept = |state: &Value| json!({"inputResponses": {"keel.approval": {"action": "accept"}}, "requestState": state});

    // A read-only tool, called without a key.
    let first = s.handle(call("gated", json!({"x": 1}), json!({}), form())).await.unwrap();
    let r = &first["result"];
    assert_eq!(r["resultType"], "input_required", "{first}");
    let approval = r["_meta"]["keel/approvalId"].as_str().unwrap().to_owned();
    let ask = &r["inputRequests"]["keel.approval"];
    assert_eq!(ask["method"], "elicitation/create");
    assert_eq!(ask["params"]["mode"], "form");
    assert_eq!(ask["params"]["requestedSchema"], json!({"type": "object", "properties": {}}));
    let message = ask["params"]["message"].as_str().unwrap();
    assert!(
        message.contains(&approval) && message.contains("`gated`") && message.contains("{\"x\":1}"),
        "{message}"
    );
    let state = r["requestState"].clone();
    assert!(state.is_string());
    assert_eq!(pending(&s).await, vec![approval.clone()]);

    // "Accept" in the client's form is no approval: still pending, asked again.
    let again = s.handle(call("gated", json!({"x": 1}), accept(&state), form())).await.unwrap();
    assert_eq!(again["result"]["resultType"], "input_required", "{again}");
    assert_eq!(again["result"]["_meta"]["keel/approvalId"], approval.as_str());
    let state = again["result"]["requestState"].clone();

    // A state on other arguments, altered, or naming what its run does not hold: refused,
    // and nothing new is asked of anyone.
    let decoded = approval::State::decode(state.as_str().unwrap()).unwrap();
    let forged = |f: &dyn Fn(&mut approval::State)| {
        let mut st = decoded.clone();
        f(&mut st);
        json!(st.encode())
    };
    let other_run = |st: &mut approval::State| {
        st.key = Some("someone-else".into());
        st.run = keel_runtime::invoke::invocation_run_id("invoke/gated/someone-else");
    };
    for (what, tampered, args) in [
        ("other arguments", state.clone(), json!({"x": 2})),
        ("other approval", forged(&|st| st.approval = "apr-forged".into()), json!({"x": 1})),
        ("other run", forged(&|st| st.run = "run-0".into()), json!({"x": 1})),
        ("a run never made", forged(&other_run), json!({"x": 1})),
        ("a digest of other arguments", forged(&|st| st.digest = "0".repeat(64)), json!({"x": 1})),
    ] {
        let answer = s.handle(call("gated", args, accept(&tampered), form())).await;
        assert_eq!(code(&answer), INVALID_PARAMS, "{what}: {answer:?}");
    }
    let mut flipped = state.as_str().unwrap().to_owned();
    flipped.insert(8, 'A');
    assert_eq!(
        code(&s.handle(call("gated", json!({"x": 1}), accept(&json!(flipped)), form())).await),
        INVALID_PARAMS
    );
    assert_eq!(pending(&s).await, vec![approval.clone()]);

    // Declining stops waiting: the "pending approval" result, nothing decided.
    let declined = json!({"inputResponses": {"keel.approval": {"action": "decline"}}, "requestState": state});
    let stop = s.handle(call("gated", json!({"x": 1}), declined, form())).await.unwrap();
    assert_eq!(stop["result"]["resultType"], "complete", "{stop}");
    assert_eq!(stop["result"]["isError"], true, "{stop}");
    assert_eq!(stop["result"]["structuredContent"]["approval_id"], approval.as_str(), "{stop}");
    assert_eq!(pending(&s).await, vec![approval.clone()]);

    // Approved in Keel: the retry gets the result.
    decide(&s, &approval, true).await;
    let done = s.handle(call("gated", json!({"x": 1}), accept(&state), form())).await.unwrap();
    let r = &done["result"];
    assert_eq!((r["resultType"].as_str(), r["isError"].as_bool()), (Some("complete"), Some(false)), "{done}");
    assert_eq!(r["_meta"]["keel/runId"], decoded.run.as_str(), "{done}");

    // A blank key of the client's is no key: the retry still finds its run.
    let blank = |extra: Value| {
        let mut c = call("gated", json!({"x": 3}), extra, form());
        c["params"]["_meta"][IDEMPOTENCY_META_KEY] = json!("  ");
        c
    };
    let first = s.handle(blank(json!({}))).await.unwrap();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let again = s.handle(blank(accept(&first["result"]["requestState"]))).await.unwrap();
    assert_eq!(
        again["result"]["_meta"]["keel/approvalId"], first["result"]["_meta"]["keel/approvalId"],
        "{again}"
    );

    // A write-like tool (its key derived), denied in Keel: `approval_denied`.
    let first = s.handle(call("gated_write", json!({"x": 5}), json!({}), form())).await.unwrap();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let approval = first["result"]["_meta"]["keel/approvalId"].as_str().unwrap().to_owned();
    decide(&s, &approval, false).await;
    let denied = s
        .handle(call("gated_write", json!({"x": 5}), accept(&first["result"]["requestState"]), form()))
        .await
        .unwrap();
    let r = &denied["result"];
    assert_eq!(
        (r["isError"].as_bool(), r["structuredContent"]["class"].as_str()),
        (Some(true), Some("approval_denied")),
        "{denied}"
    );

    // A client that cannot show a form, and a handshake-era one: the "pending approval" result.
    let plain = s.handle(call("gated_write", json!({"x": 6}), json!({}), json!({}))).await.unwrap();
    assert_eq!(plain["result"]["resultType"], "complete", "{plain}");
    assert_eq!(plain["result"]["structuredContent"]["status"], "waiting_approval", "{plain}");
    let old = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "gated_write", "arguments": {"x": 6}}});
    let old = s.handle(old).await.unwrap();
    assert!(old["result"].get("resultType").is_none(), "{old}");
    assert_eq!(
        old["result"]["structuredContent"]["approval_id"],
        plain["result"]["structuredContent"]["approval_id"]
    );
    assert!(old["result"]["content"][0]["text"].as_str().unwrap().starts_with("pending approval"));
}

#[test]
fn base64_round_trips_and_refuses_what_it_would_not_write() {
    for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "Hello, 世界"] {
        let e = envelope::base64_encode(s.as_bytes());
        assert_eq!(envelope::base64_decode(&e).unwrap(), s.as_bytes(), "{e}");
    }
    assert_eq!(envelope::base64_encode(b"Hello, \xe4\xb8\x96\xe7\x95\x8c"), "SGVsbG8sIOS4lueVjA==");
    for bad in ["Zg", "Zg=", "Zh==", "Z===", "Zg==Zg==", "Zm9v!", "Zm9v\n"] {
        assert!(envelope::base64_decode(bad).is_none(), "{bad}");
    }
    assert_eq!(envelope::decode_header_value("plain"), Some("plain".into()));
    assert_eq!(envelope::decode_header_value("=?base64?/w==?="), None, "not UTF-8");
}

/// The sandboxed code tool is offered over MCP with its fixed schema; a program's
/// `result` comes back as the call's result, and a program that fails is a tool
/// error with class `code_error`, as for any other caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_tool_is_offered_and_called_over_mcp() {
    let dir = tempfile::tempdir().unwrap();
    // The system's interpreter: as root the program runs as nobody, who may not read
    // a user's (pyenv) Python.
    let s = server_with(dir.path(), "[tools.py]\nkind = \"code\"\npython = \"/usr/bin/python3\"\n").await;
    let listed = s.handle(modern("tools/list", json!({}), json!({}))).await.unwrap();
    let tools = listed["result"]["tools"].as_array().unwrap();
    let py = tools.iter().find(|t| t["name"] == "py").unwrap_or_else(|| panic!("{listed}"));
    let props = &py["inputSchema"]["properties"];
    assert!(props.get("program").is_some() && props.get("input").is_some(), "{py}");

    let call = |program: &str, n: i64| {
        modern(
            "tools/call",
            json!({"name": "py", "arguments": {"program": program, "input": {"n": n}}}),
            json!({}),
        )
    };
    let done = s.handle(call("result = {'twice': input['n'] * 2}", 21)).await.unwrap();
    let r = &done["result"];
    assert_eq!(r["isError"], false, "{done}");
    assert_eq!(r["structuredContent"]["result"]["twice"], 42, "{done}");
    let failed = s.handle(call("result = input['missing']", 1)).await.unwrap();
    let r = &failed["result"];
    assert_eq!(r["isError"], true, "{failed}");
    assert_eq!(r["structuredContent"]["class"], "code_error", "{failed}");
}
