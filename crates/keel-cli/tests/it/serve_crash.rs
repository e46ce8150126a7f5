//! `keel serve` SIGKILLed at random moments under load while clients retry under
//! their `Idempotency-Key`s: every key is answered and charged exactly once. On
//! PostgreSQL, two instances share one database: one is killed again and again, the
//! other takes its runs over, and an approval decided on one is seen by the other.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_examples::payments::Faults;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::{Bench, alive, orders};

const AGENT: &str = "agent-key-0123456789";
const APPROVER: &str = "approver-key-0123456789";

const SERVE: &str = r#"
[run]
lease = "1s"

[defaults]
retry = { max_attempts = 3, base_delay = "10ms", max_delay = "50ms" }
breaker = { enabled = false }

[server]
workers = 2
keys = [
  { name = "bot", key_env = "AGENT_KEY", role = "agent" },
  { name = "alice", key_env = "APPROVER_KEY", role = "approver" },
]
"#;

/// One `keel serve` process on a fixed port (kept across restarts).
struct Instance {
    port: u16,
    child: Option<Child>,
    storage: Option<String>,
}

impl Instance {
    fn start(b: &Bench, port: u16, storage: Option<&str>) -> Instance {
        let mut i = Instance { port, child: None, storage: storage.map(str::to_owned) };
        i.restart(b);
        i
    }

