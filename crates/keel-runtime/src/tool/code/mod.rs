//! Code tools (`kind = "code"`): model-written Python run in a sandbox, its outcome a
//! JSON `result` or a `code_error` a model can repair.
//!
//! The program goes to a small Python launcher ([`LAUNCHER`], run with `python3 -I
//! -c`) on stdin with its `input`. The launcher sets the rlimits (address space, CPU,
//! processes, file size, open files, no core), leaves root for `nobody`, runs the
//! program with `exec` in a fresh namespace and writes one JSON outcome to its
//! original stdout; the program's own stdout and stderr both go to stderr, which
//! Keel keeps up to `max_output`. So the outcome is never mixed with what the
//! program prints, and our crates set no limit themselves (no `unsafe`).
//!
//! The process runs as command tools do ([`run_in_group`]): a fresh scratch
//! directory removed after, an environment of PATH, HOME (the scratch directory),
//! TMPDIR and LANG only, its own process group led by the lifeline watcher and
//! killed at the end, with Keel, or at the wall `timeout`. Which sandbox wraps it —
//! bubblewrap's namespaces, or the rlimits with `unshare` — is [`sandbox`]'s.
//!
//! Every outcome but a result is a [`Failure`] of class `code_error`, whose message
//! starts `Type: message` (`KeyError: 'total'`, [`code_error_kind`] reads the type
//! back) and goes on with the program's own traceback lines and the tail of its
//! output. The wall timeout is a `code_error` too (`WallTimeExceeded`), not
//! `timeout`: a program that runs past its limit is almost always the program (an
//! endless loop, a wait on nothing), so the same program would time out again —
//! `timeout`'s disposition, retry with backoff, would only spend the same wall time
//! twice and count against the tool's breaker, while `correct` asks for a changed
//! program. (The tool's policy attempt timeout, if shorter, still ends an attempt as
//! `timeout`: that is the pipeline's, not the program's.)

pub mod sandbox;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use keel_core::{ErrorClass, Failure};
use serde_json::{Value, json};
use tokio::process::Command;

pub use sandbox::{Isolation, IsolationRequest, Sandbox};

use super::command::{GroupError, Ran, run_in_group};

/// The launcher, run as `python3 -I -c LAUNCHER LIMITS`.
pub(crate) const LAUNCHER: &str = include_str!("launcher.py");

/// The open files a program may hold.
pub(crate) const MAX_OPEN_FILES: u32 = 256;

/// The most bytes of JSON a `result` may take.
pub(crate) const MAX_RESULT: usize = 4 << 20;

/// How much of the program's output a failure's message carries (its end).
const OUTPUT_IN_ERROR: usize = 1500;

/// A code tool's limits, as validated from its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall time of one run.
    pub timeout: Duration,
    /// CPU seconds (RLIMIT_CPU; the hard limit is one second more).
    pub cpu_seconds: u64,
    /// Address space, MiB (RLIMIT_AS).
    pub memory_mb: u64,
    /// Processes (and threads) of the program's user (RLIMIT_NPROC).
    pub max_processes: u32,
    /// The largest file it may write, MiB (RLIMIT_FSIZE).
    pub max_file_mb: u64,
    /// Bytes kept of its output (stdout and stderr together).
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            cpu_seconds: 10,
            memory_mb: 512,
            max_processes: 32,
            max_file_mb: 16,
            max_output: 64 << 10,
        }
    }
}

impl Limits {
    /// The limits of the sandbox probe: enough to start python and a subprocess.
    pub(crate) fn probe() -> Self {
        Self { memory_mb: 256, cpu_seconds: 5, max_processes: 16, max_file_mb: 1, ..Self::default() }
    }
}

/// A code tool.
#[derive(Clone)]
pub struct CodeTool {
    /// Its limits.
    pub limits: Limits,
    /// How it is isolated on this machine.
    pub sandbox: Arc<Sandbox>,
    /// The JSON Schema a `result` must match, if any.
    pub(crate) result_schema: Option<Arc<jsonschema::Validator>>,
    /// `LANG` for the program, from Keel's environment.
    pub(crate) lang: Option<String>,
}

impl std::fmt::Debug for CodeTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeTool")
            .field("limits", &self.limits)
            .field("isolation", &self.sandbox.isolation)
            .finish_non_exhaustive()
    }
}

