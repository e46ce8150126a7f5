use std::sync::Arc;

use super::*;

#[test]
fn the_prior_allows_retries_and_failures_lower_the_score() {
    let gate = ConfidenceGate::default();
    let t: Arc<str> = Arc::from("model");
    assert!((gate.score("model", ErrorClass::Timeout, 2) - 0.5).abs() < 1e-9);
    assert!(gate.check("model", ErrorClass::Timeout, 2).allowed);
    for _ in 0..3 {
        gate.record(&t, ErrorClass::Timeout, 2, false);
    }
    let v = gate.check("model", ErrorClass::Timeout, 2);
    assert!((v.score - 0.2).abs() < 1e-9, "Beta(1,1) after 0/3 is 1/5");
    assert!(!v.allowed);
    // Another class, another target and another attempt keep their own history.
    assert!(gate.check("model", ErrorClass::ServerError, 2).allowed);
    assert!(gate.check("other", ErrorClass::Timeout, 2).allowed);
    assert!(gate.check("model", ErrorClass::Timeout, 3).allowed);
}

#[test]
fn late_attempts_share_a_bucket() {
    let gate = ConfidenceGate::default();
    let t: Arc<str> = Arc::from("m");
    gate.record(&t, ErrorClass::Network, 9, true);
    assert_eq!(gate.outcomes("m", ErrorClass::Network, 5).successes, 1);
    assert_eq!(gate.outcomes("m", ErrorClass::Network, 50).successes, 1);
}

#[test]
fn history_round_trips_through_a_snapshot() {
    let a = ConfidenceGate::default();
    let t: Arc<str> = Arc::from("tool");
    a.record(&t, ErrorClass::RateLimited, 2, true);
    a.record(&t, ErrorClass::RateLimited, 2, false);
    a.record(&t, ErrorClass::Timeout, 3, false);
    let snap = a.snapshot();
    assert_eq!(snap.len(), 2);
    let json = serde_json::to_string(&snap).unwrap();
    let b = ConfidenceGate::default();
    b.load(serde_json::from_str::<Vec<GateRecord>>(&json).unwrap());
    assert_eq!(b.snapshot(), snap);
    assert_eq!(b.score("tool", ErrorClass::RateLimited, 2), a.score("tool", ErrorClass::RateLimited, 2));
}

#[test]
fn a_disabled_gate_scores_but_never_refuses() {
    let gate = ConfidenceGate::new(GateConfig { enabled: false, ..GateConfig::default() });
    let t: Arc<str> = Arc::from("m");
    for _ in 0..10 {
        gate.record(&t, ErrorClass::Timeout, 2, false);
    }
    let v = gate.check("m", ErrorClass::Timeout, 2);
    assert!(v.score < 0.2 && v.allowed);
}

#[test]
fn only_new_outcomes_are_unsaved() {
    let gate = ConfidenceGate::default();
    gate.load(vec![GateRecord {
        target: "tool".into(),
        class: ErrorClass::ServerError,
        attempt: 2,
        outcomes: Outcomes { successes: 40, failures: 2 },
    }]);
    assert!(gate.take_unsaved().is_empty(), "loaded history is not new");
    let t: Arc<str> = Arc::from("tool");
    gate.record(&t, ErrorClass::ServerError, 2, true);
    let first = gate.take_unsaved();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].outcomes, Outcomes { successes: 1, failures: 0 });
    assert!(gate.take_unsaved().is_empty(), "taken outcomes are not taken twice");
    // A failed save gives them back; the next save carries them with what is new.
    gate.restore_unsaved(first);
    gate.record(&t, ErrorClass::ServerError, 2, false);
    let again = gate.take_unsaved();
    assert_eq!(again[0].outcomes, Outcomes { successes: 1, failures: 1 });
    assert_eq!(gate.outcomes("tool", ErrorClass::ServerError, 2), Outcomes { successes: 41, failures: 3 });
}

#[test]
fn counts_saturate() {
    let gate = ConfidenceGate::default();
    let huge = GateRecord {
        target: "tool".into(),
        class: ErrorClass::Timeout,
        attempt: 2,
        outcomes: Outcomes { successes: u64::MAX - 1, failures: u64::MAX },
    };
    gate.load(vec![huge.clone(), huge]);
    gate.record(&Arc::from("tool"), ErrorClass::Timeout, 2, false);
    let o = gate.outcomes("tool", ErrorClass::Timeout, 2);
    assert_eq!((o.successes, o.failures), (u64::MAX, u64::MAX));
    let score = gate.score("tool", ErrorClass::Timeout, 2);
    assert!(score.is_finite() && (0.0..=1.0).contains(&score));
}
