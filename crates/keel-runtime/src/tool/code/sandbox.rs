//! Which isolation a code tool gets on this machine, found once by trying it.
//!
//! Two modes, both with the launcher's rlimits inside:
//!
//! - **bwrap** (bubblewrap): new pid, network, ipc, uts and cgroup namespaces; a
//!   filesystem of read-only `/usr`, the interpreter's prefix, the few `/etc` files
//!   the dynamic loader reads, a private `/tmp` and `/proc`, a `/dev` of null, zero,
//!   full and random only (no tty), and the scratch directory (`/sandbox`, the only
//!   writable place); the launcher is the pid namespace's init (`--as-pid-1`: when
//!   it ends, everything the program started ends), `--die-with-parent`, an empty
//!   environment. When Keel is root, bwrap keeps only CAP_SETUID/CAP_SETGID so
//!   the launcher can become `nobody` (root is exempt from RLIMIT_NPROC and owns every
//!   root file, so a program never runs as it); otherwise bwrap makes a user
//!   namespace and drops every capability.
//! - **rlimits**: the interpreter as a child process with the same limits, in the
//!   scratch directory, as `nobody` when Keel is root; wrapped in `unshare --net
//!   --pid --fork --kill-child --mount-proc` (plus `--user --map-root-user` when not
//!   root; without `--mount-proc` if that alone fails) when that works here, so it
//!   still has no network, sees only its own processes, and nothing it starts
//!   outlives it (the launcher then leaves Keel's session and terminal). Without
//!   `unshare` the answer and the log say what is not isolated.
//!
//! The probe runs the real launcher with a tiny program that imports a module the
//! launcher did not (so the interpreter's library is readable after dropping root);
//! its answer is cached per (interpreter, requested mode) for the process.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{LAUNCHER, Limits};
use crate::tool::command::Scratch;

/// The uid and gid a program runs as when Keel is root: `nobody`.
pub(crate) const NOBODY: u32 = 65534;

/// Where the scratch directory is inside bwrap's sandbox.
const INSIDE: &str = "/sandbox";

/// The isolation a code tool asks for (`isolation = ...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IsolationRequest {
    /// bwrap when it works on this machine, else rlimits.
    #[default]
    Auto,
    /// bwrap, or the config is refused.
    Bwrap,
    /// Never bwrap: a child process with rlimits (and `unshare` when it works).
    Rlimits,
}

/// The isolation a code tool has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// bubblewrap's namespaces plus the limits.
    Bwrap,
    /// A child process with the limits.
    Rlimits,
}

impl Isolation {
    /// Its name in answers and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Isolation::Bwrap => "bwrap",
            Isolation::Rlimits => "rlimits",
        }
    }
}

/// The interpreter, as found on PATH.
#[derive(Debug, Clone)]
struct Python {
    /// Its real executable (`sys.executable`, symlinks resolved).
    exe: PathBuf,
    /// Its prefixes outside `/usr` (bound read-only into bwrap's sandbox).
    roots: Vec<PathBuf>,
}

/// How a code tool's programs are run on this machine.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The mode.
    pub isolation: Isolation,
    /// Whether the program has no network.
    pub network_isolated: bool,
    /// Whether nothing the program starts can outlive it (a pid namespace).
    pub processes_contained: bool,
    /// Whether the program sees only the sandbox's files (bwrap).
    pub filesystem_isolated: bool,
    /// Whether its /proc shows only its own processes.
    pub own_proc: bool,
    /// The uid the launcher drops to (Keel is root), if any.
    pub drop_to: Option<u32>,
    /// bwrap, found on Keel's PATH (bwrap mode).
    bwrap: PathBuf,
    /// `unshare` (found on Keel's PATH) and its arguments before the interpreter, in
    /// rlimits mode.
    unshare: Vec<OsString>,
    python: Python,
}

