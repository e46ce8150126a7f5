//! A stdio MCP server: a program in its own process group, newline-delimited
//! JSON-RPC on its stdin and stdout, its stderr kept (the last lines) to say why it
//! died. Dropping the connection kills the whole group.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_core::{ErrorClass, Failure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Notify, oneshot};

use super::{MAX_MESSAGE, RpcError, Timeouts};

/// How a stdio server is started.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Its working directory.
    pub cwd: std::path::PathBuf,
    /// Its whole environment.
    pub env: BTreeMap<String, String>,
}

/// A request waiting for its answer.
struct Waiting {
    answer: oneshot::Sender<Value>,
    progress: Arc<Notify>,
}

type Pending = Arc<Mutex<HashMap<u64, Waiting>>>;

/// The most of stderr kept, to say why a server died.
const STDERR_KEPT: usize = 600;

/// One running server.
pub(crate) struct Conn {
    name: String,
    stdin: Arc<tokio::sync::Mutex<ChildStdin>>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    stderr: Arc<Mutex<String>>,
    pgid: Option<Pid>,
    /// Held so that dropping the connection kills the program.
    _child: Child,
    /// Whether the server speaks the stateless revision.
    pub(crate) modern: AtomicBool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The program and whatever it started.
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Removes a request's entry however its wait ends (answered, timed out, dropped).
struct Forget<'a>(&'a Pending, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.0.lock() {
            p.remove(&self.1);
        }
    }
}

impl Conn {
    /// Starts the program.
    pub(crate) fn spawn(name: &str, spec: &Spec) -> Result<Conn, Failure> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(Failure::new(
                ErrorClass::InvalidRequest,
                format!("MCP server `{name}` has no command"),
            ));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            Failure::new(
                ErrorClass::ServerError,
                format!("cannot start MCP server `{name}` ({program}): {e}"),
            )
        })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(Failure::new(ErrorClass::ServerError, format!("MCP server `{name}` has no pipes")));
        };
        let stdin = Arc::new(tokio::sync::Mutex::new(stdin));
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let kept = Arc::new(Mutex::new(String::new()));
        tokio::spawn(read_stderr(stderr, kept.clone()));
        tokio::spawn(read_messages(name.to_owned(), stdout, stdin.clone(), pending.clone(), alive.clone()));
        Ok(Conn {
            name: name.to_owned(),
            stdin,
            pending,
            alive,
            stderr: kept,
            pgid,
            _child: child,
            modern: AtomicBool::new(false),
        })
    }

    /// Whether the program still answers (its stdout is open).
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Why it died, from the last of its stderr.
    pub(crate) fn exit_reason(&self) -> String {
        let tail = self.stderr.lock().map(|s| s.trim().to_owned()).unwrap_or_default();
        let last = tail.lines().last().unwrap_or("").trim();
        if last.is_empty() { "it exited".to_owned() } else { format!("it exited: {last}") }
    }

    fn gone(&self) -> Failure {
        Failure::new(
            ErrorClass::Network,
            format!("MCP server `{}` is gone ({})", self.name, self.exit_reason()),
        )
    }

    async fn send(&self, message: &Value) -> Result<(), Failure> {
        let mut line = serde_json::to_vec(message).unwrap_or_default();
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        let written = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        if written.await.is_err() {
            self.alive.store(false, Ordering::Release);
            return Err(self.gone());
        }
        Ok(())
    }

    /// Sends a notification (no answer); a broken pipe shows on the next request.
    pub(crate) async fn notify(&self, method: &str, params: Value) {
        let _ = self.send(&json!({ "jsonrpc": "2.0", "method": method, "params": params })).await;
    }

    /// One request; its progress notifications keep it alive.
    pub(crate) async fn request(
        &self,
        id: u64,
        method: &str,
        params: Value,
        t: Timeouts,
    ) -> Result<Value, RpcError> {
        if !self.alive() {
            return Err(RpcError::Transport(self.gone()));
        }
        let (tx, mut rx) = oneshot::channel();
        let progress = Arc::new(Notify::new());
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, Waiting { answer: tx, progress: progress.clone() });
        }
        let _forget = Forget(&self.pending, id);
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await
            .map_err(RpcError::Transport)?;
        let answer = match super::wait(&mut rx, &progress, t).await {
            Some(Ok(answer)) => answer,
            Some(Err(_)) => return Err(RpcError::Transport(self.gone())),
            None => {
                self.notify(
                    "notifications/cancelled",
                    json!({ "requestId": id, "reason": "Keel's request timeout ran out" }),
                )
                .await;
                return Err(RpcError::Transport(super::timed_out(&self.name, method, t)));
            }
        };
        super::answer_of(answer)
    }
}

/// Keeps the last [`STDERR_KEPT`] bytes of stderr (and logs each line at debug).
async fn read_stderr(stderr: impl AsyncRead + Unpin, kept: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(target: "keel::mcp", "{}", line.chars().take(1000).collect::<String>());
        if let Ok(mut k) = kept.lock() {
            k.push_str(&line);
            k.push('\n');
            if k.len() > STDERR_KEPT {
                let cut = k.len() - STDERR_KEPT;
                let cut = (cut..k.len()).find(|i| k.is_char_boundary(*i)).unwrap_or(k.len());
                k.drain(..cut);
            }
        }
    }
}

/// Reads messages until stdout closes: answers go to their waiting request,
/// progress wakes it, the server's own requests get an answer. A line larger than
/// [`MAX_MESSAGE`] ends the connection.
async fn read_messages(
    name: String,
    stdout: impl AsyncRead + Unpin,
    stdin: Arc<tokio::sync::Mutex<ChildStdin>>,
    pending: Pending,
    alive: Arc<AtomicBool>,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_MESSAGE).unwrap_or(u64::MAX) + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) if line.len() > MAX_MESSAGE => {
                tracing::warn!(target: "keel::mcp", server = %name, "a message over {MAX_MESSAGE} bytes: the connection is closed");
                break;
            }
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
            if !line.iter().all(u8::is_ascii_whitespace) {
                tracing::debug!(target: "keel::mcp", server = %name, "a line that is not JSON-RPC was skipped");
            }
            continue;
        };
        if let Some(reply) = super::dispatch(&msg, &pending_answer(&pending), &pending_progress(&pending)) {
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let mut w = stdin.lock().await;
            let _ = w.write_all(&out).await;
            let _ = w.flush().await;
        }
    }
    alive.store(false, Ordering::Release);
    // Every waiting request learns the server is gone (its sender is dropped).
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

fn pending_answer(pending: &Pending) -> impl Fn(u64, Value) + '_ {
    move |id, msg| {
        let waiting = pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(w) = waiting {
            let _ = w.answer.send(msg);
        }
    }
}

fn pending_progress(pending: &Pending) -> impl Fn(u64) + '_ {
    move |id| {
        if let Some(n) = pending.lock().ok().and_then(|p| p.get(&id).map(|w| w.progress.clone())) {
            n.notify_one();
        }
    }
}
