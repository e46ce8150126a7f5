//! Alert routing end to end (issue 17): a scripted burst of failures through the
//! router's `EventSink`, fake PagerDuty and Slack receivers on loopback, windows on
//! an injected clock. The receivers must get exactly one trigger and one resolve,
//! PagerDuty's with one `dedup_key`, though PagerDuty's first answer is a 503 and a
//! third sink never answers at all.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use keel_core::{AttemptOutcome, BreakerState, Clock, ErrorClass, Event, EventSink};
use keel_telemetry::alert::{self, AlertEntry, AlertLog, AlertsConfig};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Time that moves only when the test says.
#[derive(Debug)]
struct ManualClock {
    base: Instant,
    wall: SystemTime,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        Self::at(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }

    /// A clock whose wall time starts at `wall`.
    fn at(wall: SystemTime) -> Arc<Self> {
        Arc::new(Self { base: Instant::now(), wall, offset: Mutex::default() })
    }

    fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
    fn wall(&self) -> SystemTime {
        self.wall + *self.offset.lock().unwrap()
    }
}

/// An alert log in memory.
#[derive(Debug, Default)]
struct MemoryLog(Mutex<Vec<AlertEntry>>);

#[async_trait::async_trait]
impl AlertLog for MemoryLog {
    async fn write(&self, entries: &[AlertEntry]) -> Result<(), String> {
        self.0.lock().unwrap().extend_from_slice(entries);
        Ok(())
    }
}

