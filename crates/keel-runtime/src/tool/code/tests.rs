//! The code tool against real python3 and real processes, in each isolation mode this
//! machine can run: broken programs are classified for a model to repair, and
//! programs that try to escape are contained, classified, and leave the host as it was.

use std::path::Path;
use std::sync::Arc;

use keel_core::{ErrorClass, Failure, TokioClock};
use serde_json::{Value, json};

use super::{Isolation, code_error_kind};
use crate::config::Config;
use crate::tool::{Tool, ToolKind};

/// The secret a host process holds in its environment (and Keel's, as the config sees it).
const SECRET: &str = "keel-test-secret-5f1d9c";

fn env(name: &str) -> Option<String> {
    match name {
        "KEEL_TEST_SECRET" => Some(SECRET.to_owned()),
        other => std::env::var(other).ok(),
    }
}

fn parse(extra: &str) -> Result<Config, String> {
    let text = format!("[tools.py]\nkind = \"code\"\n{extra}");
    Config::parse(&text, Path::new("keel.toml"), &env).map_err(|e| e.to_string())
}

/// The code tool in `mode` with `extra` keys, or why this machine cannot run the mode.
/// rlimits as root runs as nobody, who cannot read an interpreter under /root (pyenv):
/// then the system's /usr/bin/python3 is tried.
fn tool_in(mode: Isolation, extra: &str) -> Result<Arc<Tool>, String> {
    let iso = format!("isolation = \"{}\"\n{extra}", mode.as_str());
    let config = parse(&iso).or_else(|first| match mode {
        Isolation::Bwrap => Err(first),
        Isolation::Rlimits => {
            parse(&format!("{iso}\npython = \"/usr/bin/python3\"")).map_err(|e| format!("{first}; {e}"))
        }
    })?;
    let tool = config.tools.get("py").cloned().ok_or("no tool")?;
    match &tool.kind {
        ToolKind::Code(c) => assert_eq!(c.isolation(), mode),
        other => panic!("not a code tool: {other:?}"),
    }
    Ok(tool)
}

/// Every mode this machine runs, each with its tool; a mode it cannot run is skipped
/// with the reason printed.
fn tools(extra: &str) -> Vec<(Isolation, Arc<Tool>)> {
    let mut found = Vec::new();
    for mode in [Isolation::Bwrap, Isolation::Rlimits] {
        match tool_in(mode, extra) {
            Ok(t) => found.push((mode, t)),
            // Printed where `cargo test` shows it, with the test's name.
            #[allow(clippy::print_stderr)]
            Err(why) => eprintln!("SKIPPED the {} mode: it cannot run here: {why}", mode.as_str()),
        }
    }
    assert!(!found.is_empty(), "no isolation mode runs here");
    found
}

async fn run(tool: &Tool, program: &str, input: Value) -> Result<Value, Failure> {
    let params = json!({"program": program, "input": input});
    tool.check_params(&params).expect("valid parameters");
    tool.invoke(&params, &TokioClock::new()).await
}

fn code_error(mode: Isolation, r: Result<Value, Failure>) -> Failure {
    let e = r.expect_err(&format!("{}: the program must fail", mode.as_str()));
    assert_eq!(e.class, ErrorClass::CodeError, "{}: {}", mode.as_str(), e.message);
    e
}

#[tokio::test]
async fn a_result_comes_back_with_the_programs_output_and_the_isolation() {
    for (mode, t) in tools("") {
        let program = "import json\nprint('adding', len(input))\nresult = {'total': sum(input)}\n";
        let out = run(&t, program, json!([1, 2, 3])).await.unwrap();
        assert_eq!(out["result"], json!({"total": 6}));
        assert_eq!(out["stdout"], "adding 3\n");
        assert_eq!(out["isolation"], mode.as_str());
        // What a mode does not isolate is said in the answer; bwrap leaves nothing out.
        match mode {
            Isolation::Bwrap => assert!(out.get("warnings").is_none(), "{out}"),
            Isolation::Rlimits => {
                assert!(out["warnings"].to_string().contains("filesystem not isolated"), "{out}");
            }
        }
    }
}

