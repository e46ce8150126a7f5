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

/// Several observers, each seeing every event in turn (the server's metrics and its
/// alert router; the CLI's live view and its alert router).
pub struct Observers(pub Vec<std::sync::Arc<dyn Observer>>);

impl Observer for Observers {
    fn event(&self, run_id: &str, event: &JournalEvent) {
        for o in &self.0 {
            o.event(run_id, event);
        }
    }
}

/// Hands a run's policy events to a keel-core [`EventSink`](keel_core::EventSink):
/// the one event path, as the journal and `/metrics` see it (the alert router).
#[derive(Debug)]
pub struct PolicySink(pub std::sync::Arc<dyn keel_core::EventSink>);

impl Observer for PolicySink {
    fn event(&self, _run_id: &str, event: &JournalEvent) {
        if let JournalEvent::Policy { event, .. } = event {
            self.0.record(event);
        }
    }
}

/// Hands a run's failures to Sentry: its policy events (terminal failures, refused
/// retries) and its escalations (a ticket opened).
#[derive(Debug)]
pub struct SentryObserver(pub std::sync::Arc<keel_telemetry::sentry::Reporter>);

impl Observer for SentryObserver {
    fn event(&self, run_id: &str, event: &JournalEvent) {
        match event {
            JournalEvent::Policy { event, .. } => keel_core::EventSink::record(&*self.0, event),
            JournalEvent::TicketOpened { ticket_id, step, class, .. } => {
                self.0.escalated(run_id, ticket_id, *class, *step);
            }
            _ => {}
        }
    }
}
