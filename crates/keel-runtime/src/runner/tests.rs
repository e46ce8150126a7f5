use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_core::TokioClock;
use keel_journal::JournalOptions;

use super::*;

async fn runner(dir: &Path, config: &str) -> Runner {
    let config = Config::parse(config, &dir.join("keel.toml"), &|_| None).unwrap();
    let clock = Arc::new(TokioClock::new());
    let journal = keel_journal::open(
        &config.storage_url,
        JournalOptions { clock: clock.clone(), ..JournalOptions::default() },
    )
    .await
    .unwrap();
    Runner::new(Arc::new(config), journal, clock, Arc::new(NullObserver)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_drives_a_run_in_one_task_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let config = format!(
        "[tools.wait]\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.05; done\"]\n",
        gate.display()
    );
    let r = Arc::new(runner(dir.path(), &config).await);
    let plan = Plan::parse("[[steps]]\ntool = \"wait\"\n", "toml").unwrap();
    let run_id = r.create(&plan).await.unwrap();
    let first = tokio::spawn({
        let (r, id) = (r.clone(), run_id.clone());
        async move { r.drive(&id).await }
    });
    // Wait (bounded) until the first drive is inside the step.
    let mut waited = 0;
    while r.snapshot(&run_id).await.unwrap().steps.is_empty() {
        assert!(waited < 400, "the step never started");
        tokio::time::sleep(Duration::from_millis(25)).await;
        waited += 1;
    }
    assert!(matches!(r.drive(&run_id).await, Err(Error::Busy(..))), "a second task is kept out");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(first.await.unwrap().unwrap(), RunStatus::Completed);
    assert_eq!(r.drive(&run_id).await.unwrap(), RunStatus::Completed, "free again once the first ended");
}