#[tokio::test]
async fn a_key_error_names_its_type_first_and_the_programs_own_lines() {
    for (mode, t) in tools("") {
        let program = "data = {'sum': 3}\n\ndef total(d):\n    return d['total']\n\nresult = total(data)\n";
        let e = code_error(mode, run(&t, program, Value::Null).await);
        assert!(e.message.starts_with("KeyError: 'total'\n"), "{}", e.message);
        assert_eq!(code_error_kind(&e).as_deref(), Some("KeyError"));
        assert!(e.message.contains("line 4, in total: return d['total']"), "{}", e.message);
        assert!(e.message.contains("line 6, in <module>"), "{}", e.message);
        // The launcher's frames are not the program's business.
        assert!(!e.message.contains("<string>") && !e.message.contains("launcher"), "{}", e.message);
    }
}

#[tokio::test]
async fn a_syntax_error_a_missing_result_and_an_unserialisable_result_are_code_errors() {
    for (mode, t) in tools("") {
        let e = code_error(mode, run(&t, "x = 1\nresult = (x,\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("SyntaxError"), "{}", e.message);
        assert!(e.message.contains("line 2"), "{}", e.message);

        let e = code_error(mode, run(&t, "total = 3\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("NameError"), "{}", e.message);
        assert!(e.message.contains("`result`"), "{}", e.message);

        let e = code_error(mode, run(&t, "result = {1, 2}\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("TypeError"), "{}", e.message);
        assert!(e.message.contains("JSON-serialisable") && e.message.contains("set"), "{}", e.message);

        let e = code_error(mode, run(&t, "result = float('nan')\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("TypeError"), "{}", e.message);
    }
}

#[tokio::test]
async fn a_result_not_matching_the_result_schema_is_a_code_error() {
    let schema = "result_schema = { type = \"object\", required = [\"total\"], properties = { total = { type = \"number\" } } }";
    for (mode, t) in tools(schema) {
        let e = code_error(mode, run(&t, "result = {'total': 'three'}\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("ResultSchemaError"), "{}", e.message);
        assert!(e.message.contains("/total"), "{}", e.message);
        let out = run(&t, "result = {'total': 3}\n", Value::Null).await.unwrap();
        assert_eq!(out["result"]["total"], 3);
    }
}

#[tokio::test]
async fn a_socket_to_a_loopback_listener_does_not_connect() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    for (mode, t) in tools("") {
        let program = format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nresult = 'connected'\n"
        );
        let e = code_error(mode, run(&t, &program, Value::Null).await);
        assert!(e.message.contains("Error"), "{}", e.message);
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{}: the listener was reached: {accepted:?}",
            mode.as_str()
        );
    }
}

#[tokio::test]
async fn a_write_outside_the_scratch_directory_does_not_happen() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("escaped.txt");
    for (mode, t) in tools("") {
        let program = format!(
            "import os\nopen({:?}, 'w').write('pwned')\nresult = os.getcwd()\n",
            target.to_str().unwrap()
        );
        let e = code_error(mode, run(&t, &program, Value::Null).await);
        assert!(
            matches!(code_error_kind(&e).as_deref(), Some("FileNotFoundError" | "PermissionError")),
            "{}",
            e.message
        );
        assert!(!target.exists(), "{}: the program wrote {}", mode.as_str(), target.display());
        // Its own directory it may write, and it is gone after.
        let out =
            run(&t, "import os\nopen('mine.txt', 'w').write('ok')\nresult = os.getcwd()\n", Value::Null)
                .await
                .unwrap();
        let cwd = out["result"].as_str().unwrap().to_owned();
        if mode == Isolation::Rlimits {
            assert!(!Path::new(&cwd).exists(), "the scratch directory {cwd} was removed");
        }
    }
}

#[tokio::test]
async fn a_host_secret_in_the_environment_is_not_seen() {
    // A host process holding the secret in its environment (edition 2024 forbids
    // set_var without `unsafe`; the config's environment has it too): it waits on its
    // stdin, and dies when the test drops it.
    let mut holder = std::process::Command::new("/bin/sh")
        .args(["-c", "read line"])
        .env("KEEL_TEST_SECRET", SECRET)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let program = "import os\nfound = [k for k, v in os.environ.items() if 'SECRET' in k or 'keel-test-secret' in v]\n\
                   for pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n            \
                   data = open('/proc/%s/environ' % pid, 'rb').read()\n        except OSError:\n            \
                   continue\n        if b'keel-test-secret' in data:\n            found.append(pid)\n\
                   result = {'found': found, 'env': sorted(os.environ), \
                   'pids': [p for p in os.listdir('/proc') if p.isdigit()]}\n";
    for (mode, t) in tools("") {
        let out = run(&t, program, Value::Null).await.unwrap();
        assert_eq!(out["result"]["found"], json!([]), "{}: {out}", mode.as_str());
        // Its /proc is its own: the host's processes (the holder among them) are not there.
        let pids = out["result"]["pids"].as_array().unwrap();
        assert!(pids.len() <= 2, "{}: the program sees {} processes: {out}", mode.as_str(), pids.len());
        let names: Vec<&str> =
            out["result"]["env"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        for name in &names {
            assert!(
                ["PATH", "HOME", "TMPDIR", "LANG", "PWD", "LC_CTYPE"].contains(name),
                "{}: {names:?}",
                mode.as_str()
            );
        }
    }
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[tokio::test]
async fn the_program_runs_unprivileged_and_cannot_gain_privileges() {
    let program = "import os\nstatus = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n\
                   result = {'uid': os.getuid(), 'euid': os.geteuid(), 'nnp': status['NoNewPrivs'].strip(), \
                   'caps': status['CapEff'].strip()}\n";
    for (mode, t) in tools("") {
        let out = run(&t, program, Value::Null).await.unwrap();
        let r = &out["result"];
        assert_eq!(r["nnp"], "1", "{}: {r}", mode.as_str());
        assert_eq!(r["caps"], "0000000000000000", "{}: {r}", mode.as_str());
        if super::sandbox::is_root() {
            assert_eq!(
                (r["uid"].as_u64(), r["euid"].as_u64()),
                (Some(65534), Some(65534)),
                "{}: {r}",
                mode.as_str()
            );
        }
    }
}

#[tokio::test]
async fn a_fork_bomb_is_bounded_by_max_processes_and_the_host_is_fine() {
    for (mode, t) in tools("max_processes = 8\ntimeout = \"30s\"") {
        let e = code_error(mode, run(&t, "import os\nwhile True:\n    os.fork()\n", Value::Null).await);
        assert!(e.message.starts_with("BlockingIOError"), "{}", e.message);
        assert!(e.message.contains("8 processes"), "{}", e.message);
        // The host can still start a process.
        assert!(std::process::Command::new("true").status().unwrap().success());
    }
}

#[tokio::test]
async fn four_gibibytes_hit_the_memory_limit() {
    for (mode, t) in tools("memory_mb = 256") {
        let e =
            code_error(mode, run(&t, "block = bytearray(4 << 30)\nresult = len(block)\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("MemoryError"), "{}", e.message);
        assert!(e.message.contains("memory limit is 256 MiB"), "{}", e.message);
        assert!(e.message.contains("line 1"), "{}", e.message);
    }
}

#[tokio::test]
async fn an_endless_loop_hits_the_cpu_limit_and_a_wait_on_nothing_the_wall_limit() {
    for (mode, t) in tools("cpu_seconds = 1\ntimeout = \"60s\"") {
        let e = code_error(mode, run(&t, "n = 0\nwhile True:\n    n += 1\n", Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("CPUTimeExceeded"), "{}", e.message);
        assert!(e.message.contains("line 3") || e.message.contains("line 2"), "{}", e.message);
        // Catching everything does not help: the hard limit kills it.
        let swallow = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n";
        let e = code_error(mode, run(&t, swallow, Value::Null).await);
        assert!(
            matches!(code_error_kind(&e).as_deref(), Some("Killed" | "CPUTimeExceeded")),
            "{}",
            e.message
        );
    }
    for (mode, t) in tools("timeout = \"500ms\"") {
        // It waits on nothing, with a child in a session of its own: both are gone
        // when the call returns, and what it printed is kept.
        let token = format!("1000.{:09}", fastrand::u32(..1_000_000_000));
        let program = format!(
            "import subprocess, threading\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\n\
             print('waiting', flush=True)\nthreading.Event().wait()\n"
        );
        let e = code_error(mode, run(&t, &program, Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("WallTimeExceeded"), "{}", e.message);
        assert!(e.message.contains("500ms") && e.message.contains("waiting"), "{}", e.message);
        assert_eq!(
            processes_with(&token),
            Vec::<String>::new(),
            "{}: the sleep outlived the call",
            mode.as_str()
        );
    }
}

#[tokio::test]
async fn a_huge_file_hits_the_file_size_limit() {
    for (mode, t) in tools("max_file_mb = 1") {
        let program = "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))\nresult = 'written'\n";
        let e = code_error(mode, run(&t, program, Value::Null).await);
        assert_eq!(code_error_kind(&e).as_deref(), Some("OSError"), "{}", e.message);
        assert!(e.message.contains("File too large") && e.message.contains("1 MiB"), "{}", e.message);
    }
}

/// Live (not zombie) processes whose command line holds `token`.
fn processes_with(token: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z');
        if !zombie && String::from_utf8_lossy(&cmdline).contains(token) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn a_background_process_in_a_new_session_does_not_outlive_the_call() {
    for (mode, t) in tools("") {
        // A unique duration marks the process on the host's /proc (its pid inside a
        // pid namespace is not the host's).
        let token = format!("1000.{:09}", fastrand::u32(..1_000_000_000));
        let program = format!(
            "import subprocess\np = subprocess.Popen(['sleep', '{token}'], start_new_session=True,\n    \
             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
             print(p.pid)\nresult = p.pid\n"
        );
        let out = run(&t, &program, Value::Null).await.unwrap();
        assert!(out["result"].is_u64(), "{out}");
        assert_eq!(
            processes_with(&token),
            Vec::<String>::new(),
            "{}: the sleep outlived the call",
            mode.as_str()
        );
    }
}

#[test]
fn limits_are_validated_with_their_key_and_line() {
    let text = "[tools.py]\nkind = \"code\"\nmemory_mb = 1\ncpu_seconds = 0\nmax_processes = 100000\n\
                max_file_mb = 0\nmax_output = 0\ntimeout = \"1ms\"\nparams = { type = \"object\" }\n\
                result_schema = { type = 7 }\nargv = [\"x\"]\n";
    let e = Config::parse(text, Path::new("keel.toml"), &env).unwrap_err().to_string();
    for (key, line) in [
        ("memory_mb", 3),
        ("cpu_seconds", 4),
        ("max_processes", 5),
        ("max_file_mb", 6),
        ("max_output", 7),
        ("timeout", 8),
        ("params", 9),
        ("result_schema", 10),
        ("argv", 11),
    ] {
        assert!(e.contains(&format!("keel.toml:{line}: tools.py.{key}:")), "{key} at line {line}: {e}");
    }
    let e =
        Config::parse("[tools.py]\nkind = \"code\"\nisolation = \"jail\"\n", Path::new("keel.toml"), &env)
            .unwrap_err()
            .to_string();
    assert!(e.contains("keel.toml:3:") && e.contains("`jail`") && e.contains("`rlimits`"), "{e}");
    let e = Config::parse(
        "[tools.py]\nkind = \"code\"\npython = \"/no/such/python3\"\n",
        Path::new("keel.toml"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("keel.toml:3: tools.py.python:"), "{e}");
}

#[test]
fn the_params_schema_is_the_kinds_and_refuses_anything_else() {
    let t = tools("").remove(0).1;
    assert_eq!(t.params_schema, Some(super::params_schema()));
    assert!(t.check_params(&json!({"program": "result = 1"})).is_ok());
    for bad in [json!({}), json!({"program": 3}), json!({"program": "x", "other": 1}), json!({"program": ""})]
    {
        assert_eq!(t.check_params(&bad).unwrap_err().class, ErrorClass::InvalidRequest, "{bad}");
    }
}

#[test]
fn code_error_kind_reads_the_type_back_only_from_code_errors() {
    let f = |class, m: &str| Failure::new(class, m);
    let kind = |m: &str| code_error_kind(&f(ErrorClass::CodeError, m));
    assert_eq!(kind("KeyError: 'total'\nline 3").as_deref(), Some("KeyError"));
    assert_eq!(kind("MemoryError").as_deref(), Some("MemoryError"));
    assert_eq!(kind("not a type: x").as_deref(), Some("error"), "an unnamed error is of kind `error`");
    assert_eq!(code_error_kind(&f(ErrorClass::Timeout, "KeyError: 'x'")), None);
}

#[tokio::test]
async fn output_is_capped_and_kept_apart_from_the_result() {
    for (mode, t) in tools("max_output = 1000") {
        let program = "import sys\nfor i in range(100000):\n    print('line', i)\nsys.stderr.write('to stderr\\n')\n\
                       result = {'printed': 100000}\n";
        let out = run(&t, program, Value::Null).await.unwrap();
        assert_eq!(out["result"], json!({"printed": 100000}), "{}", mode.as_str());
        let printed = out["stdout"].as_str().unwrap();
        assert!(printed.starts_with("line 0\nline 1\n"), "{printed}");
        assert!(printed.len() < 1100 && printed.ends_with("[output cut at 1000 bytes]"), "{printed}");
    }
}

#[test]
fn the_readmes_code_tool_example_is_a_valid_config() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let section = &readme[readme.find("### Sandboxed code").expect("the README documents the code tool")..];
    let block = section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let config =
        Config::parse(block, Path::new("keel.toml"), &env).unwrap_or_else(|e| panic!("{e}\n{block}"));
    match &config.tools["py"].kind {
        ToolKind::Code(c) => assert_eq!(c.limits, super::Limits::default()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn without_bwrap_on_path_bwrap_is_refused_at_load_and_auto_says_what_is_not_isolated() {
    // Keel's PATH holds only the system's python3: no bwrap, no unshare.
    let dir = tempfile::tempdir().unwrap();
    if std::os::unix::fs::symlink("/usr/bin/python3", dir.path().join("python3")).is_err()
        || !Path::new("/usr/bin/python3").exists()
    {
        #[allow(clippy::print_stderr)]
        {
            eprintln!("SKIPPED: no /usr/bin/python3 here");
        }
        return;
    }
    let path = dir.path().to_str().unwrap().to_owned();
    let env = |name: &str| if name == "PATH" { Some(path.clone()) } else { env(name) };
    let parse = |text: &str| Config::parse(text, Path::new("keel.toml"), &env);

    // Asked for bwrap, which cannot run: the config is refused, by key and line.
    let e = parse("[tools.py]\nkind = \"code\"\nisolation = \"bwrap\"\n").unwrap_err().to_string();
    assert!(e.contains("keel.toml:3: tools.py.isolation:") && e.contains("`bwrap` is not on PATH"), "{e}");

    // auto falls back to rlimits and says, at load and in every answer, what it lacks.
    let config = parse("[tools.py]\nkind = \"code\"\n").unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert!(warnings.iter().any(|w| w.contains("network not isolated")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("may outlive the call")), "{warnings:?}");
    let t = config.tools["py"].clone();
    let out = run(&t, "result = 2 + 2\n", Value::Null).await.unwrap();
    assert_eq!((out["result"].as_u64(), out["isolation"].as_str()), (Some(4), Some("rlimits")), "{out}");
    assert!(out["warnings"].to_string().contains("network not isolated"), "{out}");
}
