//! Command tools: a program run without a shell, in its own process group.
//!
//! Why a process group: a tool that hangs must be killed with everything it started
//! (a script's children, a pipeline's stages), or the "timeout" leaves orphans
//! working. The program leads a new group; when the attempt ends — finished, timed out
//! or cancelled — the whole group gets SIGKILL. stdout and stderr are read to a size
//! cap (the rest is drained and dropped), so a chatty program cannot exhaust memory.

use std::collections::BTreeMap;
use std::process::Stdio;

use keel_core::classify::{CommandClassifier, CommandExit, io_error};
use keel_core::{ErrorClass, Failure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::template::render_text;

/// A command tool.
#[derive(Debug, Clone)]
pub struct CommandTool {
    /// The program and its arguments, with placeholders.
    pub argv: Vec<String>,
    /// The working directory.
    pub cwd: Option<String>,
    /// Environment variables set for the program.
    pub env: BTreeMap<String, String>,
    /// The most bytes kept of stdout and of stderr each.
    pub max_output: usize,
    /// How exits map to classes.
    pub classifier: CommandClassifier,
}

/// Kills a process group when dropped, unless disarmed: the attempt's end, however it
/// ends, takes every process of the tool with it.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (the group is already gone) is the normal case after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Reads `reader` to its end, keeping at most `cap` bytes.
async fn read_capped(reader: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else { return (Vec::new(), false) };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

impl CommandTool {
    /// Runs the command once with `params`.
    ///
    /// # Errors
    /// A [`Failure`] classified from the exit status and stderr, or from the error
    /// starting the program.
    pub async fn run(&self, params: &Value) -> Result<Value, Failure> {
        self.run_with_env(params, &[]).await
    }

    /// Runs the command once with `params` and extra environment variables.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_with_env(&self, params: &Value, extra_env: &[(&str, &str)]) -> Result<Value, Failure> {
        let argv = self
            .argv
            .iter()
            .map(|a| render_text(a, params, str::to_owned))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::new(ErrorClass::InvalidRequest, e.to_string()))?;
        let Some((program, args)) = argv.split_first() else {
            return Err(Failure::new(ErrorClass::InvalidRequest, "empty argv"));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(&self.env)
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let mut child =
            cmd.spawn().map_err(|e| Failure::new(io_error(&e), format!("cannot start `{program}`: {e}")))?;
        let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let pgid = guard.0;
        let ((out, out_cut), (err, err_cut), status) =
            tokio::join!(read_capped(stdout, self.max_output), read_capped(stderr, self.max_output), async {
                let status = child.wait().await;
                // The leader is done: whatever it left behind in its group goes too, so
                // that no straggler holds the pipes open.
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                status
            });
        guard.0 = None;
        let status =
            status.map_err(|e| Failure::new(io_error(&e), format!("waiting for `{program}`: {e}")))?;
        let stdout = String::from_utf8_lossy(&out).into_owned();
        let stderr = String::from_utf8_lossy(&err).into_owned();
        let exit = match status.code() {
            Some(code) => CommandExit::Code(code),
            None => CommandExit::Signal(std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)),
        };
        if let Some(failure) = self.classifier.classify(exit, &stderr) {
            return Err(failure);
        }
        let mut output = json!({
            "exit_code": 0,
            "stdout": stdout,
            "stderr": stderr,
            "truncated": out_cut || err_cut,
        });
        if let Ok(parsed) = serde_json::from_str::<Value>(stdout.trim()) {
            output["json"] = parsed;
        }
        Ok(output)
    }
}