impl MemoryLog {
    /// (kind, rule, sink, action, detail) of every entry, in order.
    fn lines(&self) -> Vec<(String, String, String, String, String)> {
        let e = self.0.lock().unwrap();
        e.iter()
            .map(|e| {
                (
                    e.kind.as_str().to_owned(),
                    e.rule.clone(),
                    e.sink.clone().unwrap_or_default(),
                    e.action.map(|a| a.as_str().to_owned()).unwrap_or_default(),
                    e.detail.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// A receiver on loopback: what it accepted, how many requests it saw; it answers
/// the first `fail_first` requests with a 503.
#[derive(Clone, Default)]
struct Fake {
    accepted: Arc<Mutex<Vec<Value>>>,
    seen: Arc<Mutex<u32>>,
    changed: Arc<Notify>,
}

impl Fake {
    async fn start(&self, ok: StatusCode, fail_first: u32) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |Json(body): Json<Value>| {
                let me = me.clone();
                async move {
                    let n = {
                        let mut seen = me.seen.lock().unwrap();
                        *seen += 1;
                        *seen
                    };
                    if n <= fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    me.accepted.lock().unwrap().push(body);
                    me.changed.notify_waiters();
                    ok
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hook")
    }

    fn accepted(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` bodies were accepted.
    async fn wait_for(&self, n: usize) {
        self.wait_until(&format!("{n} deliveries"), |got| got.len() >= n).await;
    }

    /// Waits (bounded) until what was accepted satisfies `done`.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.accepted.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), wait).await.is_err() {
            panic!("waited for {what}, got {:?}", self.accepted());
        }
    }
}

/// A server that accepts connections and never answers.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("http://{addr}/hook"), task)
}

fn failed(target: &str, class: ErrorClass) -> Event {
    Event::AttemptEnded {
        target: target.into(),
        attempt: 1,
        outcome: AttemptOutcome::Failed(class),
        latency: Duration::from_millis(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_pages_once_and_resolves_once() {
    let pd = Fake::default();
    let slack = Fake::default();
    let pd_url = pd.start(StatusCode::ACCEPTED, 1).await;
    let slack_url = slack.start(StatusCode::OK, 0).await;
    let (hole, _hole) = black_hole().await;
    let text = format!(
        r#"
[sinks.pager]
kind = "pagerduty"
url = "{pd_url}"
routing_key_env = "PD_KEY"
retry = {{ max_attempts = 4, base_delay = "10ms", max_delay = "20ms" }}

[sinks.chat]
kind = "slack"
url_env = "SLACK_URL"

[sinks.down]
kind = "webhook"
url = "{hole}"
timeout = "50ms"
retry = {{ max_attempts = 2, base_delay = "10ms" }}

[[rules]]
name = "pay-timeouts"
classes = ["timeout"]
targets = ["pay"]
severity = "critical"
threshold = 3
window = "60s"
"#
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let env = |var: &str| match var {
        "PD_KEY" => Some("pd-routing-key-123".to_owned()),
        "SLACK_URL" => Some(slack_url.clone()),
        _ => None,
    };
    let alerts = config.resolve(&env).unwrap_or_else(|e| panic!("{e:?}"));
    let clock = ManualClock::new();
    let log = Arc::new(MemoryLog::default());
    let (router, tasks) = alert::spawn_logged(alerts, clock.clone(), log.clone(), Vec::new());

    // The burst: 6 timeouts of `pay` one second apart, with noise that no rule counts.
    for _ in 0..6 {
        router.record(&failed("pay", ErrorClass::Timeout));
        router.record(&failed("pay", ErrorClass::Network));
        router.record(&failed("refund", ErrorClass::Timeout));
        router.record(&Event::AttemptStarted { target: "pay".into(), attempt: 1 });
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(router.check().await, Some(1), "one incident open");
    pd.wait_for(1).await;
    slack.wait_for(1).await;

    // Half a window later the failures are still in it: nothing resolves.
    clock.advance(Duration::from_secs(30));
    assert_eq!(router.check().await, Some(1));
    // More of the same while open: still one incident.
    router.record(&failed("pay", ErrorClass::Timeout));
    assert_eq!(router.check().await, Some(1));
    // A whole quiet window after the last failure: resolved, once.
    clock.advance(Duration::from_secs(61));
    assert_eq!(router.check().await, Some(0));
    assert_eq!(router.check().await, Some(0));
    pd.wait_for(2).await;
    slack.wait_for(2).await;
    tasks.shutdown(Duration::from_secs(5)).await;

    let pages = pd.accepted();
    assert_eq!(pages.len(), 2, "{pages:#?}");
    assert_eq!(*pd.seen.lock().unwrap(), 3, "the 503 was retried once");
    let (trigger, resolve) = (&pages[0], &pages[1]);
    assert_eq!(trigger["event_action"], "trigger");
    assert_eq!(resolve["event_action"], "resolve");
    assert_eq!(trigger["routing_key"], "pd-routing-key-123");
    assert_eq!(trigger["dedup_key"], "keel/pay-timeouts/pay");
    assert_eq!(resolve["dedup_key"], trigger["dedup_key"]);
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], "keel");
    assert_eq!(trigger["payload"]["component"], "pay");
    assert_eq!(trigger["payload"]["custom_details"]["count"], 3);
    let summary = trigger["payload"]["summary"].as_str().unwrap();
    assert!(summary.contains("`timeout`") && summary.contains("`pay`"), "{summary}");

    let chats = slack.accepted();
    assert_eq!(chats.len(), 2, "{chats:#?}");
    let first = chats[0]["text"].as_str().unwrap();
    let second = chats[1]["text"].as_str().unwrap();
    assert!(first.starts_with(":rotating_light: [critical]") && first.contains("`pay`"), "{first}");
    assert!(second.starts_with(":white_check_mark:") && second.contains("resolved"), "{second}");

    // The record: the incident opened, each sink's outcome (the black hole's a failure
    // after its retries), the resolve and its outcomes; all under one incident id.
    let lines = log.lines();
    let of = |kind: &str, sink: &str, action: &str| {
        lines.iter().filter(|l| l.0 == kind && l.2 == sink && l.3 == action).count()
    };
    assert_eq!(of("triggered", "", ""), 1, "{lines:#?}");
    assert_eq!(of("resolved", "", ""), 1, "{lines:#?}");
    for sink in ["pager", "chat"] {
        assert_eq!(of("delivered", sink, "trigger"), 1, "{lines:#?}");
        assert_eq!(of("delivered", sink, "resolve"), 1, "{lines:#?}");
    }
    assert_eq!(of("failed", "down", "trigger"), 1, "{lines:#?}");
    assert_eq!(of("failed", "down", "resolve"), 1, "{lines:#?}");
    let failed = lines.iter().find(|l| l.0 == "failed").unwrap();
    assert_eq!(failed.4, "timeout after 2 attempts", "{lines:#?}");
    assert_eq!(lines.len(), 8, "{lines:#?}");
    let entries = log.0.lock().unwrap();
    assert!(entries.iter().all(|e| e.incident == entries[0].incident), "{entries:#?}");
    assert!(entries[0].incident.starts_with("keel/pay-timeouts/pay@"), "{}", entries[0].incident);
    assert_eq!(lines[0].0, "triggered", "the trigger is recorded before any outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_rules_page_credentials_at_once_and_server_errors_at_a_rate() {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!("[sinks.hook]\nkind = \"webhook\"\nurl = \"{url}\"\n");
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let clock = ManualClock::new();
    let (router, tasks) = alert::spawn(alerts, clock.clone());
    // One 401 pages; four 5xx do not, the fifth does.
    router.record(&failed("crm", ErrorClass::Unauthorized));
    for _ in 0..4 {
        router.record(&failed("search", ErrorClass::ServerError));
    }
    assert_eq!(router.check().await, Some(1));
    router.record(&failed("search", ErrorClass::ServerError));
    // Classes whose `alerts()` is false never alert by default.
    for _ in 0..20 {
        router.record(&failed("search", ErrorClass::Timeout));
        router.record(&failed("search", ErrorClass::InvalidRequest));
    }
    router.record(&Event::BreakerTransition {
        target: "search".into(),
        from: BreakerState::Closed,
        to: BreakerState::Open,
    });
    assert_eq!(router.check().await, Some(2));
    hook.wait_for(2).await;
    tasks.shutdown(Duration::from_secs(5)).await;
    let got = hook.accepted();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["rule"], "default-unauthorized");
    assert_eq!(got[0]["severity"], "critical");
    assert_eq!(got[0]["target"], "crm");
    assert_eq!(got[1]["rule"], "default-server_error");
    assert_eq!(got[1]["count"], 5);
    assert_eq!(got[1]["action"], "trigger");
}

/// A drill's injected faults page nobody: an attempt marked `fault_injected` is not an
/// incident, however many there are; the first real failure still pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_page_nobody() {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!("[sinks.hook]\nkind = \"webhook\"\nurl = \"{url}\"\n");
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let clock = ManualClock::new();
    let (router, tasks) = alert::spawn(alerts, clock.clone());
    for _ in 0..20 {
        router.record(&Event::FaultInjected {
            target: "crm".into(),
            attempt: 1,
            fault: keel_core::fault::FaultKind::ServerError,
        });
        router.record(&failed("crm", ErrorClass::Unauthorized));
    }
    assert_eq!(router.check().await, Some(0), "a drill is not an incident");
    router.record(&failed("crm", ErrorClass::Unauthorized));
    assert_eq!(router.check().await, Some(1), "a real failure still pages");
    hook.wait_for(1).await;
    tasks.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn hostile_alert_configs_are_errors_naming_their_keys() {
    let check = |text: &str, key: &str| {
        let config: AlertsConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let errors = config.resolve(&|_| None).err().unwrap_or_else(|| panic!("accepted: {text}"));
        assert!(errors.iter().any(|e| e.key == key), "{text}: {errors:?}");
    };
    check("[sinks.p]\nkind = \"pagerduty\"\nurl = \"http://x\"\n", "sinks.p.routing_key_env");
    check(
        "[sinks.p]\nkind = \"pagerduty\"\nurl = \"http://x\"\nrouting_key_env = \"NOPE\"\n",
        "sinks.p.routing_key_env",
    );
    check("[sinks.s]\nkind = \"slack\"\n", "sinks.s.url");
    check("[sinks.s]\nkind = \"slack\"\nurl_env = \"NOPE\"\n", "sinks.s.url_env");
    check("[sinks.s]\nkind = \"slack\"\nurl = \"hooks.example\"\n", "sinks.s.url");
    check("[sinks.s]\nkind = \"slack\"\nurl = \"ftp://x\"\n", "sinks.s.url");
    check("[sinks.w]\nkind = \"webhook\"\nurl = \"http://x\"\nqueue = 0\n", "sinks.w.queue");
    check("[sinks.w]\nkind = \"webhook\"\nurl = \"http://x\"\ntimeout = \"0s\"\n", "sinks.w.timeout");
    check(
        "[sinks.w]\nkind = \"webhook\"\nurl = \"http://x\"\nretry = { max_attempts = 0 }\n",
        "sinks.w.retry.max_attempts",
    );
    let sink = "[sinks.w]\nkind = \"webhook\"\nurl = \"http://x\"\n";
    check(&format!("{sink}[[rules]]\nname = \"r\"\nthreshold = 0\n"), "rules[0].threshold");
    check(&format!("{sink}[[rules]]\nname = \"r\"\nwindow = \"0s\"\n"), "rules[0].window");
    check(&format!("{sink}[[rules]]\nname = \"r\"\nwindow = \"3650d\"\n"), "rules[0].window");
    check(
        &format!("{sink}[[rules]]\nname = \"r\"\nthreshold = 2\nresolve_below = 3\n"),
        "rules[0].resolve_below",
    );
    check(&format!("{sink}[[rules]]\nname = \"r\"\nsinks = [\"nope\"]\n"), "rules[0].sinks");
    check(&format!("{sink}[[rules]]\nname = \"r\"\n[[rules]]\nname = \"r\"\n"), "rules[1].name");
    check(&format!("{sink}[[rules]]\nname = \"\"\n"), "rules[0].name");
    check("[[rules]]\nname = \"r\"\n", "sinks");
    check(&format!("check_every = \"1ms\"\n{sink}"), "check_every");
    // Quiet hours and the digest.
    let quiet = |q: &str| format!("{sink}[[rules]]\nname = \"r\"\nquiet_hours = {q}\n");
    check(&quiet(r#"{ from = "25:00", to = "07:00" }"#), "rules[0].quiet_hours.from");
    check(&quiet(r#"{ from = "22:00", to = "7am" }"#), "rules[0].quiet_hours.to");
    check(&quiet(r#"{ from = "22:00", to = "22:00" }"#), "rules[0].quiet_hours.to");
    check(&quiet(r#"{ from = "22:00", to = "07:00", tz = "Europe/Paris" }"#), "rules[0].quiet_hours.tz");
    check(&format!("quiet_hours = {{ from = \"x\", to = \"07:00\" }}\n{sink}"), "quiet_hours.from");
    check(&format!("{sink}[digest]\nevery = \"1h\"\nsink = \"nope\"\n"), "digest.sink");
    check(&format!("{sink}[digest]\nevery = \"1s\"\nsink = \"w\"\n"), "digest.every");
    check(
        "[sinks.p]\nkind = \"pagerduty\"\nurl = \"http://x\"\nrouting_key_env = \"K\"\n\
         [digest]\nevery = \"1h\"\nsink = \"p\"\n",
        "digest.sink",
    );
    assert!(
        toml::from_str::<AlertsConfig>(&format!("{sink}[digest]\nevery = \"1h\"\nsink = \"w\"\nat = 1\n"))
            .is_err()
    );
    // A secret URL's problem is told without the URL.
    let config: AlertsConfig = toml::from_str("[sinks.s]\nkind = \"slack\"\nurl_env = \"U\"\n").unwrap();
    let errors = config.resolve(&|_| Some("gopher://secret-token-in-url".to_owned())).err().unwrap();
    assert!(!format!("{errors:?}").contains("secret-token"), "{errors:?}");
    // Unknown keys are refused by serde.
    assert!(
        toml::from_str::<AlertsConfig>("[sinks.s]\nkind = \"slack\"\nurl = \"http://x\"\nbogus = 1\n")
            .is_err()
    );
    assert!(toml::from_str::<AlertsConfig>("[sinks.s]\nkind = \"email\"\nurl = \"http://x\"\n").is_err());
}

/// 2026-12-03 at `hh:mm` UTC.
fn utc(h: u64, m: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_256_000 + h * 3600 + m * 60)
}

/// A webhook sink and two rules: `slow` (error, quiet 22:00–07:00 UTC, open for
/// `window`) and `down` (critical, the same quiet hours, which it ignores).
async fn quiet_setup(
    window: &str,
) -> (Fake, Arc<ManualClock>, Arc<MemoryLog>, alert::AlertTasks, Arc<alert::AlertRouter>) {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!(
        r#"
quiet_hours = {{ from = "22:00", to = "07:00" }}

[sinks.hook]
kind = "webhook"
url = "{url}"

[[rules]]
name = "slow"
classes = ["timeout"]
window = "{window}"

[[rules]]
name = "down"
classes = ["server_error"]
severity = "critical"
"#
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap_or_else(|e| panic!("{e:?}"));
    let clock = ManualClock::at(utc(23, 0));
    let log = Arc::new(MemoryLog::default());
    let (router, tasks) = alert::spawn_logged(alerts, clock.clone(), log.clone(), Vec::new());
    (hook, clock, log, tasks, router)
}

/// A critical incident on a fresh target: once its trigger arrives, everything
/// pushed to the (ordered) sink before it has arrived too.
async fn barrier(router: &alert::AlertRouter, hook: &Fake, n: usize) {
    let target = format!("barrier-{n}");
    router.record(&failed(&target, ErrorClass::ServerError));
    router.check().await;
    hook.wait_until(&target, |got| got.iter().any(|g| g["target"] == target.as_str())).await;
}

/// The rules of the triggers accepted, in order.
fn triggered(hook: &Fake) -> Vec<String> {
    hook.accepted()
        .iter()
        .filter(|g| g["action"] == "trigger")
        .map(|g| format!("{}:{}", g["rule"].as_str().unwrap(), g["target"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_hold_a_trigger_until_morning_and_critical_pages_at_once() {
    let (hook, clock, log, tasks, router) = quiet_setup("12h").await;
    // 23:00: a timeout (held until 07:00) and a critical 5xx (pages now).
    router.record(&failed("pay", ErrorClass::Timeout));
    router.record(&failed("crm", ErrorClass::ServerError));
    assert_eq!(router.check().await, Some(2), "both incidents are open");
    hook.wait_for(1).await;
    assert_eq!(hook.accepted()[0]["severity"], "critical");
    // 06:59, still quiet: the held trigger is not sent.
    clock.advance(Duration::from_secs(7 * 3600 + 59 * 60));
    router.check().await;
    barrier(&router, &hook, 1).await;
    assert_eq!(triggered(&hook), ["down:crm", "down:barrier-1"]);
    // 07:00: over; the incident is still open (a 12h window): its trigger goes now.
    clock.advance(Duration::from_secs(60));
    router.check().await;
    barrier(&router, &hook, 2).await;
    assert_eq!(triggered(&hook), ["down:crm", "down:barrier-1", "slow:pay", "down:barrier-2"]);
    let got = hook.accepted();
    let slow = got.iter().find(|g| g["rule"] == "slow").unwrap();
    assert_eq!(slow["count"], 1, "{got:#?}");
    assert_eq!(got.iter().filter(|g| g["rule"] == "slow").count(), 1, "{got:#?}");
    tasks.shutdown(Duration::from_secs(5)).await;
    let lines: Vec<_> = log.lines().into_iter().filter(|l| l.1 == "slow").collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(kinds, ["triggered", "held", "released", "delivered"], "{lines:#?}");
    assert_eq!(lines[1].4, "until 2026-12-04T07:00:00Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_in_quiet_hours_cancels_the_held_trigger() {
    let (hook, clock, log, tasks, router) = quiet_setup("60s").await;
    for _ in 0..3 {
        router.record(&failed("pay", ErrorClass::Timeout));
    }
    assert_eq!(router.check().await, Some(1));
    // 23:01: a quiet window; the incident resolves while its trigger is held.
    clock.advance(Duration::from_secs(61));
    assert_eq!(router.check().await, Some(0));
    // The morning: nothing for `slow` is sent, neither trigger nor resolve.
    clock.advance(Duration::from_secs(8 * 3600));
    router.check().await;
    barrier(&router, &hook, 1).await;
    tasks.shutdown(Duration::from_secs(5)).await;
    let got = hook.accepted();
    assert_eq!(got.len(), 1, "only the barrier: {got:#?}");
    assert_eq!(got[0]["rule"], "down");
    let kinds: Vec<String> = log.lines().into_iter().filter(|l| l.1 == "slow").map(|l| l.0).collect();
    assert_eq!(kinds, ["triggered", "held", "cancelled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_quiet_hours_a_rule_pages_at_once() {
    let (hook, clock, _log, tasks, router) = quiet_setup("60s").await;
    clock.advance(Duration::from_secs(9 * 3600)); // 08:00
    router.record(&failed("pay", ErrorClass::Timeout));
    router.check().await;
    hook.wait_for(1).await;
    tasks.shutdown(Duration::from_secs(5)).await;
    assert_eq!(hook.accepted()[0]["rule"], "slow");
}

fn exhausted(target: &str, class: ErrorClass) -> Event {
    Event::RetryRefused {
        target: target.into(),
        attempt: 3,
        class,
        reason: keel_core::RefusalReason::AttemptsExhausted { max_attempts: 3 },
    }
}

/// The digest: one delivery an hour summing, by class and target, the failures that
/// told nobody; nothing for a quiet hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digest_sums_what_paged_nobody_and_skips_an_empty_period() {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!(
        r#"
[sinks.hook]
kind = "webhook"
url = "{url}"

[digest]
every = "1h"
sink = "hook"

[[rules]]
name = "pay-timeouts"
classes = ["timeout"]
targets = ["pay"]
threshold = 3
window = "60s"

[[rules]]
name = "auth"
classes = ["unauthorized"]
"#
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap_or_else(|e| panic!("{e:?}"));
    let clock = ManualClock::new();
    let (router, tasks) = alert::spawn(alerts, clock.clone());
    for _ in 0..2 {
        router.record(&failed("crm", ErrorClass::Timeout));
    }
    router.record(&exhausted("crm", ErrorClass::Timeout));
    router.record(&failed("pay", ErrorClass::Network));
    // `pay`'s timeouts open an incident: told, so not in the digest, nor while open.
    for _ in 0..4 {
        router.record(&failed("pay", ErrorClass::Timeout));
    }
    router.record(&exhausted("pay", ErrorClass::Timeout));
    assert_eq!(router.check().await, Some(1));
    hook.wait_for(1).await;
    clock.advance(Duration::from_secs(30 * 60));
    router.check().await;
    clock.advance(Duration::from_secs(30 * 60));
    router.check().await;
    hook.wait_for(3).await; // the resolve, then the digest
    let got = hook.accepted();
    let digest = &got[2];
    assert_eq!(digest["action"], "digest", "{got:#?}");
    assert_eq!((digest["failures"].as_u64(), digest["exhausted"].as_u64()), (Some(3), Some(1)), "{digest:#}");
    assert_eq!(digest["period"], "1h");
    let entries: Vec<(&str, &str, u64, u64)> = digest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["class"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                e["failures"].as_u64().unwrap(),
                e["exhausted"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(entries, [("timeout", "crm", 2, 1), ("network", "pay", 1, 0)]);
    assert_eq!(digest["from"], "2027-01-15T08:00:00Z");
    assert_eq!(digest["to"], "2027-01-15T09:00:00Z");
    // A quiet hour: no digest. (The barrier's own failure opens an incident: told.)
    clock.advance(Duration::from_secs(3600));
    router.check().await;
    router.record(&failed("crm", ErrorClass::Unauthorized));
    router.check().await;
    hook.wait_for(4).await;
    tasks.shutdown(Duration::from_secs(5)).await;
    let got = hook.accepted();
    assert_eq!(got.len(), 4, "{got:#?}");
    assert_eq!(got[3]["rule"], "auth");
    assert_eq!(got.iter().filter(|g| g["action"] == "digest").count(), 1);
}

/// A full queue drops its oldest delivery, and the record says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_is_recorded() {
    let (hole, _hole) = black_hole().await;
    let text = format!(
        "[sinks.down]\nkind = \"webhook\"\nurl = \"{hole}\"\ntimeout = \"20ms\"\nqueue = 1\n\
         retry = {{ max_attempts = 1 }}\n[[rules]]\nname = \"all\"\n"
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let log = Arc::new(MemoryLog::default());
    let (router, tasks) = alert::spawn_logged(alerts, ManualClock::new(), log.clone(), Vec::new());
    for n in 0..5 {
        router.record(&failed(&format!("t{n}"), ErrorClass::Timeout));
    }
    assert_eq!(router.check().await, Some(5));
    tasks.shutdown(Duration::from_secs(5)).await;
    let lines = log.lines();
    let count = |kind: &str| lines.iter().filter(|l| l.0 == kind).count();
    assert_eq!(count("triggered"), 5);
    assert!(count("dropped") >= 3, "{lines:#?}");
    assert_eq!(count("dropped") + count("failed"), 5, "every delivery has one outcome: {lines:#?}");
}

/// After a restart (issue 17): the incidents the record holds open are taken over —
/// no second trigger, a resolve under the old id once a window is quiet, a trigger
/// that was held stays unsent (and is cancelled by the resolve), an incident of a rule
/// that is gone is closed in the record without a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incidents_open_before_a_restart_are_taken_over() {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!(
        r#"
quiet_hours = {{ from = "22:00", to = "07:00" }}

[sinks.hook]
kind = "webhook"
url = "{url}"

[[rules]]
name = "slow"
classes = ["timeout"]
window = "60s"

[[rules]]
name = "down"
classes = ["server_error"]
severity = "critical"
window = "60s"
"#
    );
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap_or_else(|e| panic!("{e:?}"));
    let open = |id: &str, rule: &str, key: &str, class: ErrorClass, held: bool| alert::OpenIncident {
        id: id.into(),
        rule: rule.into(),
        key: key.into(),
        class: Some(class),
        target: Some(key.into()),
        count: 1,
        held,
    };
    let before = vec![
        open("keel/slow/pay@1", "slow", "pay", ErrorClass::Timeout, true),
        open("keel/down/crm@1", "down", "crm", ErrorClass::ServerError, false),
        open("keel/gone/x@1", "gone", "x", ErrorClass::Network, false),
    ];
    let clock = ManualClock::at(utc(23, 0));
    let log = Arc::new(MemoryLog::default());
    let (router, tasks) = alert::spawn_logged(alerts, clock.clone(), log.clone(), before);
    assert_eq!(router.check().await, Some(2), "two taken over; the third's rule is gone");
    // Failures of an adopted incident: no second trigger.
    router.record(&failed("crm", ErrorClass::ServerError));
    router.record(&failed("pay", ErrorClass::Timeout));
    assert_eq!(router.check().await, Some(2));
    clock.advance(Duration::from_secs(61));
    assert_eq!(router.check().await, Some(0));
    barrier(&router, &hook, 1).await;
    tasks.shutdown(Duration::from_secs(5)).await;
    let got = hook.accepted();
    let sent: Vec<String> = got
        .iter()
        .map(|g| {
            format!(
                "{}:{}:{}",
                g["action"].as_str().unwrap(),
                g["rule"].as_str().unwrap(),
                g["key"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(sent, ["resolve:down:crm", "trigger:down:barrier-1"], "{got:#?}");
    assert_eq!(got[0]["dedup_key"], "keel/down/crm");
    let entries = log.0.lock().unwrap().clone();
    let of = |id: &str| -> Vec<&str> {
        entries.iter().filter(|e| e.incident == id && e.sink.is_none()).map(|e| e.kind.as_str()).collect()
    };
    assert_eq!(of("keel/down/crm@1"), ["adopted", "resolved"], "{entries:#?}");
    assert_eq!(of("keel/slow/pay@1"), ["adopted", "cancelled"], "{entries:#?}");
    assert_eq!(of("keel/gone/x@1"), ["resolved"], "{entries:#?}");
    assert!(entries.iter().any(|e| e.incident == "keel/down/crm@1" && e.kind.as_str() == "delivered"));
}

/// The README's `[alerts]` example is a valid config (quiet hours and digest included).
#[test]
fn the_readmes_alerts_example_resolves() {
    let readme = include_str!("../../../../README.md");
    let section = &readme[readme.find("## Traces and alerts").unwrap()..];
    let block = section.split("```toml").nth(1).unwrap().split("```").next().unwrap();
    let whole: toml::Table = toml::from_str(block).unwrap();
    let config: AlertsConfig = whole["alerts"].clone().try_into().unwrap();
    let env = |var: &str| match var {
        "PD_ROUTING_KEY" => Some("key".to_owned()),
        "SLACK_WEBHOOK_URL" => Some("https://hooks.slack.invalid/T0/B0/x".to_owned()),
        _ => None,
    };
    let alerts = config.resolve(&env).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(alerts.rules.len(), 2);
    assert!(alerts.rules.iter().all(|r| r.quiet.is_some()), "the default applies where none is set");
    assert_eq!(alerts.rules[1].quiet.unwrap().offset, 60);
    assert_eq!(alerts.digest.as_ref().map(|d| d.every), Some(Duration::from_secs(3600)));
}

/// A digest for Slack is one message: the totals, a line per entry (escaped), and how
/// many more there were past the first 50.
#[test]
fn a_slack_digest_is_one_message_with_a_line_per_entry() {
    use alert::digest::{DigestEntry, DigestReport};
    use alert::sink::{Action, Delivery, payload};
    let config: AlertsConfig =
        toml::from_str("[sinks.chat]\nkind = \"slack\"\nurl = \"http://127.0.0.1:1/hook\"\n").unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut entries =
        vec![DigestEntry { class: ErrorClass::Timeout, target: "<pay>".into(), failures: 7, exhausted: 2 }];
    entries.extend((0..60).map(|n| DigestEntry {
        class: ErrorClass::Network,
        target: format!("t{n}"),
        failures: 1,
        exhausted: 0,
    }));
    let report = DigestReport { from: t0, to: t0 + Duration::from_secs(3600), entries };
    let d = Delivery {
        action: Action::Digest,
        rule: "digest".into(),
        key: "1h".into(),
        dedup_key: "keel/digest/1".into(),
        class: None,
        target: None,
        severity: alert::Severity::Info,
        count: 69,
        window: Duration::from_secs(3600),
        incident: "digest@1".into(),
        digest: Some(Arc::new(report)),
    };
    let body = payload(&alerts.sinks[0], &d);
    let text = body["text"].as_str().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        ":bar_chart: keel: 67 failures outside incidents and 2 exhausted retries from \
         2027-01-15T08:00:00Z to 2027-01-15T09:00:00Z"
    );
    assert_eq!(lines[1], "• `timeout` of `&lt;pay&gt;`: 7 failed, 2 exhausted");
    assert_eq!(lines.len(), 1 + 50 + 1, "{text}");
    assert_eq!(*lines.last().unwrap(), "… and 11 more");
}
