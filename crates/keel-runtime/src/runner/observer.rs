//! [`Observer`]: who watches a run as it happens (the CLI's live view, the server).

use keel_journal::JournalEvent;

/// Sees every event the runner records, as it records it, policy events included.
///
/// Called on the runner's task: it must not block.
pub trait Observer: Send + Sync {
    /// One event of `run_id`.
    fn event(&self, run_id: &str, event: &JournalEvent);
}

/// Watches nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullObserver;

impl Observer for NullObserver {
    fn event(&self, _run_id: &str, _event: &JournalEvent) {}
}
