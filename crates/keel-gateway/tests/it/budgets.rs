//! Budgets that hold against upstreams that behave like real ones: answers without
//! `usage`, answers Keel rejects, upstreams that ignore `max_tokens`, huge `tools`,
//! cut and stalled streams.
//!
//! Each scenario computes what the fake provider billed from its own log and checks
//! it against the budget plus the documented in-flight bound (see
//! `keel_core::budget`: when usage passes a reservation, no new call is admitted on
//! the budget until the calls in flight settle, so the overshoot is at most what the
//! calls already in flight spend beyond their reservations). Each also checks that
//! the budget, the journal and `/metrics` agree to the token.

use std::time::Duration;

use keel_core::{BudgetConfig, BudgetKind, ErrorClass, LoopGuardConfig};
use keel_gateway::{GatewayConfig, Prices};
use serde_json::{Value, json};

use crate::support::{Fake, Reply, Served, ask, ask_stream, model, post_chat, serve_with};

const RUN: &str = "budget-run";

fn run_budget(tokens: u64) -> GatewayConfig {
    GatewayConfig {
        run_budget: BudgetConfig { tokens: Some(tokens), ..BudgetConfig::default() },
        ..GatewayConfig::default()
    }
}

/// Prints the scenario's numbers (the table in the notes) and checks the bound.
fn report(name: &str, billed: u64, budget: u64, bound: u64) {
    eprintln!("BUDGET {name}: billed {billed} tokens, budget {budget}, in-flight bound {bound}");
    assert!(billed <= budget + bound, "{name}: billed {billed} > budget {budget} + bound {bound}");
}

/// The tokens the run's budget, the journal and `/metrics` counted: all the same.
fn counted(served: &Served) -> u64 {
    let budget = served.gateway.run_budget(RUN).map_or(0, |b| b.used(BudgetKind::Tokens));
    let journal: u64 = served
        .journal
        .records()
        .iter()
        .filter_map(|r| r.usage)
        .map(|u| u.prompt_tokens + u.completion_tokens)
        .sum();
    let m = served.gateway.metrics();
    let metrics: u64 = m.models.values().map(|m| m.prompt_tokens + m.completion_tokens).sum();
    assert_eq!((budget, journal), (metrics, metrics), "budget, journal and /metrics disagree");
    budget
}

async fn sequential(served: &Served, body: &Value, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(post_chat(&served.url, body.clone(), &[("x-keel-run", RUN)]).await.status);
    }
    out
}

#[tokio::test]
async fn an_answer_without_usage_is_charged_its_upper_bound() {
    for stream in [false, true] {
        let fake = Fake::start().await;
        fake.omit_usage().always(Reply::Long(40));
        let served = serve_with(vec![("gpt", model(&fake, "m"))], run_budget(1000)).await;
        let mut body = if stream { ask_stream("gpt") } else { ask("gpt") };
        body["max_tokens"] = json!(50);
        let statuses = sequential(&served, &body, 30).await;
        let ok = statuses.iter().filter(|s| **s == 200).count();
        let charged = counted(&served);
        report(if stream { "no usage, streamed" } else { "no usage, whole" }, fake.billed_tokens(), 1000, 0);
        assert!(ok >= 1 && statuses[ok..].iter().all(|s| *s == 429), "{statuses:?}");
        assert!(charged >= fake.billed_tokens(), "charged {charged} < billed {}", fake.billed_tokens());
    }
}

/// A chat request offering one tool, `get_weather(city)`.
fn weather_request() -> Value {
    json!({
        "model": "gpt", "max_tokens": 20,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    })
}

#[tokio::test]
async fn every_attempt_that_reached_the_provider_is_charged_corrections_included() {
    let fake = Fake::start().await;
    // A model that never fixes its arguments: 3 upstream calls a request with correct = 2.
    fake.always(Reply::Tool { name: "get_weather", args: "{\"city\": " });
    let mut gpt = model(&fake, "m");
    gpt.correct = 2;
    let served = serve_with(vec![("gpt", gpt)], run_budget(1000)).await;
    let body = weather_request();
    let statuses = sequential(&served, &body, 30).await;
    let charged = counted(&served);
    report("invalid tool arguments, correct = 2", fake.billed_tokens(), 1000, 0);
    assert_eq!(charged, fake.billed_tokens(), "every billed attempt charged, to the token");
    assert!(statuses.contains(&502) && statuses.last() == Some(&429), "{statuses:?}");
}

