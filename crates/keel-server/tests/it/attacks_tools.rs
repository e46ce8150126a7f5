//! Attacks on tools with only the agent key, through a real server: a command tool
//! reads no secret, a parameter never becomes shell code, and never moves an http
//! tool's request to another path.

use keel_examples::payments::Faults;
use serde_json::json;

use crate::support::{ADMIN, AGENT, APPROVER, Server};

const TOOLS: &str = r#"
[tools.printenv]
kind = "command"
argv = ["/usr/bin/env"]

[tools.echo_sku]
kind = "command"
# The safe way to use a shell: the value is "$1", an argument, never the script.
argv = ["sh", "-c", 'printf "%s\n" "$1"; env', "sh", "{{sku}}"]

[tools.order_status]
kind = "http"
method = "GET"
url = "{base}/orders/{{id}}"
headers_env = { Authorization = "ADMIN_KEY" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_key_cannot_read_a_secret_through_a_command_tool() {
    let s = Server::start(Faults::default(), &TOOLS.replace("{base}", "http://127.0.0.1:9")).await;
    let (status, body) = s.post(Some(AGENT), "/api/tools/printenv/invoke", Some(json!({"params": {}}))).await;
    assert_eq!(status, 200, "{body}");
    let env = body["output"]["stdout"].as_str().unwrap().to_owned();
    let (status, body) = s
        .post(
            Some(AGENT),
            "/api/tools/echo_sku/invoke",
            Some(json!({"params": {"sku": "'; printenv; echo $ADMIN_KEY; '"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let echoed = body["output"]["stdout"].as_str().unwrap().to_owned();
    assert!(echoed.starts_with("'; printenv; echo $ADMIN_KEY; '\n"), "the value stayed data: {echoed}");

    for out in [&env, &echoed] {
        for secret in [AGENT, APPROVER, ADMIN] {
            assert!(!out.contains(secret), "a server key reached the tool:\n{out}");
        }
        // Nothing of the server process's own environment (where production keeps
        // its secrets) but the allow-list reaches a tool.
        // (A shell sets its own `PWD`: a leak is a variable with the server's value.)
        let foreign: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| !keel_runtime::tool::INHERITED_ENV.contains(&k.as_str()))
            .collect();
        assert!(!foreign.is_empty(), "the attack needs a variable outside the allow-list");
        for (k, v) in &foreign {
            assert!(!out.lines().any(|l| l == format!("{k}={v}")), "`{k}` leaked:\n{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_parameter_is_refused_before_the_secret_header_is_sent() {
    // Nothing listens on the tool's port: a request sent at all would be `network`.
    let s = Server::start(Faults::default(), &TOOLS.replace("{base}", "http://127.0.0.1:9")).await;
    for id in ["..", "."] {
        let (status, body) =
            s.post(Some(AGENT), "/api/tools/order_status/invoke", Some(json!({"params": {"id": id}}))).await;
        assert_eq!(body["class"], "invalid_request", "{id}: {status} {body}");
        assert_eq!(body["attempts"], 1, "refused once, never retried: {body}");
    }
}
