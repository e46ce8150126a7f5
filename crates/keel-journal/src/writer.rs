//! The background writer: a non-blocking [`EventSink`] with group commit.
//!
//! Policy code records events on its hot path and must not wait for a disk. The
//! [`JournalWriter`] hands each event to one writer task through a channel and
//! returns at once; the task takes everything queued since its last commit and
//! appends it in one transaction (group commit), so a burst of events costs one commit
//! instead of one each. Whoever needs to know that an event is durable waits on its
//! [`Ack`] or on [`JournalWriter::flush`]: both resolve only after the transaction
//! holding the event committed. A batch that fails (after the journal's own retries of
//! busy errors) is never dropped silently: its acks report it, and so does the next
//! [`flush`](JournalWriter::flush) (and [`flush_run`](JournalWriter::flush_run) of each
//! run it held events of). A failure is not a verdict on later batches: each is tried
//! afresh, so the writer recovers as soon as the storage does (a disk with room again,
//! a database back up). [`JournalWriter::healthy`] says whether the last batch failed,
//! and the start and the end of a failing stretch are logged (warn, then info).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use keel_core::{Event, EventSink};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::event::{Creation, JournalEvent, NewEvent};
use crate::journal::Journal;
use crate::state::NewRun;

/// The most events committed in one transaction.
pub const DEFAULT_MAX_BATCH: usize = 2048;

/// Runs whose lost events are remembered for [`JournalWriter::flush_run`] at most (a
/// long outage must not grow memory; beyond it, only the plain `flush` reports).
const MAX_LOST_RUNS: usize = 10_000;

/// What failed and has not been reported yet.
#[derive(Default)]
struct Failures {
    /// A batch failed since the last `flush` was answered.
    since_flush: Option<Arc<Error>>,
    /// Runs with events lost (submitted without an ack) since their last `flush_run`.
    lost_runs: HashMap<String, Arc<Error>>,
    /// Batches that failed in a row: zero when the last batch committed.
    failing: u64,
}

/// Who learns how a queued event fared.
enum Waiter {
    /// Nobody waits: a failure is reported by the next flush (the [`EventSink`] path).
    Flush,
    /// An [`Ack`].
    Ack(oneshot::Sender<Result<u64>>),
    /// An event of a group whose last event's ack answers for it.
    Group,
}

enum Item {
    Event(NewEvent, Option<oneshot::Sender<Result<u64>>>),
    /// Events committed in one transaction, acked once (with the last one's seq).
    Events(Vec<NewEvent>, oneshot::Sender<Result<u64>>),
    /// A run to create in the next batch.
    Create(Creation, oneshot::Sender<Result<Option<NewRun>>>),
    Flush(Option<String>, oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
}

/// Appends events in the background, in batches. Cheap to clone.
#[derive(Clone)]
pub struct JournalWriter {
    tx: mpsc::UnboundedSender<Item>,
    failed: Arc<Mutex<Failures>>,
    /// Events queued and not yet committed (or failed): the backlog callers use to
    /// shed load before memory grows, since queueing itself never blocks.
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl fmt::Debug for JournalWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalWriter").field("closed", &self.tx.is_closed()).finish_non_exhaustive()
    }
}

/// The promise that one submitted event will be durable.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<Result<u64>>);

impl Ack {
    /// Waits until the event is committed and returns its sequence number in its run.
    ///
    /// # Cancel safety
    ///
    /// Dropping this future does not withdraw the event; it is still written.
    ///
    /// # Errors
    ///
    /// [`Error::Batch`] with the cause when its batch could not be written;
    /// [`Error::WriterClosed`] when the writer stopped first.
    pub async fn durable(self) -> Result<u64> {
        self.0.await.unwrap_or(Err(Error::WriterClosed))
    }
}

