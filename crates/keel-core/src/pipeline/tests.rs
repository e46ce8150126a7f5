use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::breaker::BreakerConfig;
use crate::budget::BudgetConfig;
use crate::class::Disposition;
use crate::event::MemorySink;
use crate::fault::FaultConfig;
use crate::gate::GateConfig;
use crate::loop_guard::LoopGuardConfig;
use crate::retry::Jitter;
use crate::test_support::{Script, Step};

use ErrorClass as C;

fn config(max_attempts: u32) -> PolicyConfig {
    PolicyConfig {
        retry: RetryConfig {
            max_attempts,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            ..RetryConfig::default()
        },
        seed: Some(3),
        ..PolicyConfig::default()
    }
}

fn build(config: PolicyConfig, sink: &Arc<MemorySink>) -> Pipeline {
    Pipeline::builder("target", config).sink(sink.clone()).build()
}

fn kinds(sink: &MemorySink) -> Vec<&'static str> {
    sink.events().iter().map(Event::kind).filter(|k| *k != "budget_charged").collect()
}

#[tokio::test(start_paused = true)]
async fn retries_until_success_and_reports_each_step() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError), Step::Fail(C::Network)]);
    let retries = Arc::new(Mutex::new(Vec::new()));
    let seen = retries.clone();
    let p = Pipeline::builder("target", config(3))
        .sink(sink.clone())
        .on_retry(move |info| seen.lock().unwrap().push((info.attempt, info.class)))
        .build();
    assert_eq!(p.call(|_| script.call()).await.unwrap(), "ok");
    assert_eq!(script.calls().len(), 3);
    assert_eq!(*retries.lock().unwrap(), [(1, C::ServerError), (2, C::Network)]);
    assert_eq!(
        kinds(&sink),
        [
            "attempt_started",
            "attempt_ended",
            "retry_scheduled",
            "attempt_started",
            "attempt_ended",
            "retry_scheduled",
            "attempt_started",
            "attempt_ended"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn hooks_never_see_a_retry_after_the_last_attempt() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError); 5]);
    let hooks = Arc::new(Mutex::new(0));
    let h = hooks.clone();
    let p = Pipeline::builder("target", config(3))
        .sink(sink.clone())
        .on_retry(move |_| *h.lock().unwrap() += 1)
        .build();
    let err = p.call(|_| script.call()).await.unwrap_err();
    assert_eq!((err.class, err.attempts), (C::ServerError, 3));
    assert_eq!(err.refusal, Some(RefusalReason::AttemptsExhausted { max_attempts: 3 }));
    assert_eq!(*hooks.lock().unwrap(), 2, "two retries for three attempts");
    assert_eq!(script.calls().len(), 3);
    assert_eq!(kinds(&sink).last(), Some(&"retry_refused"));
    assert_eq!(err.disposition(), Disposition::Fallback);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_one_means_no_retry() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError)]);
    let err = build(config(1), &sink).call(|_| script.call()).await.unwrap_err();
    assert_eq!(err.attempts, 1);
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_7_waits_exactly_7s() {
    let sink = MemorySink::new();
    let script = Script::new([Step::RetryAfter(C::RateLimited, Duration::from_secs(7))]);
    build(config(3), &sink).call(|_| script.call()).await.unwrap();
    let calls = script.calls();
    assert_eq!(calls[1] - calls[0], Duration::from_secs(7), "the server's delay, not the backoff (≤ 100ms)");
    assert!(sink.events().iter().any(|e| matches!(
        e,
        Event::RetryScheduled { delay, reason: DelayReason::RetryAfter, .. } if *delay == Duration::from_secs(7)
    )));
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_are_the_jittered_delays() {
    let sink = MemorySink::new();
    let mut c = config(4);
    c.retry.jitter = Jitter::None;
    let script = Script::new([Step::Fail(C::Timeout), Step::Fail(C::Timeout), Step::Fail(C::Timeout)]);
    build(c, &sink).call(|_| script.call()).await.unwrap();
    let calls = script.calls();
    let gaps: Vec<_> = calls.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    assert_eq!(gaps, [100, 200, 400]);
}

#[tokio::test(start_paused = true)]
async fn classes_a_retry_cannot_fix_are_not_retried() {
    for class in [C::InvalidRequest, C::Unauthorized, C::Forbidden, C::NotFound, C::Conflict] {
        let sink = MemorySink::new();
        let script = Script::new([Step::Fail(class)]);
        let err = build(config(5), &sink).call(|_| script.call()).await.unwrap_err();
        assert_eq!((err.class, err.attempts, err.refusal.clone()), (class, 1, None));
        assert_eq!(err.disposition(), Disposition::Terminal);
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_times_out_and_is_retried() {
    let sink = MemorySink::new();
    let mut c = config(2);
    c.timeout.attempt = Some(Duration::from_secs(5));
    let script = Script::new([Step::Hang]);
    let start = Instant::now();
    build(c, &sink).call(|_| script.call()).await.unwrap();
    let calls = script.calls();
    assert!(calls[1] - start >= Duration::from_secs(5));
    assert!(sink.events().iter().any(|e| matches!(
        e,
        Event::AttemptEnded { outcome: AttemptOutcome::Failed(C::Timeout), latency, .. } if *latency == Duration::from_secs(5)
    )));
}

#[tokio::test(start_paused = true)]
async fn a_run_deadline_cuts_a_nested_retry_loop_short() {
    let sink = MemorySink::new();
    // The inner call would retry 10 times with waits up to 2s, each attempt hanging
    // until its 3s timeout: ~50s in all. The run has 8s.
    let mut inner_config = config(10);
    inner_config.timeout.attempt = Some(Duration::from_secs(3));
    let inner = Pipeline::builder("inner", inner_config).sink(sink.clone()).build();
    let outer = Pipeline::builder("outer", config(1)).sink(sink.clone()).build();
    let script = Script::new(std::iter::repeat_n(Step::Hang, 20));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(8);
    let result = RunScope::new()
        .with_deadline(deadline)
        .run(outer.call(|_| async {
            inner
                .call(|attempt| {
                    assert!(attempt.deadline.unwrap() <= deadline, "an attempt gets min(timeout, time left)");
                    script.call()
                })
                .await
                .map_err(|e| Failure::new(e.class, e.to_string()))
        }))
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.class, C::DeadlineExceeded);
    assert!(Instant::now() <= deadline, "nothing runs past the deadline");
    assert!(script.calls().len() < 4, "{} attempts", script.calls().len());
    assert!(sink.events().iter().any(|e| matches!(
        e,
        Event::RetryRefused { reason: RefusalReason::DeadlineTooClose { .. }, .. }
    ) || matches!(
        e,
        Event::AttemptEnded { outcome: AttemptOutcome::Failed(C::DeadlineExceeded), .. }
    )));
}

#[tokio::test(start_paused = true)]
async fn a_step_timeout_is_inherited_by_nested_calls() {
    let mut outer_config = config(1);
    outer_config.timeout.step = Some(Duration::from_secs(4));
    let outer = Pipeline::builder("outer", outer_config).build();
    let start = Instant::now();
    let seen = outer.call(|_| async { Ok::<_, Failure>(RunScope::current_deadline()) }).await.unwrap();
    assert_eq!(seen, Some(start + Duration::from_secs(4)));
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_would_pass_the_deadline_is_refused_up_front() {
    let sink = MemorySink::new();
    let script = Script::new([Step::RetryAfter(C::RateLimited, Duration::from_secs(30))]);
    let start = Instant::now();
    let err = RunScope::new()
        .with_deadline(start + Duration::from_secs(10))
        .run(build(config(3), &sink).call(|_| script.call()))
        .await
        .unwrap_err();
    assert_eq!(Instant::now(), start, "no pointless wait");
    assert!(matches!(err.refusal, Some(RefusalReason::DeadlineTooClose { .. })), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_gate_stops_hopeless_retries_but_not_helpful_ones() {
    let gate = Arc::new(ConfidenceGate::new(GateConfig::default()));
    let sink = MemorySink::new();
    let mut c = config(3);
    c.breaker.enabled = false;
    let p = Pipeline::builder("model", c).gate(gate.clone()).sink(sink.clone()).build();
    // Timeouts on this target never recover on retry; 429s always do.
    for _ in 0..5 {
        let hopeless = Script::new([Step::Fail(C::Timeout); 3]);
        let _ = p.call(|_| hopeless.call()).await;
        let helpful = Script::new([Step::Fail(C::RateLimited)]);
        p.call(|_| helpful.call()).await.unwrap();
    }
    let hopeless = Script::new([Step::Fail(C::Timeout); 3]);
    let err = p.call(|_| hopeless.call()).await.unwrap_err();
    assert_eq!(hopeless.calls().len(), 1, "the gate refused the retry");
    assert!(
        matches!(err.refusal, Some(RefusalReason::LowConfidence { score, threshold }) if score < threshold)
    );
    let helpful = Script::new([Step::Fail(C::RateLimited)]);
    p.call(|_| helpful.call()).await.unwrap();
    assert_eq!(helpful.calls().len(), 2, "429s still get their retry");
    assert!(gate.score("model", C::RateLimited, 2) > 0.8);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_fast_without_calling_the_target() {
    let sink = MemorySink::new();
    let mut c = config(1);
    c.breaker = BreakerConfig { min_calls: 4, ..BreakerConfig::default() };
    let p = build(c, &sink);
    let script = Script::new([Step::Fail(C::ServerError); 4]);
    for _ in 0..4 {
        let _ = p.call(|_| script.call()).await;
    }
    let err = p.call(|_| script.call()).await.unwrap_err();
    assert_eq!((err.class, err.attempts), (C::CircuitOpen, 0));
    assert_eq!(err.disposition(), Disposition::Fallback);
    assert_eq!(script.calls().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn no_retry_is_scheduled_once_the_breaker_opened() {
    let sink = MemorySink::new();
    let mut c = config(5);
    c.breaker = BreakerConfig { min_calls: 2, ..BreakerConfig::default() };
    let script = Script::new([Step::Fail(C::ServerError); 5]);
    let err = build(c, &sink).call(|_| script.call()).await.unwrap_err();
    assert_eq!(script.calls().len(), 2);
    assert_eq!(err.refusal, Some(RefusalReason::CircuitOpen));
}

#[tokio::test(start_paused = true)]
async fn attempts_are_charged_to_run_target_and_step_budgets() {
    let sink = MemorySink::new();
    let run = Arc::new(Budget::new(
        "run",
        &BudgetConfig { attempts: Some(4), ..BudgetConfig::default() },
        sink.clone(),
    ));
    let mut c = config(10);
    c.budget = BudgetConfig { attempts: Some(3), ..BudgetConfig::default() };
    let p = build(c, &sink);
    let script = Script::new([Step::Fail(C::ServerError); 10]);
    let err = RunScope::new().with_budget(run.clone()).run(p.call(|_| script.call())).await.unwrap_err();
    assert_eq!((err.class, err.attempts), (C::BudgetExceeded, 3), "the step's limit of 3");
    assert_eq!(run.used(BudgetKind::Attempts), 3, "the refused 4th was given back to the run");
    let err = RunScope::new().with_budget(run.clone()).run(p.call(|_| script.call())).await.unwrap_err();
    assert_eq!((err.class, err.attempts), (C::BudgetExceeded, 1), "the run's limit of 4");
    assert_eq!(run.used(BudgetKind::Attempts), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_shared_by_100_concurrent_calls_is_never_overspent() {
    let run = Arc::new(Budget::new(
        "run",
        &BudgetConfig { attempts: Some(150), ..BudgetConfig::default() },
        Arc::new(NullSink),
    ));
    let mut c = config(3);
    c.retry.base_delay = Duration::from_micros(10);
    c.retry.max_delay = Duration::from_micros(50);
    c.breaker.enabled = false;
    c.gate.enabled = false;
    let p = Pipeline::builder("t", c).build();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (p, run) = (p.clone(), run.clone());
            tokio::spawn(RunScope::new().with_budget(run).run(async move {
                let script = Script::new([Step::Fail(C::ServerError)]);
                p.call(|_| script.call()).await.map(|_| ()).map_err(|e| (e.class, e.attempts))
            }))
        })
        .collect();
    let (mut ok, mut attempts) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => {
                ok += 1;
                attempts += 2;
            }
            Err((class, made)) => {
                assert_eq!(class, C::BudgetExceeded);
                attempts += made;
            }
        }
    }
    assert_eq!(run.used(BudgetKind::Attempts), 150, "every attempt charged, none past the limit");
    assert_eq!(attempts, 150, "the attempts made are exactly the attempts charged");
    assert!((50..=75).contains(&ok), "{ok} calls succeeded");
}

#[tokio::test(start_paused = true)]
async fn the_loop_guard_stops_a_repeated_call_before_any_attempt() {
    let sink = MemorySink::new();
    let guard = Arc::new(LoopGuard::new(
        LoopGuardConfig { max_repeats: 2, ..LoopGuardConfig::default() },
        sink.clone(),
    ));
    let p = build(config(1), &sink);
    let sig = CallSignature::new("target", &serde_json::json!({"id": 7}));
    let scope = RunScope::new().with_loop_guard(guard);
    let script = Script::new([]);
    let (first, second) = scope
        .run(async {
            (p.call_signed(sig, |_| script.call()).await, p.call_signed(sig, |_| script.call()).await)
        })
        .await;
    assert!(first.is_ok());
    let err = second.unwrap_err();
    assert_eq!((err.class, err.attempts), (C::LoopDetected, 0));
    assert_eq!(err.disposition(), Disposition::Escalate);
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn injected_faults_are_retried_like_real_ones() {
    let sink = MemorySink::new();
    let mut c = config(10);
    c.timeout.attempt = Some(Duration::from_secs(1));
    c.fault = FaultConfig { rate: 0.5, seed: Some(11), ..FaultConfig::default() };
    c.breaker.enabled = false;
    c.gate.enabled = false;
    let p = build(c, &sink);
    let script = Script::new([]);
    for _ in 0..20 {
        p.call(|_| script.call()).await.unwrap();
    }
    let failed: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::AttemptEnded { outcome: AttemptOutcome::Failed(c), .. } => Some(c),
            _ => None,
        })
        .collect();
    assert!(failed.contains(&C::Timeout) && failed.contains(&C::ServerError), "{failed:?}");
    assert_eq!(script.calls().len(), 20, "injected faults never reached the target");
    // Every failed attempt here was injected, and its events say so (a drill must not
    // look like an incident): each failure follows its attempt's `fault_injected`.
    let events = sink.events();
    let marked: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::FaultInjected { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(marked.len(), failed.len(), "{marked:?}");
    for (i, e) in events.iter().enumerate() {
        if let Event::AttemptEnded { attempt, outcome: AttemptOutcome::Failed(_), .. } = e {
            let injected = events[..i].iter().rev().find_map(|e| match e {
                Event::FaultInjected { attempt: a, .. } => Some(a),
                Event::AttemptEnded { .. } => Some(&0),
                _ => None,
            });
            assert_eq!(injected, Some(attempt), "failed attempt {attempt} is marked injected");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_releases_its_breaker_probe() {
    let mut c = config(1);
    c.breaker = BreakerConfig {
        min_calls: 1,
        half_open_probes: 1,
        open_for: Duration::from_secs(1),
        ..BreakerConfig::default()
    };
    let p = Pipeline::builder("t", c).build();
    let _ = p.call(|_| async { Err::<(), _>(Failure::new(C::ServerError, "x")) }).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    // The probe hangs and is abandoned by its caller.
    let _ = tokio::time::timeout(
        Duration::from_millis(10),
        p.call(|_| std::future::pending::<Result<(), Failure>>()),
    )
    .await;
    p.call(|_| async { Ok::<_, Failure>(()) }).await.expect("the probe slot came back");
    assert_eq!(p.breaker().unwrap().state(), crate::BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_seeded_pipeline_replays_its_decisions_exactly() {
    async fn run() -> Vec<Event> {
        let sink = MemorySink::new();
        let script =
            Script::new([Step::Fail(C::ServerError), Step::Fail(C::Network), Step::Fail(C::Timeout)]);
        build(config(5), &sink).call(|_| script.call()).await.unwrap();
        sink.events()
    }
    assert_eq!(run().await, run().await);
}

#[tokio::test(start_paused = true)]
async fn the_tower_layer_applies_the_pipeline() {
    use tower::{Layer, ServiceExt};
    let script = Arc::new(Script::new([Step::Fail(C::ServerError)]));
    let s = script.clone();
    let service = tower::service_fn(move |req: u32| {
        let s = s.clone();
        async move { s.call().await.map(|_| req * 2) }
    });
    let svc = PipelineLayer::new(Pipeline::builder("svc", config(3)).build()).layer(service);
    assert_eq!(svc.oneshot(21).await.unwrap(), 42);
    assert_eq!(script.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_call_continues_at_the_next_attempt_after_the_rest_of_its_backoff() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError)]);
    let p = build(config(3), &sink);
    let from = Resume { attempts: 1, class: Some(C::ServerError), wait: Duration::from_secs(4) };
    let started = Instant::now();
    let err = p
        .call_resumed(from, |a| {
            let number = a.number;
            let at = Instant::now();
            let call = script.call();
            async move {
                assert!(at - started >= Duration::from_secs(4), "waited out the backoff");
                call.await.map(|v| (v, number))
            }
        })
        .await;
    // Attempt 2 fails, attempt 3 succeeds: three attempts in all, not 1 + 3.
    let (_, number) = err.unwrap();
    assert_eq!(number, 3);
    assert_eq!(script.calls().len(), 2);
    let numbers: Vec<u32> = sink
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::AttemptStarted { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(numbers, [2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_call_with_its_attempts_used_up_makes_no_more() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError), Step::Fail(C::ServerError)]);
    let p = build(config(3), &sink);
    let from = Resume { attempts: 2, class: Some(C::ServerError), wait: Duration::ZERO };
    let err = p.call_resumed(from, |_| script.call()).await.unwrap_err();
    assert_eq!(err.attempts, 3);
    assert_eq!(script.calls().len(), 1, "only the third attempt was left");
}

#[tokio::test(start_paused = true)]
async fn a_resumed_call_whose_last_attempt_never_ended_makes_it_again() {
    let sink = MemorySink::new();
    let script = Script::new([Step::Fail(C::ServerError)]);
    let p = build(config(3), &sink);
    let from = Resume { attempts: 3, class: None, wait: Duration::ZERO };
    let err = p.call_resumed(from, |_| script.call()).await.unwrap_err();
    assert_eq!((err.attempts, script.calls().len()), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn the_attempt_budget_is_checked_before_a_backoff_and_the_last_failure_is_kept() {
    let sink = MemorySink::new();
    let run = Arc::new(Budget::new(
        "run",
        &BudgetConfig { attempts: Some(2), ..BudgetConfig::default() },
        sink.clone(),
    ));
    let mut c = config(5);
    c.retry.max_retry_after = Duration::from_secs(60);
    let p = build(c, &sink);
    let script = Script::new([Step::RetryAfter(C::RateLimited, Duration::from_secs(30)); 5]);
    let start = Instant::now();
    let err = RunScope::new().with_budget(run.clone()).run(p.call(|_| script.call())).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30), "one wait, not a wait for an attempt never made");
    assert_eq!((err.class, err.attempts), (C::BudgetExceeded, 2));
    assert_eq!(err.refusal, Some(RefusalReason::BudgetExhausted { budget: "run".into() }));
    assert_eq!(err.target_error().map(|f| f.class), Some(C::RateLimited), "the last 429 is kept");
    assert_eq!(script.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_by_an_open_breaker_spends_no_attempt() {
    let sink = MemorySink::new();
    let run = Arc::new(Budget::new(
        "run",
        &BudgetConfig { attempts: Some(10), ..BudgetConfig::default() },
        sink.clone(),
    ));
    let mut c = config(1);
    c.breaker = BreakerConfig { min_calls: 2, ..BreakerConfig::default() };
    let p = build(c, &sink);
    let script = Script::new([Step::Fail(C::ServerError); 2]);
    for _ in 0..2 {
        let _ = RunScope::new().with_budget(run.clone()).run(p.call(|_| script.call())).await;
    }
    assert_eq!(run.used(BudgetKind::Attempts), 2);
    for _ in 0..5 {
        let err = RunScope::new().with_budget(run.clone()).run(p.call(|_| script.call())).await.unwrap_err();
        assert_eq!(err.class, C::CircuitOpen);
    }
    assert_eq!(run.used(BudgetKind::Attempts), 2, "refused calls never reached the target");
}
