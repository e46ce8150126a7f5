//! Attacks on command and code tools through the real `keel` binary: a tool reads no
//! secret of Keel's environment, dies with a SIGKILLed keel, and a config that puts a
//! parameter into shell code is warned about.

use std::time::Duration;

use keel_examples::payments::Faults;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{Bench, TOOLS, alive, eventually};

const SECRETS: &[(&str, &str)] = &[
    ("KEEL_AGENT_KEY", "agent-key-s3cr3t-0123456789"),
    ("PAYMENTS_AUTH", "Bearer payments-s3cr3t-42"),
    ("OPENAI_KEY", "sk-openai-s3cr3t-777"),
    ("UNRELATED_SECRET", "unrelated-s3cr3t-9"),
];

#[test]
fn a_command_tool_reads_none_of_keels_secrets() {
    let b = Bench::new(
        Faults::default(),
        &format!(
            r#"{TOOLS}
[server]
keys = [{{ name = "bot", key_env = "KEEL_AGENT_KEY", role = "agent" }}]

[models.m]
provider = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key_env = "OPENAI_KEY"

[tools.secret_http]
kind = "http"
url = "{{base}}/notify"
headers_env = {{ Authorization = "PAYMENTS_AUTH" }}

[tools.printenv]
kind = "command"
argv = ["/usr/bin/env"]
env_from = {{ SHOWN = "DECLARED_FOR_THE_TOOL" }}
"#
        ),
    );
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"printenv\"\n");
    // keel's own environment holds every secret, as in production.
    let keel = |args: &[&str]| {
        let mut cmd = b.command(args);
        cmd.env("DECLARED_FOR_THE_TOOL", "declared-value");
        for (k, v) in SECRETS {
            cmd.env(k, v);
        }
        crate::support::Run::from(cmd.output().unwrap())
    };
    let out = keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let show = keel(&["runs", "show", &out.run_id(), "--json"]);
    let export: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let stdout = export["state"]["steps"][0]["output"]["stdout"].as_str().unwrap().to_owned();
    assert!(stdout.contains("SHOWN=declared-value"), "a declared variable reaches the tool: {stdout}");
    assert!(!stdout.contains("USER=tester"), "nothing else of keel's environment does: {stdout}");
    let journal = std::fs::read(b.path("keel.db")).unwrap();
    for (name, secret) in SECRETS {
        assert!(!stdout.contains(secret), "`{name}` reached the tool:\n{stdout}");
        assert!(!show.stdout.contains(secret), "`{name}` is in the run's export");
        let found = journal.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "`{name}` is in the journal file");
    }
}

/// A program that looks for secrets everywhere it can: its environment and every
/// process's it can read.
const SNOOP: &str = "import os\nseen = dict(os.environ)\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n            seen[pid] = open('/proc/%s/environ' % pid, 'rb').read().decode('latin-1')\n        except OSError:\n            pass\nresult = seen\n";

#[test]
fn a_code_tool_program_reads_none_of_keels_secrets_and_config_check_names_its_isolation() {
    let b = Bench::new(
        Faults::default(),
        &format!(
            "{TOOLS}\n[server]\nkeys = [{{ name = \"bot\", key_env = \"KEEL_AGENT_KEY\", role = \"agent\" }}]\n\n[tools.py]\nkind = \"code\"\ntimeout = \"20s\"\n"
        ),
    );
    let keel = |args: &[&str]| {
        let mut cmd = b.command(args);
        for (k, v) in SECRETS {
            cmd.env(k, v);
        }
        crate::support::Run::from(cmd.output().unwrap())
    };
    let check = keel(&["config", "check"]);
    assert_eq!(check.code, 0, "{check:?}");
    let line = check
        .stdout
        .lines()
        .find(|l| l.contains("code tool `py`: isolation "))
        .unwrap_or_else(|| panic!("{check:?}"));
    let json: serde_json::Value = serde_json::from_str(&keel(&["config", "check", "--json"]).stdout).unwrap();
    let isolation = json["code_isolation"]["py"].as_str().unwrap().to_owned();
    assert!(isolation.starts_with("bwrap (") || isolation.starts_with("rlimits ("), "{json}");
    assert!(line.ends_with(&isolation), "{line} / {isolation}");

    let program = serde_json::to_string(SNOOP).unwrap();
    let plan =
        b.write("plan.toml", &format!("[[steps]]\ntool = \"py\"\nparams = {{ program = {program} }}\n"));
    let out = keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let show = keel(&["runs", "show", &out.run_id(), "--json"]);
    let export: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let output = &export["state"]["steps"][0]["output"];
    assert!(output["result"].is_object(), "the program ran: {output}");
    assert_eq!(output["isolation"].as_str(), isolation.split(' ').next(), "{output}");
    let seen = output["result"].to_string();
    let journal = std::fs::read(b.path("keel.db")).unwrap();
    for (name, secret) in SECRETS {
        assert!(!seen.contains(secret), "`{name}` reached the program:\n{seen}");
        let found = journal.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "`{name}` is in the journal file");
    }
}

