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
use keel_telemetry::alert::{self, AlertsConfig};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Time that moves only when the test says.
#[derive(Debug)]
struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + *self.offset.lock().unwrap()
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
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.accepted.lock().unwrap().len() >= n {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), wait).await.is_err() {
            panic!("waited for {n} deliveries, got {:?}", self.accepted());
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
    let clock = Arc::new(ManualClock { base: Instant::now(), offset: Mutex::default() });
    let (router, tasks) = alert::spawn(alerts, clock.clone());

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_rules_page_credentials_at_once_and_server_errors_at_a_rate() {
    let hook = Fake::default();
    let url = hook.start(StatusCode::OK, 0).await;
    let text = format!("[sinks.hook]\nkind = \"webhook\"\nurl = \"{url}\"\n");
    let config: AlertsConfig = toml::from_str(&text).unwrap();
    let alerts = config.resolve(&|_| None).unwrap();
    let clock = Arc::new(ManualClock { base: Instant::now(), offset: Mutex::default() });
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
    let clock = Arc::new(ManualClock { base: Instant::now(), offset: Mutex::default() });
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
