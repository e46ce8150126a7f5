//! The SQL both backends run, written once.
//!
//! SQLite and PostgreSQL accept the same statements here (`$N` parameters, `ON
//! CONFLICT ... DO UPDATE`, `RETURNING`; integers, text and JSON as text), so the
//! journal is one body of code expanded for each driver by [`sql_journal!`]. What
//! differs (how a write transaction begins, row locks, `SKIP LOCKED`) is passed in.
//! Projections live in [`project`](self::project) and run inside the append's
//! transaction, which is what makes a crash leave events and state in agreement.

pub(crate) mod exec;
pub(crate) mod incidents;
pub(crate) mod project;
pub(crate) mod sql;
pub(crate) mod write;

/// Expands the [`Journal`](crate::Journal) implementation for one sqlx driver.
///
/// `$journal` must have fields `write: Pool<$db>` (for write transactions), `read:
/// Pool<$db>` and `options: JournalOptions`.
macro_rules! sql_journal {
    (
        $journal:ident, $db:ty, $conn:ty,
        backend = $backend:expr,
        begin = $begin:expr,
        write = $write:ident,
        lock_lease = $lock_lease:literal,
        claim_candidates = $candidates:expr $(,)?
    ) => {
        mod ops {
            use super::*;
            crate::store::project::projection_ops!($db, $conn);
            crate::store::incidents::incident_ops!($db, $conn);
        }

        #[allow(unused_imports)]
        use sqlx::Row as _;

        impl $journal {
            fn now(&self) -> i64 {
                crate::journal::now_ms(&*self.options.clock)
            }

            /// The snapshot of a run just created at `at_ms` with `events`: folded from
            /// them, or read back when they are not the usual creation events.
            async fn created_snapshot(
                &self,
                run_id: &str,
                events: &[crate::JournalEvent],
                at_ms: i64,
            ) -> crate::Result<crate::RunSnapshot> {
                match crate::RunSnapshot::of_created(run_id, events, at_ms) {
                    Some(snapshot) => Ok(snapshot),
                    None => crate::Journal::snapshot(self, run_id)
                        .await?
                        .ok_or(crate::Error::Internal("a created run has no snapshot")),
                }
            }

            async fn append_once(&self, events: &[crate::NewEvent]) -> crate::Result<Vec<u64>> {
                let now = self.now();
                $write!(self, batch(events.len()), conn => Self::append_in(&mut *conn, now, events).await)
            }

            /// Appends `events` in the caller's transaction.
            async fn append_in(
                conn: &mut dyn crate::store::exec::Exec,
                now: i64,
                events: &[crate::NewEvent],
            ) -> crate::Result<Vec<u64>> {
                use crate::store::exec::args;
                // Fenced events go in only while their lease is held at their epoch.
                let mut checked: Vec<&crate::Lease> = Vec::new();
                for lease in events.iter().filter_map(|e| e.fence.as_deref()) {
                    if checked.contains(&lease) {
                        continue;
                    }
                    let held = conn
                        .fetch_i64(
                            concat!(
                                "SELECT epoch FROM leases WHERE run_id = $1 AND owner = $2 AND epoch = $3",
                                $lock_lease
                            ),
                            args![lease.run_id, lease.owner, lease.epoch as i64],
                        )
                        .await?;
                    if held.is_none() {
                        return Err(crate::Error::LeaseLost {
                            run_id: lease.run_id.clone(),
                            owner: lease.owner.clone(),
                        });
                    }
                    checked.push(lease);
                }
                let seqs = crate::store::write::append_tx(&mut *conn, now, events).await?;
                for lease in events.iter().filter(|e| e.release).filter_map(|e| e.fence.as_deref()) {
                    conn.execute(crate::store::sql::RELEASE_LEASE, args![lease.run_id, lease.owner, lease.epoch as i64])
                        .await?;
                }
                Ok(seqs)
            }

            /// Creates the run unless it exists: whether it did.
            async fn create_run_once(&self, run_id: &str, events: &[crate::NewEvent]) -> crate::Result<bool> {
                let now = self.now();
                $write!(self, tx, conn => Ok(Self::create_in(&mut *conn, now, run_id, events, None).await?.is_some()))
            }

            /// Creates the run unless it exists, in the caller's transaction; with `lease`
            /// (owner, ttl), takes its lease too. `None`: the run existed.
            async fn create_in(
                conn: &mut dyn crate::store::exec::Exec,
                now: i64,
                run_id: &str,
                events: &[crate::NewEvent],
                lease: Option<(&str, std::time::Duration)>,
            ) -> crate::Result<Option<(Option<crate::Lease>, i64)>> {
                use crate::store::exec::args;
                let fresh = conn.fetch_text(crate::store::sql::CREATE_RUN, args![run_id, now]).await?;
                if fresh.is_none() {
                    // The run exists: nothing was written.
                    return Ok(None);
                }
                crate::store::write::append_tx(&mut *conn, now, events).await?;
                let held = match lease {
                    Some((owner, ttl)) => Self::acquire_in(&mut *conn, run_id, owner, now, ttl).await?,
                    None => None,
                };
                Ok(Some((held, now)))
            }

            /// The runs of `creations` created and `events` appended, in one transaction.
            async fn write_batch_once(
                &self,
                creations: &[crate::Creation],
                events: &[crate::NewEvent],
            ) -> crate::Result<(Vec<Option<(Option<crate::Lease>, i64)>>, Vec<u64>)> {
                let now = self.now();
                $write!(self, batch(events.len() + creations.iter().map(|c| c.events.len()).sum::<usize>()), conn => {
                    let mut created = Vec::with_capacity(creations.len());
                    for c in creations {
                        let first: Vec<crate::NewEvent> =
                            c.events.iter().map(|e| crate::NewEvent::new(c.run_id.as_str(), e.clone())).collect();
                        let lease = Some((c.lease.0.as_str(), c.lease.1));
                        created.push(Self::create_in(&mut *conn, now, &c.run_id, &first, lease).await?);
                    }
                    let seqs = if events.is_empty() { Vec::new() } else { Self::append_in(&mut *conn, now, events).await? };
                    Ok((created, seqs))
                })
            }

            async fn claim_once(&self, key: &str, token: &str) -> crate::Result<crate::Claim> {
                $write!(self, auto, conn => Self::claim_in(&mut *conn, key, token, self.now(), self.options.claim_ttl).await)
            }

            async fn claim_in(
                conn: &mut dyn crate::store::exec::Exec,
                key: &str,
                token: &str,
                now: i64,
                ttl: std::time::Duration,
            ) -> crate::Result<crate::Claim> {
                use crate::store::exec::args;
                let expires = now + crate::journal::ms(ttl);
                let won = conn.fetch_text(crate::store::sql::CLAIM, args![key, token, now, expires]).await?;
                if won.is_some() {
                    return Ok(crate::Claim::Won(crate::ClaimToken { key: key.to_owned(), token: token.to_owned() }));
                }
                let Some(row) = conn.fetch_row(crate::store::sql::CLAIM_LOOKUP, args![key]).await? else {
                    // Deleted between the two statements (released): claim again.
                    return Ok(crate::Claim::InProgress { expires_at_ms: now });
                };
                let mut row = row.into_iter();
                let state = row.next().and_then(crate::store::exec::Col::text).unwrap_or_default();
                let result = row.next().and_then(crate::store::exec::Col::text);
                let expires_at_ms = row.next().and_then(|c| c.int()).unwrap_or(now);
                match (state.as_str(), result) {
                    ("done", Some(result)) => Ok(crate::Claim::Done(serde_json::from_str::<serde_json::Value>(&result)?)),
                    _ => Ok(crate::Claim::InProgress { expires_at_ms }),
                }
            }

            async fn acquire_in(
                conn: &mut dyn crate::store::exec::Exec,
                run_id: &str,
                owner: &str,
                now: i64,
                ttl: std::time::Duration,
            ) -> crate::Result<Option<crate::Lease>> {
                use crate::store::exec::args;
                let expires = now + crate::journal::ms(ttl);
                let previous = conn.fetch_text(crate::store::sql::LEASE_HOLDER, args![run_id]).await?;
                let epoch = conn.fetch_i64(crate::store::sql::ACQUIRE_LEASE, args![run_id, owner, expires, now]).await?;
                Ok(epoch.map(|epoch| crate::Lease {
                    run_id: run_id.to_owned(),
                    owner: owner.to_owned(),
                    epoch: epoch as u64,
                    expires_at_ms: expires,
                    taken_from: previous.filter(|p| p != owner),
                }))
            }

            async fn claim_runs_once(
                &self,
                owner: &str,
                ttl: std::time::Duration,
                limit: u32,
            ) -> crate::Result<Vec<crate::Lease>> {
                let now = self.now();
                let mut tx = self.write.begin_with($begin).await?;
                let candidates: Vec<String> =
                    sqlx::query_scalar($candidates).bind(now).bind(limit as i64).fetch_all(&mut *tx).await?;
                let mut leases = Vec::new();
                for run_id in candidates {
                    if let Some(lease) = Self::acquire_in(&mut *tx, &run_id, owner, now, ttl).await? {
                        leases.push(lease);
                    }
                }
                tx.commit().await?;
                Ok(leases)
            }

            async fn rebuild_once(&self) -> crate::Result<()> {
                let mut tx = self.write.begin_with($begin).await?;
                for table in ["runs", "steps", "attempts", "attempt_hours", "approvals", "tickets"] {
                    sqlx::query(&format!("DELETE FROM {table}")).execute(&mut *tx).await?;
                }
                let (mut run, mut seq) = (String::new(), 0i64);
                loop {
                    let rows = sqlx::query(crate::store::sql::EVENTS_PAGE)
                        .bind(&run)
                        .bind(seq)
                        .fetch_all(&mut *tx)
                        .await?;
                    if rows.is_empty() {
                        break;
                    }
                    for row in rows {
                        let event = ops::decode_event(&row)?;
                        crate::store::write::touch_absolute(&mut *tx, &event.run_id, event.seq, event.recorded_at_ms).await?;
                        crate::store::write::project(&mut *tx, &event.run_id, event.seq, event.recorded_at_ms, &event.event).await?;
                        run = event.run_id;
                        seq = event.seq as i64;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn save_gate_once(
                &self,
                records: &[keel_core::gate::GateRecord],
                replace: bool,
            ) -> crate::Result<()> {
                let mut tx = self.write.begin_with($begin).await?;
                if replace {
                    sqlx::query("DELETE FROM gate_history").execute(&mut *tx).await?;
                }
                for r in records {
                    sqlx::query(crate::store::sql::ADD_GATE)
                        .bind(&r.target)
                        .bind(r.class.as_str())
                        .bind(i64::from(r.attempt))
                        .bind(i64::try_from(r.outcomes.successes).unwrap_or(i64::MAX))
                        .bind(i64::try_from(r.outcomes.failures).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn prune_once(&self, age: std::time::Duration) -> crate::Result<crate::PruneReport> {
                let now = self.now();
                let cutoff = now - crate::journal::ms(age);
                let mut tx = self.write.begin_with($begin).await?;
                let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE updated_at < $1")
                    .bind(cutoff)
                    .fetch_one(&mut *tx)
                    .await?;
                let mut events = 0;
                for table in ["journal_events", "steps", "attempts", "approvals", "tickets", "leases"] {
                    let done = sqlx::query(&format!(
                        "DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM runs WHERE updated_at < $1)"
                    ))
                    .bind(cutoff)
                    .execute(&mut *tx)
                    .await?;
                    if table == "journal_events" {
                        events = done.rows_affected();
                    }
                }
                sqlx::query("DELETE FROM runs WHERE updated_at < $1").bind(cutoff).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM attempt_hours WHERE hour < $1").bind(cutoff).execute(&mut *tx).await?;
                ops::prune_incidents(&mut *tx, cutoff).await?;
                let keys = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(crate::PruneReport { runs: runs as u64, events, idempotency_keys: keys })
            }
        }

        #[async_trait::async_trait]
        impl crate::Journal for $journal {
            fn backend(&self) -> crate::Backend {
                $backend
            }

            async fn append(&self, events: &[crate::NewEvent]) -> crate::Result<Vec<u64>> {
                if events.is_empty() {
                    return Ok(Vec::new());
                }
                crate::error::with_retry("append", crate::error::Repeat::OnlyIfNotApplied, || async move {
                    self.append_once(events).await
                })
                .await
            }

            async fn append_fenced(
                &self,
                lease: &crate::Lease,
                events: &[crate::JournalEvent],
            ) -> crate::Result<Vec<u64>> {
                // One home for the fence check: `append_once`'s, per event.
                let fence = std::sync::Arc::new(lease.clone());
                let events: Vec<crate::NewEvent> = events
                    .iter()
                    .map(|e| crate::NewEvent::new(lease.run_id.clone(), e.clone()).fenced(Some(fence.clone())))
                    .collect();
                let events = &events;
                crate::error::with_retry("append", crate::error::Repeat::OnlyIfNotApplied, || async move {
                    self.append_once(events).await
                })
                .await
            }

            async fn create_run(&self, run_id: &str, events: &[crate::JournalEvent]) -> crate::Result<bool> {
                let events: Vec<crate::NewEvent> =
                    events.iter().map(|e| crate::NewEvent::new(run_id, e.clone())).collect();
                let events = &events;
                // Safe to repeat: a first try that committed makes the second find the run.
                let created = crate::error::with_retry("create_run", crate::error::Repeat::Safe, || async move {
                    self.create_run_once(run_id, events).await
                })
                .await?;
                Ok(created)
            }

            async fn create_run_leased(
                &self,
                run_id: &str,
                events: &[crate::JournalEvent],
                owner: &str,
                ttl: std::time::Duration,
            ) -> crate::Result<Option<crate::NewRun>> {
                // A batch of one creation: one path for a run created with its lease.
                let creation = crate::Creation {
                    run_id: run_id.to_owned(),
                    events: events.to_vec(),
                    lease: (owner.to_owned(), ttl),
                };
                let (mut runs, _) = crate::Journal::write_batch(self, std::slice::from_ref(&creation), &[]).await?;
                Ok(runs.pop().flatten())
            }

            async fn write_batch(
                &self,
                creations: &[crate::Creation],
                events: &[crate::NewEvent],
            ) -> crate::Result<(Vec<Option<crate::NewRun>>, Vec<u64>)> {
                // Nothing of a failed try stays (one transaction): safe to repeat until it
                // is known to have committed.
                let (created, seqs) = crate::error::with_retry("append", crate::error::Repeat::OnlyIfNotApplied, || async move {
                    self.write_batch_once(creations, events).await
                })
                .await?;
                let mut runs = Vec::with_capacity(created.len());
                for (c, made) in creations.iter().zip(created) {
                    runs.push(match made {
                        None => None,
                        Some((lease, at_ms)) => Some(crate::NewRun { lease, snapshot: self.created_snapshot(&c.run_id, &c.events, at_ms).await? }),
                    });
                }
                Ok((runs, seqs))
            }

            async fn events(
                &self,
                run_id: &str,
                after: u64,
                limit: u32,
            ) -> crate::Result<Vec<crate::RecordedEvent>> {
                crate::error::with_retry("events", crate::error::Repeat::Safe, || async move {
                    let rows = sqlx::query(crate::store::sql::EVENTS_OF_RUN)
                        .bind(run_id)
                        .bind(after as i64)
                        .bind(limit as i64)
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map(ops::decode_event).collect()
                })
                .await
            }

            async fn snapshot(&self, run_id: &str) -> crate::Result<Option<crate::RunSnapshot>> {
                crate::error::with_retry("snapshot", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::snapshot(&mut *conn, run_id).await
                })
                .await
            }

            async fn run_ids(&self) -> crate::Result<Vec<String>> {
                crate::error::with_retry("run_ids", crate::error::Repeat::Safe, || async move {
                    Ok(sqlx::query_scalar("SELECT run_id FROM runs ORDER BY created_at, run_id")
                        .fetch_all(&self.read)
                        .await?)
                })
                .await
            }

            async fn list_runs(&self, page: &crate::RunPage) -> crate::Result<Vec<crate::RunView>> {
                crate::error::with_retry("list_runs", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::list_runs(&mut *conn, page).await
                })
                .await
            }

            async fn approvals(
                &self,
                status: Option<&str>,
                limit: u32,
            ) -> crate::Result<Vec<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>> {
                crate::error::with_retry("approvals", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::approvals(&mut *conn, status, limit).await
                })
                .await
            }

            async fn approval(
                &self,
                id: &str,
            ) -> crate::Result<Option<(crate::ApprovalView, crate::RunView, Option<crate::StepView>)>> {
                crate::error::with_retry("approval", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::approval(&mut *conn, id).await
                })
                .await
            }

            async fn tickets(
                &self,
                status: Option<&str>,
                limit: u32,
            ) -> crate::Result<Vec<(crate::TicketView, crate::RunView)>> {
                crate::error::with_retry("tickets", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::tickets(&mut *conn, status, limit).await
                })
                .await
            }

            async fn ticket(&self, id: &str) -> crate::Result<Option<(crate::TicketView, crate::RunView)>> {
                crate::error::with_retry("ticket", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::ticket(&mut *conn, id).await
                })
                .await
            }

            async fn waiting(&self) -> crate::Result<(u64, u64)> {
                crate::error::with_retry("waiting", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::waiting(&mut *conn).await
                })
                .await
            }

            async fn attempt_stats(&self, since_ms: i64) -> crate::Result<crate::AttemptStats> {
                crate::error::with_retry("attempt_stats", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::attempt_stats(&mut *conn, since_ms).await
                })
                .await
            }

            async fn rebuild_projections(&self) -> crate::Result<()> {
                crate::error::with_retry("rebuild", crate::error::Repeat::Safe, || self.rebuild_once()).await
            }

            async fn claim(&self, key: &str) -> crate::Result<crate::Claim> {
                let token = format!("{:032x}", fastrand::u128(..));
                let token = token.as_str();
                crate::error::with_retry("claim", crate::error::Repeat::Safe, || async move {
                    self.claim_once(key, token).await
                })
                .await
            }

            async fn take_over_claim(&self, key: &str) -> crate::Result<crate::Claim> {
                let token = format!("{:032x}", fastrand::u128(..));
                let token = token.as_str();
                crate::error::with_retry("take_over_claim", crate::error::Repeat::Safe, || async move {
                    let (claim_ttl, now) = (self.options.claim_ttl, self.now());
                    $write!(self, auto, conn => {
                        use crate::store::exec::args;
                        let expires = now + crate::journal::ms(claim_ttl);
                        let won = conn
                            .fetch_text(crate::store::sql::TAKE_OVER_CLAIM, args![key, token, now, expires])
                            .await?;
                        if won.is_some() {
                            return Ok(crate::Claim::Won(crate::ClaimToken { key: key.to_owned(), token: token.to_owned() }));
                        }
                        // Completed (answer with its result) or absent (claim it afresh).
                        Self::claim_in(&mut *conn, key, token, now, claim_ttl).await
                    })
                })
                .await
            }

            async fn complete(&self, token: &crate::ClaimToken, result: &serde_json::Value) -> crate::Result<()> {
                let result = serde_json::to_string(result)?;
                let result = result.as_str();
                crate::error::with_retry("complete", crate::error::Repeat::Safe, || async move {
                    let expires = self.now() + crate::journal::ms(self.options.idempotency_ttl);
                    let done = $write!(self, auto, conn => {
                        conn.execute(
                            crate::store::sql::COMPLETE_CLAIM,
                            crate::store::exec::args![token.key, token.token, result, expires],
                        )
                        .await
                    })?;
                    if done == 0 {
                        return Err(crate::Error::ClaimLost(token.key.clone()));
                    }
                    Ok(())
                })
                .await
            }

            async fn release_claim(&self, token: &crate::ClaimToken) -> crate::Result<()> {
                crate::error::with_retry("release_claim", crate::error::Repeat::Safe, || async move {
                    $write!(self, auto, conn => {
                        conn.execute(
                            "DELETE FROM idempotency_keys WHERE key = $1 AND token = $2 AND state = 'in_progress'",
                            crate::store::exec::args![token.key, token.token],
                        )
                        .await
                    })?;
                    Ok(())
                })
                .await
            }

            async fn acquire_lease(
                &self,
                run_id: &str,
                owner: &str,
                ttl: std::time::Duration,
            ) -> crate::Result<Option<crate::Lease>> {
                crate::error::with_retry("acquire_lease", crate::error::Repeat::Safe, || async move {
                    let now = self.now();
                    $write!(self, auto, conn => Self::acquire_in(&mut *conn, run_id, owner, now, ttl).await)
                })
                .await
            }

            async fn renew_lease(&self, lease: &crate::Lease, ttl: std::time::Duration) -> crate::Result<crate::Lease> {
                crate::error::with_retry("renew_lease", crate::error::Repeat::Safe, || async move {
                    let expires = self.now() + crate::journal::ms(ttl);
                    let done = $write!(self, auto, conn => {
                        conn.execute(
                            "UPDATE leases SET expires_at = $4 WHERE run_id = $1 AND owner = $2 AND epoch = $3",
                            crate::store::exec::args![lease.run_id, lease.owner, lease.epoch as i64, expires],
                        )
                        .await
                    })?;
                    if done == 0 {
                        return Err(crate::Error::LeaseLost { run_id: lease.run_id.clone(), owner: lease.owner.clone() });
                    }
                    Ok(crate::Lease { expires_at_ms: expires, ..lease.clone() })
                })
                .await
            }

            async fn release_lease(&self, lease: &crate::Lease) -> crate::Result<()> {
                crate::error::with_retry("release_lease", crate::error::Repeat::Safe, || async move {
                    $write!(self, auto, conn => {
                        conn.execute(
                            crate::store::sql::RELEASE_LEASE,
                            crate::store::exec::args![lease.run_id, lease.owner, lease.epoch as i64],
                        )
                        .await
                    })?;
                    Ok(())
                })
                .await
            }

            async fn claim_runs(
                &self,
                owner: &str,
                ttl: std::time::Duration,
                limit: u32,
            ) -> crate::Result<Vec<crate::Lease>> {
                crate::error::with_retry("claim_runs", crate::error::Repeat::Safe, || async move {
                    self.claim_runs_once(owner, ttl, limit).await
                })
                .await
            }

            async fn save_gate_history(&self, records: &[keel_core::gate::GateRecord]) -> crate::Result<()> {
                crate::error::with_retry("save_gate_history", crate::error::Repeat::Safe, || async move {
                    self.save_gate_once(records, true).await
                })
                .await
            }

            async fn add_gate_outcomes(&self, records: &[keel_core::gate::GateRecord]) -> crate::Result<()> {
                // Not `Safe`: a lost commit repeated would count the outcomes twice.
                crate::error::with_retry("add_gate_outcomes", crate::error::Repeat::OnlyIfNotApplied, || async move {
                    self.save_gate_once(records, false).await
                })
                .await
            }

            async fn load_gate_history(&self) -> crate::Result<Vec<keel_core::gate::GateRecord>> {
                crate::error::with_retry("load_gate_history", crate::error::Repeat::Safe, || async move {
                    let rows = sqlx::query(
                        "SELECT target, class, attempt, successes, failures FROM gate_history ORDER BY target, class, attempt",
                    )
                    .fetch_all(&self.read)
                    .await?;
                    let mut records: Vec<_> = rows.iter().filter_map(ops::decode_gate).collect();
                    // The order of ConfidenceGate::snapshot (classes in taxonomy order).
                    records.sort_by(|a, b| (&a.target, a.class, a.attempt).cmp(&(&b.target, b.class, b.attempt)));
                    Ok(records)
                })
                .await
            }

            async fn prune(&self, age: std::time::Duration) -> crate::Result<crate::PruneReport> {
                crate::error::with_retry("prune", crate::error::Repeat::Safe, || self.prune_once(age)).await
            }

            async fn close(&self) {
                self.write.close().await;
                self.read.close().await;
            }

            async fn record_alerts(&self, records: &[crate::AlertRecord]) -> crate::Result<()> {
                if records.is_empty() {
                    return Ok(());
                }
                // Not `Safe`: a lost commit repeated would write the timeline twice.
                crate::error::with_retry("record_alerts", crate::error::Repeat::OnlyIfNotApplied, || async move {
                    let mut tx = self.write.begin_with($begin).await?;
                    ops::record_alerts(&mut *tx, records).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn incidents(&self, limit: u32) -> crate::Result<Vec<crate::IncidentView>> {
                crate::error::with_retry("incidents", crate::error::Repeat::Safe, || async move {
                    let mut conn = self.read.acquire().await?;
                    ops::incidents(&mut *conn, limit).await
                })
                .await
            }
        }
    };
}

pub(crate) use sql_journal;
