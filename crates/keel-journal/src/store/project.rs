//! Reading the projections: [`projection_ops!`] expands, for one sqlx driver, the
//! row decoders and the queries of runs, steps, approvals and tickets (the writes
//! that keep them are [`write`](super::write)'s, once for both databases).

/// Expands the read operations for one driver (see the module docs).
macro_rules! projection_ops {
    ($db:ty, $conn:ty) => {
        use crate::event::{RecordedEvent, SCHEMA_VERSION};
        use crate::state::{ApprovalView, AttemptView, RunSnapshot, RunView, StepView, TicketView};
        use crate::store::sql;
        use crate::{Error, Result};

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