/// The parameters of every code tool.
pub fn params_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "program": {
                "type": "string",
                "minLength": 1,
                "description": "Python 3 source. It must set the global `result` to a JSON-serialisable value; \
                                the global `input` holds the call's input. No network; files only in the \
                                working directory."
            },
            "input": { "description": "Any JSON value, given to the program as the global `input`." }
        },
        "required": ["program"],
        "additionalProperties": false
    })
}

/// The Python error type a `code_error` names first (`KeyError` of `KeyError:
/// 'total'`), for learning a strategy per kind of error; `None` for other classes.
/// One parser for every code error, journaled or not: [`crate::agent::correct::error_kind`].
pub fn code_error_kind(failure: &Failure) -> Option<String> {
    (failure.class == ErrorClass::CodeError).then(|| crate::agent::correct::error_kind(&failure.message))
}

/// A `code_error`: `kind: message`, then the program's frames and its output's end.
fn code_error(kind: &str, message: &str, frames: &[Value], output: &str) -> Failure {
    let mut m = format!("{kind}: {message}");
    if !frames.is_empty() {
        m.push_str("\nprogram traceback (most recent call last):");
        for f in frames {
            let line = f["line"].as_u64().unwrap_or(0);
            let func = f["function"].as_str().unwrap_or("?");
            let code = f["code"].as_str().unwrap_or("");
            m.push_str(&format!("\n  line {line}, in {func}: {code}"));
        }
    }
    let output = output.trim_end();
    if !output.is_empty() {
        let mut start = output.len().saturating_sub(OUTPUT_IN_ERROR);
        while !output.is_char_boundary(start) {
            start += 1;
        }
        m.push_str(&format!(
            "\nprogram output{}:\n{}",
            if start > 0 { " (its end)" } else { "" },
            &output[start..]
        ));
    }
    Failure::new(ErrorClass::CodeError, m)
}

