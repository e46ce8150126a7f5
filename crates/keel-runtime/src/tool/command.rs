//! Command tools: a program run without a shell, in its own process group, with a
//! clean environment, and dying with the Keel process that started it.
//!
//! Why a process group: a tool that hangs must be killed with everything it started
//! (a script's children, a pipeline's stages), or the "timeout" leaves orphans
//! working. When the attempt ends — finished, timed out or cancelled — the whole group
//! gets SIGKILL. stdout and stderr are read to a size cap (the rest is drained and
//! dropped), so a chatty program cannot exhaust memory.
//!
//! Why a lifeline: if Keel itself dies (SIGKILL, OOM), nothing is left to kill the
//! group, and a tool reparented to init would finish its side effect while the resumed
//! run calls it again. So the group is led by a tiny watcher (`/bin/sh -c 'read l;
//! kill -s KILL 0'`) whose stdin is a pipe only this process holds the write end of.
//! The kernel closes that pipe when Keel dies, however it dies; the watcher reads EOF
//! and kills its whole group — the tool and everything it started. The watcher is
//! started first and the tool joins its group, so no instant exists where the tool
//! runs unwatched; the tool stays Keel's direct child, so its exit status is exact.
//! (`PR_SET_PDEATHSIG` would need `pre_exec`, i.e. `unsafe`, follows the spawning
//! *thread* rather than the process, and kills only the leader.) A process that leaves
//! the group on purpose (`setsid`, a daemon) escapes both kills.
//!
//! Why a clean environment: Keel's own environment holds every secret it was given
//! (API keys, `headers_env`, `api_key_env`). A program gets only what
//! [`CommandTool::env`] holds — the config puts there [`INHERITED_ENV`], then the
//! tool's `env` and `env_from` — plus Keel's call variables (`KEEL_IDEMPOTENCY_KEY`).
//! Without a configured `cwd` it runs in a fresh empty private directory, removed when
//! the attempt ends, never in Keel's (where the journal and secrets may live).

use std::collections::BTreeMap;
use std::process::Stdio;

