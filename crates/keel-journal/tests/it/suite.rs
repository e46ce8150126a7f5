//! The shared suite: every case runs against SQLite and against PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_core::gate::{GateRecord, Outcomes};
use keel_core::{AttemptOutcome, Classified, ConfidenceGate, ErrorClass, Event, EventSink as _};
use keel_journal::{
    ApprovalDecision, Claim, Error, JournalEvent, JournalWriter, NewEvent, ProgramOutcome, RunState,
    SCHEMA_VERSION, StepOutcome,
};
use serde_json::json;

use crate::support::{Store, all_snapshots};

macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::support::store(keel_journal::Backend::Sqlite).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::support::store(keel_journal::Backend::Postgres).await).await;
                }
            )*
        }
    };
}

both_backends!(
    appends_are_numbered_per_run,
    projections_follow_events_and_rebuild_to_the_same_state,
    sixty_four_claimers_one_winner,
    idempotency_keys_expire_and_release,
    leases_exclude_expire_and_fence,
    a_run_created_leased_is_held_and_its_last_event_gives_the_lease_up,
    runs_created_in_a_batch_commit_with_its_events,
    claim_runs_takes_only_free_unfinished_runs,
    gate_history_round_trips,
    prune_removes_old_runs_and_export_has_events_and_state,
    writer_acks_only_committed_events,
    runs_created_under_one_id_are_created_once,
    indexed_queries_page_filter_and_aggregate,
    alert_record_keeps_incidents_and_timelines_across_a_reopen,
);

fn ev(run: &str, event: JournalEvent) -> NewEvent {
    NewEvent::new(run, event)
}

fn created(name: &str) -> JournalEvent {
    JournalEvent::RunCreated { name: name.into(), input: json!({"task": name}) }
}

fn state(state: RunState) -> JournalEvent {
    JournalEvent::RunStateChanged { state, reason: None }
}