impl JournalWriter {
    /// Starts the writer task on the current tokio runtime, appending to `journal`
    /// at most `max_batch` submissions per transaction (a group from
    /// [`submit_all`](Self::submit_all) is one).
    pub fn spawn(journal: Arc<dyn Journal>, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(Failures::default()));
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(run(journal, rx, max_batch.max(1), failed.clone(), pending.clone()));
        Self { tx, failed, pending }
    }

    /// Events queued and not yet committed: how far the writer is behind.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues `event` of `run_id` and returns at once (never blocks).
    pub fn submit(&self, run_id: impl Into<String>, event: JournalEvent) -> Ack {
        self.submit_event(NewEvent::new(run_id, event))
    }

    /// Queues `event` (perhaps fenced by a lease) and returns at once (never blocks).
    pub fn submit_event(&self, event: NewEvent) -> Ack {
        let (ack, rx) = oneshot::channel();
        self.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A closed writer drops `ack`, which resolves the Ack with WriterClosed.
        if self.tx.send(Item::Event(event, Some(ack))).is_err() {
            self.pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ack(rx)
    }

    /// Queues `events` to be committed in one transaction (all or none: they are never
    /// split across batches) and returns at once; the ack answers with the last one's
    /// sequence number. An empty list is refused ([`Error::Internal`]).
    pub fn submit_all(&self, events: Vec<NewEvent>) -> Ack {
        let (ack, rx) = oneshot::channel();
        if events.is_empty() {
            let _ = ack.send(Err(Error::Internal("no events to submit")));
            return Ack(rx);
        }
        let n = events.len();
        self.pending.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if self.tx.send(Item::Events(events, ack)).is_err() {
            self.pending.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        }
        Ack(rx)
    }

    /// Creates the run of `creation` (unless it exists) with its first events and its
    /// lease, in the next batch's transaction: the run created, `None` when it existed.
    /// The creation is the writer's once queued: a caller that stops waiting does not
    /// cancel it.
    ///
    /// # Errors
    /// As [`Ack::durable`].
    pub async fn create(&self, creation: Creation) -> Result<Option<NewRun>> {
        let (done, rx) = oneshot::channel();
        let n = creation.events.len();
        self.pending.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if self.tx.send(Item::Create(creation, done)).is_err() {
            self.pending.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        }
        rx.await.unwrap_or(Err(Error::WriterClosed))
    }

    /// Queues `event` without a way to wait for it (the [`EventSink`] path). A failure
    /// to write it is reported by the next [`flush`](Self::flush).
    pub fn record(&self, event: NewEvent) {
        self.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.tx.send(Item::Event(event, None)).is_err() {
            self.pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!("journal writer closed: event dropped");
            self.poison(Error::WriterClosed);
        }
    }

    /// Queues `event` and waits until it is committed.
    ///
    /// # Errors
    ///
    /// As [`Ack::durable`].
    pub async fn append(&self, run_id: impl Into<String>, event: JournalEvent) -> Result<u64> {
        self.submit(run_id, event).durable().await
    }

    /// Waits until every event queued before this call is committed.
    ///
    /// # Errors
    ///
    /// [`Error::Batch`] if a batch failed since the previous `flush` was answered
    /// (those events are lost and the caller must know; the failure is reported once,
    /// to the flushes answered next); [`Error::WriterClosed`] after `close`.
    pub async fn flush(&self) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Item::Flush(None, done)).map_err(|_| Error::WriterClosed)?;
        rx.await.unwrap_or(Err(Error::WriterClosed))
    }

    /// Waits until every event queued before this call is committed, and reports
    /// whether events of `run_id` handed over without an ack ([`record`](Self::record),
    /// the [`EventSink`] path) were lost since the last `flush_run` of that run.
    /// Failures of other runs are theirs: a drive of one run is not failed by another's.
    ///
    /// # Errors
    ///
    /// [`Error::Batch`] with the cause when events of `run_id` were lost;
    /// [`Error::WriterClosed`] after `close`.
    pub async fn flush_run(&self, run_id: &str) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Item::Flush(Some(run_id.to_owned()), done)).map_err(|_| Error::WriterClosed)?;
        rx.await.unwrap_or(Err(Error::WriterClosed))
    }

    /// Whether the last batch committed (or none was written yet): `false` while the
    /// storage refuses writes, `true` again after the first batch that commits.
    pub fn healthy(&self) -> bool {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).failing == 0
    }

    /// Commits what is queued and stops the writer task; later submissions fail.
    ///
    /// # Errors
    ///
    /// As [`flush`](Self::flush).
    pub async fn close(&self) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Item::Close(done)).map_err(|_| Error::WriterClosed)?;
        rx.await.unwrap_or(Err(Error::WriterClosed))
    }

    /// An [`EventSink`] that journals keel-core events as events of `run_id`.
    pub fn sink(&self, run_id: impl Into<String>) -> RunSink {
        RunSink { writer: self.clone(), run_id: run_id.into(), step: None, fence: None }
    }

    fn poison(&self, e: Error) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.since_flush.get_or_insert_with(|| Arc::new(e));
    }
}

