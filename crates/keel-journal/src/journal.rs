//! The [`Journal`] trait both backends implement, its options, and [`open`].
//!
//! Callers hold an `Arc<dyn Journal>` and never learn which database is behind it:
//! SQLite and PostgreSQL give the same answers to the same calls, which the shared
//! test suite checks.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel_core::gate::GateRecord;
use keel_core::{Clock, TokioClock};

use crate::error::{Error, Result};
use crate::event::{JournalEvent, NewEvent, RecordedEvent, SCHEMA_VERSION};
use crate::state::{Claim, Lease, NewRun, PruneReport, RunExport, RunSnapshot};

/// Which database a journal is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file.
    Sqlite,
    /// A PostgreSQL database, possibly shared by several instances.
    Postgres,
}

/// How a journal behaves; the defaults suit production.
#[derive(Clone)]
pub struct JournalOptions {
    /// Where time comes from: lease and key expiry, event timestamps.
    pub clock: Arc<dyn Clock>,
    /// How long an in-progress idempotency claim holds before another caller may
    /// take the key over (its holder is presumed dead).
    pub claim_ttl: Duration,
    /// How long a completed idempotency key keeps its result.
    pub idempotency_ttl: Duration,
    /// Connections to open at most (PostgreSQL; SQLite readers).
    pub max_connections: u32,
    /// How long a call waits for a PostgreSQL connection before it fails with
    /// `timeout` (not retried: the wait was the retry). Bounds every call while the
    /// database is down or unreachable.
    pub acquire_timeout: Duration,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(TokioClock::new()),
            claim_ttl: Duration::from_secs(300),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for JournalOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalOptions")
            .field("claim_ttl", &self.claim_ttl)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch of `clock`'s wall time.
pub(crate) fn now_ms(clock: &dyn Clock) -> i64 {
    wall_ms(clock.wall())
}

pub(crate) fn wall_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The durable store of runs: an append-only journal of events with projections of
/// current state, idempotency keys, leases on runs, and the confidence gate's history.
///
/// Every method is one transaction. # Cancel safety: dropping a call's future rolls
/// its transaction back, unless the commit was already sent, in which case the call
/// may have taken effect; appends are the only calls where that matters, and the
/// [`JournalWriter`](crate::JournalWriter) reports them only once committed.
///
/// # Errors
///
/// Every method fails with [`Error`]: `timeout` when busy or locked (retried with
/// backoff inside first), `network` when the connection is lost, `server_error` when
/// the disk is full or the data is corrupt, `conflict` for lost leases and claims.
#[async_trait]
pub trait Journal: Send + Sync + fmt::Debug {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Appends `events` in one transaction, updating the projections in it, and
    /// returns each event's sequence number within its run.
    async fn append(&self, events: &[NewEvent]) -> Result<Vec<u64>>;

    /// Appends events to `lease`'s run only if the lease is still held with the same
    /// epoch: a process that lost its lease cannot write to a run someone else took.
    async fn append_fenced(&self, lease: &Lease, events: &[JournalEvent]) -> Result<Vec<u64>>;

    /// Starts run `run_id` with `events` (its first events) in one transaction, unless
    /// a run with that id exists: `true` if this call created it. With an id derived
    /// from an idempotency key, "the key's run exists" and "the run was created" are
    /// one fact, so a crash cannot separate them; repeating the call is harmless.
    async fn create_run(&self, run_id: &str, events: &[JournalEvent]) -> Result<bool>;