impl Sandbox {
    /// What is not isolated, for the log and the answer (empty with bwrap).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.network_isolated {
            w.push(
                "network not isolated (`unshare --net` does not work here): the program can open connections"
                    .into(),
            );
        }
        if !self.processes_contained {
            w.push("a process the program starts in a new session may outlive the call".into());
        }
        if !self.own_proc {
            w.push("the program sees the host's processes (and their command lines) in /proc".into());
        }
        match (self.filesystem_isolated, self.drop_to) {
            (true, _) => {}
            (false, Some(_)) => w.push(
                "filesystem not isolated (no bwrap): the program, as nobody, can read world-readable files \
                 and write world-writable directories such as /tmp"
                    .into(),
            ),
            (false, None) => {
                w.push("filesystem not isolated (no bwrap): the program runs as Keel's user and can read and write that user's files".into());
            }
        }
        w
    }

    /// One line on what the sandbox contains, for `keel config check` and the log.
    pub fn describe(&self) -> String {
        let mut what = vec!["cpu/memory/process/file limits"];
        if self.filesystem_isolated {
            what.push("sees only /usr, the interpreter and its scratch directory");
        }
        if self.network_isolated {
            what.push("no network");
        }
        if self.processes_contained {
            what.push(if self.own_proc { "own pid namespace and /proc" } else { "own pid namespace" });
        }
        if self.drop_to.is_some() {
            what.push("runs as nobody");
        }
        format!("{} ({})", self.isolation.as_str(), what.join(", "))
    }

    /// The program, arguments, environment and working directory of one run in
    /// `scratch`, with the launcher's `limits`.
    pub(crate) fn command(
        &self,
        scratch: &Path,
        limits: &Limits,
        lang: Option<&str>,
    ) -> (OsString, Vec<OsString>, Vec<(String, String)>, PathBuf) {
        let cfg = json!({
            "memory_bytes": limits.memory_mb << 20,
            "cpu_seconds": limits.cpu_seconds,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_mb << 20,
            "max_open_files": super::MAX_OPEN_FILES,
            "max_result_bytes": super::MAX_RESULT,
            "drop_to": self.drop_to,
            // unshare's pid namespace: the launcher leaves Keel's session (and its
            // terminal); unshare, root, still kills it through the parent-death signal.
            "new_session": self.isolation == Isolation::Rlimits && !self.unshare.is_empty(),
            "cwd": match self.isolation {
                Isolation::Bwrap => INSIDE.to_owned(),
                Isolation::Rlimits => scratch.display().to_string(),
            },
        })
        .to_string();
        let bin = self.python.exe.parent().map(|p| format!("{}:", p.display())).unwrap_or_default();
        let path = format!("{bin}/usr/local/bin:/usr/bin:/bin");
        let launcher =
            [self.python.exe.clone().into_os_string(), "-I".into(), "-c".into(), LAUNCHER.into(), cfg.into()];
        match self.isolation {
            Isolation::Bwrap => {
                let mut a: Vec<OsString> = Vec::new();
                let mut arg = |s: &str| a.push(s.into());
                for ns in [
                    "--unshare-ipc",
                    "--unshare-pid",
                    "--unshare-net",
                    "--unshare-uts",
                    "--unshare-cgroup-try",
                ] {
                    arg(ns);
                }
                if self.drop_to.is_some() {
                    // Root: no user namespace (its root would still be the host's uid 0);
                    // the launcher needs exactly these two to become nobody.
                    for s in ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] {
                        arg(s);
                    }
                } else {
                    for s in ["--unshare-user", "--cap-drop", "ALL"] {
                        arg(s);
                    }
                }
                // `--as-pid-1`: the launcher is the namespace's init, so when it exits the
                // kernel kills everything left in it before bwrap sees the exit — a
                // process the program left behind is dead when the call returns (with
                // bwrap's reaper, bwrap would answer first and the reaper linger).
                // No `--new-session`: the launcher stays in Keel's process group, the
                // one a kill reaches (bwrap's monitor has no right to signal `nobody`,
                // so a parent-death signal would never come); the terminal attack a new
                // session prevents needs a tty, and this /dev has none.
                for s in ["--as-pid-1", "--die-with-parent", "--ro-bind", "/usr", "/usr"] {
                    arg(s);
                }
                for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
                    match std::fs::read_link(top) {
                        Ok(target) => {
                            a.push("--symlink".into());
                            a.push(target.into_os_string());
                            a.push(top.into());
                        }
                        Err(_) if Path::new(top).is_dir() => {
                            a.extend(["--ro-bind".into(), top.into(), top.into()]);
                        }
                        Err(_) => {}
                    }
                }
                for etc in [
                    "/etc/ld.so.cache",
                    "/etc/ld.so.conf",
                    "/etc/ld.so.conf.d",
                    "/etc/localtime",
                    "/etc/alternatives",
                ] {
                    a.extend(["--ro-bind-try".into(), etc.into(), etc.into()]);
                }
                let mut made: Vec<PathBuf> = Vec::new();
                for root in &self.python.roots {
                    // Directories above the prefix are made world-readable inside: bwrap
                    // would copy /root's 0700, and nobody could not reach the library.
                    let mut above: Vec<&Path> =
                        root.ancestors().skip(1).filter(|p| p.parent().is_some()).collect();
                    above.reverse();
                    for dir in above {
                        if !made.iter().any(|m| m == dir) {
                            made.push(dir.to_owned());
                            a.extend(["--perms".into(), "0755".into(), "--dir".into(), dir.into()]);
                        }
                    }
                    a.extend(["--ro-bind".into(), root.into(), root.into()]);
                }
                a.extend(["--proc".into(), "/proc".into(), "--tmpfs".into(), "/dev".into()]);
                for dev in ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"] {
                    a.extend(["--dev-bind".into(), dev.into(), dev.into()]);
                }
                a.extend([
                    "--symlink".into(),
                    "/proc/self/fd".into(),
                    "/dev/fd".into(),
                    "--tmpfs".into(),
                    "/tmp".into(),
                ]);
                a.extend(["--bind".into(), scratch.into(), INSIDE.into(), "--chdir".into(), "/".into()]);
                a.extend(["--clearenv".into(), "--setenv".into(), "PATH".into(), path.into()]);
                a.extend([
                    "--setenv".into(),
                    "HOME".into(),
                    INSIDE.into(),
                    "--setenv".into(),
                    "TMPDIR".into(),
                    "/tmp".into(),
                ]);
                if let Some(lang) = lang {
                    a.extend(["--setenv".into(), "LANG".into(), lang.into()]);
                }
                a.push("--".into());
                a.extend(launcher);
                (self.bwrap.clone().into_os_string(), a, Vec::new(), PathBuf::from("/"))
            }
            Isolation::Rlimits => {
                let dir = scratch.display().to_string();
                let mut env = vec![
                    ("PATH".to_owned(), path),
                    ("HOME".to_owned(), dir.clone()),
                    ("TMPDIR".to_owned(), dir),
                ];
                if let Some(lang) = lang {
                    env.push(("LANG".to_owned(), lang.to_owned()));
                }
                let (program, mut args): (OsString, Vec<OsString>) = match self.unshare.split_first() {
                    Some((u, rest)) => (u.clone(), rest.to_vec()),
                    None => (launcher[0].clone(), Vec::new()),
                };
                let skip = usize::from(self.unshare.is_empty());
                args.extend(launcher.into_iter().skip(skip));
                (program, args, env, PathBuf::from("/"))
            }
        }
    }

    /// A fresh scratch directory the program (perhaps as nobody) can write.
    pub(crate) fn scratch(&self) -> std::io::Result<Scratch> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let s = Scratch::create_as("keel-code-", &SWEPT)?;
        if let Some(uid) = self.drop_to {
            std::os::unix::fs::chown(s.path(), Some(uid), Some(uid))?;
        }
        Ok(s)
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is its euid).
pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `python` found in `path` (a name) or as given (a path).
fn which(python: &str, path: Option<&str>) -> Option<PathBuf> {
    if python.contains('/') {
        return Some(PathBuf::from(python));
    }
    std::env::split_paths(path.unwrap_or("/usr/bin:/bin"))
        .map(|d| d.join(python))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// Runs `cmd` to its end with `input` on stdin, within `bound` (then killed).
fn run_bounded(mut cmd: Command, input: &[u8], bound: Duration) -> Result<(bool, String, String), String> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    // A probe at config load, not a call: a bounded poll keeps it free of a runtime
    // (and of the system clock: the bound is counted in steps).
    let step = Duration::from_millis(5);
    let mut left = bound.as_millis() / step.as_millis();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if left > 0 => {
                left -= 1;
                std::thread::sleep(step);
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {}s", bound.as_secs()));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().chars().take(600).collect::<String>();
    Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
}

/// Asks the interpreter where it lives.
fn python_info(python: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Python, String> {
    let path = env("PATH");
    let found = which(python, path.as_deref()).ok_or_else(|| format!("`{python}` is not on PATH"))?;
    let mut cmd = Command::new(&found);
    cmd.args([
        "-I",
        "-c",
        "import sys, json; print(json.dumps([sys.executable, sys.prefix, sys.base_prefix]))",
    ]);
    // Keel's own PATH and HOME, for this question only: a pyenv shim needs them.
    cmd.env_clear().current_dir("/");
    for var in ["PATH", "HOME"] {
        if let Some(v) = env(var) {
            cmd.env(var, v);
        }
    }
    let (ok, out, err) = run_bounded(cmd, b"", Duration::from_secs(20))?;
    let parsed: Option<(String, String, String)> = ok.then(|| serde_json::from_str(&out).ok()).flatten();
    let Some((exe, prefix, base)) = parsed else {
        return Err(format!("`{}` does not answer as a Python 3 interpreter: {err}", found.display()));
    };
    let exe = std::fs::canonicalize(&exe).map_err(|e| format!("`{exe}`: {e}"))?;
    let mut roots: Vec<PathBuf> = Vec::new();
    for dir in [Some(prefix), Some(base), exe.parent().map(|p| p.display().to_string())].into_iter().flatten()
    {
        let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| PathBuf::from(&dir));
        let covered = dir.starts_with("/usr") || roots.iter().any(|r| dir.starts_with(r));
        if !covered && dir.parent().is_some() {
            roots.retain(|r| !r.starts_with(&dir));
            roots.push(dir);
        }
    }
    Ok(Python { exe, roots })
}

/// Runs the probe program in `sandbox`: `Ok` when it ran and answered.
fn probe(sandbox: &Sandbox, lang: Option<&str>) -> Result<(), String> {
    let scratch = sandbox.scratch().map_err(|e| format!("cannot make a scratch directory: {e}"))?;
    let limits = Limits::probe();
    let (program, args, env, cwd) = sandbox.command(scratch.path(), &limits, lang);
    let mut cmd = Command::new(&program);
    cmd.args(&args).env_clear().envs(env).current_dir(cwd);
    let input = json!({"program": "import decimal, subprocess\nresult = 1", "input": null}).to_string();
    let (_, out, err) = run_bounded(cmd, input.as_bytes(), Duration::from_secs(20))?;
    match serde_json::from_str::<Value>(&out) {
        Ok(v) if v["ok"] == true && v["result"] == 1 => Ok(()),
        Ok(v) => Err(format!(
            "{}: {}",
            v["error"]["type"].as_str().unwrap_or("error"),
            v["error"]["message"].as_str().unwrap_or("")
        )),
        Err(_) => Err(if err.is_empty() { "no answer".to_owned() } else { err }),
    }
}

type Cache = Mutex<HashMap<(String, IsolationRequest, Option<String>), Result<Arc<Sandbox>, String>>>;

/// The sandbox for `python` with the `wanted` isolation on this machine.
///
/// # Errors
/// Why no sandbox can run (the interpreter is missing, bwrap was asked for and does
/// not work, Keel is root and the interpreter cannot run as nobody): the config is
/// refused rather than run a program less isolated than asked.
pub(crate) fn resolve(
    python: &str,
    wanted: IsolationRequest,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<Sandbox>, String> {
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let key = (python.to_owned(), wanted, env("PATH"));
    if let Some(found) = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
        return found.clone();
    }
    let found = find(python, wanted, env).map(Arc::new);
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, found.clone());
    found
}