/// Compiles a `result_schema` (a code tool's, or an agent task's).
///
/// # Errors
/// Why it is not a JSON Schema, in words.
pub fn compile_result_schema(schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
    jsonschema::validator_for(schema).map(Arc::new).map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// A program's `result` against a `result_schema` — the code tool's own (`whose`: "the
/// tool's") or the agent task's ("the task's"): the one home of that check. A mismatch
/// is a `code_error` of kind `ResultSchemaError` naming the first problems at their
/// paths, then the program's `output`, for the model to correct.
///
/// # Errors
/// That `code_error`.
pub fn check_result(
    schema: &jsonschema::Validator,
    whose: &str,
    result: &Value,
    output: &str,
) -> Result<(), Failure> {
    let problems: Vec<String> = schema
        .iter_errors(result)
        .take(5)
        .map(|e| {
            let path = e.instance_path().to_string();
            if path.is_empty() { e.to_string() } else { format!("{path}: {e}") }
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let message = format!("`result` does not match {whose} result_schema: {}", problems.join("; "));
    Err(code_error("ResultSchemaError", &message, &[], output))
}

impl CodeTool {
    /// Which isolation its programs run in.
    pub fn isolation(&self) -> Isolation {
        self.sandbox.isolation
    }

    /// Runs `params.program` once.
    ///
    /// # Errors
    /// `code_error` for everything the program did (see the module docs);
    /// `invalid_request` for parameters that are not a program; `server_error` when
    /// the sandbox itself could not start.
    pub async fn run(&self, params: &Value) -> Result<Value, Failure> {
        if !params["program"].is_string() {
            return Err(Failure::new(
                ErrorClass::InvalidRequest,
                "`program` must be a string of Python code",
            ));
        }
        let request =
            json!({"program": params["program"], "input": params.get("input").unwrap_or(&Value::Null)});
        let scratch = self.sandbox.scratch().map_err(|e| {
            Failure::new(
                keel_core::classify::io_error(&e),
                format!("cannot make the program's scratch directory: {e}"),
            )
        })?;
        let (program, args, env, cwd) =
            self.sandbox.command(scratch.path(), &self.limits, self.lang.as_deref());
        let mut cmd = Command::new(&program);
        cmd.args(&args).env_clear().envs(env).current_dir(cwd);
        let input = request.to_string().into_bytes();
        let caps = (MAX_RESULT + 4096, self.limits.max_output);
        let ran = run_in_group(cmd, Some(&input), caps, Some(self.limits.timeout)).await;
        drop(scratch);
        let message = format!(
            "the program ran longer than its {} wall-clock limit and was killed",
            humantime::format_duration(self.limits.timeout)
        );
        let ran = match ran {
            Ok(ran) => ran,
            Err(GroupError::Stuck) => {
                let message =
                    format!("{message}; a process it started in a session of its own held its output");
                return Err(code_error("WallTimeExceeded", &message, &[], ""));
            }
            Err(e) => return Err(e.into_failure(&program.to_string_lossy())),
        };
        if ran.timed_out {
            return Err(code_error("WallTimeExceeded", &message, &[], &self.output(&ran)));
        }
        self.outcome(ran)
    }

    /// The answer or failure a finished run makes.
    fn outcome(&self, ran: Ran) -> Result<Value, Failure> {
        let output = self.output(&ran);
        let doc: Option<Value> = serde_json::from_slice(&ran.stdout).ok();
        let Some(doc) = doc else {
            return Err(self.no_outcome(&ran, &output));
        };
        if doc["ok"] != true {
            let e = &doc["error"];
            let frames = e["traceback"].as_array().map(Vec::as_slice).unwrap_or_default();
            return Err(code_error(
                e["type"].as_str().unwrap_or("Error"),
                e["message"].as_str().unwrap_or(""),
                frames,
                &output,
            ));
        }
        let result = doc.get("result").cloned().unwrap_or(Value::Null);
        if let Some(schema) = &self.result_schema {
            check_result(schema, "the tool's", &result, &output)?;
        }
        let mut answer = json!({
            "result": result,
            "stdout": output,
            "isolation": self.sandbox.isolation.as_str(),
        });
        let warnings = self.sandbox.warnings();
        if !warnings.is_empty() {
            answer["warnings"] = json!(warnings);
        }
        Ok(answer)
    }

    /// What the program printed (stdout and stderr), marked when cut.
    fn output(&self, ran: &Ran) -> String {
        let mut output = String::from_utf8_lossy(&ran.stderr).into_owned();
        if ran.stderr_cut {
            output.push_str(&format!("\n[output cut at {} bytes]", self.limits.max_output));
        }
        output
    }

    /// The failure of a run that wrote no outcome: killed, or gone before reporting.
    fn no_outcome(&self, ran: &Ran, output: &str) -> Failure {
        use std::os::unix::process::ExitStatusExt;
        // bwrap and unshare report a child's signal as 128 + its number.
        let signal = ran
            .status
            .signal()
            .or_else(|| ran.status.code().filter(|c| (129..160).contains(c)).map(|c| c - 128));
        // util-linux's unshare, whose child died by a signal, fails re-raising it and
        // says so instead of the signal's name.
        let unshare_signal = output.lines().any(|l| l.starts_with("unshare: sigprocmask"));
        if let Some(first) =
            output.lines().next().filter(|l| l.starts_with("bwrap:") || l.starts_with("unshare:"))
        {
            if !unshare_signal {
                return Failure::new(
                    ErrorClass::ServerError,
                    format!("the sandbox could not start: {first}"),
                );
            }
        }
        let output: String =
            output.lines().filter(|l| !l.starts_with("unshare: ")).collect::<Vec<_>>().join("\n");
        let output = output.as_str();
        let l = &self.limits;
        let signal = if unshare_signal { Some(9) } else { signal };
        let (kind, message) = match signal {
            Some(9) => (
                "Killed",
                format!(
                    "the program was killed: it went past a hard limit — {} s of CPU time, or {} MiB of memory",
                    l.cpu_seconds + 1,
                    l.memory_mb
                ),
            ),
            Some(24) => ("CPUTimeExceeded", format!("the program used its {} s of CPU time", l.cpu_seconds)),
            Some(25) => (
                "FileSizeExceeded",
                format!("the program wrote past the {} MiB file size limit", l.max_file_mb),
            ),
            Some(11) => ("Segfault", "the interpreter crashed (SIGSEGV)".to_owned()),
            Some(n) => ("Signal", format!("the program was killed by signal {n}")),
            None => (
                "Exited",
                format!(
                    "the program ended (exit status {}) before reporting `result` (os._exit, or the interpreter failed)",
                    ran.status.code().unwrap_or(-1)
                ),
            ),
        };
        code_error(kind, &message, &[], output)
    }
}