/// A correction that works: the rejected attempt and the answer are both charged, and
/// the client is told the whole charge (`x-keel-charged-*`) beside the answering
/// provider's own `usage`.
#[tokio::test]
async fn a_corrected_answer_charges_every_attempt_and_says_so() {
    let fake = Fake::start().await;
    fake.script([Reply::Tool { name: "get_weather", args: "{\"city\": " }])
        .always(Reply::Tool { name: "get_weather", args: "{\"city\": \"Paris\"}" });
    let mut gpt = model(&fake, "m");
    gpt.correct = 2;
    gpt.prices = Prices { input_per_mtok: 1.0, output_per_mtok: 2.0 };
    let served = serve_with(vec![("gpt", gpt)], run_budget(1000)).await;
    let body = weather_request();
    let a = post_chat(&served.url, body, &[("x-keel-run", RUN)]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("x-keel-corrections"), "1");
    assert_eq!(fake.hits(), 2);
    let charged = counted(&served);
    assert_eq!(charged, fake.billed_tokens(), "both attempts charged");
    assert_eq!(a.header("x-keel-charged-tokens"), charged.to_string(), "the client is told the whole charge");
    let cost = served.gateway.run_budget(RUN).unwrap().used(BudgetKind::CostMicros);
    assert_eq!(a.header("x-keel-charged-cost-micros"), cost.to_string());
    let own = a.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(own < charged, "the body's usage is the last attempt's: {own} of {charged}");
}