    fn restart(&mut self, b: &Bench) {
        let mut cmd = b.command(&["serve", "--listen", &format!("127.0.0.1:{}", self.port)]);
        cmd.env("AGENT_KEY", AGENT).env("APPROVER_KEY", APPROVER).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(url) = &self.storage {
            cmd.env("KEEL_TEST_STORAGE", url);
        }
        self.child = Some(cmd.spawn().unwrap());
        let start = Instant::now();
        while call(self.port, "GET", "/readyz", AGENT, None, None).map(|(s, _)| s) != Some(200) {
            assert!(start.elapsed() < Duration::from_secs(30), "keel serve never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            child.wait().unwrap();
            assert!(!alive(child.id() as i32));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request with `Connection: close`; `None` when the server is not
/// there or went away mid-answer (the client's view of a crash).
fn call(
    port: u16,
    method: &str,
    path: &str,
    key: &str,
    idem: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let idem = idem.map(|k| format!("idempotency-key: {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\nauthorization: Bearer {key}\r\n\
         {idem}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

/// Invokes `charge` under `key` until answered 200 (retrying through crashes,
/// restarts and 202s), on the ports in turn; returns the answer and the tries that
/// were not answered 200 (a dead server, a 5xx, a 202).
fn charge_until_answered(ports: &[u16], key: &str, order: i64, give_up: Instant) -> (Value, Vec<String>) {
    let body = json!({"params": {"order": order, "amount": 10}});
    let mut unanswered = Vec::new();
    for n in 0usize.. {
        assert!(Instant::now() < give_up, "key {key} was never answered");
        let port = ports[n % ports.len()];
        match call(port, "POST", "/api/tools/charge/invoke?wait=5s", AGENT, Some(key), Some(&body)) {
            Some((200, answer)) => return (answer, unanswered),
            Some((202, answer)) => {
                // Not done within ?wait: the run's real state, never an empty approval.
                assert_eq!(answer["state"], "running", "key {key}: {answer}");
                assert!(answer.get("approval_id").is_none(), "key {key}: {answer}");
                unanswered.push("202 running".to_owned());
            }
            Some((status, answer)) => {
                assert!(
                    matches!(status, 502..=504),
                    "key {key}: a retry is answered from the key's run, not {status}: {answer}"
                );
                unanswered.push(format!("{status} {}", answer["class"].as_str().unwrap_or("")));
            }
            None => unanswered.push("no answer (server down)".to_owned()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

/// What a drill did.
#[derive(Debug)]
struct Drill {
    answers: Vec<Value>,
    kills: u32,
    /// Tries not answered 200, by what they got.
    unanswered: std::collections::BTreeMap<String, u32>,
}

/// Starts a client (one key) every 30 ms against `ports` until `kill_round` has done
/// its rounds (each kills at a random moment and says whether to go on), so every
/// kill lands under load; then waits for every client's answer.
fn drill(ports: Vec<u16>, max_keys: i64, mut kill_round: impl FnMut() -> bool + Send + 'static) -> Drill {
    let give_up = Instant::now() + Duration::from_secs(120);
    let answers = Arc::new(Mutex::new(Vec::new()));
    let killing = Arc::new(AtomicBool::new(true));
    let k = killing.clone();
    let killer = std::thread::spawn(move || {
        let mut kills = 0;
        while kill_round() {
            kills += 1;
        }
        k.store(false, Ordering::SeqCst);
        kills
    });
    let mut clients = Vec::new();
    for order in 0..max_keys {
        if !killing.load(Ordering::SeqCst) && order >= 8 {
            break;
        }
        let (ports, answers) = (ports.clone(), answers.clone());
        clients.push(std::thread::spawn(move || {
            let (answer, unanswered) =
                charge_until_answered(&ports, &format!("crash-{order}"), order, give_up);
            answers.lock().unwrap().push((order, answer, unanswered));
        }));
        std::thread::sleep(Duration::from_millis(30));
    }
    for c in clients {
        c.join().unwrap();
    }
    let kills = killer.join().unwrap();
    let mut answers = Arc::try_unwrap(answers).unwrap().into_inner().unwrap();
    answers.sort_by_key(|(o, _, _)| *o);
    let mut unanswered = std::collections::BTreeMap::new();
    for what in answers.iter().flat_map(|(_, _, u)| u) {
        *unanswered.entry(what.clone()).or_default() += 1;
    }
    for (order, answer, _) in &answers {
        assert_eq!(answer["output"]["body"]["order"], *order, "{answer}");
    }
    Drill { answers: answers.into_iter().map(|(_, a, _)| a).collect(), kills, unanswered }
}

/// The journal after a drill: every run completed, each run's sequence numbers
/// contiguous from 1, and the projections rebuilt from the events equal to the live
/// ones. Returns the number of runs.
fn check_journal(url: &str) -> usize {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let journal = keel_journal::open(url, keel_journal::JournalOptions::default()).await.unwrap();
        let ids = journal.run_ids().await.unwrap();
        let mut live = Vec::new();
        for id in &ids {
            let export = journal.export_run(id).await.unwrap().unwrap();
            let seqs: Vec<u64> = export.events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "run {id}: no gap, no repeat");
            assert_eq!(export.state.run.state.as_str(), "completed", "run {id}");
            live.push(export.state);
        }
        journal.rebuild_projections().await.unwrap();
        for (id, before) in ids.iter().zip(live) {
            assert_eq!(journal.snapshot(id).await.unwrap().unwrap(), before, "run {id} rebuilt equal");
        }
        journal.close().await;
        ids.len()
    })
}

/// The drill's counts, printed (`--nocapture`) before they are asserted: keys never
/// charged (lost) and charges past one per key (duplicated). `charged` is sorted.
fn tally(label: &str, keys: &[i64], kills: u32, charged: &[i64]) {
    let lost = keys.iter().filter(|k| charged.binary_search(k).is_err()).count();
    let duplicated = charged.windows(2).filter(|w| w[0] == w[1]).count();
    eprintln!(
        "{label}: keys {}, kills {kills}, charges {}, lost {lost}, duplicated {duplicated}",
        keys.len(),
        charged.len()
    );
}

#[test]
fn keel_serve_sigkilled_under_load_charges_every_key_exactly_once() {
    // A charge is recorded, then answered 30 ms later: kills land mid-charge too.
    let b = Arc::new(Bench::new(Faults { charge_delay_ms: 30, ..Faults::default() }, SERVE));
    let port = free_port();
    let server = Arc::new(Mutex::new(Instance::start(&b, port, None)));
    const KILLS: u32 = 8;
    let mut rng = fastrand::Rng::with_seed(2);
    let (s, b2) = (server.clone(), b.clone());
    let mut rounds = 0;
    let d = drill(vec![port], 200, move || {
        if rounds == KILLS {
            return false;
        }
        rounds += 1;
        // The fault: SIGKILL at a random moment of the load, then a restart.
        std::thread::sleep(Duration::from_millis(rng.u64(20..250)));
        let mut server = s.lock().unwrap();
        server.kill();
        server.restart(&b2);
        true
    });
    let keys = d.answers.len();
    eprintln!("serve drill: {keys} keys, {} kills, retried tries: {:?}", d.kills, d.unanswered);
    assert_eq!(d.kills, KILLS);
    let mut charged = orders(&b.payments);
    charged.sort_unstable();
    tally("serve drill (SQLite)", &(0..keys as i64).collect::<Vec<_>>(), d.kills, &charged);
    assert_eq!(charged, (0..keys as i64).collect::<Vec<_>>(), "every key charged exactly once");
    // Retried once more after everything: the key's one charge, replayed.
    let (again, _) = charge_until_answered(&[port], "crash-3", 3, Instant::now() + Duration::from_secs(30));
    assert_eq!(
        (again["replayed"].clone(), again["output"].clone()),
        (json!(true), d.answers[3]["output"].clone())
    );
    assert_eq!(b.payments.charges().len(), keys);
    drop(server);
    let runs = check_journal(&format!("sqlite://{}", b.path("keel.db").display()));
    assert_eq!(runs, keys, "one run per key, no orphan");
}

#[test]
fn two_instances_on_postgres_one_sigkilled_under_load_the_other_takes_over() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = rt.block_on(keel_testkit::postgres_database());
    let config = format!("{SERVE}\n[storage]\nurl_env = \"KEEL_TEST_STORAGE\"\n");
    let b = Arc::new(Bench::new(Faults { charge_delay_ms: 30, ..Faults::default() }, &config));
    let (pa, pb) = (free_port(), free_port());
    let a = Arc::new(Mutex::new(Instance::start(&b, pa, Some(&url))));
    let other = Instance::start(&b, pb, Some(&url));

    // An approval asked on one instance and decided on the other, with a crash of the
    // first in between, is seen by both.
    let big = json!({"params": {"order": 1000, "amount": 500}});
    let (status, pending) =
        call(pa, "POST", "/api/tools/charge/invoke", AGENT, Some("big-1000"), Some(&big)).unwrap();
    assert_eq!(status, 202, "{pending}");
    let approval = pending["approval_id"].as_str().unwrap().to_owned();
    a.lock().unwrap().kill();
    let (status, decided) =
        call(pb, "POST", &format!("/api/approvals/{approval}/approve"), APPROVER, None, Some(&json!({})))
            .unwrap();
    assert_eq!(status, 200, "{decided}");
    a.lock().unwrap().restart(&b);
    let (status, done) =
        call(pa, "POST", "/api/tools/charge/invoke?wait=20s", AGENT, Some("big-1000"), Some(&big)).unwrap();
    assert_eq!(status, 200, "the decision made on the other instance is seen: {done}");
    assert_eq!(done["output"]["body"]["order"], 1000);

    const KILLS: u32 = 6;
    let mut rng = fastrand::Rng::with_seed(3);
    let (s, b2) = (a.clone(), b.clone());
    let mut rounds = 0;
    let d = drill(vec![pa, pb], 120, move || {
        if rounds == KILLS {
            return false;
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(rng.u64(20..250)));
        let mut a = s.lock().unwrap();
        a.kill();
        // The other instance alone for a moment: it takes the dead one's runs over.
        std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
        a.restart(&b2);
        true
    });
    let keys = d.answers.len();
    eprintln!(
        "postgres drill: {keys} keys, {} kills of one of two instances, retried tries: {:?}",
        d.kills, d.unanswered
    );
    assert_eq!(d.kills, KILLS);
    let mut charged = orders(&b.payments);
    charged.sort_unstable();
    let mut expected: Vec<i64> = (0..keys as i64).collect();
    expected.push(1000);
    tally("serve drill (PostgreSQL, two instances)", &expected, d.kills, &charged);
    assert_eq!(charged, expected, "every key charged exactly once, the approved one included");
    drop(other);
    drop(a);
    let runs = check_journal(&url);
    assert_eq!(runs, keys + 1, "one run per key, no orphan");
}