async fn appends_are_numbered_per_run(s: Store) {
    let j = &s.journal;
    let seqs = j
        .append(&[ev("a", created("a")), ev("b", created("b")), ev("a", state(RunState::Running))])
        .await
        .unwrap();
    assert_eq!(seqs, [1, 1, 2]);
    let seqs =
        j.append(&[ev("b", state(RunState::Running)), ev("a", state(RunState::Completed))]).await.unwrap();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(j.append(&[]).await.unwrap(), Vec::<u64>::new());

    let events = j.events("a", 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(events.iter().all(|e| e.schema_version == SCHEMA_VERSION && e.run_id == "a"));
    assert_eq!(events[0].event, created("a"));
    assert_eq!(events[2].event, state(RunState::Completed));
    assert_eq!(j.events("a", 1, 1).await.unwrap()[0].seq, 2);
    assert_eq!(j.run_ids().await.unwrap().len(), 2);
    let run = j.snapshot("a").await.unwrap().unwrap().run;
    assert_eq!((run.state, run.last_seq, run.name.as_str()), (RunState::Completed, 3, "a"));
    assert!(j.snapshot("nope").await.unwrap().is_none());
}

fn policy(step: u32, event: Event) -> JournalEvent {
    JournalEvent::Policy { step: Some(step), event }
}

async fn projections_follow_events_and_rebuild_to_the_same_state(s: Store) {
    let j = &s.journal;
    let t: Arc<str> = Arc::from("search");
    let run = "r1";
    let lat = Duration::from_millis(40);
    j.append(&[ev(run, created("plan")), ev(run, state(RunState::Running))]).await.unwrap();
    s.clock.advance(Duration::from_millis(5));
    j.append(&[
        ev(
            run,
            JournalEvent::StepStarted {
                step: 1,
                name: "find".into(),
                target: "search".into(),
                input: json!({"q": 1}),
            },
        ),
        ev(run, policy(1, Event::AttemptStarted { target: t.clone(), attempt: 1 })),
        ev(
            run,
            policy(
                1,
                Event::AttemptEnded {
                    target: t.clone(),
                    attempt: 1,
                    outcome: AttemptOutcome::Failed(ErrorClass::Timeout),
                    latency: lat,
                },
            ),
        ),
        ev(
            run,
            policy(
                1,
                Event::RetryScheduled {
                    target: t.clone(),
                    attempt: 1,
                    class: ErrorClass::Timeout,
                    delay: lat,
                    reason: keel_core::DelayReason::Backoff,
                },
            ),
        ),
        ev(run, policy(1, Event::AttemptStarted { target: t.clone(), attempt: 2 })),
    ])
    .await
    .unwrap();
    s.clock.advance(Duration::from_millis(5));
    j.append(&[
        ev(
            run,
            policy(
                1,
                Event::AttemptEnded {
                    target: t.clone(),
                    attempt: 2,
                    outcome: AttemptOutcome::Ok,
                    latency: lat,
                },
            ),
        ),
        ev(
            run,
            JournalEvent::StepFinished {
                step: 1,
                outcome: StepOutcome::Succeeded { output: json!(["hit"]), shape: Some("a1b2".into()) },
            },
        ),
        ev(
            run,
            JournalEvent::ApprovalRequested {
                approval_id: "ap1".into(),
                step: 2,
                tool: "pay".into(),
                args_digest: "d1".into(),
                expires_at_ms: 99,
                args: json!({"amount": 150}),
            },
        ),
        ev(run, state(RunState::WaitingApproval)),
    ])
    .await
    .unwrap();
    s.clock.advance(Duration::from_millis(5));
    j.append(&[
        ev(
            run,
            JournalEvent::ApprovalDecided {
                approval_id: "ap1".into(),
                decision: ApprovalDecision::Approved,
                by: "ann".into(),
            },
        ),
        ev(run, state(RunState::Running)),
        ev(
            run,
            JournalEvent::StepStarted { step: 2, name: "pay".into(), target: "pay".into(), input: json!({}) },
        ),
        ev(
            run,
            JournalEvent::ProgramRecorded {
                step: 2,
                attempt: 1,
                program: "result = 1/0".into(),
                outcome: ProgramOutcome::Failed {
                    class: ErrorClass::CodeError,
                    message: "ZeroDivisionError".into(),
                },
            },
        ),
        ev(
            run,
            JournalEvent::StepFinished {
                step: 2,
                outcome: StepOutcome::Failed { class: ErrorClass::CodeError, message: "boom".into() },
            },
        ),
        ev(
            run,
            JournalEvent::TicketOpened {
                ticket_id: "t1".into(),
                step: Some(2),
                class: ErrorClass::CodeError,
                summary: "pay failed".into(),
                context: json!({"trace": "..."}),
            },
        ),
        ev(
            run,
            JournalEvent::TicketResolved {
                ticket_id: "t1".into(),
                resolution: json!({"action": "abort"}),
                by: "bob".into(),
            },
        ),
        ev(
            run,
            JournalEvent::RunStateChanged { state: RunState::Failed, reason: Some("aborted by bob".into()) },
        ),
        // An attempt outside any step, ended without a start: still projected.
        ev(
            run,
            JournalEvent::Policy {
                step: None,
                event: Event::AttemptEnded {
                    target: t.clone(),
                    attempt: 1,
                    outcome: AttemptOutcome::Ok,
                    latency: lat,
                },
            },
        ),
    ])
    .await
    .unwrap();
    j.append(&[ev("other", created("other"))]).await.unwrap();

    let snap = j.snapshot(run).await.unwrap().unwrap();
    assert_eq!(snap.run.state, RunState::Failed);
    assert_eq!(snap.run.reason.as_deref(), Some("aborted by bob"));
    assert_eq!(snap.run.last_seq, 20);
    assert_eq!(snap.run.updated_at_ms - snap.run.created_at_ms, 15);
    assert_eq!(snap.steps.len(), 2);
    assert_eq!(
        (snap.steps[0].status.as_str(), snap.steps[0].output.clone()),
        ("succeeded", Some(json!(["hit"])))
    );
    assert_eq!(snap.steps[0].shape.as_deref(), Some("a1b2"), "the hash journaled beside the output");
    assert_eq!(snap.steps[1].status, "failed");
    assert_eq!(snap.steps[1].shape, None);
    assert_eq!(snap.steps[1].error_class.as_deref(), Some("code_error"));
    let outcomes: Vec<_> = snap.attempts.iter().map(|a| (a.step, a.attempt, a.outcome.clone())).collect();
    assert_eq!(
        outcomes,
        [(Some(1), 1, Some("timeout".into())), (Some(1), 2, Some("ok".into())), (None, 1, Some("ok".into()))]
    );
    assert_eq!(snap.attempts[0].latency_ms, Some(40));
    assert_eq!(snap.approvals[0].status, "approved");
    assert_eq!(snap.approvals[0].decided_by.as_deref(), Some("ann"));
    assert_eq!(snap.approvals[0].args, Some(json!({"amount": 150})), "the arguments the approval covers");
    assert_eq!(snap.tickets[0].status, "resolved");
    assert_eq!(snap.tickets[0].resolution, Some(json!({"action": "abort"})));

    let live = all_snapshots(&**j).await;
    j.rebuild_projections().await.unwrap();
    assert_eq!(all_snapshots(&**j).await, live);
    // And appends carry on from the rebuilt counters.
    assert_eq!(j.append(&[ev(run, state(RunState::Cancelled))]).await.unwrap(), [21]);
}

async fn sixty_four_claimers_one_winner(s: Store) {
    let executed = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let (j, executed, barrier) = (s.journal.clone(), executed.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match j.claim_or_wait("charge-42", Duration::from_secs(60)).await.unwrap() {
                Claim::Won(token) => {
                    executed.fetch_add(1, Ordering::SeqCst);
                    let result = json!({"charged_by": i});
                    j.complete(&token, &result).await.unwrap();
                    result
                }
                Claim::Done(result) => result,
                Claim::InProgress { .. } => panic!("claim_or_wait returned in progress"),
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(executed.load(Ordering::SeqCst), 1, "exactly one claimer executes");
    assert!(results.iter().all(|r| *r == results[0]), "all receive the winner's result: {results:?}");
}

async fn idempotency_keys_expire_and_release(s: Store) {
    let j = &s.journal;
    let Claim::Won(first) = j.claim("k").await.unwrap() else { panic!("first claim wins") };
    assert!(matches!(j.claim("k").await.unwrap(), Claim::InProgress { .. }));
    // The holder died: after claim_ttl (60 s) the key can be won again.
    s.clock.advance(Duration::from_secs(61));
    let Claim::Won(second) = j.claim("k").await.unwrap() else { panic!("expired claim is won again") };
    let err = j.complete(&first, &json!(1)).await.unwrap_err();
    assert!(matches!(err, Error::ClaimLost(_)));
    assert_eq!(err.class(), ErrorClass::Conflict);
    j.complete(&second, &json!({"ok": 2})).await.unwrap();
    assert_eq!(j.claim("k").await.unwrap(), Claim::Done(json!({"ok": 2})));
    // Results are kept for idempotency_ttl (1 h), then the key is free.
    s.clock.advance(Duration::from_secs(3601));
    assert!(matches!(j.claim("k").await.unwrap(), Claim::Won(_)));
    // A released claim (the action failed) lets the next claimer act.
    let Claim::Won(third) = j.claim("r").await.unwrap() else { panic!() };
    j.release_claim(&third).await.unwrap();
    assert!(matches!(j.claim("r").await.unwrap(), Claim::Won(_)));
}

async fn leases_exclude_expire_and_fence(s: Store) {
    let j = &s.journal;
    let ttl = Duration::from_secs(10);
    j.append(&[ev("run", created("run"))]).await.unwrap();
    let a = j.acquire_lease("run", "a", ttl).await.unwrap().unwrap();
    assert_eq!(a.epoch, 1);
    assert!(j.acquire_lease("run", "b", ttl).await.unwrap().is_none());
    s.clock.advance(Duration::from_secs(6));
    let a = j.renew_lease(&a, ttl).await.unwrap();
    s.clock.advance(Duration::from_secs(6));
    assert!(j.acquire_lease("run", "b", ttl).await.unwrap().is_none(), "renewed lease still held");
    j.append_fenced(&a, &[state(RunState::Running)]).await.unwrap();
    // a dies; its lease expires; b takes over.
    s.clock.advance(Duration::from_secs(11));
    let b = j.acquire_lease("run", "b", ttl).await.unwrap().unwrap();
    assert_eq!(b.epoch, 2);
    assert!(matches!(j.renew_lease(&a, ttl).await.unwrap_err(), Error::LeaseLost { .. }));
    let err = j.append_fenced(&a, &[state(RunState::Failed)]).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "a zombie cannot write: {err}");
    assert_eq!(j.append_fenced(&b, &[state(RunState::Completed)]).await.unwrap(), [3]);
    // b restarts with the same owner id: it gets its run back at once, fencing its old self.
    let b2 = j.acquire_lease("run", "b", ttl).await.unwrap().unwrap();
    assert_eq!(b2.epoch, 3);
    assert!(j.append_fenced(&b, &[state(RunState::Running)]).await.is_err());
    j.release_lease(&b2).await.unwrap();
    assert!(j.acquire_lease("run", "a", ttl).await.unwrap().is_some());
}

async fn runs_created_in_a_batch_commit_with_its_events(s: Store) {
    let j = &s.journal;
    let ttl = Duration::from_secs(10);
    assert!(j.create_run("old", &[created("old")]).await.unwrap());
    let c = |id: &str| keel_journal::Creation {
        run_id: id.into(),
        events: vec![created(id), state(RunState::Running)],
        lease: ("me".into(), ttl),
    };
    let (runs, seqs) = j
        .write_batch(&[c("a"), c("old"), c("b"), c("a")], &[ev("old", state(RunState::Running))])
        .await
        .unwrap();
    assert_eq!(seqs, [2], "the batch's events are appended with its creations");
    assert!(runs[1].is_none() && runs[3].is_none(), "an existing run, and one created earlier in the batch");
    for (i, id) in [(0, "a"), (2, "b")] {
        let new = runs[i].clone().expect("created");
        assert_eq!(new.lease.as_ref().map(|l| (l.owner.as_str(), l.epoch)), Some(("me", 1)));
        assert_eq!(Some(new.snapshot), j.snapshot(id).await.unwrap(), "{id}: folded as projected");
    }
    // Held from the start, as a run created alone with its lease.
    assert!(j.acquire_lease("a", "you", ttl).await.unwrap().is_none());
    // The writer queues creations into its batches.
    let writer = JournalWriter::spawn(j.clone(), 64);
    let made = writer.create(c("w")).await.unwrap().expect("created");
    assert_eq!(made.snapshot.run.state, RunState::Running);
    assert!(writer.create(c("w")).await.unwrap().is_none(), "created once");
}

async fn a_run_created_leased_is_held_and_its_last_event_gives_the_lease_up(s: Store) {
    let j = &s.journal;
    let ttl = Duration::from_secs(10);
    let first = [created("k"), state(RunState::Running)];
    let new = j.create_run_leased("k", &first, "me", ttl).await.unwrap().expect("created");
    let lease = new.lease.expect("leased");
    assert_eq!((lease.owner.as_str(), lease.epoch, lease.taken_from.as_deref()), ("me", 1, None));
    // The snapshot it answers with (folded, not read) is what the projections hold.
    assert_eq!(Some(new.snapshot), j.snapshot("k").await.unwrap(), "folded as projected");
    assert_eq!(j.create_run_leased("k", &first, "you", ttl).await.unwrap(), None, "created once");
    // An id whose lease someone holds already: created, not leased.
    j.acquire_lease("pre", "other", ttl).await.unwrap().unwrap();
    let pre = j.create_run_leased("pre", &first, "me", ttl).await.unwrap().expect("created");
    assert_eq!(pre.lease, None);
    // Creation events beyond the usual two are read back, not folded.
    let step = JournalEvent::StepStarted { step: 0, name: "s".into(), target: "t".into(), input: json!({}) };
    let more = [created("m"), state(RunState::Running), step];
    let m = j.create_run_leased("m", &more, "me", ttl).await.unwrap().expect("created");
    assert_eq!((m.snapshot.steps.len(), m.snapshot.run.last_seq), (1, 3));
    assert_eq!(Some(m.snapshot), j.snapshot("m").await.unwrap());
    assert_eq!(j.snapshot("k").await.unwrap().unwrap().run.state, RunState::Running);
    // Held from the start: no worker can claim it, no one else can lease it.
    assert!(j.claim_runs("worker", ttl, 10).await.unwrap().is_empty());
    assert!(j.acquire_lease("k", "you", ttl).await.unwrap().is_none());
    // A releasing event without a fence releases nothing; a lost lease's is refused.
    j.append(&[ev("k", state(RunState::Running)).releasing()]).await.unwrap();
    assert!(j.acquire_lease("k", "you", ttl).await.unwrap().is_none(), "still held");
    let stale = keel_journal::Lease { epoch: 7, ..lease.clone() };
    let err = j
        .append(&[ev("k", state(RunState::Failed)).fenced(Some(Arc::new(stale))).releasing()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(j.acquire_lease("k", "you", ttl).await.unwrap().is_none(), "still held");
    // The drive's last event goes in and gives the lease up in one transaction.
    let last = ev("k", state(RunState::Completed)).fenced(Some(Arc::new(lease))).releasing();
    j.append(&[last]).await.unwrap();
    assert_eq!(j.snapshot("k").await.unwrap().unwrap().run.state, RunState::Completed);
    let next = j.acquire_lease("k", "you", ttl).await.unwrap().expect("released at once, not on expiry");
    assert_eq!(next.taken_from, None, "nobody held it");
}

async fn claim_runs_takes_only_free_unfinished_runs(s: Store) {
    let j = &s.journal;
    let ttl = Duration::from_secs(10);
    j.append(&[
        ev("free", created("free")),
        ev("done", created("done")),
        ev("done", state(RunState::Completed)),
        ev("held", created("held")),
        // No run_created: a run model calls were journaled under, nothing to drive.
        ev("nameless", state(RunState::Running)),
    ])
    .await
    .unwrap();
    j.acquire_lease("held", "other", ttl).await.unwrap().unwrap();
    let got = j.claim_runs("me", ttl, 10).await.unwrap();
    assert_eq!(got.iter().map(|l| l.run_id.as_str()).collect::<Vec<_>>(), ["free"]);
    assert!(j.claim_runs("you", ttl, 10).await.unwrap().is_empty(), "nothing left to take");
    s.clock.advance(Duration::from_secs(11));
    let mut got: Vec<String> =
        j.claim_runs("you", ttl, 10).await.unwrap().into_iter().map(|l| l.run_id).collect();
    got.sort();
    assert_eq!(got, ["free", "held"]);
}

async fn gate_history_round_trips(s: Store) {
    let j = &s.journal;
    let gate = ConfidenceGate::default();
    let target: Arc<str> = Arc::from("llm");
    gate.record(&target, ErrorClass::Timeout, 2, true);
    gate.record(&target, ErrorClass::Timeout, 2, false);
    gate.record(&target, ErrorClass::ServerError, 3, false);
    j.save_gate_history(&gate.snapshot()).await.unwrap();
    assert_eq!(j.load_gate_history().await.unwrap(), gate.snapshot());
    let restored = ConfidenceGate::default();
    restored.load(j.load_gate_history().await.unwrap());
    assert_eq!(restored.snapshot(), gate.snapshot());

    let delta = GateRecord {
        target: "llm".into(),
        class: ErrorClass::Timeout,
        attempt: 2,
        outcomes: Outcomes { successes: 3, failures: 1 },
    };
    j.add_gate_outcomes(std::slice::from_ref(&delta)).await.unwrap();
    let loaded = j.load_gate_history().await.unwrap();
    let timeout = loaded.iter().find(|r| r.class == ErrorClass::Timeout).unwrap();
    assert_eq!(timeout.outcomes, Outcomes { successes: 4, failures: 2 });
    j.save_gate_history(&[]).await.unwrap();
    assert!(j.load_gate_history().await.unwrap().is_empty());
}

async fn prune_removes_old_runs_and_export_has_events_and_state(s: Store) {
    let j = &s.journal;
    j.append(&[ev("old", created("old")), ev("old", state(RunState::Completed))]).await.unwrap();
    let Claim::Won(token) = j.claim("old-key").await.unwrap() else { panic!() };
    j.complete(&token, &json!(1)).await.unwrap();
    s.clock.advance(Duration::from_secs(2 * 3600));
    j.append(&[ev("new", created("new"))]).await.unwrap();
    let report = j.prune(Duration::from_secs(3600)).await.unwrap();
    assert_eq!((report.runs, report.events, report.idempotency_keys), (1, 2, 1));
    assert!(j.snapshot("old").await.unwrap().is_none());
    assert!(j.events("old", 0, 10).await.unwrap().is_empty());
    assert!(j.export_run("old").await.unwrap().is_none());

    let export = j.export_run("new").await.unwrap().unwrap();
    assert_eq!(export.events.len(), 1);
    assert_eq!(export.state.run.name, "new");
    let value = serde_json::to_value(&export).unwrap();
    assert_eq!(value["events"][0]["event"]["type"], "run_created");
    assert_eq!(value["state"]["run"]["state"], "created");
    let back: keel_journal::RunExport = serde_json::from_value(value).unwrap();
    assert_eq!(back, export);
}

async fn writer_acks_only_committed_events(s: Store) {
    let writer = JournalWriter::spawn(s.journal.clone(), 64);
    let sink = writer.sink("w").step(1);
    let ack = writer.submit("w", created("w"));
    for attempt in 1..=500 {
        sink.record(&Event::AttemptStarted { target: Arc::from("t"), attempt });
    }
    let last = writer.submit("w", state(RunState::Running));
    assert!(writer.pending() <= 502, "the backlog counts queued events");
    assert_eq!(ack.durable().await.unwrap(), 1);
    // Acknowledged means committed: a second connection sees it.
    assert_eq!(last.durable().await.unwrap(), 502);
    writer.flush().await.unwrap();
    assert_eq!(writer.pending(), 0, "nothing is behind after a flush");
    let other = keel_journal::open(&s.url, keel_journal::JournalOptions::default()).await.unwrap();
    let events = other.events("w", 0, 1000).await.unwrap();
    assert_eq!(events.len(), 502);
    assert_eq!(other.snapshot("w").await.unwrap().unwrap().attempts.len(), 500);
    writer.close().await.unwrap();
    assert!(matches!(writer.append("w", state(RunState::Failed)).await, Err(Error::WriterClosed)));
    assert!(matches!(writer.flush().await, Err(Error::WriterClosed)));
}

async fn runs_created_under_one_id_are_created_once(s: Store) {
    let j = s.journal.clone();
    let first = [created("k"), state(RunState::Running)];
    let tries: Vec<_> = (0..16)
        .map(|_| {
            let (j, first) = (j.clone(), first.clone());
            tokio::spawn(async move { j.create_run("run-k", &first).await.unwrap() })
        })
        .collect();
    let mut created_count = 0;
    for t in tries {
        created_count += usize::from(t.await.unwrap());
    }
    assert_eq!(created_count, 1, "exactly one of sixteen concurrent creations made the run");
    let events = j.events("run-k", 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2], "its first events, once");
    assert_eq!(events[0].event, created("k"));
    // A run that exists is never written to by a creation, whatever it holds.
    j.append(&[ev("run-k", state(RunState::Completed))]).await.unwrap();
    assert!(!j.create_run("run-k", &first).await.unwrap());
    assert_eq!(j.snapshot("run-k").await.unwrap().unwrap().run.state, RunState::Completed);
    let before = all_snapshots(&*j).await;
    j.rebuild_projections().await.unwrap();
    assert_eq!(all_snapshots(&*j).await, before, "the projections rebuild to the same state");
}

#[tokio::test]
async fn storage_errors_are_classified() {
    let err = keel_journal::open("sqlite:/proc/keel-no-such-dir/j.db", Default::default()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Network, "{err:?}");
    let err = keel_journal::open("postgres://keel@127.0.0.1:1/none", Default::default()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Network, "{err:?}");
    assert!(err.is_transient());
    let err = keel_journal::open("mysql://x/y", Default::default()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidRequest);
}

/// The inbox's and the dashboard's queries: pages of runs by activity (and state),
/// approvals and tickets by status, one of each by id, attempts aggregated over a window.
async fn indexed_queries_page_filter_and_aggregate(s: Store) {
    use keel_journal::RunPage;
    let j = &s.journal;
    let t: Arc<str> = Arc::from("pay");
    for i in 0..25u32 {
        let run = format!("run-{i:02}");
        let mut events = vec![ev(&run, created("plan")), ev(&run, state(RunState::Running))];
        if i % 5 == 0 {
            events.push(ev(&run, state(RunState::Completed)));
        }
        events.push(ev(&run, policy(0, Event::AttemptStarted { target: t.clone(), attempt: 1 })));
        events.push(ev(
            &run,
            policy(
                0,
                Event::AttemptEnded {
                    target: t.clone(),
                    attempt: 1,
                    outcome: if i % 2 == 0 {
                        AttemptOutcome::Ok
                    } else {
                        AttemptOutcome::Failed(ErrorClass::Timeout)
                    },
                    latency: Duration::from_millis(3),
                },
            ),
        ));
        if i == 7 {
            events.push(ev(
                &run,
                JournalEvent::ApprovalRequested {
                    approval_id: "apr-7".into(),
                    step: 0,
                    tool: "pay".into(),
                    args_digest: "d".into(),
                    expires_at_ms: i64::MAX,
                    args: json!({"amount": 7}),
                },
            ));
            events.push(ev(
                &run,
                JournalEvent::TicketOpened {
                    ticket_id: "tkt-7".into(),
                    step: Some(0),
                    class: ErrorClass::Timeout,
                    summary: "stuck".into(),
                    context: json!({}),
                },
            ));
        }
        j.append(&events).await.unwrap();
        s.clock.advance(Duration::from_millis(10));
    }
    // Pages: newest first, no run twice, none left out.
    let mut seen = Vec::new();
    let mut page = RunPage::first(10);
    loop {
        let runs = j.list_runs(&page).await.unwrap();
        assert!(runs.len() <= 10);
        let Some(last) = runs.last() else { break };
        page.before = Some((last.updated_at_ms, last.run_id.clone()));
        seen.extend(runs.into_iter().map(|r| r.run_id));
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("run-{i:02}")).collect();
    assert_eq!(seen, expected);
    let done =
        j.list_runs(&RunPage { state: Some(RunState::Completed), ..RunPage::first(100) }).await.unwrap();
    assert_eq!(
        done.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        ["run-20", "run-15", "run-10", "run-05", "run-00"]
    );
    assert_eq!(j.list_runs(&RunPage::first(0)).await.unwrap().len(), 1, "a page holds at least one run");

    let pending = j.approvals(Some("pending"), 50).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].0.approval_id.as_str(), pending[0].1.run_id.as_str()), ("apr-7", "run-07"));
    assert_eq!(j.approvals(None, 50).await.unwrap().len(), 1);
    assert!(j.approvals(Some("approved"), 50).await.unwrap().is_empty());
    let (a, run, step) = j.approval("apr-7").await.unwrap().unwrap();
    assert_eq!((a.run_id.as_str(), run.run_id.as_str(), step), ("run-07", "run-07", None));
    assert!(j.approval("apr-none").await.unwrap().is_none());
    let open = j.tickets(Some("open"), 50).await.unwrap();
    assert_eq!((open[0].0.ticket_id.as_str(), open[0].1.run_id.as_str()), ("tkt-7", "run-07"));
    assert_eq!(j.ticket("tkt-7").await.unwrap().unwrap().1.run_id, "run-07");

    assert_eq!(j.waiting().await.unwrap(), (1, 1), "pending approvals, open tickets");
    let stats = j.attempt_stats(0).await.unwrap();
    assert_eq!(stats.by_target, [("pay".to_owned(), 25, 12)]);
    assert_eq!(stats.errors_by_hour.iter().map(|(_, _, n)| n).sum::<u64>(), 12);
    assert!(stats.retries_by_run.is_empty(), "every attempt was a first one");
    let later = j.attempt_stats(i64::MAX).await.unwrap();
    assert!(later.by_target.is_empty(), "the window excludes older attempts");
}