async fn run(
    journal: Arc<dyn Journal>,
    mut rx: mpsc::UnboundedReceiver<Item>,
    max_batch: usize,
    failed: Arc<Mutex<Failures>>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut items = Vec::with_capacity(max_batch);
    let mut events = Vec::with_capacity(max_batch);
    let mut acks = Vec::with_capacity(max_batch);
    let mut creations = Vec::new();
    let mut created = Vec::new();
    let mut waiters = Vec::new();
    loop {
        if rx.recv_many(&mut items, max_batch).await == 0 {
            return;
        }
        let mut closing = false;
        for item in items.drain(..) {
            match item {
                Item::Event(e, ack) => {
                    events.push(e);
                    acks.push(ack.map_or(Waiter::Flush, Waiter::Ack));
                }
                Item::Events(group, ack) => {
                    let last = group.len() - 1;
                    acks.extend((0..last).map(|_| Waiter::Group));
                    acks.push(Waiter::Ack(ack));
                    events.extend(group);
                }
                Item::Create(c, done) => {
                    creations.push(c);
                    created.push(done);
                }
                Item::Flush(run, done) => waiters.push((run, done)),
                Item::Close(done) => {
                    waiters.push((None, done));
                    closing = true;
                }
            }
        }
        if !events.is_empty() || !creations.is_empty() {
            let queued = events.len() + creations.iter().map(|c| c.events.len()).sum::<usize>();
            let mut result = journal.write_batch(&creations, &events).await;
            // A lost lease fences out its own events only: the batch goes in without them.
            while let Err(Error::LeaseLost { run_id, owner }) = &result {
                let lost =
                    |e: &NewEvent| e.fence.as_ref().is_some_and(|l| l.run_id == *run_id && l.owner == *owner);
                let (mut kept, mut kept_acks) = (Vec::new(), Vec::new());
                let mut dropped = 0;
                for (event, ack) in events.drain(..).zip(acks.drain(..)) {
                    if lost(&event) {
                        dropped += 1;
                        if let Waiter::Ack(ack) = ack {
                            let _ = ack
                                .send(Err(Error::LeaseLost { run_id: run_id.clone(), owner: owner.clone() }));
                        }
                    } else {
                        kept.push(event);
                        kept_acks.push(ack);
                    }
                }
                tracing::warn!(run = %run_id, owner = %owner, events = dropped, "events of a lost lease were not written");
                (events, acks) = (kept, kept_acks);
                if dropped == 0 {
                    break; // not an event's lease: the batch fails as it is
                }
                if events.is_empty() && creations.is_empty() {
                    result = Ok((Vec::new(), Vec::new()));
                    break;
                }
                result = journal.write_batch(&creations, &events).await;
            }
            match result {
                Ok((runs, seqs)) => {
                    {
                        // Healthy before any ack: whoever sees one sees the recovery.
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        if f.failing > 0 {
                            tracing::info!(failed_batches = f.failing, "journal writes recovered");
                            f.failing = 0;
                        }
                    }
                    for (ack, seq) in acks.drain(..).zip(seqs) {
                        if let Waiter::Ack(ack) = ack {
                            let _ = ack.send(Ok(seq));
                        }
                    }
                    for (done, run) in created.drain(..).zip(runs) {
                        let _ = done.send(Ok(run));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, events = events.len(), "journal batch failed");
                    let e = Arc::new(e);
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    if f.failing == 0 {
                        tracing::warn!(error = %e, "journal writes are failing; later batches are tried afresh");
                    }
                    f.failing += 1;
                    f.since_flush.get_or_insert_with(|| e.clone());
                    for done in created.drain(..) {
                        let _ = done.send(Err(Error::Batch(e.clone())));
                    }
                    for (event, ack) in events.iter().zip(acks.drain(..)) {
                        match ack {
                            Waiter::Ack(ack) => {
                                let _ = ack.send(Err(Error::Batch(e.clone())));
                            }
                            Waiter::Flush
                                if f.lost_runs.len() < MAX_LOST_RUNS
                                    || f.lost_runs.contains_key(&event.run_id) =>
                            {
                                f.lost_runs.entry(event.run_id.clone()).or_insert_with(|| e.clone());
                            }
                            Waiter::Flush | Waiter::Group => {}
                        }
                    }
                }
            }
            pending.fetch_sub(queued, std::sync::atomic::Ordering::Relaxed);
            events.clear();
            creations.clear();
        }
        if closing {
            // Before answering: once `close` returns, submissions must fail.
            rx.close();
        }
        if waiters.is_empty() {
            continue;
        }
        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
        let global = waiters.iter().any(|(run, _)| run.is_none()).then(|| f.since_flush.take()).flatten();
        for (run, done) in waiters.drain(..) {
            let lost = match &run {
                None => global.clone(),
                Some(run) => f.lost_runs.remove(run),
            };
            let _ = done.send(match lost {
                None => Ok(()),
                Some(e) => Err(Error::Batch(e)),
            });
        }
    }
}

/// Journals keel-core events as events of one run (and optionally one step).
#[derive(Debug, Clone)]
pub struct RunSink {
    writer: JournalWriter,
    run_id: String,
    step: Option<u32>,
    fence: Option<Arc<crate::Lease>>,
}

impl RunSink {
    /// The same sink, attributing events to step `step`.
    pub fn step(&self, step: u32) -> RunSink {
        RunSink { step: Some(step), ..self.clone() }
    }

    /// The same sink, its events fenced by `lease` (see [`NewEvent::fence`]).
    pub fn fenced(&self, lease: Option<Arc<crate::Lease>>) -> RunSink {
        RunSink { fence: lease, ..self.clone() }
    }

    /// The writer behind this sink, to flush it.
    pub fn writer(&self) -> &JournalWriter {
        &self.writer
    }
}

impl EventSink for RunSink {
    fn record(&self, event: &Event) {
        self.writer.record(
            NewEvent::new(
                self.run_id.clone(),
                JournalEvent::Policy { step: self.step, event: event.clone() },
            )
            .fenced(self.fence.clone()),
        );
    }
}
