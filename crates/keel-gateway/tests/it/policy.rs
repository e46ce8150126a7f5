//! Whole answers: pass-through, retries, fallbacks, breaker, budgets, accounting.

use std::time::Duration;

use keel_core::event::{DelayReason, Event};
use keel_core::{BudgetConfig, BudgetKind, ErrorClass};
use keel_gateway::GatewayConfig;
use serde_json::json;

use std::sync::Arc;

use crate::support::{Fake, ManualClock, Reply, ask, model, post_chat, serve, serve_clocked, serve_with};

#[tokio::test]
async fn a_plain_completion_passes_every_field_through_and_names_the_model() {
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "gpt-4o-mini"))]).await;
    let body = json!({
        "model": "gpt", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}, "temperature": 0.1, "x_vendor": {"a": 1},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    });
    let a = post_chat(&served.url, body, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["model"], "gpt", "the answer names the Keel model that answered");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(v["system_fingerprint"], "fp_fake", "unknown answer fields pass through");
    assert_eq!(v["usage"]["total_tokens"], 12);
    assert_eq!(
        (a.header("x-keel-model"), a.header("x-keel-attempts"), a.header("x-keel-fallback")),
        ("gpt", "1", "false")
    );
    let seen = &fake.seen()[0].body;
    assert_eq!(seen["model"], "gpt-4o-mini");
    assert_eq!(seen["response_format"]["type"], "json_object");
    assert_eq!(seen["x_vendor"]["a"], 1);
    assert_eq!(seen["tools"][0]["function"]["name"], "f");
    let record = &served.journal.records()[0];
    assert!(
        matches!(&record.prompt, keel_gateway::journal::Prompt::Hashed(h) if h.starts_with("sha256:") && h.len() == 71)
    );
    assert_eq!(record.answered_by.as_deref(), Some("gpt"));
}

