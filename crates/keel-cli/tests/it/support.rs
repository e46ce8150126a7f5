//! The test bench: a temp dir with keel.toml, a payments service, and `keel` itself.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_examples::payments::{Faults, Handle, spawn};

/// One test's world.
pub(crate) struct Bench {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) payments: Handle,
}

impl Bench {
    /// Starts a payments service with `faults`; writes keel.toml from `config` and the
    /// payments tools, where `{base}` is the service's URL.
    pub(crate) fn new(faults: Faults, config: &str) -> Bench {
        let (base, payments) = spawn(faults);
        let dir = tempfile::tempdir().unwrap();
        let config = format!("{config}\n{}", keel_examples::payments::TOOLS_TOML);
        std::fs::write(dir.path().join("keel.toml"), config.replace("{base}", &base)).unwrap();
        Bench { dir, payments }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
        c.current_dir(self.dir.path())
            .env("KEEL_CONFIG", self.path("keel.toml"))
            .env("USER", "tester")
            .args(args);
        c
    }

    /// Runs `keel args` to its end.
    pub(crate) fn keel(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().unwrap();
        Run::from(out)
    }

    /// Starts `keel args` with stdout piped; returns the child and its run id (read
    /// from the first line).
    pub(crate) fn spawn(&self, args: &[&str]) -> (Child, String, std::sync::mpsc::Receiver<String>) {
        let mut child = self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let run_id = loop {
            let line = rx.recv_timeout(Duration::from_secs(30)).expect("keel printed its run id");
            if let Some(id) = run_id_of(&line) {
                break id;
            }
        };
        (child, run_id, rx)
    }
}

impl Bench {
    /// Starts `keel runs resume RUN` in the background (to be killed).
    pub(crate) fn spawn_resume(&self, run_id: &str) -> Child {
        self.command(&["runs", "resume", run_id]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }
}

/// A finished `keel` process.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    pub(crate) fn run_id(&self) -> String {
        self.stdout.lines().find_map(run_id_of).unwrap_or_else(|| panic!("no run id in {}", self.stdout))
    }

    /// The first token after `prefix` on any line.
    pub(crate) fn after(&self, prefix: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| {
                l.split(prefix)
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap_or("").trim_end_matches(':').to_owned())
            })
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn run_id_of(line: &str) -> Option<String> {
    line.strip_prefix("run ")
        .and_then(|r| r.split(':').next())
        .filter(|r| r.starts_with("run-"))
        .map(str::to_owned)
}

/// Waits, with a bound, until `check` holds.
pub(crate) fn eventually(what: &str, bound: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < bound, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `cmd` (a `keel serve` with piped stdout) and waits, with a bound, for the
/// line where it says it listens; the child and its URL.
pub(crate) fn spawn_listening(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("keel serve said where it listens");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    (child, url)
}

/// Sends SIGTERM and waits, with a bound, for the child to exit (its exit is the event).
pub(crate) fn stop_gracefully(mut child: Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(Duration::from_secs(30)).expect("keel serve did not stop within 30 s");
    status.unwrap();
}

/// Whether a process is alive (not a zombie).
pub(crate) fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// The charges' orders, in order.
pub(crate) fn orders(h: &Handle) -> Vec<i64> {
    h.charges().iter().map(|c| c["order"].as_i64().unwrap_or(-1)).collect()
}

pub(crate) fn exists(p: &Path) -> bool {
    p.exists()
}

/// The usual run limits; `Bench::new` adds the payments tools, `charge` (approval
/// above 100) and `notify` (`keel_examples::payments::TOOLS_TOML`).
pub(crate) const TOOLS: &str = r#"
[run]
lease = "1s"
escalate_after = 3

[defaults]
retry = { max_attempts = 3, base_delay = "10ms", max_delay = "50ms" }
breaker = { enabled = false }
"#;
