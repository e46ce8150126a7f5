//! Appending events and keeping the projections, inside one transaction.
//!
//! [`projection_ops!`] expands, for one driver, the functions that run on a
//! connection already in a transaction: `append_tx` numbers a batch of events per run,
//! inserts them (multi-row inserts: this is where group commit pays off) and applies
//! each to the projections with `project`; replay calls the same `project`, so live
//! and rebuilt state cannot drift apart.

/// Rows per multi-row `INSERT` of events: few distinct statements to prepare, and far
/// below both databases' parameter limits.
pub(crate) const INSERT_CHUNK: usize = 128;

/// Expands the transaction-level operations for one driver (see the module docs).
macro_rules! projection_ops {
    ($db:ty, $conn:ty) => {
        use crate::event::{JournalEvent, NewEvent, RecordedEvent, SCHEMA_VERSION, StepOutcome};
        use crate::state::{ApprovalView, AttemptView, RunSnapshot, RunView, StepView, TicketView};
        use crate::store::sql;
        use crate::{Error, Result};
        use keel_core::{AttemptOutcome, Event};

        pub(super) async fn append_tx(conn: &mut $conn, now: i64, events: &[NewEvent]) -> Result<Vec<u64>> {
            // Number the events per run: one counter bump per run per batch.
            let mut runs: Vec<(&str, u64)> = Vec::new();
            let mut slot = Vec::with_capacity(events.len());
            for e in events {
                let i = match runs.iter().position(|(r, _)| *r == e.run_id) {
                    Some(i) => i,
                    None => {
                        runs.push((&e.run_id, 0));
                        runs.len() - 1
                    }
                };
                runs[i].1 += 1;
                slot.push(i);
            }
            let mut next = Vec::with_capacity(runs.len());
            for (run_id, count) in &runs {
                let last: i64 = sqlx::query_scalar(sql::TOUCH_RUN)
                    .bind(*run_id)
                    .bind(now)
                    .bind(*count as i64)
                    .fetch_one(&mut *conn)
                    .await?;
                next.push(last as u64 + 1 - count);
            }
            let mut seqs = Vec::with_capacity(events.len());
            for &i in &slot {
                seqs.push(next[i]);
                next[i] += 1;
            }
            let payloads =
                events.iter().map(|e| serde_json::to_string(&e.event)).collect::<Result<Vec<_>, _>>()?;
            let rows: Vec<(&NewEvent, u64, &String)> = events
                .iter()
                .zip(seqs.iter().copied())
                .zip(payloads.iter())
                .map(|((e, s), p)| (e, s, p))
                .collect();
            for chunk in rows.chunks(crate::store::project::INSERT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO journal_events (run_id, seq, schema_version, kind, payload, recorded_at) ",
                );
                qb.push_values(chunk, |mut b, (e, seq, payload)| {
                    b.push_bind(e.run_id.as_str())
                        .push_bind(*seq as i64)
                        .push_bind(i64::from(SCHEMA_VERSION))
                        .push_bind(e.event.kind())
                        .push_bind(payload.as_str())
                        .push_bind(now);
                });
                qb.build().execute(&mut *conn).await?;
            }
            apply_folded(&mut *conn, now, &rows).await?;
            Ok(seqs)
        }

        /// Applies a batch to the projections with fewer statements than one per
        /// event, with the same result as applying them one by one (the rebuild test
        /// holds it to that): an attempt or step that starts and ends within the batch
        /// is written once with its final values, and attempt rows are inserted in
        /// multi-row statements (nothing else reads them before the batch ends, except
        /// an unmatched `attempt_ended`, which flushes them first).
        async fn apply_folded(conn: &mut $conn, now: i64, rows: &[(&NewEvent, u64, &String)]) -> Result<()> {
            let n = rows.len();
            let mut attempt_end: Vec<Option<(&'static str, i64)>> = vec![None; n];
            let mut step_end: Vec<Option<&StepOutcome>> = vec![None; n];
            let mut skip = vec![false; n];
            let mut open_attempts: std::collections::HashMap<(&str, Option<u32>, &str, u32), usize> = Default::default();
            let mut open_steps: std::collections::HashMap<(&str, u32), usize> = Default::default();
            // Ends folded into their attempt's row, counted per (target, outcome) for the
            // hourly counters (an unfolded end is counted by `project`).
            let mut hours: std::collections::BTreeMap<(&str, &'static str), i64> = Default::default();
            for (j, (e, _, _)) in rows.iter().enumerate() {
                match &e.event {
                    JournalEvent::Policy { step, event: Event::AttemptStarted { target, attempt } } => {
                        open_attempts.insert((e.run_id.as_str(), *step, &**target, *attempt), j);
                    }
                    JournalEvent::Policy { step, event: Event::AttemptEnded { target, attempt, outcome, latency } } => {
                        if let Some(i) = open_attempts.remove(&(e.run_id.as_str(), *step, &**target, *attempt)) {
                            attempt_end[i] = Some((outcome_str(outcome), crate::journal::ms(*latency)));
                            skip[j] = true;
                            *hours.entry((&**target, outcome_str(outcome))).or_default() += 1;
                        }
                    }
                    JournalEvent::StepStarted { step, .. } => {
                        open_steps.insert((e.run_id.as_str(), *step), j);
                    }
                    JournalEvent::StepFinished { step, outcome } => {
                        if let Some(i) = open_steps.remove(&(e.run_id.as_str(), *step)) {
                            step_end[i] = Some(outcome);
                            skip[j] = true;
                        }
                    }
                    _ => {}
                }
            }
            let mut attempt_rows: Vec<AttemptRow<'_>> = Vec::new();
            for (i, (e, seq, _)) in rows.iter().enumerate() {
                if skip[i] {
                    continue;
                }
                match (&e.event, step_end[i]) {
                    (JournalEvent::Policy { step, event: Event::AttemptStarted { target, attempt } }, _) => {
                        let end = attempt_end[i];
                        attempt_rows.push(AttemptRow {
                            run_id: &e.run_id,
                            seq: *seq as i64,
                            step: step.map_or(-1, i64::from),
                            target,
                            attempt: i64::from(*attempt),
                            outcome: end.map(|(o, _)| o),
                            latency: end.map(|(_, l)| l),
                            ended_at: end.map(|_| now),
                        });
                    }
                    (JournalEvent::StepStarted { step, name, target, input }, Some(outcome)) => {
                        let (status, output, class, message, shape) = step_outcome(outcome)?;
                        sqlx::query(sql::STEP_ROW)
                            .bind(&e.run_id)
                            .bind(i64::from(*step))
                            .bind(name)
                            .bind(target)
                            .bind(status)
                            .bind(json(input)?)
                            .bind(output)
                            .bind(class)
                            .bind(message)
                            .bind(now)
                            .bind(shape)
                            .execute(&mut *conn)
                            .await?;
                    }
                    (event @ JournalEvent::Policy { event: Event::AttemptEnded { .. }, .. }, _) => {
                        insert_attempts(&mut *conn, now, &mut attempt_rows).await?;
                        project(&mut *conn, &e.run_id, *seq, now, event).await?;
                    }
                    (event, _) => project(&mut *conn, &e.run_id, *seq, now, event).await?,
                }
            }
            insert_attempts(&mut *conn, now, &mut attempt_rows).await?;
            for ((target, outcome), n) in hours {
                count_hour(&mut *conn, target, outcome, now, n).await?;
            }
            Ok(())
        }

        /// Adds `n` ended attempts of `target` with `outcome` to the hour of `at`: the
        /// dashboard's window is read from these counters, not from every attempt.
        async fn count_hour(conn: &mut $conn, target: &str, outcome: &str, at: i64, n: i64) -> Result<()> {
            sqlx::query(sql::COUNT_HOUR)
                .bind(target)
                .bind(at - at.rem_euclid(3_600_000))
                .bind(outcome)
                .bind(n)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        struct AttemptRow<'a> {
            run_id: &'a str,
            seq: i64,
            step: i64,
            target: &'a str,
            attempt: i64,
            outcome: Option<&'static str>,
            latency: Option<i64>,
            ended_at: Option<i64>,
        }

        async fn insert_attempts(conn: &mut $conn, now: i64, rows: &mut Vec<AttemptRow<'_>>) -> Result<()> {
            for chunk in rows.chunks(crate::store::project::INSERT_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO attempts (run_id, started_seq, step, target, attempt, outcome, latency_ms, started_at, ended_at) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(r.run_id)
                        .push_bind(r.seq)
                        .push_bind(r.step)
                        .push_bind(r.target)
                        .push_bind(r.attempt)
                        .push_bind(r.outcome)
                        .push_bind(r.latency)
                        .push_bind(now)
                        .push_bind(r.ended_at);
                });
                qb.build().execute(&mut *conn).await?;
            }
            rows.clear();
            Ok(())
        }

        fn outcome_str(outcome: &AttemptOutcome) -> &'static str {
            match outcome {
                AttemptOutcome::Ok => "ok",
                AttemptOutcome::Failed(class) => class.as_str(),
            }
        }

        /// Status, output, error class, message and the output's shape hash.
        type StepColumns<'a> =
            (&'static str, Option<String>, Option<&'static str>, Option<&'a str>, Option<&'a str>);

        fn step_outcome(outcome: &StepOutcome) -> Result<StepColumns<'_>> {
            Ok(match outcome {
                StepOutcome::Succeeded { output, shape } => {
                    ("succeeded", Some(json(output)?), None, None, shape.as_deref())
                }
                StepOutcome::Failed { class, message } => {
                    ("failed", None, Some(class.as_str()), Some(message.as_str()), None)
                }
                StepOutcome::Skipped { reason } => ("skipped", None, None, Some(reason.as_str()), None),
            })
        }

        pub(super) async fn touch_absolute(conn: &mut $conn, run_id: &str, seq: u64, at: i64) -> Result<()> {
            sqlx::query(sql::TOUCH_RUN_ABSOLUTE)
                .bind(run_id)
                .bind(at)
                .bind(seq as i64)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        fn json(v: &serde_json::Value) -> Result<String> {
            Ok(serde_json::to_string(v)?)
        }

        /// Applies one event to the projections (the run's counter and times aside).
        pub(super) async fn project(
            conn: &mut $conn,
            run_id: &str,
            seq: u64,
            at: i64,
            event: &JournalEvent,
        ) -> Result<()> {
            match event {
                JournalEvent::RunCreated { name, input } => {
                    sqlx::query("UPDATE runs SET name = $2, input = $3 WHERE run_id = $1")
                        .bind(run_id)
                        .bind(name)
                        .bind(json(input)?)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::RunStateChanged { state, reason } => {
                    sqlx::query("UPDATE runs SET state = $2, reason = $3 WHERE run_id = $1")
                        .bind(run_id)
                        .bind(state.as_str())
                        .bind(reason.as_deref())
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::StepStarted { step, name, target, input } => {
                    sqlx::query(sql::STEP_STARTED)
                        .bind(run_id)
                        .bind(i64::from(*step))
                        .bind(name)
                        .bind(target)
                        .bind(json(input)?)
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::StepFinished { step, outcome } => {
                    let (status, output, class, message, shape) = step_outcome(outcome)?;
                    sqlx::query(sql::STEP_FINISHED)
                        .bind(run_id)
                        .bind(i64::from(*step))
                        .bind(status)
                        .bind(output)
                        .bind(class)
                        .bind(message)
                        .bind(at)
                        .bind(shape)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::ApprovalRequested { approval_id, step, tool, args_digest, expires_at_ms, args } => {
                    let args = if args.is_null() { None } else { Some(json(args)?) };
                    sqlx::query(sql::APPROVAL_REQUESTED)
                        .bind(approval_id)
                        .bind(run_id)
                        .bind(i64::from(*step))
                        .bind(tool)
                        .bind(args_digest)
                        .bind(at)
                        .bind(*expires_at_ms)
                        .bind(args)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::ApprovalDecided { approval_id, decision, by } => {
                    sqlx::query(sql::APPROVAL_DECIDED)
                        .bind(approval_id)
                        .bind(decision.as_str())
                        .bind(by)
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::TicketOpened { ticket_id, step, class, summary, context } => {
                    sqlx::query(sql::TICKET_OPENED)
                        .bind(ticket_id)
                        .bind(run_id)
                        .bind(step.map(i64::from))
                        .bind(class.as_str())
                        .bind(summary)
                        .bind(json(context)?)
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::TicketResolved { ticket_id, resolution, by } => {
                    sqlx::query(sql::TICKET_RESOLVED)
                        .bind(ticket_id)
                        .bind(json(resolution)?)
                        .bind(by)
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::AttemptAbandoned { step, target, attempt } => {
                    sqlx::query(sql::ATTEMPT_ABANDONED)
                        .bind(run_id)
                        .bind(step.map_or(-1, i64::from))
                        .bind(target)
                        .bind(i64::from(*attempt))
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                }
                JournalEvent::ProgramRecorded { .. }
                | JournalEvent::ModelCalled { .. }
                | JournalEvent::RunTakenOver { .. } => {}
                JournalEvent::Policy { step, event } => {
                    let step = step.map_or(-1, i64::from);
                    match event {
                        Event::AttemptStarted { target, attempt } => {
                            sqlx::query(sql::ATTEMPT_STARTED)
                                .bind(run_id)
                                .bind(seq as i64)
                                .bind(step)
                                .bind(&**target)
                                .bind(i64::from(*attempt))
                                .bind(at)
                                .execute(&mut *conn)
                                .await?;
                        }
                        Event::AttemptEnded { target, attempt, outcome, latency } => {
                            let outcome = outcome_str(outcome);
                            let latency = crate::journal::ms(*latency);
                            count_hour(&mut *conn, target, outcome, at, 1).await?;
                            let done = sqlx::query(sql::ATTEMPT_ENDED)
                                .bind(run_id)
                                .bind(step)
                                .bind(&**target)
                                .bind(i64::from(*attempt))
                                .bind(outcome)
                                .bind(latency)
                                .bind(at)
                                .execute(&mut *conn)
                                .await?;
                            if done.rows_affected() == 0 {
                                sqlx::query(sql::ATTEMPT_ENDED_ALONE)
                                    .bind(run_id)
                                    .bind(step)
                                    .bind(&**target)
                                    .bind(i64::from(*attempt))
                                    .bind(outcome)
                                    .bind(latency)
                                    .bind(at)
                                    .bind(seq as i64)
                                    .execute(&mut *conn)
                                    .await?;
                            }
                        }
                        Event::RetryScheduled { .. }
                        | Event::RetryRefused { .. }
                        | Event::BreakerTransition { .. }
                        | Event::FallbackTaken { .. }
                        | Event::CorrectionRound { .. }
                        | Event::BudgetCharged { .. }
                        | Event::BudgetExceeded { .. }
                        | Event::FaultInjected { .. }
                        | Event::SchemaDrift { .. }
                        | Event::LoopDetected { .. } => {}
                    }
                }
            }
            Ok(())
        }

        pub(super) fn decode_event(row: &<$db as sqlx::Database>::Row) -> Result<RecordedEvent> {
            let run_id: String = row.try_get("run_id")?;
            let seq = row.try_get::<i64, _>("seq")? as u64;
            let version = row.try_get::<i64, _>("schema_version")? as u32;
            if version > SCHEMA_VERSION {
                return Err(Error::UnsupportedSchema { run_id, seq, version, supported: SCHEMA_VERSION });
            }
            let payload: String = row.try_get("payload")?;
            Ok(RecordedEvent {
                run_id,
                seq,
                schema_version: version,
                recorded_at_ms: row.try_get("recorded_at")?,
                event: serde_json::from_str(&payload)?,
            })
        }

        /// One stored gate row; `None` (with a warning) for a row this build cannot
        /// use, so that a bad row costs its history, never the journal. Counts out of
        /// range (negative, or a REAL left by an overflowing older build) saturate.
        pub(super) fn decode_gate(row: &<$db as sqlx::Database>::Row) -> Option<keel_core::gate::GateRecord> {
            fn count(row: &<$db as sqlx::Database>::Row, column: &str) -> Option<u64> {
                match row.try_get::<i64, _>(column) {
                    Ok(n) => Some(u64::try_from(n).unwrap_or(0)),
                    Err(_) => match row.try_get::<f64, _>(column) {
                        Ok(f) if f.is_nan() => None,
                        // `as` saturates a float at the integer's bounds.
                        Ok(f) => Some((f as i64).max(0) as u64),
                        Err(_) => None,
                    },
                }
            }
            let target: String = row.try_get("target").ok()?;
            let class: Option<keel_core::ErrorClass> =
                row.try_get::<String, _>("class").ok().and_then(|c| c.parse().ok());
            let attempt = row.try_get::<i64, _>("attempt").ok().and_then(|a| u32::try_from(a).ok());
            let (successes, failures) = (count(row, "successes"), count(row, "failures"));
            match (class, attempt, successes, failures) {
                (Some(class), Some(attempt), Some(successes), Some(failures)) => Some(keel_core::gate::GateRecord {
                    target,
                    class,
                    attempt,
                    outcomes: keel_core::gate::Outcomes { successes, failures },
                }),
                _ => {
                    tracing::warn!(target_name = %target, "a confidence-gate row cannot be read: its history is ignored");
                    None
                }
            }
        }

        fn parse_json(s: Option<String>) -> Result<Option<serde_json::Value>> {
            Ok(match s {
                Some(s) => Some(serde_json::from_str(&s)?),
                None => None,
            })
        }

        pub(super) fn run_row(r: &<$db as sqlx::Database>::Row) -> Result<RunView> {
            let state: String = r.try_get("state")?;
            Ok(RunView {
                run_id: r.try_get("run_id")?,
                name: r.try_get("name")?,
                state: crate::RunState::parse(&state).ok_or_else(|| {
                    Error::Codec(<serde_json::Error as serde::de::Error>::custom(format!(
                        "unknown run state `{state}`"
                    )))
                })?,
                input: serde_json::from_str(&r.try_get::<String, _>("input")?)?,
                reason: r.try_get("reason")?,
                created_at_ms: r.try_get("created_at")?,
                updated_at_ms: r.try_get("updated_at")?,
                last_seq: r.try_get::<i64, _>("last_seq")? as u64,
            })
        }

        pub(super) fn step_row(s: &<$db as sqlx::Database>::Row) -> Result<StepView> {
            Ok(StepView {
                step: s.try_get::<i64, _>("step")? as u32,
                name: s.try_get("name")?,
                target: s.try_get("target")?,
                status: s.try_get("status")?,
                input: serde_json::from_str(&s.try_get::<String, _>("input")?)?,
                output: parse_json(s.try_get("output")?)?,
                error_class: s.try_get("error_class")?,
                message: s.try_get("message")?,
                started_at_ms: s.try_get("started_at")?,
                finished_at_ms: s.try_get("finished_at")?,
                shape: s.try_get("shape")?,
            })
        }

        pub(super) fn approval_row(a: &<$db as sqlx::Database>::Row) -> Result<ApprovalView> {
            Ok(ApprovalView {
                approval_id: a.try_get("approval_id")?,
                run_id: a.try_get("run_id")?,
                step: a.try_get::<i64, _>("step")? as u32,
                tool: a.try_get("tool")?,
                args_digest: a.try_get("args_digest")?,
                args: parse_json(a.try_get("args")?)?,
                status: a.try_get("status")?,
                requested_at_ms: a.try_get("requested_at")?,
                expires_at_ms: a.try_get("expires_at")?,
                decided_by: a.try_get("decided_by")?,
                decided_at_ms: a.try_get("decided_at")?,
            })
        }

        pub(super) fn ticket_row(t: &<$db as sqlx::Database>::Row) -> Result<TicketView> {
            Ok(TicketView {
                ticket_id: t.try_get("ticket_id")?,
                run_id: t.try_get("run_id")?,
                step: t.try_get::<Option<i64>, _>("step")?.map(|s| s as u32),
                class: t.try_get("class")?,
                summary: t.try_get("summary")?,
                context: serde_json::from_str(&t.try_get::<String, _>("context")?)?,
                status: t.try_get("status")?,
                resolution: parse_json(t.try_get("resolution")?)?,
                resolved_by: t.try_get("resolved_by")?,
                opened_at_ms: t.try_get("opened_at")?,
                resolved_at_ms: t.try_get("resolved_at")?,
            })
        }

        pub(super) async fn snapshot(conn: &mut $conn, run_id: &str) -> Result<Option<RunSnapshot>> {
            let Some(r) = sqlx::query("SELECT * FROM runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(None);
            };
            let run = run_row(&r)?;
            let steps = sqlx::query("SELECT * FROM steps WHERE run_id = $1 ORDER BY step")
                .bind(run_id)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(step_row)
                .collect::<Result<Vec<_>>>()?;
            let mut attempts = Vec::new();
            for a in sqlx::query("SELECT * FROM attempts WHERE run_id = $1 ORDER BY started_seq")
                .bind(run_id)
                .fetch_all(&mut *conn)
                .await?
            {
                let step: i64 = a.try_get("step")?;
                attempts.push(AttemptView {
                    started_seq: a.try_get::<i64, _>("started_seq")? as u64,
                    step: (step >= 0).then_some(step as u32),
                    target: a.try_get("target")?,
                    attempt: a.try_get::<i64, _>("attempt")? as u32,
                    outcome: a.try_get("outcome")?,
                    latency_ms: a.try_get("latency_ms")?,
                    started_at_ms: a.try_get("started_at")?,
                    ended_at_ms: a.try_get("ended_at")?,
                });
            }
            let approvals =
                sqlx::query("SELECT * FROM approvals WHERE run_id = $1 ORDER BY requested_at, approval_id")
                    .bind(run_id)
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(approval_row)
                    .collect::<Result<Vec<_>>>()?;
            let tickets = sqlx::query("SELECT * FROM tickets WHERE run_id = $1 ORDER BY opened_at, ticket_id")
                .bind(run_id)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(ticket_row)
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(RunSnapshot { run, steps, attempts, approvals, tickets }))
        }

        /// A page of runs, newest activity first (`runs_by_update`, `runs_by_state`).
        pub(super) async fn list_runs(conn: &mut $conn, page: &crate::RunPage) -> Result<Vec<RunView>> {
            let (at, id) = page.before.clone().unwrap_or((i64::MAX, String::new()));
            let limit = i64::from(page.limit.clamp(1, crate::RunPage::MAX));
            let rows = match &page.state {
                Some(state) => {
                    sqlx::query(sql::RUNS_PAGE_IN_STATE)
                        .bind(state.as_str())
                        .bind(at)
                        .bind(&id)
                        .bind(limit)
                        .fetch_all(&mut *conn)
                        .await?
                }
                None => sqlx::query(sql::RUNS_PAGE).bind(at).bind(&id).bind(limit).fetch_all(&mut *conn).await?,
            };
            rows.iter().map(run_row).collect()
        }

        /// Approvals (of a status), newest first, at most `limit` (`approvals_by_status`),
        /// each with its run and step: three queries, whatever the page's size.
        pub(super) async fn approvals(
            conn: &mut $conn,
            status: Option<&str>,
            limit: u32,
        ) -> Result<Vec<(ApprovalView, RunView, Option<StepView>)>> {
            // `$1` NULL: any status.
            let page = "SELECT * FROM approvals WHERE ($1 IS NULL OR status = $1) \
                        ORDER BY requested_at DESC, approval_id DESC LIMIT $2";
            let limit = i64::from(limit);
            let approvals = sqlx::query(page)
                .bind(status)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(approval_row)
                .collect::<Result<Vec<_>>>()?;
            let runs = runs_of_page(&mut *conn, page, status, limit).await?;
            let steps: std::collections::HashMap<(String, u32), StepView> = sqlx::query(&format!(
                "SELECT s.* FROM steps s JOIN ({page}) p ON s.run_id = p.run_id AND s.step = p.step"
            ))
            .bind(status)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| -> Result<_> {
                let run_id: String = r.try_get("run_id")?;
                let v = step_row(r)?;
                Ok(((run_id, v.step), v))
            })
            .collect::<Result<_>>()?;
            Ok(approvals
                .into_iter()
                .filter_map(|a| {
                    let run = runs.get(&a.run_id)?.clone();
                    let step = steps.get(&(a.run_id.clone(), a.step)).cloned();
                    Some((a, run, step))
                })
                .collect())
        }

        /// The runs of the rows `page` (a query on `$1` status and `$2` limit) selects, by id.
        async fn runs_of_page(
            conn: &mut $conn,
            page: &str,
            status: Option<&str>,
            limit: i64,
        ) -> Result<std::collections::HashMap<String, RunView>> {
            sqlx::query(&format!("SELECT * FROM runs WHERE run_id IN (SELECT run_id FROM ({page}) p)"))
                .bind(status)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| run_row(r).map(|v| (v.run_id.clone(), v)))
                .collect()
        }

        /// Tickets (of a status), newest first, at most `limit` (`tickets_by_status`), each
        /// with its run: two queries.
        pub(super) async fn tickets(
            conn: &mut $conn,
            status: Option<&str>,
            limit: u32,
        ) -> Result<Vec<(TicketView, RunView)>> {
            let page = "SELECT * FROM tickets WHERE ($1 IS NULL OR status = $1) \
                        ORDER BY opened_at DESC, ticket_id DESC LIMIT $2";
            let limit = i64::from(limit);
            let tickets = sqlx::query(page)
                .bind(status)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(ticket_row)
                .collect::<Result<Vec<_>>>()?;
            let runs = runs_of_page(&mut *conn, page, status, limit).await?;
            Ok(tickets.into_iter().filter_map(|t| Some((runs.get(&t.run_id)?.clone(), t))).map(|(r, t)| (t, r)).collect())
        }

        /// One approval with its run and step, by id.
        pub(super) async fn approval(
            conn: &mut $conn,
            id: &str,
        ) -> Result<Option<(ApprovalView, RunView, Option<StepView>)>> {
            let Some(a) = sqlx::query("SELECT * FROM approvals WHERE approval_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(None);
            };
            let a = approval_row(&a)?;
            let Some(r) =
                sqlx::query("SELECT * FROM runs WHERE run_id = $1").bind(&a.run_id).fetch_optional(&mut *conn).await?
            else {
                return Ok(None);
            };
            let step = sqlx::query("SELECT * FROM steps WHERE run_id = $1 AND step = $2")
                .bind(&a.run_id)
                .bind(i64::from(a.step))
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(step_row)
                .transpose()?;
            Ok(Some((a, run_row(&r)?, step)))
        }

        /// One ticket with its run, by id.
        pub(super) async fn ticket(conn: &mut $conn, id: &str) -> Result<Option<(TicketView, RunView)>> {
            let Some(t) =
                sqlx::query("SELECT * FROM tickets WHERE ticket_id = $1").bind(id).fetch_optional(&mut *conn).await?
            else {
                return Ok(None);
            };
            let t = ticket_row(&t)?;
            let Some(r) =
                sqlx::query("SELECT * FROM runs WHERE run_id = $1").bind(&t.run_id).fetch_optional(&mut *conn).await?
            else {
                return Ok(None);
            };
            Ok(Some((t, run_row(&r)?)))
        }

        /// Pending approvals and open tickets, counted.
        pub(super) async fn waiting(conn: &mut $conn) -> Result<(u64, u64)> {
            let approvals: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM approvals WHERE status = 'pending'")
                .fetch_one(&mut *conn)
                .await?;
            let tickets: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM tickets WHERE status = 'open'").fetch_one(&mut *conn).await?;
            Ok((approvals.max(0) as u64, tickets.max(0) as u64))
        }

        /// Attempts since `since` ms, aggregated: from the hourly counters (a window's
        /// cost is its hours, not its attempts), retries of the 30 latest runs.
        pub(super) async fn attempt_stats(conn: &mut $conn, since: i64) -> Result<crate::AttemptStats> {
            let since = since.saturating_sub(since.rem_euclid(3_600_000));
            let mut stats = crate::AttemptStats::default();
            for r in sqlx::query(sql::ATTEMPTS_BY_TARGET).bind(since).fetch_all(&mut *conn).await? {
                stats.by_target.push((
                    r.try_get("target")?,
                    r.try_get::<i64, _>("calls")? as u64,
                    r.try_get::<i64, _>("errors")? as u64,
                ));
            }
            for r in sqlx::query(sql::ERRORS_BY_HOUR).bind(since).fetch_all(&mut *conn).await? {
                stats.errors_by_hour.push((
                    r.try_get("outcome")?,
                    r.try_get::<i64, _>("hour")?,
                    r.try_get::<i64, _>("n")? as u64,
                ));
            }
            for r in sqlx::query(sql::RETRIES_BY_RUN).fetch_all(&mut *conn).await? {
                stats.retries_by_run.push((r.try_get("run_id")?, r.try_get::<i64, _>("retries")? as u64));
            }
            Ok(stats)
        }
    };
}

pub(crate) use projection_ops;
