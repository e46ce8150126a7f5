//! The official `openai` and `anthropic` Python packages as real clients of the
//! gateway on loopback: chat completions (`python/client.py`: plain, streamed, a tool
//! call, fallbacks the client never notices), the Responses, embeddings and models
//! APIs (`python/responses.py`), and Anthropic's Messages API against models of both
//! providers (`python/anthropic_client.py`).
//!
//! The interpreter is `KEEL_TEST_PYTHON` when set (`.ci/run` sets it, see
//! `.ci/python.sh`); otherwise a venv with `openai` and `anthropic` is created once
//! under the cargo target dir. It is built in a temporary directory and renamed into place, so
//! concurrent test processes never see a half-made venv.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Fake, Reply, model, serve};

/// The `anthropic` package, pinned as in `.ci/python.sh`.
const ANTHROPIC: &str = "anthropic==2.16.0";

/// Runs `script` (in `tests/it/python/`) against `url`; its last line must be `ok`.
async fn run_script(script: &str, url: &str) {
    let python = tokio::task::spawn_blocking(python).await.expect("the venv task");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/python").join(script);
    let out =
        tokio::process::Command::new(&python).arg(&script).arg(url).output().await.expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("sdk-venv");
    let bin = venv.join("bin").join("python");
    if bin.exists() {
        return bin;
    }
    let building = root.join(format!("sdk-venv.{}", std::process::id()));
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&building));
    run(Command::new(building.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "openai",
        ANTHROPIC,
    ]));
    // Whoever renames first wins; a loser uses the winner's venv.
    if std::fs::rename(&building, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_through_keel() {
    let fake = Fake::start().await;
    let tools = Fake::start().await;
    tools.always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let down = Fake::start().await;
    down.always(Reply::Status {
        code: 503,
        retry_after: None,
        body: r#"{"error":{"message":"overloaded"}}"#,
    });
    let cut = Fake::start().await;
    cut.always(Reply::Cut(vec!["Hello"]));
    // A stream that dies inside its tool call's arguments (after its first frame).
    let tool_cut = Fake::start().await;
    tool_cut.always(Reply::Raw(
        concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_9\",\"type\":\"function\",",
            "\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"ci\"}}]},\"finish_reason\":null}]}\n\n",
        )
        .into(),
    ));

    let mut flaky = model(&down, "flaky-upstream");
    flaky.fallbacks = vec!["gpt".into()];
    let mut cutting = model(&cut, "cut-upstream");
    cutting.fallbacks = vec!["gpt".into()];
    let mut tool_cutting = model(&tool_cut, "tool-cut-upstream");
    tool_cutting.fallbacks = vec!["tools".into()];
    let served = serve(vec![
        ("gpt", model(&fake, "gpt-4o-mini")),
        ("tools", model(&tools, "tools-upstream")),
        ("flaky", flaky),
        ("cut", cutting),
        ("toolcut", tool_cutting),
    ])
    .await;

    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/python/client.py");
    let out = tokio::process::Command::new(&python).arg(&script).arg(&served.url).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = served.gateway.metrics();
    assert_eq!(m.models["flaky"].fallbacks_from, 2, "both flaky calls fell back");
    assert_eq!(m.models["gpt"].rescued_splice, 1, "the cut stream was spliced");
    assert_eq!(
        m.models["tools"].rescued_splice, 2,
        "both streams cut inside their tool call were regenerated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_does_not_resend_a_budget_refusal() {
    let fake = Fake::start().await;
    let config = keel_gateway::GatewayConfig {
        run_budget: keel_core::BudgetConfig { tokens: Some(10), ..keel_core::BudgetConfig::default() },
        ..keel_gateway::GatewayConfig::default()
    };
    let served = crate::support::serve_with(vec![("gpt", model(&fake, "gpt-4o-mini"))], config).await;
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/python/budget.py");
    let out = tokio::process::Command::new(&python).arg(&script).arg(&served.url).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "budget.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = served.journal.records().iter().filter(|r| r.error.is_some()).count();
    assert_eq!(refused, 2, "one request a call: the SDK did not re-send the refusals");
    assert_eq!(fake.hits(), 0);
}

fn failing(code: u16, body: &'static str) -> Reply {
    Reply::Status { code, retry_after: None, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_speaks_responses_embeddings_and_models_through_keel() {
    let fake = Fake::start().await;
    let tools = Fake::start().await;
    tools.always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let limited = Fake::start().await;
    limited.always(failing(429, r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#));
    let bad = Fake::start().await;
    bad.always(failing(
        400,
        r#"{"error":{"message":"temperature is out of range","type":"invalid_request_error"}}"#,
    ));
    let served = serve(vec![
        ("gpt", model(&fake, "gpt-4o-mini")),
        ("tools", model(&tools, "tools-upstream")),
        ("limited", model(&limited, "m")),
        ("bad", model(&bad, "m")),
        ("embed", model(&fake, "text-embedding-3-small")),
    ])
    .await;
    run_script("responses.py", &served.url).await;
    assert_eq!(limited.hits(), 3, "Keel retried the 429 before the SDK saw it");
    assert_eq!(bad.hits(), 1, "a 400 is not retried");
    let second = fake.seen().into_iter().find(|s| s.body.to_string().contains("18C, sunny")).unwrap();
    assert_eq!(
        second.body["messages"][2]["role"], "tool",
        "the function_call_output went upstream as a tool message"
    );
    assert!(fake.seen().iter().any(|s| s.path == "/v1/embeddings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_client_works_through_keel_on_both_providers() {
    let gpt = Fake::start().await;
    let claude = Fake::start().await;
    let gpt_tools = Fake::start().await;
    gpt_tools.always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let claude_tools = Fake::start().await;
    claude_tools.always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let limited = Fake::start().await;
    limited.always(failing(
        429,
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    ));
    let bad = Fake::start().await;
    bad.always(failing(
        400,
        r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens is too large"}}"#,
    ));
    let anthropic = |fake: &Fake| {
        let mut m = model(fake, "claude-sonnet-4");
        m.provider = keel_gateway::Provider::Anthropic;
        m
    };
    let served = serve(vec![
        ("gpt", model(&gpt, "gpt-4o-mini")),
        ("gpt-tools", model(&gpt_tools, "gpt-4o-mini")),
        ("gpt-limited", model(&limited, "m")),
        ("gpt-bad", model(&bad, "m")),
        ("claude", anthropic(&claude)),
        ("claude-tools", anthropic(&claude_tools)),
        ("claude-limited", anthropic(&limited)),
        ("claude-bad", anthropic(&bad)),
    ])
    .await;
    run_script("anthropic_client.py", &served.url).await;
    assert_eq!(limited.hits(), 6, "Keel retried each 429 (3 attempts a model) before the SDK saw it");
    assert_eq!(bad.hits(), 2);
    assert!(claude.seen().iter().all(|s| s.path == "/v1/messages"));
    let second = claude.seen().into_iter().find(|s| s.body.to_string().contains("18C, sunny")).unwrap();
    assert_eq!(second.body["messages"][2]["content"][0]["type"], "tool_result", "{}", second.body);
}
