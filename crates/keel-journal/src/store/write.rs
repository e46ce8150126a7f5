//! The journal's writes inside a transaction, written once for both databases over
//! [`Exec`]: `append_tx` numbers a batch of events per run, inserts them (multi-row
//! inserts: this is where group commit pays off) and applies each to the projections
//! with `project`; replay calls the same `project`, so live and rebuilt state cannot
//! drift apart.

use keel_core::{AttemptOutcome, Event};

use crate::error::Result;
use crate::event::{JournalEvent, NewEvent, SCHEMA_VERSION, StepOutcome};
use crate::store::exec::{Arg, Exec, ToArg as _, args, multi_row_insert};
use crate::store::sql;

/// Rows per multi-row `INSERT` of events: few distinct statements to prepare, and far
/// below both databases' parameter limits.
pub(crate) const INSERT_CHUNK: usize = 128;

/// Appends `events` (numbered per run) and applies them to the projections, inside
/// the caller's transaction; each event's sequence number in its run.
pub(crate) async fn append_tx(conn: &mut dyn Exec, now: i64, events: &[NewEvent]) -> Result<Vec<u64>> {
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
        let last = conn
            .fetch_i64(sql::TOUCH_RUN, args![*run_id, now, *count as i64])
            .await?
            .ok_or(crate::Error::Internal("a run's counter returned no row"))?;
        next.push(last as u64 + 1 - count);
    }
    let mut seqs = Vec::with_capacity(events.len());
    for &i in &slot {
        seqs.push(next[i]);
        next[i] += 1;
    }
    let payloads = events.iter().map(|e| serde_json::to_string(&e.event)).collect::<Result<Vec<_>, _>>()?;
    let rows: Vec<(&NewEvent, u64, &String)> =
        events.iter().zip(seqs.iter().copied()).zip(payloads.iter()).map(|((e, s), p)| (e, s, p)).collect();
    let version = i64::from(SCHEMA_VERSION);
    for chunk in rows.chunks(INSERT_CHUNK) {
        let sql = multi_row_insert(
            "INSERT INTO journal_events (run_id, seq, schema_version, kind, payload, recorded_at)",
            chunk.len(),
            6,
        );
        let mut a = Vec::with_capacity(chunk.len() * 6);
        for (e, seq, payload) in chunk {
            a.extend([
                Arg::Text(&e.run_id),
                Arg::Int(*seq as i64),
                Arg::Int(version),
                Arg::Text(e.event.kind()),
                Arg::Text(payload),
                Arg::Int(now),
            ]);
        }
        conn.execute(&sql, &a).await?;
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
async fn apply_folded(conn: &mut dyn Exec, now: i64, rows: &[(&NewEvent, u64, &String)]) -> Result<()> {
    let n = rows.len();
    let mut attempt_end: Vec<Option<(&'static str, i64)>> = vec![None; n];
    let mut step_end: Vec<Option<&StepOutcome>> = vec![None; n];
    let mut skip = vec![false; n];
    let mut open_attempts: std::collections::HashMap<(&str, Option<u32>, &str, u32), usize> =
        Default::default();
    let mut open_steps: std::collections::HashMap<(&str, u32), usize> = Default::default();
    // Ends folded into their attempt's row, counted per (target, outcome) for the
    // hourly counters (an unfolded end is counted by `project`).
    let mut hours: std::collections::BTreeMap<(&str, &'static str), i64> = Default::default();
    for (j, (e, _, _)) in rows.iter().enumerate() {
        match &e.event {
            JournalEvent::Policy { step, event: Event::AttemptStarted { target, attempt } } => {
                open_attempts.insert((e.run_id.as_str(), *step, &**target, *attempt), j);
            }
            JournalEvent::Policy {
                step,
                event: Event::AttemptEnded { target, attempt, outcome, latency },
            } => {
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
                conn.execute(
                    sql::STEP_ROW,
                    args![
                        &e.run_id,
                        i64::from(*step),
                        name,
                        target,
                        status,
                        json(input)?,
                        output,
                        class,
                        message,
                        now,
                        shape
                    ],
                )
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
async fn count_hour(conn: &mut dyn Exec, target: &str, outcome: &str, at: i64, n: i64) -> Result<()> {
    conn.execute(sql::COUNT_HOUR, args![target, at - at.rem_euclid(3_600_000), outcome, n]).await?;
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

async fn insert_attempts(conn: &mut dyn Exec, now: i64, rows: &mut Vec<AttemptRow<'_>>) -> Result<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let sql = multi_row_insert(
            "INSERT INTO attempts (run_id, started_seq, step, target, attempt, outcome, latency_ms, started_at, ended_at)",
            chunk.len(),
            9,
        );
        let mut a = Vec::with_capacity(chunk.len() * 9);
        for r in chunk {
            a.extend([
                Arg::Text(r.run_id),
                Arg::Int(r.seq),
                Arg::Int(r.step),
                Arg::Text(r.target),
                Arg::Int(r.attempt),
                r.outcome.arg(),
                r.latency.arg(),
                Arg::Int(now),
                r.ended_at.arg(),
            ]);
        }
        conn.execute(&sql, &a).await?;
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
type StepColumns<'a> = (&'static str, Option<String>, Option<&'static str>, Option<&'a str>, Option<&'a str>);

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

pub(crate) async fn touch_absolute(conn: &mut dyn Exec, run_id: &str, seq: u64, at: i64) -> Result<()> {
    conn.execute(sql::TOUCH_RUN_ABSOLUTE, args![run_id, at, seq as i64]).await?;
    Ok(())
}

fn json(v: &serde_json::Value) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// Applies one event to the projections (the run's counter and times aside).
pub(crate) async fn project(
    conn: &mut dyn Exec,
    run_id: &str,
    seq: u64,
    at: i64,
    event: &JournalEvent,
) -> Result<()> {
    match event {
        JournalEvent::RunCreated { name, input } => {
            conn.execute(
                "UPDATE runs SET name = $2, input = $3 WHERE run_id = $1",
                args![run_id, name, json(input)?],
            )
            .await?;
        }
        JournalEvent::RunStateChanged { state, reason } => {
            conn.execute(
                "UPDATE runs SET state = $2, reason = $3 WHERE run_id = $1",
                args![run_id, state.as_str(), reason.as_deref()],
            )
            .await?;
        }
        JournalEvent::StepStarted { step, name, target, input } => {
            conn.execute(sql::STEP_STARTED, args![run_id, i64::from(*step), name, target, json(input)?, at])
                .await?;
        }
        JournalEvent::StepFinished { step, outcome } => {
            let (status, output, class, message, shape) = step_outcome(outcome)?;
            conn.execute(
                sql::STEP_FINISHED,
                args![run_id, i64::from(*step), status, output, class, message, at, shape],
            )
            .await?;
        }
        JournalEvent::ApprovalRequested { approval_id, step, tool, args_digest, expires_at_ms, args } => {
            let args = if args.is_null() { None } else { Some(json(args)?) };
            conn.execute(
                sql::APPROVAL_REQUESTED,
                args![approval_id, run_id, i64::from(*step), tool, args_digest, at, *expires_at_ms, args],
            )
            .await?;
        }
        JournalEvent::ApprovalDecided { approval_id, decision, by } => {
            conn.execute(sql::APPROVAL_DECIDED, args![approval_id, decision.as_str(), by, at]).await?;
        }
        JournalEvent::TicketOpened { ticket_id, step, class, summary, context } => {
            conn.execute(
                sql::TICKET_OPENED,
                args![ticket_id, run_id, step.map(i64::from), class.as_str(), summary, json(context)?, at],
            )
            .await?;
        }
        JournalEvent::TicketResolved { ticket_id, resolution, by } => {
            conn.execute(sql::TICKET_RESOLVED, args![ticket_id, json(resolution)?, by, at]).await?;
        }
        JournalEvent::AttemptAbandoned { step, target, attempt } => {
            conn.execute(
                sql::ATTEMPT_ABANDONED,
                args![run_id, step.map_or(-1, i64::from), target, i64::from(*attempt), at],
            )
            .await?;
        }
        JournalEvent::ProgramRecorded { .. }
        | JournalEvent::ModelCalled { .. }
        | JournalEvent::RunTakenOver { .. } => {}
        JournalEvent::Policy { step, event } => {
            let step = step.map_or(-1, i64::from);
            match event {
                Event::AttemptStarted { target, attempt } => {
                    conn.execute(
                        sql::ATTEMPT_STARTED,
                        args![run_id, seq as i64, step, &**target, i64::from(*attempt), at],
                    )
                    .await?;
                }
                Event::AttemptEnded { target, attempt, outcome, latency } => {
                    let outcome = outcome_str(outcome);
                    let latency = crate::journal::ms(*latency);
                    count_hour(&mut *conn, target, outcome, at, 1).await?;
                    let done = conn
                        .execute(
                            sql::ATTEMPT_ENDED,
                            args![run_id, step, &**target, i64::from(*attempt), outcome, latency, at],
                        )
                        .await?;
                    if done == 0 {
                        conn.execute(
                            sql::ATTEMPT_ENDED_ALONE,
                            args![
                                run_id,
                                step,
                                &**target,
                                i64::from(*attempt),
                                outcome,
                                latency,
                                at,
                                seq as i64
                            ],
                        )
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
