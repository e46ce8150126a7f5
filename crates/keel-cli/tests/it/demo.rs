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
