//! The payments example end to end, with the real `keel` command.
//!
//! Run: `cargo run -p keel-examples --bin demo`
//!
//! See `keel_examples::demo` for what it shows. This binary builds `keel` (the demo
//! drives the real command, as a person would) and runs the demo on 127.0.0.1:18099.

use std::process::ExitCode;

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    match keel_examples::build_keel().and_then(|bin| keel_examples::demo::run(&bin, "127.0.0.1:18099")) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            println!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
