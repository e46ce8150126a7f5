use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::event::MemorySink;

#[test]
fn a_charge_over_the_limit_is_refused_whole() {
    let b = Budget::new(
        "run",
        &BudgetConfig { tokens: Some(100), ..BudgetConfig::default() },
        Arc::new(NullSink),
    );
    b.charge(BudgetKind::Tokens, 60).unwrap();
    let e = b.charge(BudgetKind::Tokens, 41).unwrap_err();
    assert_eq!((e.requested, e.remaining, e.limit), (41, 40, 100));
    assert_eq!(e.class(), ErrorClass::BudgetExceeded);
    assert_eq!(b.used(BudgetKind::Tokens), 60, "nothing charged");
    b.charge(BudgetKind::Tokens, 40).unwrap();
    assert_eq!(b.remaining(BudgetKind::Tokens), Some(0));
    // Kinds without a limit only count.
    b.charge(BudgetKind::Attempts, 1_000_000).unwrap();
}

#[test]
fn cost_is_counted_in_micro_dollars() {
    let b = Budget::new(
        "key",
        &BudgetConfig { cost_usd: Some(0.5), ..BudgetConfig::default() },
        Arc::new(NullSink),
    );
    assert_eq!(b.limit(BudgetKind::CostMicros), Some(500_000));
    assert!(b.charge(BudgetKind::CostMicros, usd_to_micros(0.25)).is_ok());
    assert!(b.charge(BudgetKind::CostMicros, usd_to_micros(0.26)).is_err());
}

#[test]
fn reservations_settle_to_the_real_usage() {
    let sink = MemorySink::new();
    let b = Arc::new(Budget::new(
        "run",
        &BudgetConfig { tokens: Some(1000), ..BudgetConfig::default() },
        sink.clone(),
    ));
    let r = b.reserve(BudgetKind::Tokens, 800).unwrap();
    assert!(b.reserve(BudgetKind::Tokens, 300).is_err(), "the reservation holds its share");
    r.settle(250).unwrap();
    assert_eq!(b.used(BudgetKind::Tokens), 250);
    // Dropped unsettled: given back.
    drop(b.reserve(BudgetKind::Tokens, 700).unwrap());
    assert_eq!(b.used(BudgetKind::Tokens), 250);
    // Real usage beyond the reservation is counted and reported, never hidden.
    let r = b.reserve(BudgetKind::Tokens, 700).unwrap();
    let e = r.settle(900).unwrap_err();
    assert_eq!(e.kind, BudgetKind::Tokens);
    assert_eq!(b.used(BudgetKind::Tokens), 1150);
    assert!(b.charge(BudgetKind::Tokens, 1).is_err());
    assert!(sink.events().iter().any(|e| matches!(e, Event::BudgetExceeded { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_shared_by_100_tasks_is_never_overspent() {
    let limit = 1_000;
    let b = Arc::new(Budget::new(
        "shared",
        &BudgetConfig { tokens: Some(limit), ..BudgetConfig::default() },
        Arc::new(NullSink),
    ));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut granted = 0;
                for j in 0..50u64 {
                    let amount = 1 + (i + j) % 7;
                    if b.charge(BudgetKind::Tokens, amount).is_ok() {
                        granted += amount;
                    }
                    if j % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                granted
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total <= limit, "granted {total} of {limit}");
    assert_eq!(b.used(BudgetKind::Tokens), total, "what was granted is exactly what was charged");
    assert!(total > limit - 7, "the budget is used up to the last unit that fits");
}

proptest! {
    #[test]
    fn charges_never_pass_the_limit(limit in 0u64..10_000, charges in proptest::collection::vec(0u64..3_000, 0..60)) {
        let b = Budget::new("p", &BudgetConfig { tokens: Some(limit), ..BudgetConfig::default() }, Arc::new(NullSink));
        let mut expected = 0;
        for c in charges {
            let ok = b.charge(BudgetKind::Tokens, c).is_ok();
            prop_assert_eq!(ok, expected + c <= limit);
            if ok { expected += c; }
            prop_assert!(b.used(BudgetKind::Tokens) <= limit);
        }
        prop_assert_eq!(b.used(BudgetKind::Tokens), expected);
    }
}

#[test]
fn usage_past_u64_saturates_instead_of_overflowing() {
    let limited = Arc::new(Budget::new(
        "b",
        &BudgetConfig { tokens: Some(10), ..BudgetConfig::default() },
        Arc::new(crate::event::NullSink),
    ));
    let r = limited.reserve(BudgetKind::Tokens, 5).unwrap();
    assert!(r.settle(u64::MAX).is_err(), "a hostile usage is over the limit, not a panic");
    assert_eq!(limited.used(BudgetKind::Tokens), u64::MAX);
    assert!(limited.charge(BudgetKind::Tokens, 1).is_err());
    let unlimited = Budget::unlimited("u");
    unlimited.charge(BudgetKind::Tokens, u64::MAX).unwrap();
    unlimited.charge(BudgetKind::Tokens, u64::MAX).unwrap();
    assert_eq!(unlimited.used(BudgetKind::Tokens), u64::MAX);
}

#[test]
fn after_an_overshoot_nothing_is_admitted_until_the_calls_in_flight_settle() {
    let b = Arc::new(Budget::new(
        "run",
        &BudgetConfig { tokens: Some(1000), ..BudgetConfig::default() },
        Arc::new(NullSink),
    ));
    let first = b.reserve(BudgetKind::Tokens, 100).unwrap();
    let second = b.reserve(BudgetKind::Tokens, 100).unwrap();
    assert_eq!((b.reserved(BudgetKind::Tokens), b.in_flight()), (200, 2));
    // The upstream ignored its limit: 300 spent on a 100 reservation.
    first.settle(300).unwrap();
    assert_eq!(b.used(BudgetKind::Tokens), 400);
    let e = b.reserve(BudgetKind::Tokens, 10).unwrap_err();
    assert!(e.held && e.to_string().contains("held"), "{e}");
    assert_eq!(b.refusals(), 1);
    // The call in flight spends past its reservation too: that is the bound.
    second.settle(250).unwrap();
    assert_eq!((b.used(BudgetKind::Tokens), b.in_flight(), b.reserved(BudgetKind::Tokens)), (550, 0, 0));
    // Nothing in flight: admitted again on the real balance.
    let third = b.reserve(BudgetKind::Tokens, 450).unwrap();
    assert!(b.reserve(BudgetKind::Tokens, 1).is_err(), "the balance is spent");
    drop(third);
    assert_eq!(
        (b.used(BudgetKind::Tokens), b.in_flight()),
        (550, 0),
        "an abandoned reservation is given back"
    );
    // An overshoot with nothing else in flight holds nothing.
    b.reserve(BudgetKind::Tokens, 10).unwrap().settle(20).unwrap();
    assert!(!b.is_held());
}
