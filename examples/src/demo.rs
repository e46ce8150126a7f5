//! The payments example end to end, with the real `keel` command (the README's main
//! command runs it: `cargo run -p keel-examples --bin demo`).
//!
//! Starts the payments service on 127.0.0.1:18099 (the first two charges fail with
//! 503, the mail relay is down), copies `examples/payments/{keel.toml,plan.toml}` to a
//! temporary directory (the journal is a SQLite file there), and runs, printing each
//! command: `keel run` (retries, then a step that waits for approval), `keel approvals
//! approve` from another process, `keel runs resume` (the breaker opens on the mail
//! relay and a ticket is opened), `keel tickets resolve --action skip`, and a final
//! resume. The ledger at the end shows each order charged exactly once.

use std::path::Path;
use std::process::Command;

use crate::payments::{Faults, router_with_handle};

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// Runs `keel args`, showing the command and its output; returns the output.
fn keel(bin: &Path, dir: &Path, args: &[&str], codes: &mut Vec<i32>) -> (i32, String) {
    say(&format!("\n$ keel {}", args.join(" ")));
    let out = Command::new(bin).current_dir(dir).args(args).env("USER", "demo").output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            for line in text.lines() {
                say(&format!("  {line}"));
            }
            let err = String::from_utf8_lossy(&out.stderr);
            for line in err.lines() {
                say(&format!("  {line}"));
            }
            let code = out.status.code().unwrap_or(-1);
            say(&format!("  [exit {code}]"));
            codes.push(code);
            (code, text)
        }
        Err(e) => {
            say(&format!("  cannot run keel: {e}"));
            codes.push(-1);
            (-1, String::new())
        }
    }
}

fn token_after(text: &str, prefix: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.split(prefix)
            .nth(1)
            .map(|r| r.split_whitespace().next().unwrap_or("").trim_end_matches(':').to_owned())
    })
}

/// What the demo ended with.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The run's id.
    pub run_id: String,
    /// The exit codes of each `keel` command, in order.
    pub codes: Vec<i32>,
    /// The charges the payments service made.
    pub charges: Vec<serde_json::Value>,
}

/// Runs the demo with the `keel` binary at `bin`, the payments service on `addr`
/// (`127.0.0.1:18099` for people; `127.0.0.1:0` in tests).
///
/// # Errors
/// What went wrong, in words; an order charged twice is an error.
pub fn run(bin: &Path, addr: &str) -> Result<Outcome, String> {
    let faults = Faults { fail_first: 2, notify_down: true, ..Faults::default() };
    let (router, ledger) = router_with_handle(faults);
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on {addr} (is the demo already running?): {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        if let Ok(rt) = rt {
            rt.block_on(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(listener) {
                    let _ = axum::serve(l, router).await;
                }
            });
        }
    });
    say(&format!(
        "payments service on http://{bound} (first 2 charges fail with 503; the mail relay is down)"
    ));

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("payments");
    let dir = std::env::temp_dir().join(format!("keel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for f in ["keel.toml", "plan.toml"] {
        let text = std::fs::read_to_string(src.join(f)).map_err(|e| format!("{f}: {e}"))?;
        std::fs::write(dir.join(f), text.replace("127.0.0.1:18099", &bound.to_string()))
            .map_err(|e| format!("{f}: {e}"))?;
    }
    say(&format!("working in {} (journal: keel.db there)", dir.display()));
    let mut codes = Vec::new();

    let (code, out) = keel(bin, &dir, &["run", "plan.toml"], &mut codes);
    let run_id = out
        .split_whitespace()
        .map(|w| w.trim_end_matches(':'))
        .find(|w| w.starts_with("run-"))
        .ok_or("no run id")?
        .to_owned();
    if code == 3 {
        let approval = token_after(&out, "waits for approval ").ok_or("no approval id")?;
        say("\n(a person approves from another terminal; the run held no process meanwhile)");
        keel(bin, &dir, &["approvals", "approve", &approval], &mut codes);
        let (code, out) = keel(bin, &dir, &["runs", "resume", &run_id], &mut codes);
        if code == 4 {
            let ticket = token_after(&out, "ticket ").ok_or("no ticket id")?;
            keel(bin, &dir, &["tickets", "show", &ticket], &mut codes);
            say("\n(the on-call engineer decides the email can be skipped)");
            keel(bin, &dir, &["tickets", "resolve", &ticket, "--action", "skip"], &mut codes);
            keel(bin, &dir, &["runs", "resume", &run_id], &mut codes);
        }
    }
    say("\n(resuming a finished run acts on nothing)");
    keel(bin, &dir, &["runs", "resume", &run_id], &mut codes);
    keel(bin, &dir, &["runs", "show", &run_id], &mut codes);

    let charges = ledger.charges();
    say(&format!(
        "\nthe payments ledger: {} charges for {} charge requests that got through:",
        charges.len(),
        ledger.attempts()
    ));
    for c in &charges {
        say(&format!("  {c}"));
    }
    let orders: Vec<_> = charges.iter().map(|c| c["order"].clone()).collect();
    let unique: std::collections::BTreeSet<String> = orders.iter().map(ToString::to_string).collect();
    if unique.len() == orders.len() {
        say("each order was charged exactly once.");
        Ok(Outcome { run_id, codes, charges })
    } else {
        Err("an order was charged twice".into())
    }
}
