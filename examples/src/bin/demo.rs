//! The payments example end to end, with the real `keel` command.
//!
//! Run: `cargo run -p keel-examples --bin demo`
//!
//! See `keel_examples::demo` for what it shows. This binary builds `keel` (the demo
//! drives the real command, as a person would) and runs the demo on 127.0.0.1:18099.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn keel_binary() -> Result<PathBuf, String> {
    // Build the `keel` binary next to this one (cargo sets CARGO for `cargo run`).
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
    match keel_binary().and_then(|bin| keel_examples::demo::run(&bin, "127.0.0.1:18099")) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            println!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
