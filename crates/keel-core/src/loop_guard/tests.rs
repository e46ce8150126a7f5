use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::event::MemorySink;

fn sig(n: i64) -> CallSignature {
    CallSignature::new("search", &json!({ "q": n }))
}

#[test]
fn the_nth_identical_call_within_the_window_is_stopped() {
    let sink = MemorySink::new();
    let g = LoopGuard::new(
        LoopGuardConfig { max_repeats: 3, window: 5, max_calls_per_turn: None, max_turns_per_run: None },
        sink.clone(),
    );
    let t: Arc<str> = Arc::from("search");
    g.check_call(&t, sig(1)).unwrap();
    g.check_call(&t, sig(1)).unwrap();
    let e = g.check_call(&t, sig(1)).unwrap_err();
    assert!(matches!(e, LoopDetected::Repeated { count: 3, .. }), "{e}");
    assert_eq!(sink.events().len(), 1);
    // Other calls push the old ones out of the window: then it may be made again.
    for n in 2..6 {
        g.check_call(&t, sig(n)).unwrap();
    }
    g.check_call(&t, sig(1)).unwrap();
}

#[test]
fn calls_per_turn_and_turns_per_run_are_capped() {
    let g = LoopGuard::new(
        LoopGuardConfig {
            max_repeats: 0,
            window: 0,
            max_calls_per_turn: Some(2),
            max_turns_per_run: Some(2),
        },
        Arc::new(crate::NullSink),
    );
    let t: Arc<str> = Arc::from("x");
    g.begin_turn().unwrap();
    g.check_call(&t, sig(1)).unwrap();
    g.check_call(&t, sig(1)).unwrap();
    assert!(matches!(g.check_call(&t, sig(2)), Err(LoopDetected::CallsPerTurn { limit: 2 })));
    g.begin_turn().unwrap();
    g.check_call(&t, sig(3)).unwrap();
    assert!(matches!(g.begin_turn(), Err(LoopDetected::TurnsPerRun { limit: 2 })));
}
