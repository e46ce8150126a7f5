//! The server's workers: they carry on runs that nobody is working — started through
//! the API, or whose approval or ticket was just decided, or left by a process that
//! died — with no other process waiting.

use std::sync::Arc;
use std::time::Duration;

use keel_runtime::Runner;
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

/// The runs this process is driving (shared with tool invocations).
pub use keel_runtime::invoke::Drives;
