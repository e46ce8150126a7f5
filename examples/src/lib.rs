//! Offline examples of Keel. Each binary under `src/bin/` opens with how to run it; the
//! tests under `tests/` run every one.

pub mod agent;
pub mod demo;
pub mod payments;

/// Builds the `keel` binary next to the running example's (cargo sets `CARGO` for
/// `cargo run`) and returns its path: the examples drive the real command, as a person
/// would.
///
/// # Errors
/// When cargo cannot be run or the build fails.
pub fn build_keel() -> Result<std::path::PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "keel-cli", "--bin", "keel"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building keel failed".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(me.parent().ok_or("no directory")?.join("keel"))
}
