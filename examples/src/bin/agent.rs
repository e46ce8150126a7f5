//! An agent run end to end with the real `keel` command (see `keel_examples::agent`).
//!
//! Run: `cargo run -p keel-examples --bin agent`

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn keel_binary() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "keel-cli", "--bin", "keel"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building keel failed".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(me.parent().ok_or("no directory")?.join("keel"))
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    match keel_binary().and_then(|bin| keel_examples::agent::run(&bin)) {
        Ok(out) if out.code == 0 => ExitCode::SUCCESS,
        Ok(out) => {
            println!("the agent run ended with exit code {}", out.code);
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("the example failed: {e}");
            ExitCode::FAILURE
        }
    }
}