    /// Like [`create_run`](Self::create_run), and in the same transaction takes the new
    /// run's lease for `owner` (a caller that creates a run to drive it at once saves a
    /// transaction): the run if this call created it, with the lease if it got it (a
    /// lease on the id may be held already) and its snapshot (`None`: the run existed).
    async fn create_run_leased(
        &self,
        run_id: &str,
        events: &[JournalEvent],
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<NewRun>> {
        if !self.create_run(run_id, events).await? {
            return Ok(None);
        }
        let lease = self.acquire_lease(run_id, owner, ttl).await?;
        let snapshot =
            self.snapshot(run_id).await?.ok_or(Error::Internal("a created run has no snapshot"))?;
        Ok(Some(NewRun { lease, snapshot }))
    }

    /// Creates runs (each as [`create_run_leased`](Self::create_run_leased) would) and
    /// appends `events` (as [`append`](Self::append) would), in one transaction: the
    /// writer's group commit, so that runs created by concurrent calls cost one commit
    /// between them. Answers each creation's run (`None`: it existed) and each event's
    /// sequence number.
    async fn write_batch(
        &self,
        creations: &[crate::Creation],
        events: &[NewEvent],
    ) -> Result<(Vec<Option<NewRun>>, Vec<u64>)> {
        let mut created = Vec::with_capacity(creations.len());
        for c in creations {
            created.push(self.create_run_leased(&c.run_id, &c.events, &c.lease.0, c.lease.1).await?);
        }
        let seqs = if events.is_empty() { Vec::new() } else { self.append(events).await? };
        Ok((created, seqs))
    }

    /// The events of `run_id` after sequence number `after`, at most `limit`.
    async fn events(&self, run_id: &str, after: u64, limit: u32) -> Result<Vec<RecordedEvent>>;

    /// What the projections hold for `run_id`, or `None` for an unknown run.
    async fn snapshot(&self, run_id: &str) -> Result<Option<RunSnapshot>>;

    /// The ids of all runs, oldest first.
    async fn run_ids(&self) -> Result<Vec<String>>;

    /// A page of runs, newest activity first: an indexed query whose cost does not grow
    /// with the journal's history.
    async fn list_runs(&self, page: &crate::RunPage) -> Result<Vec<crate::RunView>>;

    /// Approvals (of `status`: `pending`, `approved`, `denied`, `expired`), newest
    /// first, at most `limit`, each with its run and step.
    async fn approvals(
        &self,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>>;

    /// One approval with its run and its step.
    async fn approval(
        &self,
        id: &str,
    ) -> Result<Option<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>>;

    /// Tickets (of `status`: `open`, `resolved`), newest first, at most `limit`, with
    /// their runs.
    async fn tickets(
        &self,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(crate::TicketView, crate::RunView)>>;

    /// One ticket with its run.
    async fn ticket(&self, id: &str) -> Result<Option<(crate::TicketView, crate::RunView)>>;

    /// How many approvals are pending and how many tickets are open (counted by index).
    async fn waiting(&self) -> Result<(u64, u64)>;

    /// Attempts started since `since_ms`, aggregated.
    async fn attempt_stats(&self, since_ms: i64) -> Result<crate::AttemptStats>;

    /// Throws away every projection and rebuilds them from the events alone.
    async fn rebuild_projections(&self) -> Result<()>;

    /// Claims an idempotency key: exactly one concurrent claimer wins; the others get
    /// the winner's result, or "in progress" while it has none.
    async fn claim(&self, key: &str) -> Result<Claim>;

    /// Stores the result of a won claim; from now on claims of the key return it.
    async fn complete(&self, token: &crate::ClaimToken, result: &serde_json::Value) -> Result<()>;

    /// Takes over `key`'s in-progress claim, whoever holds it: for a caller that knows
    /// the holder is dead (it holds the lease of the run the key belongs to). Returns
    /// the stored result if the key was completed.
    async fn take_over_claim(&self, key: &str) -> Result<Claim>;

    /// Gives a won claim up without a result (the action failed): the next claim wins.
    async fn release_claim(&self, token: &crate::ClaimToken) -> Result<()>;

    /// Takes the lease on `run_id` for `owner` if it is free, expired, or already
    /// `owner`'s (a restarted process), for `ttl`; `None` if someone else holds it.
    async fn acquire_lease(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extends a held lease to now + `ttl`; [`Error::LeaseLost`] if it was taken.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Gives a lease up.
    async fn release_lease(&self, lease: &Lease) -> Result<()>;

    /// Takes up to `limit` unfinished runs whose lease is missing or expired
    /// (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so instances never take the same run).
    async fn claim_runs(&self, owner: &str, ttl: Duration, limit: u32) -> Result<Vec<Lease>>;

    /// Replaces the stored gate history with `records` (a full
    /// [`ConfidenceGate::snapshot`](keel_core::ConfidenceGate::snapshot)).
    async fn save_gate_history(&self, records: &[GateRecord]) -> Result<()>;

    /// Adds outcomes to the stored gate history (for instances sharing one database:
    /// each adds what it observed).
    async fn add_gate_outcomes(&self, records: &[GateRecord]) -> Result<()>;

    /// The stored gate history, for [`ConfidenceGate::load`](keel_core::ConfidenceGate::load).
    async fn load_gate_history(&self) -> Result<Vec<GateRecord>>;

    /// Removes runs whose last event is older than `age`, with their events and
    /// projections, and idempotency keys that have expired.
    async fn prune(&self, age: Duration) -> Result<PruneReport>;

    /// Closes the connections.
    async fn close(&self);

    /// Stores alerting's record, in order, in one transaction: each line in its
    /// incident's timeline; a `triggered` line makes the incident's row (once), a
    /// `resolved` or `cancelled` line closes it.
    async fn record_alerts(&self, records: &[crate::AlertRecord]) -> Result<()>;

    /// Incidents with their timelines: the open ones, latest first, then up to
    /// `limit` resolved ones, latest resolved first (at most `limit` open ones too).
    async fn incidents(&self, limit: u32) -> Result<Vec<crate::IncidentView>>;

    /// One run's events and state, for `keel runs show --json` and support bundles.
    async fn export_run(&self, run_id: &str) -> Result<Option<RunExport>> {
        let Some(state) = self.snapshot(run_id).await? else { return Ok(None) };
        let mut events = Vec::new();
        loop {
            let after = events.last().map(|e: &RecordedEvent| e.seq).unwrap_or(0);
            let page = self.events(run_id, after, 1000).await?;
            if page.is_empty() {
                break;
            }
            events.extend(page);
        }
        Ok(Some(RunExport { schema_version: SCHEMA_VERSION, state, events }))
    }

    /// Whether the journal can be written now, with a write that changes nothing
    /// others see: a lease on a probe id of its own, taken and given back (two small
    /// committed transactions). For readiness checks: reads may work on a full disk.
    ///
    /// # Errors
    /// The storage's, as for every write.
    async fn check_writable(&self) -> Result<()> {
        let probe = format!("keel-probe-{:016x}", fastrand::u64(..));
        if let Some(lease) = self.acquire_lease(&probe, &probe, Duration::from_secs(60)).await? {
            self.release_lease(&lease).await?;
        }
        Ok(())
    }

    /// Claims `key`, waiting up to `timeout` while another claimer is in progress.
    /// Returns [`Claim::Won`] or [`Claim::Done`]; [`Error::InProgress`] on timeout.
    async fn claim_or_wait(&self, key: &str, timeout: Duration) -> Result<Claim> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            match self.claim(key).await? {
                Claim::InProgress { .. } => {
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(Error::InProgress(key.to_owned()));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                done_or_won => return Ok(done_or_won),
            }
        }
    }
}

/// Opens the journal at `url`: `sqlite:PATH` (or a plain path; the file is created on
/// first use) or `postgres://...`, applying the embedded migrations.
///
/// # Errors
///
/// [`Error::Url`] for another scheme; storage errors as for every call.
pub async fn open(url: &str, options: JournalOptions) -> Result<Arc<dyn Journal>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(crate::postgres::PostgresJournal::connect(url, options).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        Ok(Arc::new(crate::sqlite::SqliteJournal::open(path.as_ref(), options).await?))
    } else if !url.contains("://") {
        Ok(Arc::new(crate::sqlite::SqliteJournal::open(url.as_ref(), options).await?))
    } else {
        Err(Error::Url(url.to_owned()))
    }
}
