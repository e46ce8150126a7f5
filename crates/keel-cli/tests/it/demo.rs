//! The README's main command: the payments demo, end to end with the real binary.

#[test]
fn the_demo_shows_retries_an_approval_a_breaker_a_ticket_and_no_double_charge() {
    let out =
        keel_examples::demo::run(std::path::Path::new(env!("CARGO_BIN_EXE_keel")), "127.0.0.1:0").unwrap();
    // run → waiting(3), approve, resume → escalated(4), show, resolve, resume → done,
    // resume again (nothing to do), show.
    assert_eq!(out.codes, [3, 0, 4, 0, 0, 0, 0, 0], "{out:?}");
    let orders: Vec<_> = out.charges.iter().map(|c| c["order"].as_i64().unwrap()).collect();
    assert_eq!(orders, [1, 2]);
}

/// The agent example: the model's charge goes through the tool's policy (its 503
/// retried) and lands once; the answer quotes the charge.
#[test]
fn the_agent_example_charges_once_and_answers_with_the_charge() {
    let out = keel_examples::agent::run(std::path::Path::new(env!("CARGO_BIN_EXE_keel"))).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.charges.len(), 1, "{out:?}");
    assert_eq!(out.charges[0]["order"], 7);
    assert!(out.stdout.contains("Done: the order is charged (ch_"), "{}", out.stdout);
    assert!(out.stdout.contains("turn-1: calls charge("), "the live view: {}", out.stdout);
}
