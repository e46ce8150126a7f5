//! The web inbox in headless Chromium: a person approves a held charge with a click, and
//! the run it held completes (issue #6).
//!
//! The browser half is `tests/browser/approve.mjs` (playwright-core driving Debian's
//! `chromium`); this half starts the server, makes the approval, and checks the outcome
//! through the API. Needs `node`, `npm` and `/usr/bin/chromium` (or `KEEL_CHROMIUM`);
//! `.ci/browser.sh` installs them. A missing browser fails the test, it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_examples::payments::Faults;
use serde_json::json;

use crate::support::{AGENT, APPROVER, Server};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> PathBuf {
    let path = PathBuf::from(std::env::var("KEEL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        path.is_file(),
        "the browser test needs Debian's chromium at {}: `apt-get install chromium` (.ci/browser.sh does), \
         or set KEEL_CHROMIUM",
        path.display()
    );
    path
}

/// Installs playwright-core from the lockfile when `node_modules` lacks it.
fn playwright() {
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core/package.json").is_file() {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("the browser test needs npm (Debian's `npm`) to install playwright-core: {e}")
        });
    assert!(
        out.status.success(),
        "`npm ci --prefix {}` failed; run it by hand (.ci/browser.sh does):\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_node(script: &Path, args: &[&str], chromium: &Path) -> Output {
    Command::new("node")
        .arg(script)
        .args(args)
        .env("KEEL_CHROMIUM", chromium)
        .output()
        .unwrap_or_else(|e| panic!("the browser test needs node (Debian's `nodejs`): {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_in_the_inbox_approves_a_held_charge_and_its_run_completes() {
    let chromium = chromium();
    tokio::task::spawn_blocking(playwright).await.unwrap();

    let s = Server::start(Faults::default(), "").await;
    let plan = json!({"plan": {"name": "big charge", "steps": [
        {"tool": "charge", "params": {"order": 42, "amount": 250}}
    ]}});
    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "waiting_approval").await;
    let approval = run["state"]["approvals"][0]["approval_id"].as_str().unwrap().to_owned();
    assert!(s.payments.charges().is_empty(), "nothing is charged before the click");

    let script = browser_dir().join("approve.mjs");
    let args = [s.base.clone(), APPROVER.to_owned(), approval.clone()];
    let out = tokio::task::spawn_blocking(move || {
        run_node(&script, &args.iter().map(String::as_str).collect::<Vec<_>>(), &chromium)
    })
    .await
    .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{log}");
    assert!(out.status.success(), "approve.mjs: {}\n{log}", out.status);

    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "completed").await;
    let decided = &run["state"]["approvals"][0];
    assert_eq!(decided["status"], "approved", "{decided:#}");
    assert_eq!(decided["decided_by"], "alice (approved in the browser test)", "{decided:#}");
    let charges = s.payments.charges();
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!((charges[0]["order"].as_i64(), charges[0]["amount"].as_f64()), (Some(42), Some(250.0)));
}

/// The dashboard shows each budget's balance, in flight and refusals, as `/api/budgets`
/// has them; the screenshot is kept for a person to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_budgets_balances() {
    let chromium = chromium();
    tokio::task::spawn_blocking(playwright).await.unwrap();
    let base = crate::gateway::upstream().await;
    let s = Server::start(
        Faults::default(),
        &format!(
            "[models.small]\nprovider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"up\"\n\
             [gateway]\nkey_budget = {{ tokens = 1000 }}\n"
        ),
    )
    .await;
    let body = json!({"model": "small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let resp =
            s.http.post(s.url("/v1/chat/completions")).bearer_auth(AGENT).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (_, view) = s.get(Some(APPROVER), "/api/budgets").await;
    let (name, budget) =
        view["budgets"].as_object().unwrap().iter().find(|(n, _)| n.starts_with("key:")).unwrap();
    assert_eq!(budget["used"]["tokens"], 8, "{view}");

    let shot = std::env::temp_dir().join(format!("keel-dashboard-{}.png", std::process::id()));
    let script = browser_dir().join("dashboard.mjs");
    let args = [s.base.clone(), APPROVER.to_owned(), shot.display().to_string()];
    let out = tokio::task::spawn_blocking(move || {
        run_node(&script, &args.iter().map(String::as_str).collect::<Vec<_>>(), &chromium)
    })
    .await
    .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dashboard.mjs: {}\n{log}", out.status);
    let row = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(name.as_str()))
        .unwrap_or_else(|| panic!("no row for {name}:\n{log}"))
        .to_owned();
    let cells: Vec<&str> = row.split('\t').collect();
    assert_eq!(cells[1], "8 / 1000", "{row}");
    assert!(cells[2].starts_with("$0.0000"), "no price is set: {row}");
    assert_eq!((cells[4], cells[5]), ("0", "open"), "{row}");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false), "a screenshot was taken");
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// A ticket's context reads as sections in the inbox — what failed, the error, the
/// suggestion — and a click on Skip resolves it; the screenshot is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tickets_context_reads_as_sections_and_skip_resolves_it() {
    let chromium = chromium();
    tokio::task::spawn_blocking(playwright).await.unwrap();
    let s = Server::start(Faults { notify_down: true, ..Faults::default() }, "").await;
    let plan = json!({"plan": {"name": "notify", "steps": [{"tool": "notify", "params": {"order": 9}}]}});
    let (status, started) = s.post(Some(AGENT), "/api/runs", Some(plan)).await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let run = s.until_run(&run_id, |r| r["state"]["run"]["state"] == "escalated").await;
    let ticket = run["state"]["tickets"][0]["ticket_id"].as_str().unwrap().to_owned();

    let shot = std::env::temp_dir().join(format!("keel-ticket-{}.png", std::process::id()));
    let script = browser_dir().join("ticket.mjs");
    let args = [s.base.clone(), APPROVER.to_owned(), ticket.clone(), shot.display().to_string()];
    let out = tokio::task::spawn_blocking(move || {
        run_node(&script, &args.iter().map(String::as_str).collect::<Vec<_>>(), &chromium)
    })
    .await
    .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ticket.mjs: {}\n{log}", out.status);
    // (Headings are upper-cased by the style sheet: compare without case.)
    let lower = log.to_lowercase();
    assert!(lower.contains("ctx-failed: what failed step step-1 calling notify with {\"order\":9}"), "{log}");
    assert!(lower.contains("ctx-error: the error server_error after 2 attempt(s)"), "{log}");
    assert!(lower.contains("ctx-suggestion: suggestion the target kept failing"), "{log}");
    assert!(log.contains(&format!("ticket {ticket} resolved")), "{log}");
    let run = s.until_run(&run_id, |r| r["state"]["tickets"][0]["status"] == "resolved").await;
    assert_eq!(run["state"]["tickets"][0]["resolution"]["action"], "skip");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false), "a screenshot was taken");
    eprintln!("ticket screenshot: {}", shot.display());
}

