//! Attacks on policy values: every absurd value is refused by `validate` with its key,
//! and no value at all, checked or not, panics a pipeline.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use crate::breaker::BreakerConfig;
use crate::budget::BudgetConfig;
use crate::class::ErrorClass;
use crate::classify::Failure;
use crate::event::NullSink;
use crate::fault::{FaultConfig, FaultKind};
use crate::gate::GateConfig;
use crate::loop_guard::{LoopGuard, LoopGuardConfig};
use crate::pipeline::Pipeline;
use crate::policy::{PolicyConfig, TimeoutConfig};
use crate::retry::{Jitter, RetryConfig};
use crate::signature::CallSignature;

/// The keys `validate` refuses in `toml` (a policy table), sorted.
fn refused(toml: &str) -> Vec<String> {
    let p: PolicyConfig = toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
    let mut keys: Vec<String> = p.validate().err().unwrap_or_default().into_iter().map(|e| e.key).collect();
    keys.sort();
    keys
}

#[test]
fn defaults_are_valid() {
    assert_eq!(PolicyConfig::default().validate(), Ok(()));
    assert_eq!(refused(""), Vec::<String>::new());
}

#[test]
fn each_absurd_value_is_refused_by_its_key() {
    let check = |toml: &str, key: &str| assert_eq!(refused(toml), [key], "{toml}");
    check("timeout = { attempt = \"500000000000years\" }", "timeout.attempt");
    check("timeout = { step = \"500000000000years\" }", "timeout.step");
    check("timeout = { attempt = \"0s\" }", "timeout.attempt");
    check("timeout = { step = \"0s\" }", "timeout.step");
    check("retry = { max_attempts = 0 }", "retry.max_attempts");
    check("retry = { max_attempts = 4000000000 }", "retry.max_attempts");
    check("retry = { multiplier = 0.5 }", "retry.multiplier");
    check("retry = { multiplier = nan }", "retry.multiplier");
    check("retry = { multiplier = inf }", "retry.multiplier");
    check("retry = { base_delay = \"400years\" }", "retry.base_delay");
    check("retry = { max_delay = \"400years\" }", "retry.max_delay");
    check("retry = { max_retry_after = \"400years\" }", "retry.max_retry_after");
    check("breaker = { failure_ratio = 1.5 }", "breaker.failure_ratio");
    check("breaker = { failure_ratio = 0.0 }", "breaker.failure_ratio");
    check("breaker = { failure_ratio = -0.1 }", "breaker.failure_ratio");
    check("breaker = { failure_ratio = nan }", "breaker.failure_ratio");
    check("breaker = { min_calls = 0 }", "breaker.min_calls");
    check("breaker = { buckets = 4000000000 }", "breaker.buckets");
    check("breaker = { buckets = 0 }", "breaker.buckets");
    check("breaker = { window = \"0s\" }", "breaker.window");
    check("breaker = { open_for = \"400years\" }", "breaker.open_for");
    check("breaker = { half_open_probes = 0 }", "breaker.half_open_probes");
    check("gate = { threshold = 2.0 }", "gate.threshold");
    check("gate = { prior_successes = -1.0 }", "gate.prior_successes");
    check("gate = { prior_failures = inf }", "gate.prior_failures");
    check("gate = { max_attempt_bucket = 0 }", "gate.max_attempt_bucket");
    check("budget = { cost_usd = -2.0 }", "budget.cost_usd");
    check("budget = { cost_usd = nan }", "budget.cost_usd");
    check("loop_guard = { max_repeats = 1 }", "loop_guard.max_repeats");
    check("loop_guard = { window = 4000000000 }", "loop_guard.window");
    check("loop_guard = { max_calls_per_turn = 0 }", "loop_guard.max_calls_per_turn");
    check("loop_guard = { max_turns_per_run = 0 }", "loop_guard.max_turns_per_run");
    check("fault = { rate = 1.7 }", "fault.rate");
    check("fault = { rate = -0.5 }", "fault.rate");
    check("fault = { rate = 0.5, kinds = [] }", "fault.kinds");
    check("fault = { latency = \"400years\" }", "fault.latency");
}

#[test]
fn every_problem_is_reported_at_once() {
    let keys = refused(
        "retry = { max_attempts = 0 }\nbreaker = { failure_ratio = 1.5 }\nfault = { rate = 1.7 }\n\
         timeout = { attempt = \"500000000000years\" }\n",
    );
    assert_eq!(keys, ["breaker.failure_ratio", "fault.rate", "retry.max_attempts", "timeout.attempt"]);
}