#[tokio::test]
async fn models_are_listed_and_unknown_ones_are_not_found() {
    let fake = Fake::start().await;
    let served = serve(vec![("a", model(&fake, "m")), ("b", model(&fake, "m"))]).await;
    let list: serde_json::Value =
        reqwest::get(format!("{}/v1/models", served.url)).await.unwrap().json().await.unwrap();
    assert_eq!(
        list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let a = post_chat(&served.url, ask("nope"), &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["keel_class"], "not_found");
    let bad = post_chat(&served.url, json!({"model": "a"}), &[]).await;
    assert_eq!((bad.status, bad.json()["error"]["keel_class"].as_str()), (400, Some("invalid_request")));
    assert_eq!(fake.hits(), 0);
}

#[tokio::test]
async fn a_429_waits_as_long_as_retry_after_says() {
    let fake = Fake::start().await;
    fake.script([Reply::Status {
        code: 429,
        retry_after: Some("1"),
        body: r#"{"error":{"message":"slow down"}}"#,
    }]);
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-attempts")), (200, "2"), "{}", a.text);
    let waits: Vec<_> = served
        .events
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RetryScheduled { class, delay, reason, .. } => Some((class, delay, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(waits, [(ErrorClass::RateLimited, Duration::from_secs(1), DelayReason::RetryAfter)]);
}

#[tokio::test]
async fn a_persistent_429_backs_off_then_falls_back() {
    let primary = Fake::start().await;
    primary.always(Reply::Status { code: 429, retry_after: None, body: "{}" });
    let backup = Fake::start().await;
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        (a.header("x-keel-model"), a.header("x-keel-fallback"), a.header("x-keel-attempts")),
        ("backup", "true", "4")
    );
    assert_eq!(primary.hits(), 3, "max_attempts on the primary, then the fallback");
    let floors = served.events.events().into_iter().filter_map(|e| match e {
        Event::RetryScheduled { delay, .. } => Some(delay),
        _ => None,
    });
    for delay in floors {
        assert!(
            delay >= Duration::from_millis(5),
            "a 429 without Retry-After waits at least the floor: {delay:?}"
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_and_the_fallback_answers_with_its_own_usage() {
    let primary = Fake::start().await;
    primary.script([Reply::Status { code: 500, retry_after: None, body: "oops" }]);
    let served = serve(vec![("gpt", model(&primary, "m"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-attempts")), (200, "2"));

    primary.always(Reply::Status { code: 503, retry_after: None, body: "down" });
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["from", " backup", " model"]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    let v = a.json();
    assert_eq!((v["model"].as_str(), v["usage"]["completion_tokens"].as_u64()), (Some("backup"), Some(3)));
    let m = served.gateway.metrics();
    assert_eq!(m.models["gpt"].fallbacks_from, 1);
    assert_eq!(m.models["gpt"].attempt_failures[&ErrorClass::ServerError], 3);
    assert_eq!(
        (m.models["backup"].answered, m.models["gpt"].answered),
        (1, 0),
        "failed attempts are not billed"
    );
    let record = &served.journal.records()[0];
    assert_eq!((record.failures.len(), record.failures[0].class), (1, ErrorClass::ServerError));
}

#[tokio::test]
async fn a_hung_model_with_a_fallback_is_left_at_once() {
    let primary = Fake::start().await;
    primary.always(Reply::Hang);
    let backup = Fake::start().await;
    let mut gpt = model(&primary, "m");
    gpt.policy.timeout = Duration::from_millis(300);
    gpt.fallbacks = vec!["backup".into()];
    let served = serve(vec![("gpt", gpt), ("backup", model(&backup, "b"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-model")), (200, "backup"));
    assert_eq!(primary.hits(), 1, "a timeout is not retried when a fallback can answer");

    // Without a fallback, the timeout is retried, then reported as a timeout.
    let mut alone = model(&primary, "m");
    alone.policy.timeout = Duration::from_millis(200);
    alone.policy.retry.max_attempts = 2;
    let served = serve(vec![("alone", alone)]).await;
    let a = post_chat(&served.url, ask("alone"), &[]).await;
    assert_eq!(
        (a.status, a.json()["error"]["keel_class"].as_str(), a.header("x-keel-attempts")),
        (504, Some("timeout"), "2")
    );
}

#[tokio::test]
async fn malformed_json_is_a_server_error_that_is_retried() {
    let fake = Fake::start().await;
    fake.script([Reply::Malformed]);
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-attempts")), (200, "2"));
    assert_eq!(served.gateway.metrics().models["gpt"].attempt_failures[&ErrorClass::ServerError], 1);
}

#[tokio::test]
async fn context_overflow_goes_to_the_larger_model_and_is_never_retried() {
    let small = Fake::start().await;
    small.always(Reply::Status {
        code: 400,
        retry_after: None,
        body: r#"{"error":{"code":"context_length_exceeded","message":"This model's maximum context length is 8192 tokens"}}"#,
    });
    let large = Fake::start().await;
    let other = Fake::start().await;
    let mut gpt = model(&small, "small");
    gpt.context_fallback = Some("large".into());
    gpt.fallbacks = vec!["other".into()];
    let served =
        serve(vec![("gpt", gpt.clone()), ("large", model(&large, "l")), ("other", model(&other, "o"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-model")), (200, "large"));
    assert_eq!((small.hits(), other.hits()), (1, 0));

    gpt.context_fallback = None;
    let served = serve(vec![("gpt", gpt), ("other", model(&other, "o"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(a.status, 400, "no context fallback: a clean failure, not the generic chain");
    assert_eq!(a.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(other.hits(), 0);
}

#[tokio::test]
async fn a_content_policy_rejection_keeps_its_reason_or_takes_the_content_fallback() {
    let strict = Fake::start().await;
    strict.always(Reply::Status {
        code: 400,
        retry_after: None,
        body: r#"{"error":{"code":"content_policy_violation","message":"Your request was rejected by the safety system"}}"#,
    });
    let lenient = Fake::start().await;
    let served = serve(vec![("gpt", model(&strict, "s"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], "content_policy_violation");
    assert!(
        a.json()["error"]["message"].as_str().unwrap().contains("rejected by the safety system"),
        "{}",
        a.text
    );

    let mut gpt = model(&strict, "s");
    gpt.content_fallback = Some("lenient".into());
    let served = serve(vec![("gpt", gpt), ("lenient", model(&lenient, "l"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-model")), (200, "lenient"));

    // A refusal inside a 200 answer, without a content fallback, reaches the agent as is.
    strict.always(Reply::Refused("I can't help with that."));
    let served = serve(vec![("gpt", model(&strict, "s"))]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(
        (a.status, a.json()["choices"][0]["message"]["refusal"].as_str()),
        (200, Some("I can't help with that."))
    );
}

#[tokio::test]
async fn the_breaker_opens_serves_from_the_fallback_and_returns_to_the_primary() {
    let primary = Fake::start().await;
    primary.always(Reply::Status { code: 500, retry_after: None, body: "down" });
    let backup = Fake::start().await;
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    gpt.policy.retry.max_attempts = 1;
    gpt.policy.breaker.min_calls = 4;
    gpt.policy.breaker.open_for = Duration::from_millis(300);
    gpt.policy.breaker.half_open_probes = 1;
    let clock = Arc::new(ManualClock::new());
    let models = vec![("gpt", gpt), ("backup", model(&backup, "b"))];
    let served = serve_clocked(models, GatewayConfig::default(), clock.clone()).await;
    for _ in 0..4 {
        assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.header("x-keel-model"), "backup");
    }
    assert_eq!(served.gateway.breaker("gpt").unwrap().state(), keel_core::BreakerState::Open);
    for _ in 0..5 {
        assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.header("x-keel-model"), "backup");
    }
    assert_eq!(primary.hits(), 4, "an open breaker fails fast: the primary is not called");

    // The primary recovers; once `open_for` has passed, a probe goes through and
    // closes the breaker: traffic is back on the primary.
    primary.always(Reply::Text(vec!["back"]));
    clock.advance(Duration::from_secs(1));
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(a.header("x-keel-model"), "gpt");
    assert_eq!(served.gateway.breaker("gpt").unwrap().state(), keel_core::BreakerState::Closed);
    assert_eq!(primary.hits(), 5, "one probe, which closed the breaker");
}

/// With a model's default breaker, a primary that recovers gets its traffic back
/// within 10 s, even when a probe failed during the outage; the failed probe costs its
/// caller one attempt and no wait: the call moves on to the fallback at once.
#[tokio::test]
async fn a_recovered_primary_gets_its_traffic_back_within_ten_seconds() {
    let primary = Fake::start().await;
    primary.always(Reply::Status { code: 500, retry_after: None, body: "down" });
    let backup = Fake::start().await;
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    gpt.policy.breaker.min_calls = 4;
    let (open_for, probes) = (gpt.policy.breaker.open_for, gpt.policy.breaker.half_open_probes);
    assert!(open_for <= Duration::from_secs(5), "the model default: {open_for:?}");
    let clock = Arc::new(ManualClock::new());
    let models = vec![("gpt", gpt), ("backup", model(&backup, "b"))];
    let served = serve_clocked(models, GatewayConfig::default(), clock.clone()).await;
    let breaker = || served.gateway.breaker("gpt").unwrap().state();
    while breaker() != keel_core::BreakerState::Open {
        assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.header("x-keel-model"), "backup");
        assert!(primary.hits() <= 20, "the breaker never opened");
    }

    // Still down when the breaker lets a probe through: the probe fails, the call is
    // answered by the backup with no retry on the primary, and the breaker reopens.
    clock.advance(open_for);
    let before = primary.hits();
    let started = tokio::time::Instant::now();
    assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.header("x-keel-model"), "backup");
    assert_eq!(primary.hits(), before + 1, "one probe, no retry into the reopened breaker");
    assert!(started.elapsed() < Duration::from_secs(5), "no backoff was waited out");
    assert_eq!(breaker(), keel_core::BreakerState::Open);

    // It recovers now. Within 10 s its calls are answered by it again.
    primary.always(Reply::Text(vec!["back"]));
    clock.advance(open_for);
    assert!(open_for <= Duration::from_secs(10));
    for _ in 0..probes {
        assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.header("x-keel-model"), "gpt");
    }
    assert_eq!(breaker(), keel_core::BreakerState::Closed);
}

#[tokio::test]
async fn run_budgets_are_reserved_from_max_tokens_and_settled_from_usage() {
    let fake = Fake::start().await;
    let mut gpt = model(&fake, "m");
    gpt.prices = keel_gateway::Prices { input_per_mtok: 1.0, output_per_mtok: 2.0 };
    let config = GatewayConfig {
        run_budget: BudgetConfig { tokens: Some(1000), ..BudgetConfig::default() },
        ..GatewayConfig::default()
    };
    let served = serve_with(vec![("gpt", gpt)], config).await;
    let mut body = ask("gpt");
    body["max_tokens"] = json!(100);
    let a = post_chat(&served.url, body.clone(), &[("x-keel-run", "run-1")]).await;
    assert_eq!(a.status, 200);
    let budget = served.gateway.run_budget("run-1").unwrap();
    assert_eq!(budget.used(BudgetKind::Tokens), 12, "settled to the real usage");
    assert_eq!(budget.used(BudgetKind::CostMicros), 10 + 2 * 2);

    // A request whose token limit cannot fit is refused before any upstream call.
    body["max_tokens"] = json!(5000);
    let a = post_chat(&served.url, body.clone(), &[("x-keel-run", "run-1")]).await;
    assert_eq!((a.status, a.json()["error"]["keel_class"].as_str()), (429, Some("budget_exceeded")));
    assert_eq!(fake.hits(), 1);
    // Another run has its own budget.
    body["max_tokens"] = json!(100);
    assert_eq!(post_chat(&served.url, body, &[("x-keel-run", "run-2")]).await.status, 200);
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_budget() {
    let fake = Fake::start().await;
    let config = GatewayConfig {
        run_budget: BudgetConfig { tokens: Some(2000), ..BudgetConfig::default() },
        ..GatewayConfig::default()
    };
    let served = serve_with(vec![("gpt", model(&fake, "m"))], config).await;
    let mut body = ask("gpt");
    body["max_tokens"] = json!(300);
    let calls = (0..20).map(|_| post_chat(&served.url, body.clone(), &[("x-keel-run", "r")]));
    let answers = futures_util::future::join_all(calls).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!(ok >= 6, "{ok} of 20 fit");
    let used = served.gateway.run_budget("r").unwrap().used(BudgetKind::Tokens);
    assert_eq!(used, 12 * ok as u64, "every answer settled to its real usage");
    assert!(used <= 2000);
}

#[tokio::test]
async fn api_key_budgets_come_from_the_servers_extension() {
    let fake = Fake::start().await;
    let config = GatewayConfig {
        // One call's bound (the whole request's bytes / 3, plus max_tokens) fits, two do not.
        key_budget: BudgetConfig { tokens: Some(30), ..BudgetConfig::default() },
        ..GatewayConfig::default()
    };
    let served = serve_with(vec![("gpt", model(&fake, "m"))], config).await;
    let app = keel_gateway::router(served.gateway.clone())
        .layer(axum::Extension(keel_gateway::ApiKeyId("team-a".into())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut body = ask("gpt");
    body["max_tokens"] = json!(1);
    assert_eq!(post_chat(&url, body.clone(), &[]).await.status, 200);
    assert_eq!(served.gateway.key_budget("team-a").unwrap().used(BudgetKind::Tokens), 12);
    let a = post_chat(&url, body, &[]).await;
    assert_eq!(a.status, 429, "{}", a.text);
}

#[tokio::test]
async fn keys_come_from_the_environment_and_bad_configs_list_every_problem() {
    let fake = Fake::start().await;
    let mut keyed = model(&fake, "m");
    keyed.api_key_env = Some("FAKE_KEY".into());
    let served = serve(vec![("gpt", keyed.clone())]).await;
    assert_eq!(post_chat(&served.url, ask("gpt"), &[]).await.status, 200);
    assert_eq!(fake.seen()[0].headers["authorization"], "Bearer sk-test");

    keyed.api_key_env = Some("MISSING".into());
    keyed.fallbacks = vec!["ghost".into()];
    keyed.base_url = "ftp://api.example.com/v1".into();
    let models = [("gpt".to_owned(), keyed)].into_iter().collect();
    let e = keel_gateway::Gateway::builder(models).env(|_| None).build().unwrap_err();
    assert_eq!(e.problems.len(), 3, "{e}");
    assert!(e.to_string().contains("ghost") && e.to_string().contains("MISSING"), "{e}");
}

#[tokio::test]
async fn metrics_render_for_prometheus() {
    let fake = Fake::start().await;
    fake.script([Reply::Status { code: 500, retry_after: None, body: "x" }]);
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    post_chat(&served.url, ask("gpt"), &[]).await;
    let text = crate::support::prometheus(&served.gateway);
    assert!(text.contains("keel_gateway_requests_total{model=\"gpt\"} 1"), "{text}");
    assert!(text.contains("keel_gateway_attempts_total{model=\"gpt\"} 2"), "{text}");
    assert!(
        text.contains("keel_gateway_attempt_failures_total{model=\"gpt\",class=\"server_error\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn absurd_model_policies_are_refused_by_key() {
    let fake = Fake::start().await;
    let mut m = model(&fake, "m");
    m.policy.timeout = Duration::ZERO;
    m.policy.stall_timeout = Duration::MAX;
    m.policy.retry.max_attempts = 0;
    m.policy.breaker.failure_ratio = 1.5;
    let models = [("gpt".to_owned(), m)].into_iter().collect();
    let config = GatewayConfig {
        run_budget: BudgetConfig { cost_usd: Some(f64::NAN), ..Default::default() },
        ..Default::default()
    };
    let e = keel_gateway::Gateway::builder(models).config(config).build().unwrap_err();
    let mut keys: Vec<&str> = e.problems.iter().filter_map(|p| p.split_once(": ").map(|(k, _)| k)).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "gateway.run_budget.cost_usd",
            "models.gpt.policy.breaker.failure_ratio",
            "models.gpt.policy.retry.max_attempts",
            "models.gpt.policy.stall_timeout",
            "models.gpt.policy.timeout",
        ],
        "{e}"
    );
}

/// Every gateway series has its `# HELP`, costs are in dollars, and label values from
/// config are escaped by the one encoder.
#[tokio::test]
async fn gateway_series_have_help_and_base_units() {
    let fake = Fake::start().await;
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;
    post_chat(&served.url, ask("gpt"), &[]).await;
    let text = crate::support::prometheus(&served.gateway);
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or(""))
        .collect();
    assert!(names.len() > 10, "{text}");
    for name in names {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help:\n{text}");
        assert!(!name.contains("micro"), "{name}: base units only");
    }
    assert!(text.contains("keel_gateway_cost_dollars{model=\"gpt\"}"), "{text}");
    assert!(text.contains("keel_gateway_breaker_state{model=\"gpt\"} 0"), "{text}");
}
