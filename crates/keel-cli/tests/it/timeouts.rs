//! A command tool that hangs is killed, with its children, at its timeout.

use std::time::Duration;

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS, alive, eventually};

#[test]
fn a_hanging_command_is_killed_with_its_children() {
    let config = format!(
        "{TOOLS}\n[tools.hang]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"sleep 300 & echo $! > child.pid; sleep 300\"]\ncwd = \".\"\npolicy = {{ timeout = {{ attempt = \"1s\" }}, retry = {{ max_attempts = 1 }} }}\n"
    );
    let b = Bench::new(Faults::default(), &config);
    let plan = b.write("plan.toml", "[[steps]]\ntool = \"hang\"\n");
    let out = b.keel(&["run", plan.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("timeout"), "{out:?}");
    let pid: i32 = std::fs::read_to_string(b.path("child.pid")).unwrap().trim().parse().unwrap();
    eventually("the child to die", Duration::from_secs(5), || !alive(pid));
}
