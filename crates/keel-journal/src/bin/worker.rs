//! A test helper process for keel-journal's crash and lease tests; not a product binary.
//!
//! `keel-journal-worker append URL PREFIX` appends events as fast as it can from
//! several tasks and prints `ack RUN SEQ` for each event only after the journal
//! acknowledged it (committed). The crash test kills it with SIGKILL.
//!
//! `keel-journal-worker work URL RUN OWNER STEPS STEP_MS TTL_MS` works one run the way
//! an instance would: takes its lease (waiting while another owner holds it), renews
//! it, skips steps already finished, performs each step's effect under an idempotency
//! key, writes with fenced appends, and marks the run succeeded.
//!
//! `keel-journal-worker open URL RUN` opens the journal (creating it) and records one run.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_core::{AttemptOutcome, Event};
use keel_journal::{Claim, JournalEvent, JournalOptions, JournalWriter, RunState, StepOutcome, open};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("append") if args.len() == 3 => append(&args[1], &args[2]).await,
        Some("open") if args.len() == 3 => open_once(&args[1], &args[2]).await,
        Some("work") if args.len() == 7 => work(&args[1..]).await,
        _ => {
            Err("usage: keel-journal-worker append URL PREFIX | work URL RUN OWNER STEPS STEP_MS TTL_MS"
                .into())
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel-journal-worker: {e}");
            ExitCode::from(2)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Events of one step: started, an attempt, finished.
fn step_events(step: u32) -> [JournalEvent; 4] {
    let target: Arc<str> = Arc::from("tool");
    [
        JournalEvent::StepStarted {
            step,
            name: format!("step {step}"),
            target: "tool".into(),
            input: json!({"n": step}),
        },
        JournalEvent::Policy {
            step: Some(step),
            event: Event::AttemptStarted { target: target.clone(), attempt: 1 },
        },
        JournalEvent::Policy {
            step: Some(step),
            event: Event::AttemptEnded {
                target,
                attempt: 1,
                outcome: AttemptOutcome::Ok,
                latency: Duration::from_millis(3),
            },
        },
        JournalEvent::StepFinished {
            step,
            outcome: StepOutcome::Succeeded { output: json!(step * 2), shape: None },
        },
    ]
}

/// Opens the journal (perhaps creating it) and records one run: for racing first opens.
async fn open_once(url: &str, run: &str) -> Res<ExitCode> {
    let journal = open(url, JournalOptions::default()).await?;
    let created = JournalEvent::RunCreated { name: "open".into(), input: json!({}) };
    journal.append(&[keel_journal::NewEvent::new(run, created)]).await?;
    Ok(ExitCode::SUCCESS)
}

async fn append(url: &str, prefix: &str) -> Res<ExitCode> {
    let journal = open(url, JournalOptions::default()).await?;
    let writer = JournalWriter::spawn(journal, keel_journal::writer::DEFAULT_MAX_BATCH);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let writer = writer.clone();
        let run = format!("{prefix}-{t}");
        tasks.push(tokio::spawn(async move {
            let created = JournalEvent::RunCreated { name: "crash".into(), input: json!({"task": t}) };
            let running = JournalEvent::RunStateChanged { state: RunState::Running, reason: None };
            let mut pending = vec![writer.submit(run.clone(), created), writer.submit(run.clone(), running)];
            for step in 1.. {
                pending.extend(step_events(step).map(|e| writer.submit(run.clone(), e)));
                if pending.len() >= 32 {
                    for ack in pending.drain(..) {
                        let seq = ack.durable().await?;
                        println!("ack {run} {seq}");
                    }
                }
            }
            Ok::<(), keel_journal::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(ExitCode::SUCCESS)
}

async fn work(args: &[String]) -> Res<ExitCode> {
    let [url, run, owner, steps, step_ms, ttl_ms] = args else { return Err("bad arguments".into()) };
    let steps: u32 = steps.parse()?;
    let step_time = Duration::from_millis(step_ms.parse()?);
    let ttl = Duration::from_millis(ttl_ms.parse()?);
    let options = JournalOptions { claim_ttl: ttl, ..JournalOptions::default() };
    let journal = open(url, options).await?;

    let mut said_waiting = false;
    let lease = loop {
        let taken = journal.claim_runs(owner, ttl, 10).await?;
        if let Some(lease) = taken.iter().find(|l| &l.run_id == run).cloned() {
            for other in taken.iter().filter(|l| &l.run_id != run) {
                journal.release_lease(other).await?;
            }
            break lease;
        }
        if !said_waiting {
            println!("waiting");
            said_waiting = true;
        }
        tokio::time::sleep(ttl / 10).await;
    };
    println!("acquired {}", lease.epoch);

    let lost = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (journal, lease, lost) = (journal.clone(), lease.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if journal.renew_lease(&lease, ttl).await.is_err() {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };

    let snapshot = journal.snapshot(run).await?.ok_or("no such run")?;
    let finished: Vec<u32> =
        snapshot.steps.iter().filter(|s| s.status == "succeeded").map(|s| s.step).collect();
    if snapshot.run.state == RunState::Created {
        journal
            .append_fenced(
                &lease,
                &[JournalEvent::RunStateChanged { state: RunState::Running, reason: None }],
            )
            .await?;
    }
    for step in 1..=steps {
        if finished.contains(&step) {
            continue;
        }
        if lost.load(Ordering::SeqCst) {
            return Ok(ExitCode::from(3));
        }
        let started = JournalEvent::StepStarted {
            step,
            name: format!("step {step}"),
            target: "effect".into(),
            input: json!(null),
        };
        journal.append_fenced(&lease, &[started]).await?;
        tokio::time::sleep(step_time).await; // The step's work.
        let key = format!("{run}/step/{step}");
        let output = match journal.claim_or_wait(&key, ttl * 20).await? {
            Claim::Won(token) => {
                let output = json!({"by": owner, "step": step});
                journal.complete(&token, &output).await?;
                output
            }
            Claim::Done(output) => output,
            Claim::InProgress { .. } => return Err("claim still in progress".into()),
        };
        journal
            .append_fenced(
                &lease,
                &[JournalEvent::StepFinished {
                    step,
                    outcome: StepOutcome::Succeeded { output, shape: None },
                }],
            )
            .await?;
        println!("finished {step}");
    }
    journal
        .append_fenced(&lease, &[JournalEvent::RunStateChanged { state: RunState::Completed, reason: None }])
        .await?;
    renewer.abort();
    journal.release_lease(&lease).await?;
    println!("succeeded");
    journal.close().await;
    Ok(ExitCode::SUCCESS)
}
