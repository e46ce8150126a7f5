//! The crash drill for plan runs, on both backends: `keel run` and `keel runs resume`
//! SIGKILLed at random moments (bounded counts for CI; `KEEL_DRILL_RUNS` and
//! `KEEL_DRILL_SEED` make it longer or replay it), each run resumed until it ends.
//! Then: every run completed, every order charged exactly once, each run's sequence
//! numbers contiguous from 1, and projections rebuilt from the events alone equal to
//! the live ones.

#![allow(clippy::print_stdout)] // the drill reports its counts

use std::time::Duration;

use keel_examples::payments::Faults;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{Bench, TOOLS, orders};

const ORDERS_PER_RUN: i64 = 3;

fn drill(storage_url: &str, label: &str) {
    let runs: i64 = std::env::var("KEEL_DRILL_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let seed: u64 = std::env::var("KEEL_DRILL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    println!("drill {label}: KEEL_DRILL_SEED={seed} KEEL_DRILL_RUNS={runs}");
    let mut rng = fastrand::Rng::with_seed(seed);
    // Slow, sometimes failing charges: kills land in calls, backoffs and commits.
    let faults = Faults { fail_every: 4, charge_delay_ms: 150, ..Faults::default() };
    let b = Bench::new(faults, &format!("[storage]\nurl = \"{storage_url}\"\n{TOOLS}"));
    let mut ids = Vec::new();
    let mut kills = 0;
    for r in 0..runs {
        let steps: String = (1..=ORDERS_PER_RUN)
            .map(|o| {
                format!("[[steps]]\ntool = \"charge\"\nparams = {{ order = {}, amount = 10 }}\n", r * 10 + o)
            })
            .collect();
        let plan = b.write(&format!("plan-{r}.toml"), &steps);
        let (mut child, run_id, _lines) = b.spawn(&["run", plan.to_str().unwrap()]);
        // Up to three kills of whichever process drives the run, at random moments.
        for round in 0..3 {
            // Not a wait for something: the random moment of the kill is the point.
            std::thread::sleep(Duration::from_millis(rng.u64(0..700)));
            let exited = child.try_wait().unwrap().is_some();
            if !exited {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
                kills += 1;
            }
            child.wait().unwrap();
            if round < 2 {
                child = b.spawn_resume(&run_id);
            }
        }
        let last = b.keel(&["runs", "resume", &run_id]);
        assert_eq!(last.code, 0, "run {run_id} (seed {seed}) ends completed: {last:?}");
        ids.push(run_id);
    }

    let mut charged = orders(&b.payments);
    let total = charged.len();
    charged.sort_unstable();
    charged.dedup();
    let duplicated = total - charged.len();
    let expected: Vec<i64> = (0..runs).flat_map(|r| (1..=ORDERS_PER_RUN).map(move |o| r * 10 + o)).collect();
    println!(
        "drill {label}: runs {runs}, kills {kills}, completed {}, orders charged {}, duplicated {duplicated}, lost {}",
        ids.len(),
        charged.len(),
        expected.len() - charged.len()
    );
    assert_eq!(duplicated, 0, "an order was charged twice (seed {seed})");
    assert_eq!(charged, expected, "every order charged once (seed {seed})");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let journal = keel_journal::open(storage_url, keel_journal::JournalOptions::default()).await.unwrap();
        let mut before = Vec::new();
        for id in &ids {
            let export = journal.export_run(id).await.unwrap().unwrap();
            let seqs: Vec<u64> = export.events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "contiguous seqs in {id}");
            assert_eq!(export.state.run.state, keel_journal::RunState::Completed);
            before.push(export.state);
        }
        journal.rebuild_projections().await.unwrap();
        for (id, state) in ids.iter().zip(before) {
            assert_eq!(journal.snapshot(id).await.unwrap().unwrap(), state, "rebuilt projections of {id}");
        }
    });
}

#[test]
fn plan_runs_killed_at_random_resume_to_one_charge_each_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    drill(&format!("sqlite:{}", dir.path().join("drill.db").display()), "sqlite");
}

#[test]
fn plan_runs_killed_at_random_resume_to_one_charge_each_on_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = rt.block_on(keel_testkit::postgres_database());
    drill(&url, "postgres");
}
