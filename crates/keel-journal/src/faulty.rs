//! [`Faulty`]: a journal whose writes fail on demand, for drills and tests of what Keel
//! does when its storage does (a full disk, a database that refuses writes).
//!
//! It wraps a real journal: reads always reach it; while [`Faulty::fail_writes`] is on,
//! every call that would write answers [`Error::DiskFull`] without touching it, and
//! once it is off again the same calls go through. Nothing here decides anything; it
//! only makes the storage's failures happen when a test says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::gate::GateRecord;

use crate::error::{Error, Result};
use crate::event::{JournalEvent, NewEvent, RecordedEvent};
use crate::journal::{Backend, Journal};
use crate::state::{Claim, ClaimToken, Lease, PruneReport, RunSnapshot};

/// A journal that refuses writes while told to (see the module docs).
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Journal>,
    failing: AtomicBool,
    refused: AtomicU64,
}

impl Faulty {
    /// Wraps `inner`, writing normally until [`fail_writes`](Self::fail_writes).
    pub fn new(inner: Arc<dyn Journal>) -> Arc<Self> {
        Arc::new(Self { inner, failing: AtomicBool::new(false), refused: AtomicU64::new(0) })
    }

    /// From now on, writes fail (`true`) or go through again (`false`).
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Writes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn write(&self) -> Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::DiskFull(sqlx::Error::Protocol("injected: database or disk is full".into())));
        }
        Ok(())
    }
}

#[async_trait]
impl Journal for Faulty {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn append(&self, events: &[NewEvent]) -> Result<Vec<u64>> {
        self.write()?;
        self.inner.append(events).await
    }
    async fn append_fenced(&self, lease: &Lease, events: &[JournalEvent]) -> Result<Vec<u64>> {
        self.write()?;
        self.inner.append_fenced(lease, events).await
    }
    async fn write_batch(
        &self,
        creations: &[crate::Creation],
        events: &[crate::NewEvent],
    ) -> Result<(Vec<Option<crate::NewRun>>, Vec<u64>)> {
        self.write()?;
        self.inner.write_batch(creations, events).await
    }
    async fn create_run(&self, run_id: &str, events: &[JournalEvent]) -> Result<bool> {
        self.write()?;
        self.inner.create_run(run_id, events).await
    }
    async fn create_run_leased(
        &self,
        run_id: &str,
        events: &[JournalEvent],
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<crate::NewRun>> {
        self.write()?;
        self.inner.create_run_leased(run_id, events, owner, ttl).await
    }
    async fn events(&self, run_id: &str, after: u64, limit: u32) -> Result<Vec<RecordedEvent>> {
        self.inner.events(run_id, after, limit).await
    }
    async fn snapshot(&self, run_id: &str) -> Result<Option<RunSnapshot>> {
        self.inner.snapshot(run_id).await
    }
    async fn run_ids(&self) -> Result<Vec<String>> {
        self.inner.run_ids().await
    }
    async fn list_runs(&self, page: &crate::RunPage) -> Result<Vec<crate::RunView>> {
        self.inner.list_runs(page).await
    }

    async fn approvals(
        &self,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>> {
        self.inner.approvals(status, limit).await
    }

    async fn approval(
        &self,
        id: &str,
    ) -> Result<Option<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>> {
        self.inner.approval(id).await
    }

    async fn tickets(
        &self,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(crate::TicketView, crate::RunView)>> {
        self.inner.tickets(status, limit).await
    }

    async fn ticket(&self, id: &str) -> Result<Option<(crate::TicketView, crate::RunView)>> {
        self.inner.ticket(id).await
    }

    async fn waiting(&self) -> Result<(u64, u64)> {
        self.inner.waiting().await
    }

    async fn attempt_stats(&self, since_ms: i64) -> Result<crate::AttemptStats> {
        self.inner.attempt_stats(since_ms).await
    }

    async fn rebuild_projections(&self) -> Result<()> {
        self.write()?;
        self.inner.rebuild_projections().await
    }
    async fn claim(&self, key: &str) -> Result<Claim> {
        self.write()?;
        self.inner.claim(key).await
    }
    async fn complete(&self, token: &ClaimToken, result: &serde_json::Value) -> Result<()> {
        self.write()?;
        self.inner.complete(token, result).await
    }
    async fn take_over_claim(&self, key: &str) -> Result<Claim> {
        self.write()?;
        self.inner.take_over_claim(key).await
    }
    async fn release_claim(&self, token: &ClaimToken) -> Result<()> {
        self.write()?;
        self.inner.release_claim(token).await
    }
    async fn acquire_lease(&self, run_id: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.write()?;
        self.inner.acquire_lease(run_id, owner, ttl).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.write()?;
        self.inner.renew_lease(lease, ttl).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.write()?;
        self.inner.release_lease(lease).await
    }
    async fn claim_runs(&self, owner: &str, ttl: Duration, limit: u32) -> Result<Vec<Lease>> {
        self.write()?;
        self.inner.claim_runs(owner, ttl, limit).await
    }
    async fn save_gate_history(&self, records: &[GateRecord]) -> Result<()> {
        self.write()?;
        self.inner.save_gate_history(records).await
    }
    async fn add_gate_outcomes(&self, records: &[GateRecord]) -> Result<()> {
        self.write()?;
        self.inner.add_gate_outcomes(records).await
    }
    async fn load_gate_history(&self) -> Result<Vec<GateRecord>> {
        self.inner.load_gate_history().await
    }
    async fn prune(&self, age: Duration) -> Result<PruneReport> {
        self.write()?;
        self.inner.prune(age).await
    }
    async fn close(&self) {
        self.inner.close().await;
    }

    async fn record_alerts(&self, records: &[crate::AlertRecord]) -> Result<()> {
        self.write()?;
        self.inner.record_alerts(records).await
    }

    async fn incidents(&self, limit: u32) -> Result<Vec<crate::IncidentView>> {
        self.inner.incidents(limit).await
    }
}
