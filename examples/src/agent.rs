//! An agent run end to end, with the real `keel` command: `cargo run -p keel-examples
//! --bin agent`.
//!
//! Starts the payments service (its first charge fails with 503) and a small,
//! deterministic stand-in for a model behind OpenAI's chat-completions API (it calls
//! `charge` for the order the task names, then answers with the charge's id), copies
//! `examples/payments/keel.toml` with an `[agent]` section to a temporary directory,
//! and runs `keel agent "Charge order 7 for $40"`: the model's call goes through the
//! tool's policy (the 503 is retried), the idempotency key and the journal; the answer
//! and the ledger are printed. Offline: nothing leaves the machine.

use std::path::Path;
use std::process::Command;

use axum::Json;
use axum::routing::post;
use serde_json::{Value, json};

use crate::payments::{Faults, router_with_handle};

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// The stand-in model: a `charge` call for "order N for $A" in the task, then, once the
/// tool answered, a text answer quoting the charge id. Usage is reported like a real
/// provider's (a token per 4 bytes).
pub fn model_router() -> axum::Router {
    axum::Router::new().route("/v1/chat/completions", post(answer))
}

async fn answer(Json(req): Json<Value>) -> Json<Value> {
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let message = if last["role"] == "tool" {
        let tool: Value =
            serde_json::from_str(last["content"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
        let text = match tool["body"]["charge_id"].as_str() {
            Some(id) => format!("Done: the order is charged ({id})."),
            None => format!("The charge did not go through: {}", last["content"].as_str().unwrap_or("")),
        };
        json!({"role": "assistant", "content": text})
    } else {
        let task =
            messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
        let numbers: Vec<f64> = task
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter_map(|w| w.trim_matches('.').parse().ok())
            .collect();
        match numbers.as_slice() {
            [order, amount, ..] => json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "charge", "arguments": json!({"order": *order as i64, "amount": amount}).to_string()}}]}),
            _ => json!({"role": "assistant", "content": "Which order, and how much?"}),
        }
    };
    let prompt = (req.to_string().len() / 4) as u64;
    Json(json!({
        "id": "chatcmpl-example", "object": "chat.completion", "created": 0, "model": "example",
        "choices": [{"index": 0, "message": message, "finish_reason": if last["role"] == "tool" { "stop" } else { "tool_calls" }}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12},
    }))
}

/// What the example ended with.
#[derive(Debug, Clone)]
pub struct AgentOutcome {
    /// `keel agent`'s exit code.
    pub code: i32,
    /// What it printed.
    pub stdout: String,
    /// The charges the payments service made.
    pub charges: Vec<Value>,
}

fn serve_on(router: axum::Router) -> Result<std::net::SocketAddr, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(listener) {
                    let _ = axum::serve(l, router).await;
                }
            });
        }
    });
    Ok(bound)
}

/// Runs the example with the `keel` binary at `bin`.
///
/// # Errors
/// What went wrong setting it up (the run's own outcome is in the result).
pub fn run(bin: &Path) -> Result<AgentOutcome, String> {
    let (payments, ledger) = router_with_handle(Faults { fail_first: 1, ..Faults::default() });
    let payments = serve_on(payments)?;
    let model = serve_on(model_router())?;
    say(&format!(
        "payments on http://{payments} (its first charge fails with 503), a model on http://{model}"
    ));
    let dir = std::env::temp_dir().join(format!("keel-agent-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("payments/keel.toml");
    let config = std::fs::read_to_string(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let config = format!(
        "{}\n# The model agent runs ask, and what they may do.\n[models.assistant]\nprovider = \"openai\"\n\
         base_url = \"http://{model}/v1\"\nmodel = \"example\"\n\n[agent]\nmodel = \"assistant\"\n\
         tools = [\"charge\", \"check_stock\"]\nmax_turns = 6\n",
        config.replace("127.0.0.1:18099", &payments.to_string())
    );
    std::fs::write(dir.join("keel.toml"), config).map_err(|e| e.to_string())?;
    say(&format!("working in {} (journal: keel.db there)", dir.display()));
    say("\n$ keel agent \"Charge order 7 for $40\"");
    let out = Command::new(bin)
        .current_dir(&dir)
        .args(["agent", "Charge order 7 for $40"])
        .env("USER", "example")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in stdout.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
        say(&format!("  {line}"));
    }
    let charges = ledger.charges();
    say(&format!("\nledger: {} charge(s): {}", charges.len(), Value::Array(charges.clone())));
    Ok(AgentOutcome { code: out.status.code().unwrap_or(-1), stdout, charges })
}