#[tokio::test]
async fn a_huge_tools_array_counts_in_the_prompt_estimate() {
    let fake = Fake::start().await;
    fake.prompt_by_size();
    let served = serve_with(vec![("gpt", model(&fake, "m"))], run_budget(5000)).await;
    let tools: Vec<Value> = (0..20)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"),
                "description": "x".repeat(200), "parameters": {"type": "object"}}})
        })
        .collect();
    let body = json!({"model": "gpt", "max_tokens": 10, "tools": tools,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
    assert!(body.to_string().len() > 4000);
    let statuses = sequential(&served, &body, 20).await;
    let charged = counted(&served);
    report("4 KB tools array", fake.billed_tokens(), 5000, 0);
    assert!(statuses.last() == Some(&429), "{statuses:?}");
    assert_eq!(charged, fake.billed_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_ignoring_max_tokens_overshoots_by_at_most_the_calls_in_flight() {
    // Whole answers and streams alike: a stream's usage comes in its last chunk.
    for stream in [false, true] {
        let fake = Fake::start().await;
        fake.always(Reply::Long(500));
        let served = serve_with(vec![("gpt", model(&fake, "m"))], run_budget(1000)).await;
        let mut body = if stream { ask_stream("gpt") } else { ask("gpt") };
        body["max_tokens"] = json!(10);
        let workers = 4;
        let calls = (0..workers).map(|_| sequential(&served, &body, 10));
        let statuses: Vec<u16> = futures_util::future::join_all(calls).await.into_iter().flatten().collect();
        let charged = counted(&served);
        // Each call in flight can spend what the upstream sends beyond its reservation.
        let bound = workers * 510;
        let what = if stream {
            "ignores max_tokens, streamed, 4 in flight"
        } else {
            "ignores max_tokens, 4 in flight"
        };
        report(what, fake.billed_tokens(), 1000, bound);
        assert_eq!(charged, fake.billed_tokens(), "{what}");
        assert!(statuses.iter().filter(|s| **s == 429).count() >= 30, "{what}: {statuses:?}");
    }
}

#[tokio::test]
async fn a_cut_stream_rescued_elsewhere_is_charged_for_both_attempts() {
    let primary = Fake::start().await;
    primary.always(Reply::Cut(vec!["Hel", "lo"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["Hel", "lo", " there"]));
    let mut gpt = model(&primary, "m");
    gpt.fallbacks = vec!["backup".into()];
    gpt.prices = Prices { input_per_mtok: 1.0, output_per_mtok: 2.0 };
    let mut b = model(&backup, "b");
    b.prices = Prices { input_per_mtok: 1.0, output_per_mtok: 2.0 };
    let served = serve_with(vec![("gpt", gpt), ("backup", b)], run_budget(1000)).await;
    let mut body = ask_stream("gpt");
    body["max_tokens"] = json!(20);
    let a = post_chat(&served.url, body.clone(), &[("x-keel-run", RUN)]).await;
    assert_eq!(a.streamed_text(), "Hello there");
    let billed = primary.billed_tokens() + backup.billed_tokens();
    let charged = counted(&served);
    report("cut stream, rescued by splice", billed, 1000, 0);
    assert!(charged >= billed, "charged {charged} < billed {billed}");
    // The client's final usage is what was charged.
    let events = a.events();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let told = usage["usage"]["prompt_tokens"].as_u64().unwrap()
        + usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(told, charged, "{usage}");
    // Money too: the budget's cost is the journal's and /metrics', and covers the bills.
    let prices = Prices { input_per_mtok: 1.0, output_per_mtok: 2.0 };
    let cost = served.gateway.run_budget(RUN).unwrap().used(BudgetKind::CostMicros);
    let metrics: u64 = served.gateway.metrics().models.values().map(|m| m.cost_micros).sum();
    let journal: u64 = served.journal.records().iter().map(|r| r.cost_micros).sum();
    assert_eq!((cost, journal), (metrics, metrics));
    assert!(cost >= primary.billed_micros(&prices) + backup.billed_micros(&prices));
}

#[tokio::test]
async fn a_stalled_stream_is_charged_its_upper_bound() {
    let fake = Fake::start().await;
    fake.always(Reply::Stall(vec!["Hel", "lo"]));
    let mut gpt = model(&fake, "m");
    gpt.policy.stall_timeout = Duration::from_millis(200);
    let served = serve_with(vec![("gpt", gpt)], run_budget(300)).await;
    let mut body = ask_stream("gpt");
    body["max_tokens"] = json!(50);
    let statuses = sequential(&served, &body, 10).await;
    let charged = counted(&served);
    report("stalled streams", fake.billed_tokens(), 300, 0);
    assert!(charged >= fake.billed_tokens());
    assert!(statuses.last() == Some(&429), "{statuses:?}");
}

#[tokio::test]
async fn streams_are_charged_to_the_attempt_budgets_like_whole_calls() {
    let fake = Fake::start().await;
    let config = GatewayConfig {
        run_budget: BudgetConfig { attempts: Some(10), ..BudgetConfig::default() },
        ..GatewayConfig::default()
    };
    let served = serve_with(vec![("gpt", model(&fake, "m"))], config).await;
    let busy = Reply::Status { code: 503, retry_after: None, body: "{}" };
    for (run, body) in [("whole", ask("gpt")), ("streamed", ask_stream("gpt"))] {
        fake.script([busy.clone()]);
        let a = post_chat(&served.url, body, &[("x-keel-run", run)]).await;
        assert_eq!((a.status, a.header("x-keel-attempts")), (200, "2"), "{}", a.text);
    }
    let used = |run| served.gateway.run_budget(run).unwrap().used(BudgetKind::Attempts);
    assert_eq!(
        (used("whole"), used("streamed")),
        (2, 2),
        "a stream's attempts are charged as a whole call's"
    );
}

#[tokio::test]
async fn a_budget_refusal_says_not_to_retry() {
    let fake = Fake::start().await;
    let served = serve_with(vec![("gpt", model(&fake, "m"))], run_budget(10)).await;
    for body in [ask("gpt"), ask_stream("gpt")] {
        let a = post_chat(&served.url, body, &[("x-keel-run", RUN)]).await;
        assert_eq!((a.status, a.json()["error"]["keel_class"].as_str()), (429, Some("budget_exceeded")));
        assert_eq!(a.header("x-should-retry"), "false");
        assert_eq!(a.header("retry-after"), "", "a budget over the process's life never refills");
    }
    assert_eq!(fake.hits(), 0);
    let refused = served.events.events().iter().filter(|e| e.kind() == "budget_exceeded").count();
    assert_eq!(refused, 2, "each refusal is an event (the journal's budget_exceeded)");
}

#[tokio::test]
async fn calls_the_budget_refused_are_not_turns() {
    let fake = Fake::start().await;
    let config = GatewayConfig {
        run_budget: BudgetConfig { attempts: Some(5), ..BudgetConfig::default() },
        loop_guard: LoopGuardConfig { max_turns_per_run: Some(50), ..LoopGuardConfig::default() },
        ..GatewayConfig::default()
    };
    let served = serve_with(vec![("gpt", model(&fake, "m"))], config).await;
    let mut last = None;
    for _ in 0..51 {
        last = Some(post_chat(&served.url, ask("gpt"), &[("x-keel-run", RUN)]).await);
    }
    let a = last.unwrap();
    assert_eq!(a.json()["error"]["keel_class"], ErrorClass::BudgetExceeded.as_str(), "{}", a.text);
    assert_eq!(fake.hits(), 5);
}

#[tokio::test]
async fn budgets_are_visible_in_metrics_while_calls_are_in_flight() {
    let fake = Fake::start().await;
    fake.script([Reply::Stall(vec!["Hel", "lo"])]);
    let served = serve_with(vec![("gpt", model(&fake, "m"))], run_budget(100)).await;
    let mut body = ask_stream("gpt");
    body["max_tokens"] = json!(40);
    // A stream that reached its first token holds its reservation.
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", served.url))
        .header("x-keel-run", RUN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    let m = served.gateway.metrics();
    let runs = &m.budgets["runs"];
    assert!(runs.reserved["tokens"] > 40, "{runs:?}");
    assert_eq!(runs.used["tokens"], runs.reserved["tokens"], "nothing settled yet");
    assert_eq!(runs.limit["tokens"], 100);
    // A second call does not fit beside it: refused, and counted.
    let a = post_chat(&served.url, body.clone(), &[("x-keel-run", RUN)]).await;
    assert_eq!(a.status, 429, "{}", a.text);
    let text = crate::support::prometheus(&served.gateway);
    for line in [
        "keel_gateway_budget_refusals_total{budget=\"runs\"} 1",
        "keel_gateway_budget_limit{budget=\"runs\",kind=\"tokens\"} 100",
        "keel_gateway_budget_held{budget=\"runs\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("keel_gateway_budget_reserved{budget=\"runs\",kind=\"tokens\"} "), "{text}");
    drop(resp);
}

#[tokio::test]
async fn after_an_overshoot_no_call_is_admitted_until_the_calls_in_flight_settle() {
    let fake = Fake::start().await;
    fake.script([Reply::Stall(vec!["Hel", "lo"]), Reply::Long(500)]);
    let mut gpt = model(&fake, "m");
    gpt.policy.stall_timeout = Duration::from_millis(300);
    let served = serve_with(vec![("gpt", gpt)], run_budget(1000)).await;
    let mut streamed = ask_stream("gpt");
    streamed["max_tokens"] = json!(10);
    let mut whole = ask("gpt");
    whole["max_tokens"] = json!(10);
    // A: a stream in flight.
    let mut a = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", served.url))
        .header("x-keel-run", RUN)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert!(a.chunk().await.unwrap().is_some());
    // B: an upstream that ignores max_tokens spends 510 on a reservation of ~40.
    assert_eq!(post_chat(&served.url, whole.clone(), &[("x-keel-run", RUN)]).await.status, 200);
    let budget = served.gateway.run_budget(RUN).unwrap();
    assert!(budget.is_held() && budget.used(BudgetKind::Tokens) < 700, "{budget:?}");
    // C would fit the balance, but the budget holds while A is in flight.
    let c = post_chat(&served.url, whole.clone(), &[("x-keel-run", RUN)]).await;
    assert_eq!(c.status, 429, "{}", c.text);
    assert!(c.json()["error"]["message"].as_str().unwrap().contains("held"), "{}", c.text);
    // A ends (its upstream stalled: an error event) and settles at its bound.
    while a.chunk().await.unwrap().is_some() {}
    assert!(!budget.is_held());
    // D is admitted again on the real balance.
    assert_eq!(post_chat(&served.url, whole, &[("x-keel-run", RUN)]).await.status, 200);
    let charged = counted(&served);
    report("overshoot, then held", fake.billed_tokens(), 1000, 0);
    assert!(charged >= fake.billed_tokens());
}

/// Waits (bounded) for the journal to hold `n` call records.
async fn journaled(served: &Served, n: usize) -> Vec<keel_gateway::CallRecord> {
    for _ in 0..500 {
        let records = served.journal.records();
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the journal never held {n} records: {:?}", served.journal.records());
}

#[tokio::test]
async fn a_client_that_leaves_during_a_stall_is_not_rescued() {
    let primary = Fake::start().await;
    primary.always(Reply::Stall(vec!["Hel", "lo"]));
    let backup = Fake::start().await;
    backup.always(Reply::Text(vec!["never", " read"]));
    let mut gpt = model(&primary, "m");
    // A stall far longer than the test's bound: the end must come from the client.
    gpt.policy.stall_timeout = Duration::from_secs(600);
    gpt.fallbacks = vec!["backup".into()];
    let served = serve_with(vec![("gpt", gpt), ("backup", model(&backup, "b"))], run_budget(10_000)).await;
    let mut a = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", served.url))
        .header("x-keel-run", RUN)
        .json(&ask_stream("gpt"))
        .send()
        .await
        .unwrap();
    assert!(a.chunk().await.unwrap().is_some());
    drop(a);
    let records = journaled(&served, 1).await;
    let error = records[0].error.as_ref().expect("a gone client is journaled as such");
    assert!(error.1.contains("client closed"), "{error:?}");
    assert_eq!(backup.hits(), 0, "a rescue was paid for a client that had left");
    let budget = served.gateway.run_budget(RUN).unwrap();
    assert_eq!(budget.reserved(BudgetKind::Tokens), 0, "{budget:?}");
    // The stalled attempt was answered by its provider: charged, at its bound.
    assert!(counted(&served) >= primary.billed_tokens());
}