use keel_core::classify::{CommandClassifier, CommandExit, io_error};
use keel_core::{ErrorClass, Failure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::template::render_text;

/// The variables of Keel's environment a command inherits (when set): nothing that can
/// hold a secret. Everything else must be declared with `env` or `env_from`.
pub const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// The prefix of the variables Keel sets for each call (`KEEL_IDEMPOTENCY_KEY`); a tool
/// cannot declare one.
pub(crate) const CALL_ENV_PREFIX: &str = "KEEL_";

/// The watcher leading each tool's process group: on EOF of its stdin (Keel is gone, or
/// the attempt is over) it kills the group. See the module docs.
const WATCHER: &[&str] = &["-c", "read l; kill -s KILL 0", "keel-tool-watcher"];

/// A command tool.
#[derive(Debug, Clone)]
pub struct CommandTool {
    /// The program and its arguments, with placeholders.
    pub argv: Vec<String>,
    /// The working directory; `None` runs each attempt in a fresh empty private
    /// directory, removed when the attempt ends.
    pub cwd: Option<String>,
    /// The program's whole environment: nothing of Keel's own is inherited beyond this
    /// (and the call's `KEEL_*` variables).
    pub env: BTreeMap<String, String>,
    /// Whether the call's parameters are written to the program's stdin as one JSON
    /// document (then stdin closes); otherwise stdin is empty.
    pub params_on_stdin: bool,
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

/// Programs that run their argument as code, and the flag that introduces it (`None`:
/// the first argument that is not an option is the program, as with awk).
const INTERPRETERS: &[(&str, Option<&str>)] = &[
    ("sh", Some("c")),
    ("bash", Some("c")),
    ("dash", Some("c")),
    ("zsh", Some("c")),
    ("ksh", Some("c")),
    ("mksh", Some("c")),
    ("ash", Some("c")),
    ("fish", Some("c")),
    ("csh", Some("c")),
    ("tcsh", Some("c")),
    ("python", Some("c")),
    ("pypy", Some("c")),
    ("perl", Some("eE")),
    ("ruby", Some("e")),
    ("node", Some("ep")),
    ("nodejs", Some("ep")),
    ("php", Some("r")),
    ("awk", None),
    ("gawk", None),
    ("mawk", None),
    ("nawk", None),
];

/// The interpreter `arg` names (`/usr/bin/python3.12` is python), with its code flag.
fn interpreter(arg: &str) -> Option<(&'static str, Option<&'static str>)> {
    let base = arg.rsplit('/').next().unwrap_or(arg);
    INTERPRETERS.iter().copied().find(|(name, _)| {
        base == *name
            || (base.starts_with(name)
                && base[name.len()..].chars().all(|ch| ch.is_ascii_digit() || ch == '.'))
    })
}

/// Where `argv` puts a `{{param}}` into code an interpreter runs — a `sh -c` script, a
/// `python -c` program, an awk program — or names the program itself from a parameter:
/// (argv index, why it is dangerous). A value there is code: no escaping can make it
/// safe. Arguments after the script (`sh -c 'echo "$1"' sh {{x}}`) are data and fine.
pub(crate) fn shell_templates(argv: &[String]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    if argv.first().is_some_and(|a| a.contains("{{")) {
        found.push((0, "the program itself comes from a parameter: a caller could run anything".to_owned()));
    }
    for (i, arg) in argv.iter().enumerate() {
        let Some((name, flag)) = interpreter(arg) else { continue };
        let rest = &argv[i + 1..];
        let script = match flag {
            Some(letters) => rest
                .iter()
                .position(|a| {
                    a.len() > 1
                        && a.starts_with('-')
                        && !a.starts_with("--")
                        && a[1..].contains(|ch| letters.contains(ch))
                })
                .and_then(|f| {
                    rest[f + 1..].iter().position(|a| !a.starts_with('-') || a == "-").map(|s| f + 1 + s)
                }),
            None => rest.iter().position(|a| !a.starts_with('-')),
        };
        let Some(s) = script else { continue };
        if rest[s].contains("{{") {
            let how = flag.map_or(String::new(), |l| format!(" -{}", &l[..1]));
            found.push((
                i + 1 + s,
                format!(
                    "a `{{{{param}}}}` inside the code `{name}{how}` runs: a value like `'; printenv; '` \
                     becomes code, and no escaping can make that safe. Pass values as their own \
                     arguments (`[\"sh\", \"-c\", \"echo \\\"$1\\\"\", \"sh\", \"{{{{x}}}}\"]`) or drop the interpreter"
                ),
            ));
        }
    }
    found
}

/// A fresh empty directory, private to this user, removed when dropped.
pub(crate) struct Scratch(std::path::PathBuf);

impl Scratch {
    /// Where it is.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// A command's: `keel-tool-PID-RANDOM` in the temp directory.
    pub(crate) fn create() -> std::io::Result<Scratch> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        Self::create_as("keel-tool-", &SWEPT)
    }

    /// A fresh `{prefix}PID-RANDOM`; the first of a process sweeps away those of dead
    /// processes with the same prefix (each kind of tool sweeps its own).
    pub(crate) fn create_as(prefix: &str, swept: &std::sync::Once) -> std::io::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        swept.call_once(|| sweep(&base, prefix));
        let mut last = None;
        for _ in 0..8 {
            let dir = base.join(format!("{prefix}{}-{:016x}", std::process::id(), fastrand::u64(..)));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Scratch(dir)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no directory")))
    }
}

/// Removes the scratch directories a killed Keel left behind (its watcher killed the
/// tool, but nobody removed the directory): those whose process is gone.
fn sweep(base: &std::path::Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

/// How a program run in its own group ended.
pub(crate) struct Ran {
    /// Its exit status.
    pub(crate) status: std::process::ExitStatus,
    /// What it wrote to stdout, up to the cap.
    pub(crate) stdout: Vec<u8>,
    /// Whether stdout went past the cap.
    pub(crate) stdout_cut: bool,
    /// What it wrote to stderr, up to the cap.
    pub(crate) stderr: Vec<u8>,
    /// Whether stderr went past the cap.
    pub(crate) stderr_cut: bool,
    /// Whether it was killed at the deadline [`run_in_group`] was given.
    pub(crate) timed_out: bool,
}

/// How long a group killed at its deadline has to close its pipes before the call
/// stops waiting for them (a process that left the group may hold them for ever).
const KILLED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why [`run_in_group`] has no [`Ran`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum GroupError {
    /// The program could not be started.
    #[error("cannot start the program: {0}")]
    Start(std::io::Error),
    /// The watcher could not be started, or has no pid.
    #[error("cannot start the tool's watcher: {0}")]
    Watcher(std::io::Error),
    /// Waiting for the program failed.
    #[error("waiting for the program: {0}")]
    Wait(std::io::Error),
    /// Killed at its deadline, a process that left the group still held its pipes.
    #[error("killed at its deadline, the program left a process holding its output")]
    Stuck,
}

impl GroupError {
    /// The classified failure of running `program`.
    pub(crate) fn into_failure(self, program: &str) -> Failure {
        match self {
            GroupError::Start(e) => Failure::new(io_error(&e), format!("cannot start `{program}`: {e}")),
            GroupError::Watcher(e) => {
                Failure::new(io_error(&e), format!("cannot start the tool's watcher: {e}"))
            }
            GroupError::Wait(e) => Failure::new(io_error(&e), format!("waiting for `{program}`: {e}")),
            GroupError::Stuck => Failure::new(
                ErrorClass::Timeout,
                format!(
                    "`{program}` was killed at its deadline; a process it started in another group held its output"
                ),
            ),
        }
    }
}

/// Runs `cmd` (program, arguments, environment and directory set by the caller) in a
/// fresh process group led by the lifeline watcher (see the module docs): `stdin`
/// written to it and closed (none: empty), stdout and stderr read up to `caps`, and
/// the whole group killed once it exits — or at `deadline`, or when this future is
/// dropped (a cancelled attempt), or when Keel dies.
///
/// At the deadline the group is killed and the output read until every process
/// holding the pipes is gone (at most [`KILLED_GRACE`] more): what it printed is
/// kept, and nothing it started is still running when this returns.
pub(crate) async fn run_in_group(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    caps: (usize, usize),
    deadline: Option<std::time::Duration>,
) -> Result<Ran, GroupError> {
    // The watcher first, leading the group; the guard covers it from here on.
    let mut watcher = Command::new("/bin/sh")
        .args(WATCHER)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(GroupError::Watcher)?;
    let pgid = watcher.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    let mut guard = GroupGuard(pgid);
    // Only this process holds the write end (std's pipes are close-on-exec): it
    // closes when the attempt ends or when Keel dies.
    let lifeline = watcher.stdin.take();
    let Some(pgid) = pgid else {
        return Err(GroupError::Watcher(std::io::Error::other("the watcher has no process id")));
    };
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(pgid.as_raw())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(GroupError::Start)?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let pipe = child.stdin.take();
    let feed = async {
        if let (Some(mut pipe), Some(bytes)) = (pipe, stdin) {
            // A program that does not read its input closes the pipe: not an error.
            let _ = pipe.write_all(bytes).await;
            let _ = pipe.shutdown().await;
        }
    };
    let pgid = guard.0;
    let work = async {
        tokio::join!(feed, read_capped(stdout, caps.0), read_capped(stderr, caps.1), async {
            let status = child.wait().await;
            // The leader is done: whatever it left behind in its group goes too, so
            // that no straggler holds the pipes open.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            status
        })
    };
    tokio::pin!(work);
    let mut timed_out = false;
    let done = match deadline {
        None => Some(work.await),
        Some(limit) => tokio::select! {
            done = &mut work => Some(done),
            () = tokio::time::sleep(limit) => {
                timed_out = true;
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                tokio::time::timeout(KILLED_GRACE, &mut work).await.ok()
            }
        },
    };
    let Some((_, (out, out_cut), (err, err_cut), status)) = done else {
        return Err(GroupError::Stuck);
    };
    guard.0 = None;
    drop(lifeline);
    let _ = watcher.wait().await;
    let status = status.map_err(GroupError::Wait)?;
    Ok(Ran { status, stdout: out, stdout_cut: out_cut, stderr: err, stderr_cut: err_cut, timed_out })
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
        let scratch = match &self.cwd {
            Some(_) => None,
            None => Some(Scratch::create().map_err(|e| {
                Failure::new(io_error(&e), format!("cannot make a working directory for `{program}`: {e}"))
            })?),
        };
        let mut cmd = Command::new(program);
        cmd.args(args).env_clear().envs(&self.env).envs(extra_env.iter().copied());
        match (&self.cwd, &scratch) {
            (Some(dir), _) => cmd.current_dir(dir),
            (None, Some(s)) => cmd.current_dir(s.path()),
            (None, None) => &mut cmd,
        };
        let input = self.params_on_stdin.then(|| params.to_string().into_bytes());
        let ran = run_in_group(cmd, input.as_deref(), (self.max_output, self.max_output), None)
            .await
            .map_err(|e| e.into_failure(program))?;
        drop(scratch);
        let Ran { status, stdout: out, stdout_cut: out_cut, stderr: err, stderr_cut: err_cut, .. } = ran;
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