fn alert(
    at_s: i64,
    incident: &str,
    kind: &str,
    sink: Option<&str>,
    action: Option<&str>,
) -> keel_journal::AlertRecord {
    keel_journal::AlertRecord {
        at_ms: (1_700_000_000 + at_s) * 1000,
        incident: incident.into(),
        kind: kind.into(),
        rule: incident.split('@').next().unwrap().into(),
        key: "pay".into(),
        severity: "error".into(),
        class: Some("timeout".into()),
        target: Some("pay".into()),
        count: 3,
        sink: sink.map(Into::into),
        action: action.map(Into::into),
        detail: (kind == "failed").then(|| "timeout after 8 attempts".into()),
    }
}

/// Alerting's record (issue 17): incidents open first, then by resolve time, each
/// with its whole timeline; kept across a reopen; a repeated trigger makes no second
/// incident; prune drops what resolved before its cutoff.
async fn alert_record_keeps_incidents_and_timelines_across_a_reopen(s: Store) {
    let j = &s.journal;
    assert!(j.incidents(10).await.unwrap().is_empty());
    j.record_alerts(&[
        alert(0, "a@1", "triggered", None, None),
        alert(1, "a@1", "delivered", Some("pager"), Some("trigger")),
        alert(9, "a@1", "failed", Some("chat"), Some("trigger")),
        alert(10, "b@2", "triggered", None, None),
        alert(10, "b@2", "held", None, None),
        alert(20, "c@3", "triggered", None, None),
        alert(20, "c@3", "held", None, None),
    ])
    .await
    .unwrap();
    j.record_alerts(&[
        alert(30, "c@3", "cancelled", None, None),
        alert(60, "a@1", "resolved", None, None),
        alert(61, "a@1", "delivered", Some("pager"), Some("resolve")),
        alert(62, "digest@4", "delivered", Some("chat"), Some("digest")),
        alert(63, "a@1", "triggered", None, None),
    ])
    .await
    .unwrap();
    j.record_alerts(&[]).await.unwrap();

    let other = keel_journal::open(&s.url, keel_journal::JournalOptions::default()).await.unwrap();
    let all = other.incidents(10).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["b@2", "a@1", "c@3"], "open first, then the latest resolved");
    let (b, a, c) = (&all[0], &all[1], &all[2]);
    assert!(b.is_open() && !a.is_open() && !c.is_open());
    assert_eq!((a.rule.as_str(), a.key.as_str(), a.severity.as_str()), ("a", "pay", "error"));
    assert_eq!((a.class.as_deref(), a.target.as_deref(), a.count), (Some("timeout"), Some("pay"), 3));
    assert_eq!(a.triggered_at_ms, 1_700_000_000_000);
    assert_eq!(a.resolved_at_ms, Some(1_700_000_060_000));
    assert_eq!(c.resolved_at_ms, Some(1_700_000_030_000), "cancelled closes it");
    let timeline: Vec<(&str, Option<&str>, Option<&str>)> =
        a.timeline.iter().map(|e| (e.kind.as_str(), e.sink.as_deref(), e.action.as_deref())).collect();
    assert_eq!(
        timeline,
        [
            ("triggered", None, None),
            ("delivered", Some("pager"), Some("trigger")),
            ("failed", Some("chat"), Some("trigger")),
            ("resolved", None, None),
            ("delivered", Some("pager"), Some("resolve")),
            ("triggered", None, None),
        ]
    );
    assert_eq!(a.timeline[2].detail.as_deref(), Some("timeout after 8 attempts"));
    assert_eq!(b.timeline.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["triggered", "held"]);
    let value = serde_json::to_value(a).unwrap();
    assert_eq!(value["timeline"][1]["sink"], "pager");
    // At most `limit` of each.
    let few = other.incidents(1).await.unwrap();
    assert_eq!(few.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b@2", "a@1"]);
    other.close().await;

    s.clock.advance(Duration::from_secs(2 * 3600));
    j.prune(Duration::from_secs(3600)).await.unwrap();
    let left = j.incidents(10).await.unwrap();
    assert_eq!(left.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b@2"], "the open one stays");
    assert_eq!(left[0].timeline.len(), 2);
}