#[test]
fn messages_say_what_is_allowed() {
    let p: PolicyConfig =
        toml::from_str("timeout = { attempt = \"0s\" }\nbreaker = { failure_ratio = 0.0 }").unwrap();
    let errors = p.validate().unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(text[0].starts_with("timeout.attempt: ") && text[0].contains("\"off\""), "{text:?}");
    assert!(text[1].contains("successes alone") && text[1].contains("up to 1.0"), "{text:?}");
}

#[test]
fn off_and_none_turn_a_timeout_off_and_round_trip() {
    for word in ["off", "none", "OFF", " none "] {
        let p: PolicyConfig =
            toml::from_str(&format!("timeout = {{ attempt = \"{word}\", step = \"{word}\" }}")).unwrap();
        assert_eq!(p.timeout, TimeoutConfig { attempt: None, step: None }, "{word}");
        assert_eq!(p.validate(), Ok(()));
    }
    let off: PolicyConfig = toml::from_str("timeout = { attempt = \"off\" }").unwrap();
    let back: PolicyConfig = toml::from_str(&toml::to_string(&off).unwrap()).unwrap();
    assert_eq!(back, off, "off survives a round trip");
    let json: PolicyConfig =
        serde_json::from_value(serde_json::json!({"timeout": {"attempt": null}})).unwrap();
    assert_eq!(json.timeout.attempt, None, "JSON null is off too");
    let e = toml::from_str::<PolicyConfig>("timeout = { attempt = \"never\" }").unwrap_err().to_string();
    assert!(e.contains("never") && e.contains("\"off\""), "{e}");
}

/// Runs one call through a pipeline built from `config` on paused time: two failures
/// (the second asking for `retry_after`), then success. Returns whether it succeeded.
fn run_one(config: PolicyConfig, retry_after: Option<Duration>) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async move {
        let guard = Arc::new(LoopGuard::new(config.loop_guard.clone(), Arc::new(NullSink)));
        let pipeline = Pipeline::builder("target", config).loop_guard(guard).build();
        let sig = CallSignature::new("target", &serde_json::json!({"n": 1}));
        pipeline
            .call_signed(sig, |attempt| async move {
                match attempt.number {
                    1 => Err(Failure::new(ErrorClass::ServerError, "HTTP 503")),
                    2 => Err(Failure::new(ErrorClass::RateLimited, "HTTP 429").with_retry_after(retry_after)),
                    _ => Ok(()),
                }
            })
            .await
            .is_ok()
    })
}

#[test]
fn the_issues_values_do_not_panic_a_pipeline() {
    let huge = "\"500000000000years\"";
    for toml in [
        format!("timeout = {{ attempt = {huge} }}"),
        format!("timeout = {{ step = {huge} }}"),
        format!("timeout = {{ attempt = {huge}, step = {huge} }}"),
        "retry = { max_attempts = 0 }".to_owned(),
        "breaker = { failure_ratio = 1.5, min_calls = 1 }".to_owned(),
        "fault = { rate = 1.7, kinds = [\"latency\"], latency = \"500000000000years\" }".to_owned(),
        "fault = { rate = 1.7, kinds = [\"timeout\"] }".to_owned(),
        format!(
            "retry = {{ base_delay = {huge}, max_delay = {huge}, multiplier = 1e300, jitter = \"none\" }}"
        ),
    ] {
        let p: PolicyConfig = toml::from_str(&toml).unwrap();
        assert!(p.validate().is_err(), "{toml} is refused");
        run_one(p, None);
    }
    // Checked or not, Rust values at the edge.
    let mut p = PolicyConfig {
        timeout: TimeoutConfig { attempt: Some(Duration::MAX), step: Some(Duration::MAX) },
        ..PolicyConfig::default()
    };
    assert!(!run_one(p.clone(), Some(Duration::MAX)), "a Retry-After past the cap is refused");
    p.retry.max_retry_after = Duration::MAX;
    p.gate.enabled = false;
    assert!(run_one(p, Some(Duration::from_secs(u64::MAX))), "waits Retry-After u64::MAX s, then succeeds");
}

#[test]
fn an_uncapped_backoff_at_a_high_attempt_saturates() {
    let rng = crate::rng::SharedRng::new(Some(3));
    let c = RetryConfig {
        base_delay: Duration::MAX,
        max_delay: Duration::MAX,
        multiplier: 100.0,
        jitter: Jitter::None,
        ..RetryConfig::default()
    };
    assert_eq!(c.backoff(u32::MAX, &rng), Duration::MAX);
    let zero = RetryConfig { base_delay: Duration::ZERO, multiplier: f64::MAX, ..c };
    assert_eq!(zero.backoff(u32::MAX, &rng), Duration::ZERO, "0 × ∞ is no wait");
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..100_000).prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(1.5),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::MAX),
        0.0f64..1.0,
        any::<f64>(),
    ]
}

