//! A flaky payments service called through keel-core's pipeline, offline.
//!
//! Run: `cargo run -p keel-examples --bin resilient-call`
//!
//! The "payments" target fails the way real services do: a 503, a 429 with
//! `Retry-After: 1`, then an outage. Keel retries what a retry can fix, honours the
//! server's delay, refuses to retry a bad request, opens the breaker during the outage
//! and serves from the backup, stops a repeated call with the loop guard, and keeps to
//! the run's budget. Every decision is printed as it happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_core::{
    BreakerConfig, Budget, BudgetConfig, CallSignature, ErrorClass, Event, EventSink, Failure, FallbackChain,
    FallbackConfig, LoopGuard, LoopGuardConfig, Pipeline, PolicyConfig, RetryConfig, RunScope, TimeoutConfig,
};
use serde_json::json;

/// Prints each event as one line.
#[derive(Debug)]
struct Printer;

impl EventSink for Printer {
    fn record(&self, event: &Event) {
        let line = match event {
            Event::AttemptStarted { .. } | Event::BudgetCharged { .. } => return,
            Event::AttemptEnded { target, attempt, outcome, .. } => {
                format!("  {target}: attempt {attempt} -> {outcome:?}")
            }
            Event::RetryScheduled { attempt, class, delay, reason, .. } => {
                format!("  retry after attempt {attempt} ({class}): wait {delay:?} ({reason:?})")
            }
            Event::RetryRefused { class, reason, .. } => format!("  no retry ({class}): {reason}"),
            Event::BreakerTransition { target, from, to } => {
                format!("  breaker of {target}: {} -> {}", from.as_str(), to.as_str())
            }
            Event::FallbackTaken { from, to, class } => format!("  fallback {from} -> {to} ({class})"),
            Event::CorrectionRound { target, round, class } => {
                format!("  {target}: correction {round} ({class} sent back to it)")
            }
            Event::BudgetExceeded { budget, kind, .. } => {
                format!("  budget {budget} exceeded ({})", kind.as_str())
            }
            Event::LoopDetected { reason, .. } => format!("  loop detected: {reason}"),
            Event::FaultInjected { target, attempt, fault } => {
                format!("  {target}: attempt {attempt} gets an injected {fault:?} fault (a drill)")
            }
            Event::SchemaDrift { target, shape, .. } => {
                format!("  {target} answered in an unusual shape ({shape})")
            }
        };
        say(&line);
    }
}

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// The payments service: fails by script, counts the calls that reached it.
#[derive(Debug, Default)]
struct Payments {
    calls: AtomicU32,
}

impl Payments {
    async fn charge(&self, script: &[Result<&'static str, Failure>]) -> Result<&'static str, Failure> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
        tokio::time::sleep(Duration::from_millis(5)).await;
        script.get(n).cloned().unwrap_or(Ok("charged"))
    }
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        timeout: TimeoutConfig { attempt: Some(Duration::from_secs(2)), step: Some(Duration::from_secs(10)) },
        retry: RetryConfig {
            max_attempts: 3,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            ..RetryConfig::default()
        },
        breaker: BreakerConfig {
            min_calls: 6,
            open_for: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        seed: Some(7),
        ..PolicyConfig::default()
    }
}

#[tokio::main]
async fn main() {
    let sink: Arc<dyn EventSink> = Arc::new(Printer);
    let payments = Arc::new(Payments::default());
    let primary = Pipeline::builder("payments", policy()).sink(sink.clone()).build();
    let backup = Pipeline::builder("payments-backup", policy()).sink(sink.clone()).build();
    let chain =
        FallbackChain::new(vec![primary.clone(), backup], FallbackConfig::default()).with_sink(sink.clone());
    let budget = Arc::new(Budget::new(
        "run",
        &BudgetConfig { attempts: Some(20), ..BudgetConfig::default() },
        sink.clone(),
    ));
    let guard = Arc::new(LoopGuard::new(LoopGuardConfig::default(), sink.clone()));
    let scope = RunScope::new().with_budget(budget.clone()).with_loop_guard(guard);

    scope
        .run(async {
            say("1. a 503, then success: retried with backoff");
            let script = [Err(Failure::new(ErrorClass::ServerError, "HTTP 503"))];
            let r = primary.call(|_| payments.charge(&script)).await;
            say(&format!("   => {r:?}\n"));

            say("2. a 429 asking for 1s: the server's delay wins over backoff");
            payments.calls.store(0, Ordering::SeqCst);
            let script = [Err(Failure::new(ErrorClass::RateLimited, "HTTP 429")
                .with_retry_after(Some(Duration::from_secs(1))))];
            let r = primary.call(|_| payments.charge(&script)).await;
            say(&format!("   => {r:?}\n"));

            say("3. a bad request: terminal, never retried");
            payments.calls.store(0, Ordering::SeqCst);
            let script = [Err(Failure::new(ErrorClass::InvalidRequest, "HTTP 400: amount must be positive"))];
            let r = primary.call(|_| payments.charge(&script)).await;
            say(&format!("   => {}\n", r.map_or_else(|e| e.to_string(), |v| v.to_owned())));

            say("4. an outage: retries fail, the breaker opens, the backup answers");
            let down: Vec<_> =
                (0..20).map(|_| Err(Failure::new(ErrorClass::ServerError, "HTTP 502"))).collect();
            for order in 1..=3 {
                payments.calls.store(0, Ordering::SeqCst);
                let r = chain
                    .call(|target, _| {
                        let target = target.clone();
                        let payments = payments.clone();
                        let down = down.clone();
                        async move {
                            if &*target == "payments" {
                                payments.charge(&down).await
                            } else {
                                Ok("charged by backup")
                            }
                        }
                    })
                    .await;
                match r {
                    Ok(served) => {
                        say(&format!("   order {order} => {} (from {})\n", served.value, served.target))
                    }
                    Err(e) => say(&format!("   order {order} => failed: {e}\n")),
                }
            }

            say("5. the agent repeats the same call: the loop guard stops it");
            let params = json!({"order": 42, "amount": 10});
            for _ in 0..3 {
                let sig = CallSignature::new("payments-backup", &params);
                let r =
                    chain.alternatives()[1].call_signed(sig, |_| async { Ok::<_, Failure>("charged") }).await;
                if let Err(e) = r {
                    say(&format!("   => {e}\n"));
                }
            }
        })
        .await;

    say(&format!(
        "attempts charged to the run's budget: {} of {}",
        budget.used(keel_core::BudgetKind::Attempts),
        budget.limit(keel_core::BudgetKind::Attempts).unwrap_or(0)
    ));
}