/// The incidents tab after a scripted burst (issue 17): `notify` fails, which opens a
/// critical incident that stays open and one that resolves once its 2-second window is
/// quiet; one sink takes every delivery, the other refuses connections. Each card
/// shows the rule, the failures and the timeline with every delivery's outcome; the
/// screenshot is kept in the target dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_incidents_tab_shows_each_incident_with_its_timeline() {
    let chromium = chromium();
    tokio::task::spawn_blocking(playwright).await.unwrap();
    let hook = crate::alerts::Hook::default();
    let url = hook.start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let extra = format!(
        r#"
[alerts]
check_every = "100ms"

[alerts.sinks.hook]
kind = "webhook"
url = "{url}"

[alerts.sinks.down]
kind = "webhook"
url = "http://{closed}/hook"
retry = {{ max_attempts = 2, base_delay = "10ms" }}

[[alerts.rules]]
name = "notify-down"
classes = ["server_error"]
targets = ["notify"]
severity = "critical"
window = "1h"

[[alerts.rules]]
name = "notify-flaky"
classes = ["server_error"]
targets = ["notify"]
threshold = 2
window = "2s"
sinks = ["hook"]
"#
    );
    let s = Server::start(Faults { notify_down: true, ..Faults::default() }, &extra).await;
    let (status, body) =
        s.post(Some(AGENT), "/api/tools/notify/invoke", Some(json!({"params": {"order": 7}}))).await;
    assert!(status >= 400, "{status} {body}");
    // Both incidents recorded, the flaky one resolved and its resolve delivered.
    let list = s
        .until_incidents(|l| {
            l.len() == 2
                && l.iter().any(|i| {
                    i["state"] == "resolved" && i["timeline"].as_array().is_some_and(|t| t.len() == 4)
                })
                && l.iter()
                    .any(|i| i["state"] == "open" && i["timeline"].as_array().is_some_and(|t| t.len() == 3))
        })
        .await;
    assert_eq!(list[0]["rule"], "notify-down", "open first: {list:#?}");
    assert_eq!(list[1]["rule"], "notify-flaky", "{list:#?}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel-incidents.png");
    let script = browser_dir().join("incidents.mjs");
    let args = [s.base.clone(), AGENT.to_owned(), shot.display().to_string()];
    let out = tokio::task::spawn_blocking(move || {
        run_node(&script, &args.iter().map(String::as_str).collect::<Vec<_>>(), &chromium)
    })
    .await
    .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "incidents.mjs: {}\n{log}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let cards: Vec<Vec<&str>> =
        stdout.lines().filter(|l| l.starts_with("keel/")).map(|l| l.split('\t').collect()).collect();
    assert_eq!(cards.len(), 2, "{log}");
    assert!(stdout.contains("badge\t1"), "one open: {log}");
    let (open, resolved) = (&cards[0], &cards[1]);
    assert_eq!(open[1], "open", "{log}");
    // (The severity label is upper-cased by the style sheet.)
    assert!(open[2].to_lowercase().starts_with("critical notify-down — notify"), "{log}");
    assert!(open[3].starts_with("1 × server_error on notify · triggered "), "{log}");
    assert!(open[4].contains("incident opened"), "{log}");
    assert!(open[4].contains("trigger delivered → hook"), "{log}");
    assert!(open[4].contains("trigger not delivered → down (network after 2 attempts)"), "{log}");
    assert_eq!(resolved[1], "resolved", "{log}");
    assert!(resolved[3].starts_with("2 × server_error on notify"), "{log}");
    let steps: Vec<&str> = resolved[4].split(" | ").collect();
    assert_eq!(steps.len(), 4, "{log}");
    assert!(steps[0].ends_with("incident opened"), "{log}");
    assert!(steps[1].ends_with("trigger delivered → hook"), "{log}");
    assert!(steps[2].ends_with("resolved"), "{log}");
    assert!(steps[3].ends_with("resolve delivered → hook"), "{log}");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false), "a screenshot was taken");
    eprintln!("incidents screenshot: {}", shot.display());
    let got = hook.got.lock().unwrap().len();
    assert_eq!(got, 3, "two triggers and one resolve reached the hook");
}