fn small() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(u32::MAX), 0u32..64, any::<u32>()]
}

// Each part is boxed: one flat strategy of this many values overflows a debug stack.
fn retry() -> BoxedStrategy<RetryConfig> {
    (
        0u32..6,
        duration(),
        float(),
        duration(),
        prop_oneof![Just(Jitter::Full), Just(Jitter::None)],
        duration(),
    )
        .prop_map(|(max_attempts, base_delay, multiplier, max_delay, jitter, max_retry_after)| RetryConfig {
            max_attempts,
            base_delay,
            multiplier,
            max_delay,
            jitter,
            max_retry_after,
            ..RetryConfig::default()
        })
        .boxed()
}

fn gate() -> BoxedStrategy<GateConfig> {
    (any::<bool>(), float(), float(), float(), small())
        .prop_map(|(enabled, threshold, prior_successes, prior_failures, max_attempt_bucket)| GateConfig {
            enabled,
            threshold,
            prior_successes,
            prior_failures,
            max_attempt_bucket,
        })
        .boxed()
}

fn breaker() -> BoxedStrategy<BreakerConfig> {
    (any::<bool>(), float(), small(), duration(), 0u32..2000, duration(), small())
        .prop_map(|(enabled, failure_ratio, min_calls, window, buckets, open_for, half_open_probes)| {
            BreakerConfig {
                enabled,
                failure_ratio,
                min_calls,
                window,
                buckets,
                open_for,
                half_open_probes,
                ..BreakerConfig::default()
            }
        })
        .boxed()
}

fn limits() -> BoxedStrategy<(BudgetConfig, LoopGuardConfig)> {
    let budget = (
        proptest::option::of(any::<u64>()),
        proptest::option::of(float()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(tokens, cost_usd, attempts)| BudgetConfig { tokens, cost_usd, attempts });
    let guard = (small(), 0u32..20_000, proptest::option::of(small()), proptest::option::of(small()))
        .prop_map(|(max_repeats, window, max_calls_per_turn, max_turns_per_run)| LoopGuardConfig {
            max_repeats,
            window,
            max_calls_per_turn,
            max_turns_per_run,
        });
    (budget.boxed(), guard.boxed()).boxed()
}

fn fault() -> BoxedStrategy<FaultConfig> {
    let kinds = vec![FaultKind::Timeout, FaultKind::ServerError, FaultKind::Latency, FaultKind::EmptyOutput];
    (float(), proptest::sample::subsequence(kinds, 0..=4), duration(), any::<u64>())
        .prop_map(|(rate, kinds, latency, seed)| FaultConfig { rate, kinds, latency, seed: Some(seed) })
        .boxed()
}

fn policy() -> BoxedStrategy<PolicyConfig> {
    let timeout = (proptest::option::of(duration()), proptest::option::of(duration()))
        .prop_map(|(attempt, step)| TimeoutConfig { attempt, step })
        .boxed();
    (timeout, retry(), gate(), breaker(), limits(), fault(), any::<u64>())
        .prop_map(|(timeout, retry, gate, breaker, (budget, loop_guard), fault, seed)| PolicyConfig {
            timeout,
            retry,
            gate,
            breaker,
            budget,
            loop_guard,
            fault,
            seed: Some(seed),
            ..PolicyConfig::default()
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any values, given directly: validating never panics, nor does a call.
    #[test]
    fn no_policy_value_panics_a_pipeline(p in policy(), retry_after in proptest::option::of(duration())) {
        let verdict = p.validate();
        let ok = run_one(p.clone(), retry_after);
        // A valid policy with no injected faults, no limits and no gate makes its
        // third attempt and succeeds, unless a timeout, breaker or deadline says no.
        if verdict.is_ok() && p.retry.max_attempts >= 3 && p.fault.rate == 0.0 && !p.gate.enabled
            && !p.breaker.enabled && !p.budget.is_limited() && retry_after.is_none_or(|d| d <= p.retry.max_retry_after)
            && p.timeout.step.is_none()
        {
            prop_assert!(ok, "{p:?}");
        }
    }

    /// Any values through serde, as `keel.toml` would hold them.
    #[test]
    fn no_policy_value_read_from_toml_panics_a_pipeline(p in policy()) {
        let text = toml::to_string(&p).unwrap();
        if let Ok(read) = toml::from_str::<PolicyConfig>(&text) {
            let _ = read.validate();
            run_one(read, None);
        }
    }
}
