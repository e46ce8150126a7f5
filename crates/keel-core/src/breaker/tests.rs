use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::class::ErrorClass;
use crate::clock::TokioClock;
use crate::event::MemorySink;

fn config() -> BreakerConfig {
    BreakerConfig {
        failure_ratio: 0.5,
        min_calls: 10,
        window: Duration::from_secs(30),
        open_for: Duration::from_secs(10),
        half_open_probes: 2,
        ..BreakerConfig::default()
    }
}

fn call(m: &mut Machine, now: Instant, outcome: CallOutcome) -> Option<Transition> {
    let (ticket, _) = m.acquire(now);
    m.record(now, ticket.expect("admitted"), outcome)
}

#[test]
fn does_not_open_before_min_calls_and_opens_on_the_tenth() {
    let now = Instant::now();
    let mut m = Machine::new(config(), now);
    for _ in 0..9 {
        assert_eq!(call(&mut m, now, CallOutcome::Failure), None, "9 calls are fewer than min_calls");
    }
    assert_eq!(m.state(now).0, BreakerState::Closed);
    let t = call(&mut m, now, CallOutcome::Success);
    assert_eq!(t, Some(Transition { from: BreakerState::Closed, to: BreakerState::Open }));
    assert!(m.acquire(now).0.is_err(), "open fails fast");
}

#[test]
fn opens_at_exactly_half_failed_and_not_below() {
    let now = Instant::now();
    let mut m = Machine::new(config(), now);
    for _ in 0..5 {
        call(&mut m, now, CallOutcome::Success);
    }
    for _ in 0..4 {
        assert_eq!(call(&mut m, now, CallOutcome::Failure), None);
    }
    // 10th call: 5 of 10 failed.
    assert!(call(&mut m, now, CallOutcome::Failure).is_some());

    let mut m = Machine::new(config(), now);
    for _ in 0..6 {
        call(&mut m, now, CallOutcome::Success);
    }
    for _ in 0..4 {
        assert_eq!(call(&mut m, now, CallOutcome::Failure), None, "4 of 10 is below 0.5");
    }
    assert_eq!(m.state(now).0, BreakerState::Closed);
}

#[test]
fn ignored_outcomes_do_not_count() {
    let now = Instant::now();
    let mut m = Machine::new(config(), now);
    for _ in 0..50 {
        assert_eq!(call(&mut m, now, CallOutcome::Ignored), None);
    }
    assert_eq!(m.window_counts(now), (0, 0));
}

#[test]
fn old_calls_slide_out_of_the_window() {
    let start = Instant::now();
    let mut m = Machine::new(config(), start);
    for _ in 0..9 {
        call(&mut m, start, CallOutcome::Failure);
    }
    let later = start + Duration::from_secs(31);
    assert_eq!(m.window_counts(later), (0, 0));
    assert_eq!(call(&mut m, later, CallOutcome::Failure), None, "one failure in a fresh window");
}

#[test]
fn half_open_lets_exactly_the_configured_probes_through() {
    let start = Instant::now();
    let mut m = Machine::new(config(), start);
    for _ in 0..10 {
        call(&mut m, start, CallOutcome::Failure);
    }
    assert!(m.acquire(start + Duration::from_secs(9)).0.is_err(), "still open before open_for");
    let t = start + Duration::from_secs(10);
    let (p1, transition) = m.acquire(t);
    assert_eq!(transition, Some(Transition { from: BreakerState::Open, to: BreakerState::HalfOpen }));
    let (p2, _) = m.acquire(t);
    assert!(p1.is_ok() && p2.is_ok());
    for _ in 0..5 {
        assert!(m.acquire(t).0.is_err(), "a third probe is refused");
    }
    assert_eq!(m.record(t, p1.unwrap(), CallOutcome::Success), None, "one success is not enough");
    assert_eq!(
        m.record(t, p2.unwrap(), CallOutcome::Success),
        Some(Transition { from: BreakerState::HalfOpen, to: BreakerState::Closed })
    );
    assert_eq!(m.window_counts(t), (0, 0), "closing starts a fresh window");
}

