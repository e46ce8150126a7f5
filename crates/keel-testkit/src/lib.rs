//! keel-testkit: dev-only helpers for Keel's tests — a real, throwaway PostgreSQL
//! server and a fresh database per test.
//!
//! [`postgres_database`] returns the URL of an empty database of its own. The server
//! is `KEEL_TEST_POSTGRES_URL` when that is set; otherwise one is started for the test
//! process from Debian's binaries (`/usr/lib/postgresql/*/bin`): `initdb` into a temp
//! directory (as the `postgres` user when running as root, since `initdb` refuses
//! root), listening on a free loopback port, and stopped — its directory removed — when
//! the test process ends, however it ends. Without binaries the call panics with how
//! to get them: a Postgres test never skips silently.

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use sqlx::Connection as _;

#[cfg(feature = "model")]
pub mod model;
mod proxy;
pub use proxy::{Proxy, target_of};

#[cfg(feature = "tls")]
pub mod tls;

/// The environment variable naming an existing server to test against.
pub const POSTGRES_URL_ENV: &str = "KEEL_TEST_POSTGRES_URL";

const INSTALL_HINT: &str = "install postgresql (apt-get install postgresql) or set KEEL_TEST_POSTGRES_URL";

/// A PostgreSQL server the tests may create databases on.
#[derive(Debug)]
pub struct PostgresServer {
    /// The URL of the server's `postgres` database, with credentials.
    pub admin_url: String,
    /// Held open for the life of the process: its end tells the supervisor to stop
    /// the server (the OS closes it when the process exits, even on SIGKILL).
    _lifeline: Option<Mutex<ChildStdin>>,
}

/// The process-wide server: `KEEL_TEST_POSTGRES_URL`, or one started on first use.
///
/// # Panics
///
/// When no server is configured and none can be started, with the reason.
pub fn postgres_server() -> &'static PostgresServer {
    static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| match std::env::var(POSTGRES_URL_ENV) {
        Ok(url) if !url.is_empty() => Ok(PostgresServer { admin_url: url, _lifeline: None }),
        _ => start_postgres_server(false),
    });
    match server {
        Ok(s) => s,
        Err(e) => panic!("cannot start a PostgreSQL server for the tests: {e}"),
    }
}

/// Creates an empty database for one test and returns its URL.
///
/// # Panics
///
/// As [`postgres_server`], or when the database cannot be created.
pub async fn postgres_database() -> String {
    create_database(postgres_server()).await
}

/// Creates an empty database on `server` and returns its URL.
///
/// # Panics
///
/// When the database cannot be created.
pub async fn create_database(server: &PostgresServer) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "keel_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        fastrand_suffix()
    );
    let mut conn = sqlx::PgConnection::connect(&server.admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", server.admin_url));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let _ = conn.close().await;
    with_database(&server.admin_url, &name)
}

fn fastrand_suffix() -> u32 {
    // Distinct across processes that share an external server and reuse pids.
    let t = std::time::SystemTime::UNIX_EPOCH.elapsed().map(|d| d.subsec_nanos()).unwrap_or(0);
    t % 1_000_000
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// The directory of the newest installed PostgreSQL's binaries.
pub fn find_postgres_bin() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

/// `program` from `bin`, run as the `postgres` user when we are root.
fn pg_command(bin: &Path, program: &str, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Starts a new throwaway server, stopped when this process ends. `fsync` off is
/// for tests (a killed *client* loses nothing either way); benchmarks want it on.
///
/// # Errors
///
/// Why no server could be started (no binaries: how to install them).
pub fn start_postgres_server(fsync: bool) -> Result<PostgresServer, String> {
    let bin =
        find_postgres_bin().ok_or_else(|| format!("no /usr/lib/postgresql/*/bin/initdb: {INSTALL_HINT}"))?;
    let root = is_root();
    let dir =
        tempfile::Builder::new().prefix("keel-pg-").tempdir().map_err(|e| format!("temp dir: {e}"))?.keep();
    let data = dir.join("data");
    if root {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
        if !matches!(status, Ok(s) if s.success()) {
            return Err(format!("chown postgres {}: {status:?}", dir.display()));
        }
    }
    let out = pg_command(&bin, "initdb", root)
        .arg("-D")
        .arg(&data)
        .args(["-U", "keel", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("initdb: {e}: {INSTALL_HINT}"))?;
    if !out.status.success() {
        return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        match supervise(&bin, &dir, port, root, fsync) {
            Ok(lifeline) => {
                return Ok(PostgresServer {
                    admin_url: format!("postgres://keel@127.0.0.1:{port}/postgres"),
                    _lifeline: Some(Mutex::new(lifeline)),
                });
            }
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// Starts a shell that starts the server, waits for its stdin to close (this process
/// ending), then stops the server and removes `dir`.
fn supervise(bin: &Path, dir: &Path, port: u16, root: bool, fsync: bool) -> Result<ChildStdin, String> {
    let fsync = if fsync { "on" } else { "off" };
    let runas = if root { "runuser -u postgres -- " } else { "" };
    let script = format!(
        r#"set -u
D="$1"; B="$2"
if ! {runas}"$B/pg_ctl" -D "$D/data" -l "$D/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p {port} -k $D -c fsync={fsync} -c max_connections=300 -c shared_buffers=32MB" start >"$D/pg_ctl.log" 2>&1; then
  echo "failed"; cat "$D/server.log" "$D/pg_ctl.log"; exit 1
fi
echo ready
exec >/dev/null 2>&1
cat >/dev/null
{runas}"$B/pg_ctl" -D "$D/data" -m immediate stop
rm -rf "$D"
"#
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("keel-pg-supervisor")
        .arg(dir)
        .arg(bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line == "ready" => {}
        other => {
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            let _ = child.wait();
            return Err(format!("postgres did not start on port {port}: {other:?}\n{}", rest.join("\n")));
        }
    }
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let _ = stdin.flush();
    // The supervisor lives until our stdin pipe closes; nobody waits for it.
    std::mem::forget(child);
    Ok(stdin)
}

/// The Python interpreter with the official `mcp` package: `KEEL_TEST_PYTHON`, which
/// the README's test command (`scripts/test`, through `.ci/python.sh`) sets.
///
/// # Panics
/// When it is not set: run the tests through `scripts/test`.
pub fn python_with_mcp() -> PathBuf {
    match std::env::var_os("KEEL_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!("KEEL_TEST_PYTHON is not set: run the tests with scripts/test (it makes the venv)"),
    }
}

/// A hand-written stdio MCP server that misbehaves (`python/mcp_hostile.py`): noise
/// on stdout, requests to the client, an oversized line, a call never answered.
pub fn mcp_hostile_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_hostile.py")
}

/// An upstream MCP server written with the official `mcp` package
/// (`python/mcp_upstream.py`): stdio by default, `--http PORT` for streamable HTTP.
pub fn mcp_upstream_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_upstream.py")
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_replace_the_path() {
        assert_eq!(with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
