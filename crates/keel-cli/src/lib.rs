//! keel-cli: the `keel` command — run plans failure-first, answer approvals and
//! tickets, inspect runs. One report path: [`main`] runs a command and turns any error
//! into `keel: error[class]: message` and an exit code chosen by the class.
//!
//! Exit codes: 0 completed, 1 failed, 2 bad input (config, plan, arguments — nothing
//! was touched), 3 waiting for approval, 4 escalated (a ticket is open), 5 timed out,
//! 6 cancelled, 7 busy (another process works the run).
//!
//! With `--json`, an error is also one JSON object on stdout: `{"ok": false, "class",
//! "message", "exit_code"}`, and for a bad config `"errors": [{"file", "line", "key",
//! "message"}]`, every problem found.

mod cli;
mod commands;
mod render;

use std::process::ExitCode;

use clap::Parser;
use keel_core::{Classified, ErrorClass};

pub use cli::Cli;

/// Parses the process's arguments, runs the command, reports errors.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_cli(cli)
}

/// Runs a parsed command line to its exit code.
pub fn run_cli(cli: Cli) -> ExitCode {
    let json = cli.json;
    // 8 MiB stacks, as the main thread's: a call nests a pipeline, a tool's transport
    // and, on a fallback, a second pipeline; 2 MiB is tight for that in debug builds.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&anyhow::Error::new(e), json),
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => report(&e, json),
    }
}

/// The class of an error from any layer.
fn class_of(e: &anyhow::Error) -> ErrorClass {
    if let Some(e) = e.downcast_ref::<keel_runtime::ConfigErrors>() {
        return e.class();
    }
    if let Some(e) = e.downcast_ref::<keel_runtime::PlanError>() {
        return e.class();
    }
    if let Some(e) = e.downcast_ref::<keel_runtime::runner::Error>() {
        return e.class();
    }
    if let Some(e) = e.downcast_ref::<keel_journal::Error>() {
        return e.class();
    }
    if let Some(e) = e.downcast_ref::<commands::UsageError>() {
        return e.class();
    }
    ErrorClass::ServerError
}

/// Whether Keel could not use its journal (exit code 8): not the run's fault, and
/// nothing about the run can be concluded from it.
fn storage_failed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<keel_journal::Error>().is_some_and(keel_journal::Error::is_storage)
            || matches!(
                c.downcast_ref::<keel_runtime::runner::Error>(),
                Some(keel_runtime::runner::Error::Journal(j)) if j.is_storage()
            )
    })
}

fn report(e: &anyhow::Error, json: bool) -> ExitCode {
    // A closed pipe (`keel runs list | head`) is not an error.
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    let class = class_of(e);
    let mut text = format!("keel: error[{class}]: {e}");
    for cause in e.chain().skip(1) {
        text.push_str(&format!("\n  caused by: {cause}"));
    }
    render::eprint(&text);
    let code = if storage_failed(e) {
        8
    } else if matches!(class, ErrorClass::InvalidRequest | ErrorClass::NotFound) {
        2
    } else if class == ErrorClass::Conflict {
        7
    } else {
        1
    };
    if json {
        let mut v = serde_json::json!({
            "ok": false,
            "class": class,
            "message": e.to_string(),
            "causes": e.chain().skip(1).map(ToString::to_string).collect::<Vec<_>>(),
            "exit_code": code,
        });
        if let Some(errors) = e.downcast_ref::<keel_runtime::ConfigErrors>() {
            v["errors"] = errors
                .0
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "file": c.file.display().to_string(),
                        "line": c.line,
                        "key": c.key,
                        "message": c.message,
                    })
                })
                .collect();
        }
        render::print(&serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    ExitCode::from(code)
}
