//! An agent run end to end with the real `keel` command (see `keel_examples::agent`).
//!
//! Run: `cargo run -p keel-examples --bin agent`

use std::process::ExitCode;

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    match keel_examples::build_keel().and_then(|bin| keel_examples::agent::run(&bin)) {
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