#[test]
fn a_command_tool_dies_with_a_sigkilled_keel_and_its_side_effect_never_happens() {
    let b = Bench::new(
        Faults::default(),
        &format!(
            r#"{TOOLS}
[tools.slow]
kind = "command"
# The tool, and a child in its group, record their pids, then wait on the child; the
# side effect comes after. Parameters are positional arguments, never shell code.
argv = ["sh", "-c", 'echo $$ > "$1/tool.pid"; sleep 300 & echo $! > "$1/child.pid"; wait; touch "$1/effect"', "sh", "{{{{dir}}}}"]
policy = {{ timeout = {{ attempt = "600s" }} }}

[tools.true]
kind = "command"
argv = ["true"]
"#
        ),
    );
    let dir = b.path("tool");
    std::fs::create_dir(&dir).unwrap();
    let plan = b.write(
        "plan.toml",
        &format!("[[steps]]\ntool = \"slow\"\nparams = {{ dir = \"{}\" }}\n", dir.display()),
    );
    let (mut child, _run_id, _lines) = b.spawn(&["run", plan.to_str().unwrap()]);
    let pid =
        |name: &str| -> Option<i32> { std::fs::read_to_string(dir.join(name)).ok()?.trim().parse().ok() };
    eventually("the tool and its child to start", Duration::from_secs(30), || {
        pid("tool.pid").is_some() && pid("child.pid").is_some()
    });
    let (tool, grandchild) = (pid("tool.pid").unwrap(), pid("child.pid").unwrap());
    assert!(alive(tool) && alive(grandchild));

    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    eventually("the tool's whole group to die with keel", Duration::from_secs(10), || {
        !alive(tool) && !alive(grandchild)
    });
    // Both are gone, so the effect can no longer happen: it did not.
    assert!(!dir.join("effect").exists(), "the tool finished its side effect after keel died");

    // The next keel sweeps the killed one's scratch directory away.
    let scratch = std::env::temp_dir().join(format!("keel-tool-{}-", child.id()));
    let left = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .any(|e| e.path().to_string_lossy().starts_with(scratch.to_str().unwrap()))
    };
    assert!(left(), "a SIGKILLed keel cannot clean up after itself");
    let quick = b.write("quick.toml", "[[steps]]\ntool = \"true\"\n");
    let out = b.keel(&["run", quick.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!left(), "the stale scratch directory was removed");
}

/// Live processes whose command line holds `token`.
fn processes_with(token: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            alive(*pid) && String::from_utf8_lossy(&cmdline).contains(token)
        })
        .collect()
}

#[test]
fn a_code_tool_program_and_what_it_started_die_with_a_sigkilled_keel() {
    // Each isolation mode; rlimits as root runs as nobody, so with the system's python.
    for (mode, python) in [("bwrap", "python3"), ("rlimits", "/usr/bin/python3")] {
        let b = Bench::new(
            Faults::default(),
            &format!(
                "{TOOLS}\n[tools.py]\nkind = \"code\"\nisolation = \"{mode}\"\npython = \"{python}\"\ntimeout = \"5m\"\n\n\
                 [tools.py.policy]\ntimeout = {{ attempt = \"10m\" }}\n"
            ),
        );
        let check = b.keel(&["config", "check"]);
        if check.code != 0 {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED the {mode} mode: it cannot run here: {}", check.stderr);
            }
            continue;
        }
        // A child in a session of its own, and the program waiting on nothing.
        let token = format!("1000.{:09}", fastrand::u32(..1_000_000_000));
        let program = format!(
            "import subprocess, threading\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True, \
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nthreading.Event().wait()\n"
        );
        let plan = b.write(
            "plan.toml",
            &format!(
                "[[steps]]\ntool = \"py\"\nparams = {{ program = {} }}\n",
                serde_json::to_string(&program).unwrap()
            ),
        );
        let (mut child, _run_id, _lines) = b.spawn(&["run", plan.to_str().unwrap()]);
        eventually("the program's child to start", Duration::from_secs(30), || {
            !processes_with(&token).is_empty()
        });
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        eventually(&format!("{mode}: the program's child to die with keel"), Duration::from_secs(10), || {
            processes_with(&token).is_empty()
        });
    }
}

#[test]
fn config_check_warns_about_a_parameter_inside_shell_code() {
    let b = Bench::new(
        Faults::default(),
        &format!(
            r#"{TOOLS}
[tools.check_stock]
kind = "command"
argv = ["sh", "-c", "echo '{{{{sku}}}}'"]
"#
        ),
    );
    let out = b.keel(&["config", "check"]);
    assert_eq!(out.code, 0, "valid, but dangerous: {out:?}");
    let text = std::fs::read_to_string(b.path("keel.toml")).unwrap();
    let at = text.lines().position(|l| l == "[tools.check_stock]").unwrap() + 1;
    let line = out.stderr.clone();
    assert!(
        line.contains("keel: warning: ")
            && line.contains(&format!("keel.toml:{at}: tools.check_stock.argv[2]:")),
        "{out:?}"
    );
    assert!(line.contains("no escaping can make that safe"), "says why: {line}");
    let json = b.keel(&["config", "check", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1, "{json:?}");
}

#[test]
fn the_example_configs_pass_config_check_without_a_warning() {
    let b = Bench::new(Faults::default(), TOOLS);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let files =
        ["examples/payments/keel.toml", "bench/keel.toml", "bench/serve.toml", "bench/gateway-serve.toml"];
    for file in files {
        let mut cmd = b.command(&["config", "check", "--json"]);
        cmd.env("KEEL_CONFIG", root.join(file));
        // The benchmarks' secrets, as bench/*.sh set them.
        cmd.env("KEEL_BENCH_DB", format!("sqlite://{}", b.path("bench.db").display()));
        cmd.env("KEEL_BENCH_KEY", "bench-key-0123456789abcdef");
        let out = crate::support::Run::from(cmd.output().unwrap());
        assert_eq!(out.code, 0, "{file}: {out:?}");
        assert_eq!(out.stderr, "", "{file}: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["warnings"], serde_json::json!([]), "{file}");
    }
}