fn find(
    python: &str,
    wanted: IsolationRequest,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Sandbox, String> {
    let python = python_info(python, env)?;
    let root = is_root();
    let lang = env("LANG");
    let drop_to = root.then_some(NOBODY);
    let path = env("PATH");
    let bwrap_exe = which("bwrap", path.as_deref());
    let bwrap = Sandbox {
        isolation: Isolation::Bwrap,
        network_isolated: true,
        processes_contained: true,
        filesystem_isolated: true,
        own_proc: true,
        drop_to,
        bwrap: bwrap_exe.clone().unwrap_or_default(),
        unshare: Vec::new(),
        python: python.clone(),
    };
    let bwrap_problem = match (wanted, &bwrap_exe) {
        (IsolationRequest::Rlimits, _) => None,
        (IsolationRequest::Auto | IsolationRequest::Bwrap, None) => {
            Some("`bwrap` is not on PATH (Debian's package `bubblewrap`)".to_owned())
        }
        (IsolationRequest::Auto | IsolationRequest::Bwrap, Some(_)) => match probe(&bwrap, lang.as_deref()) {
            Ok(()) => return Ok(bwrap),
            Err(e) => Some(e),
        },
    };
    if let (IsolationRequest::Bwrap, Some(problem)) = (wanted, &bwrap_problem) {
        return Err(format!("bwrap (bubblewrap) cannot run a program here: {problem}"));
    }
    let user: &[&str] = if root { &[] } else { &["--user", "--map-root-user"] };
    let mut contained = Sandbox {
        isolation: Isolation::Rlimits,
        network_isolated: true,
        processes_contained: true,
        filesystem_isolated: false,
        own_proc: true,
        drop_to,
        bwrap: PathBuf::new(),
        unshare: Vec::new(),
        python: python.clone(),
    };
    if let Some(unshare) = which("unshare", path.as_deref()) {
        // With a /proc of its own when it can (the program then cannot read the host's
        // processes' command lines), else the host's.
        for own_proc in [true, false] {
            let proc: &[&str] = if own_proc { &["--mount-proc"] } else { &[] };
            let flags = [user, &["--net", "--pid", "--fork", "--kill-child"], proc, &["--"]].concat();
            contained.own_proc = own_proc;
            contained.unshare = std::iter::once(unshare.clone().into_os_string())
                .chain(flags.iter().map(OsString::from))
                .collect();
            if probe(&contained, lang.as_deref()).is_ok() {
                return Ok(contained);
            }
        }
    }
    let bare = Sandbox {
        network_isolated: false,
        processes_contained: false,
        own_proc: false,
        unshare: Vec::new(),
        ..contained
    };
    match probe(&bare, lang.as_deref()) {
        Ok(()) => Ok(bare),
        Err(e) if root => Err(format!(
            "`{}` cannot run as nobody (uid {NOBODY}), as a code tool must when Keel is root{}: {e}; \
             install bubblewrap or set `python` to an interpreter every user can read (e.g. /usr/bin/python3)",
            python.exe.display(),
            bwrap_problem.map(|p| format!(" without bwrap ({p})")).unwrap_or_default(),
        )),
        Err(e) => Err(format!("`{}` cannot run the launcher: {e}", python.exe.display())),
    }
}
