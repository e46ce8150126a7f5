//! The server's workers: they carry on runs that nobody is working — started through
//! the API, or whose approval or ticket was just decided, or left by a process that
//! died — with no other process waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_runtime::{RunStatus, Runner};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Starts `count` workers on `tracker`; they stop taking runs when `stop` fires and
/// finish the drive they are in.
pub fn start(
    runner: Arc<Runner>,
    drives: Arc<Drives>,
    wake: Arc<Notify>,
    count: usize,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    for _ in 0..count.max(1) {
        let (runner, drives, wake, stop) = (runner.clone(), drives.clone(), wake.clone(), stop.clone());
        tracker.spawn(async move {
            loop {
                if stop.is_cancelled() {
                    return;
                }
                let ttl = runner.config().run.lease;
                let leases = match runner.journal().claim_runs(runner.owner(), ttl, 1).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim runs");
                        Vec::new()
                    }
                };
                let idle = leases.is_empty();
                for lease in leases {
                    match drives.drive(&runner, &lease.run_id).await {
                        Ok(status) => tracing::info!(run = %lease.run_id, ?status, "run driven"),
                        Err(e) => tracing::warn!(run = %lease.run_id, error = %e, "run drive failed"),
                    }
                }
                if idle {
                    tokio::select! {
                        () = wake.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        });
    }
}

/// The runs this process is driving, one task per run at a time.
///
/// The journal's lease keeps processes apart, but this server is one lease owner: a
/// worker could claim a run that an invoking request had just created, and the
/// request's own drive would then re-enter the lease, so both called the tool (and
/// the second took the first's idempotency claim, answering it 409). Here the later
/// one waits, then finds the run finished.
#[derive(Debug, Default)]
pub struct Drives(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Drives {
    /// Drives `run_id` with `runner` once no other task of this process does.
    ///
    /// # Errors
    /// The runner's.
    ///
    /// # Cancel safety
    /// As [`Runner::drive`]'s; a dropped wait leaves nothing behind.
    pub async fn drive(
        &self,
        runner: &Runner,
        run_id: &str,
    ) -> Result<RunStatus, keel_runtime::runner::Error> {
        let entry = Entry { drives: self, run_id, lock: self.lock_for(run_id) };
        let _held = entry.lock.lock().await;
        // A run's future is large; boxed, it lives on the heap, not on the task's stack
        // (debug builds overflowed a worker's 2 MiB stack).
        Box::pin(runner.drive(run_id)).await
    }

    fn lock_for(&self, run_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(run_id.to_owned()).or_default().clone()
    }
}

/// One task's hold on a run's lock; the last one out removes the run's entry.
struct Entry<'a> {
    drives: &'a Drives,
    run_id: &'a str,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut map = self.drives.0.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under the map's lock: two references are the map's and ours.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(self.run_id);
        }
    }
}
