//! What alerting did, for the record: every incident's trigger, hold, resolve and
//! cancel, and every delivery's outcome, handed to an [`AlertLog`] so an operator
//! sees them after a restart.
//!
//! Why a trait and not the journal: keel-telemetry sits beside keel-journal, not on
//! it. `keel serve` implements [`AlertLog`] over its journal; tests over a `Vec`. The
//! router and the sink workers never wait for it: they push onto a bounded channel
//! ([`LogTx::send`] never blocks; a full channel drops the entry and counts it) and
//! one task writes what it finds there in batches, retrying a failed batch a few
//! times before it drops it with a warning.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use keel_core::ErrorClass;
use tokio::sync::mpsc;

use super::config::Severity;
use super::sink::Action;

/// Entries waiting for the log's writer at most.
pub const LOG_CHANNEL: usize = 4096;
/// Entries one write carries at most.
pub const LOG_BATCH: usize = 256;
/// Tries of one batch before it is dropped.
const LOG_TRIES: u32 = 4;

/// What happened to an incident or one of its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// The incident opened (its rule's threshold was crossed).
    Triggered,
    /// Its trigger is held for quiet hours (`detail`: until when).
    Held,
    /// The quiet hours ended with the incident open: its trigger is sent now.
    Released,
    /// The incident resolved.
    Resolved,
    /// It resolved while its trigger was held: nothing was or will be sent.
    Cancelled,
    /// A sink accepted a delivery.
    Delivered,
    /// A delivery failed after its retries (`detail`: class and attempts).
    Failed,
    /// A delivery was dropped: its sink's queue was full.
    Dropped,
    /// A restarted router took the incident over (it was open before the restart).
    Adopted,
}

impl EntryKind {
    /// The name as stored (`triggered`, `delivered`…).
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryKind::Triggered => "triggered",
            EntryKind::Held => "held",
            EntryKind::Released => "released",
            EntryKind::Resolved => "resolved",
            EntryKind::Cancelled => "cancelled",
            EntryKind::Delivered => "delivered",
            EntryKind::Failed => "failed",
            EntryKind::Dropped => "dropped",
            EntryKind::Adopted => "adopted",
        }
    }
}

/// One line of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEntry {
    /// When (the injected clock's wall time).
    pub at: SystemTime,
    /// The incident's id (`keel/{rule}/{key}@{ms}`), or `digest@{ms}` for a digest.
    pub incident: String,
    /// What happened.
    pub kind: EntryKind,
    /// The rule's name (`digest` for a digest).
    pub rule: String,
    /// The incident's key.
    pub key: String,
    /// The rule's severity.
    pub severity: Severity,
    /// The class that crossed the threshold.
    pub class: Option<ErrorClass>,
    /// Its target.
    pub target: Option<String>,
    /// Failures in the window when it opened.
    pub count: u32,
    /// The sink (deliveries).
    pub sink: Option<String>,
    /// What was delivered (deliveries).
    pub action: Option<Action>,
    /// More, in words: a failure's class and attempts, a hold's end.
    pub detail: Option<String>,
}

/// Where the record goes.
#[async_trait]
pub trait AlertLog: Send + Sync + std::fmt::Debug {
    /// Stores `entries`, in order, durably.
    ///
    /// # Errors
    /// The store's problem, in words (the batch is tried again, then dropped).
    async fn write(&self, entries: &[AlertEntry]) -> Result<(), String>;
}

/// The router's and the workers' end of the log: never blocks.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogTx {
    tx: Option<mpsc::Sender<AlertEntry>>,
    dropped: Arc<AtomicU64>,
}

impl LogTx {
    pub(crate) fn send(&self, entry: AlertEntry) {
        if let Some(tx) = &self.tx {
            if tx.try_send(entry).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Entries dropped because the log's writer was behind (or gone).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Starts the log's writer; it ends once every [`LogTx`] is dropped and the channel
/// is empty.
pub(crate) fn start(log: Arc<dyn AlertLog>) -> (LogTx, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(LOG_CHANNEL);
    let dropped = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(writer(log, rx, dropped.clone()));
    (LogTx { tx: Some(tx), dropped }, task)
}

async fn writer(log: Arc<dyn AlertLog>, mut rx: mpsc::Receiver<AlertEntry>, dropped: Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(LOG_BATCH);
    while rx.recv_many(&mut batch, LOG_BATCH).await > 0 {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=LOG_TRIES {
            match log.write(&batch).await {
                Ok(()) => break,
                Err(problem) if attempt == LOG_TRIES => {
                    dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::warn!(
                        target: "keel::alert", entries = batch.len(), problem = %problem,
                        "alert record not written; dropped"
                    );
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
        batch.clear();
    }
}
