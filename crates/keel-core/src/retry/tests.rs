use std::time::Duration;

use proptest::prelude::*;

use super::*;

#[test]
fn max_attempts_counts_the_first_call() {
    let rng = SharedRng::new(Some(1));
    let one = RetryConfig::none();
    assert_eq!(
        one.decide(1, ErrorClass::ServerError, None, &rng),
        RetryDecision::Refused(RefusalReason::AttemptsExhausted { max_attempts: 1 })
    );
    let three = RetryConfig { max_attempts: 3, ..RetryConfig::default() };
    assert!(matches!(three.decide(1, ErrorClass::ServerError, None, &rng), RetryDecision::Retry { .. }));
    assert!(matches!(three.decide(2, ErrorClass::ServerError, None, &rng), RetryDecision::Retry { .. }));
    assert!(matches!(three.decide(3, ErrorClass::ServerError, None, &rng), RetryDecision::Refused(_)));
}

#[test]
fn only_configured_classes_retry() {
    let rng = SharedRng::new(Some(1));
    let c = RetryConfig::default();
    for class in ErrorClass::ALL {
        let retried = matches!(c.decide(1, class, None, &rng), RetryDecision::Retry { .. });
        let expected = matches!(
            class,
            ErrorClass::Network | ErrorClass::Timeout | ErrorClass::RateLimited | ErrorClass::ServerError
        );
        assert_eq!(retried, expected, "{class}");
    }
}

#[test]
fn retry_after_wins_over_backoff_and_is_capped() {
    let rng = SharedRng::new(Some(1));
    let c = RetryConfig { max_retry_after: Duration::from_secs(30), ..RetryConfig::default() };
    assert_eq!(
        c.decide(1, ErrorClass::RateLimited, Some(Duration::from_secs(7)), &rng),
        RetryDecision::Retry { delay: Duration::from_secs(7), reason: DelayReason::RetryAfter }
    );
    assert_eq!(
        c.decide(1, ErrorClass::RateLimited, Some(Duration::from_secs(31)), &rng),
        RetryDecision::Refused(RefusalReason::RetryAfterTooLong {
            requested: Duration::from_secs(31),
            cap: Duration::from_secs(30)
        })
    );
}

#[test]
fn backoff_grows_exponentially_without_jitter() {
    let rng = SharedRng::new(None);
    let c = RetryConfig {
        base_delay: Duration::from_millis(100),
        multiplier: 2.0,
        max_delay: Duration::from_millis(500),
        jitter: Jitter::None,
        ..RetryConfig::default()
    };
    let delays: Vec<_> = (1..=5).map(|a| c.backoff(a, &rng).as_millis()).collect();
    assert_eq!(delays, [100, 200, 400, 500, 500]);
}

#[test]
fn a_seed_replays_the_same_jitter() {
    let c = RetryConfig::default();
    let a: Vec<_> = {
        let rng = SharedRng::new(Some(42));
        (1..20).map(|n| c.backoff(n, &rng)).collect()
    };
    let b: Vec<_> = {
        let rng = SharedRng::new(Some(42));
        (1..20).map(|n| c.backoff(n, &rng)).collect()
    };
    assert_eq!(a, b);
    assert!(a.windows(2).any(|w| w[0] != w[1]), "jitter varies");
}

proptest! {
    #[test]
    fn jittered_delays_never_exceed_the_cap(
        seed in any::<u64>(),
        attempt in 1u32..200,
        base_ms in 0u64..10_000,
        cap_ms in 0u64..60_000,
        multiplier in 1.0f64..10.0,
    ) {
        let c = RetryConfig {
            base_delay: Duration::from_millis(base_ms),
            max_delay: Duration::from_millis(cap_ms),
            multiplier,
            ..RetryConfig::default()
        };
        let rng = SharedRng::new(Some(seed));
        let d = c.backoff(attempt, &rng);
        prop_assert!(d <= c.max_delay, "{d:?} > cap {:?}", c.max_delay);
    }
}

#[test]
fn a_rate_limit_without_retry_after_waits_at_least_the_floor_plus_backoff() {
    let rng = SharedRng::new(Some(5));
    let c = RetryConfig { rate_limit_floor: Duration::from_millis(250), ..RetryConfig::default() };
    for _ in 0..100 {
        let RetryDecision::Retry { delay, .. } = c.decide(1, ErrorClass::RateLimited, None, &rng) else {
            panic!("retried")
        };
        assert!(delay >= Duration::from_millis(250) && delay <= Duration::from_millis(450), "{delay:?}");
        let RetryDecision::Retry { delay, .. } = c.decide(1, ErrorClass::ServerError, None, &rng) else {
            panic!("retried")
        };
        assert!(delay <= Duration::from_millis(200), "the floor is for rate limits only: {delay:?}");
    }
    let asked = Duration::from_millis(30);
    assert_eq!(
        c.decide(1, ErrorClass::RateLimited, Some(asked), &rng),
        RetryDecision::Retry { delay: asked, reason: DelayReason::RetryAfter },
        "a Retry-After is the server's word: no floor added"
    );
}
