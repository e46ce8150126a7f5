//! The official `openai` Python package as a real client of the gateway on loopback
//! (`python/client.py`): a plain completion, a streamed one, a tool call, and
//! fallbacks the client never notices.
//!
//! The interpreter is `KEEL_TEST_PYTHON` when set (`.ci/run` sets it, see
//! `.ci/python.sh`); otherwise a venv with `openai` is created once under the cargo
//! target dir. It is built in a temporary directory and renamed into place, so
//! concurrent test processes never see a half-made venv.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Fake, Reply, model, serve};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("openai-venv");
    let bin = venv.join("bin").join("python");
    if bin.exists() {
        return bin;
    }
    let building = root.join(format!("openai-venv.{}", std::process::id()));
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

    let mut flaky = model(&down, "flaky-upstream");
    flaky.fallbacks = vec!["gpt".into()];
    let mut cutting = model(&cut, "cut-upstream");
    cutting.fallbacks = vec!["gpt".into()];
    let served = serve(vec![
        ("gpt", model(&fake, "gpt-4o-mini")),
        ("tools", model(&tools, "tools-upstream")),
        ("flaky", flaky),
        ("cut", cutting),
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
