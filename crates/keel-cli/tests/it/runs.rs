//! `keel runs list`: paged by the journal's index, filtered by state, and the model
//! gateway's own record (the `gateway` run) is never listed nor cancellable.

use keel_examples::payments::Faults;

use crate::support::{Bench, TOOLS};

fn plan(order: u32, amount: u32) -> String {
    format!("[[steps]]\ntool = \"charge\"\nparams = {{ order = {order}, amount = {amount} }}\n")
}

#[test]
fn runs_list_pages_filters_and_hides_the_gateways_record() {
    let b = Bench::new(Faults::default(), TOOLS);
    let mut done = Vec::new();
    for order in 1..=3 {
        let p = b.write(&format!("plan{order}.toml"), &plan(order, 10));
        let out = b.keel(&["run", p.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{out:?}");
        done.push(out.run_id());
    }
    let big = b.write("big.toml", &plan(9, 250));
    let waiting = b.keel(&["run", big.to_str().unwrap()]);
    assert_eq!(waiting.code, 3, "waits for approval: {waiting:?}");
    let waiting = waiting.run_id();

    // The gateway's record of model calls lives in the journal as the run `gateway`.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}", b.path("keel.db").display());
        let journal = keel_journal::open(&url, keel_journal::JournalOptions::default()).await.unwrap();
        let created =
            keel_journal::JournalEvent::RunCreated { name: String::new(), input: serde_json::json!({}) };
        assert!(journal.create_run("gateway", &[created]).await.unwrap());
        journal.close().await;
    });

    let all = b.keel(&["runs", "list", "--json"]);
    assert_eq!(all.code, 0, "{all:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&all.stdout).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "four runs, not the gateway's record: {ids:?}");
    assert_eq!(ids[0], waiting, "newest first");
    assert!(!ids.contains(&"gateway"));

    let two = b.keel(&["runs", "list", "--json", "--limit", "2"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&two.stdout).unwrap();
    assert_eq!(rows.len(), 2, "{two:?}");

    let completed = b.keel(&["runs", "list", "--json", "--state", "completed"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&completed.stdout).unwrap();
    let mut ids: Vec<String> = rows.iter().map(|r| r["run_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    done.sort();
    assert_eq!(ids, done, "only the completed ones");

    let bad = b.keel(&["runs", "list", "--state", "sleeping"]);
    assert_eq!(bad.code, 2, "a usage error: {bad:?}");
    assert!(bad.stderr.contains("no run state `sleeping`"), "{bad:?}");
    let bad = b.keel(&["runs", "list", "--limit", "0"]);
    assert_eq!(bad.code, 2, "{bad:?}");

    let cancel = b.keel(&["runs", "cancel", "gateway"]);
    assert_eq!(cancel.code, 2, "the gateway's record is not a run: {cancel:?}");
    assert!(cancel.stderr.contains("not a run"), "{cancel:?}");
}