#[test]
fn a_failed_probe_reopens_and_stale_results_are_ignored() {
    let start = Instant::now();
    let mut m = Machine::new(config(), start);
    let (slow, _) = m.acquire(start);
    for _ in 0..10 {
        call(&mut m, start, CallOutcome::Failure);
    }
    let t = start + Duration::from_secs(10);
    let (probe, _) = m.acquire(t);
    // The slow call admitted while closed ends now: it must not close or open anything.
    assert_eq!(m.record(t, slow.unwrap(), CallOutcome::Success), None);
    assert_eq!(
        m.record(t, probe.unwrap(), CallOutcome::Failure),
        Some(Transition { from: BreakerState::HalfOpen, to: BreakerState::Open })
    );
    assert!(m.acquire(t + Duration::from_secs(9)).0.is_err(), "open again for a full open_for");
    assert!(m.acquire(t + Duration::from_secs(10)).0.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_permit_gives_its_probe_back_and_transitions_are_events() {
    let sink = MemorySink::new();
    let b = Breaker::new(
        "t",
        BreakerConfig { half_open_probes: 1, ..config() },
        Arc::new(TokioClock::new()),
        sink.clone(),
    );
    for _ in 0..10 {
        b.acquire().unwrap().record(Some(ErrorClass::ServerError));
    }
    assert_eq!(b.state(), BreakerState::Open);
    assert!(b.acquire().is_none());
    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = b.acquire().expect("one probe");
    assert!(b.acquire().is_none());
    drop(probe); // cancelled call
    let probe = b.acquire().expect("the slot came back");
    probe.record(Some(ErrorClass::InvalidRequest)); // not counted: slot back again
    b.acquire().expect("probe").record(None);
    assert_eq!(b.state(), BreakerState::Closed);
    let transitions: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            crate::Event::BreakerTransition { from, to, .. } => Some((from, to)),
            _ => None,
        })
        .collect();
    use BreakerState::*;
    assert_eq!(transitions, [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]);
}

#[derive(Debug, Clone)]
enum Op {
    Call(u8),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![4 => (0u8..3).prop_map(Op::Call), 1 => (0u16..20_000).prop_map(Op::Advance)]
}

proptest! {
    #[test]
    fn only_legal_transitions(ops in proptest::collection::vec(op(), 1..300), probes in 1u32..4, min in 1u32..12) {
        let cfg = BreakerConfig { half_open_probes: probes, min_calls: min, ..config() };
        let mut now = Instant::now();
        let mut m = Machine::new(cfg, now);
        let mut outstanding = Vec::new();
        let mut state = BreakerState::Closed;
        for op in ops {
            let mut transitions = Vec::new();
            match op {
                Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                Op::Call(kind) => {
                    let (ticket, t) = m.acquire(now);
                    transitions.extend(t);
                    if let Ok(ticket) = ticket { outstanding.push(ticket); }
                    if let Some(ticket) = outstanding.pop() {
                        let outcome = [CallOutcome::Success, CallOutcome::Failure, CallOutcome::Ignored][kind as usize];
                        transitions.extend(m.record(now, ticket, outcome));
                    }
                }
            }
            for t in transitions {
                prop_assert_eq!(t.from, state);
                let legal = matches!(
                    (t.from, t.to),
                    (BreakerState::Closed, BreakerState::Open)
                        | (BreakerState::Open, BreakerState::HalfOpen)
                        | (BreakerState::HalfOpen, BreakerState::Open)
                        | (BreakerState::HalfOpen, BreakerState::Closed)
                );
                prop_assert!(legal, "illegal {:?}", t);
                state = t.to;
            }
        }
    }
}

#[test]
fn a_late_failure_counts_when_closed_reopens_when_half_open_and_is_ignored_when_open() {
    let now = Instant::now();
    let mut m = Machine::new(BreakerConfig { min_calls: 2, ..config() }, now);
    assert_eq!(m.record_late_failure(now), None, "one failure of two needed");
    assert_eq!(
        m.record_late_failure(now),
        Some(Transition { from: BreakerState::Closed, to: BreakerState::Open })
    );
    assert_eq!(m.record_late_failure(now), None, "open: nothing more to learn");
    let later = now + Duration::from_secs(10);
    assert_eq!(m.state(later).0, BreakerState::HalfOpen);
    // A probe answered (a stream's first token), then its stream died.
    let (ticket, _) = m.acquire(later);
    assert!(ticket.is_ok());
    assert_eq!(
        m.record_late_failure(later),
        Some(Transition { from: BreakerState::HalfOpen, to: BreakerState::Open })
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_failure_of_a_class_not_counted_is_ignored() {
    let sink = MemorySink::new();
    let b = Breaker::new(
        "t",
        BreakerConfig { min_calls: 1, ..config() },
        Arc::new(TokioClock::new()),
        sink.clone(),
    );
    b.record_failure(ErrorClass::InvalidRequest, None);
    assert_eq!(b.state(), BreakerState::Closed);
    b.record_failure(ErrorClass::Network, None);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(sink.events().len(), 1, "the transition was announced");
}
