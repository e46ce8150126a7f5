//! What the journal says about corrections: failed → fixed program pairs (`keel
//! export corrections`, JSONL for training or review) and, per error kind and
//! strategy, how often a correction worked and what it cost (`keel stats corrections`).
//!
//! Read from agent runs' steps alone: a code call is a tool step whose arguments hold
//! a `program`; a turn that followed a failed program records the strategy it used and
//! the kind it answered (`input.strategy`, `input.after_kind`) and what it was charged.

use std::collections::BTreeMap;

use keel_journal::{Journal, RunPage, RunSnapshot};
use serde::Serialize;
use serde_json::{Value, json};

use super::{MODEL_TARGET_PREFIX, program_of, program_result};

/// One strategy's record after one error kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StrategyStats {
    /// Turns that used it.
    pub tries: u64,
    /// Of those, turns whose next program worked.
    pub fixed: u64,
    /// Tokens those turns were charged.
    pub tokens: u64,
}

/// Everything `keel stats corrections` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CorrectionStats {
    /// By (error kind, strategy).
    pub by_kind: BTreeMap<String, BTreeMap<String, StrategyStats>>,
    /// Chains of failed programs that ended fixed.
    pub chains_fixed: u64,
    /// Chains that never were (the run stopped or moved on).
    pub chains_unsolved: u64,
    /// Tokens spent on correction turns of unsolved chains.
    pub tokens_unsolved: u64,
}

/// Scans every agent run of `journal`.
///
/// # Errors
/// The journal's.
pub async fn scan(journal: &dyn Journal) -> keel_journal::Result<(Vec<Value>, CorrectionStats)> {
    let mut pairs = Vec::new();
    let mut stats = CorrectionStats::default();
    for id in journal.run_ids().await? {
        let Some(snap) = journal.snapshot(&id).await? else { continue };
        if snap.run.input.get("agent").is_none() {
            continue;
        }
        scan_run(&snap, &mut pairs, &mut stats);
    }
    Ok((pairs, stats))
}

/// [`scan`]'s record over the latest `limit` runs by activity only (one indexed page of
/// at most [`RunPage::MAX`]): the history a process weighs correction strategies' token
/// costs by, read without going through the whole journal.
///
/// # Errors
/// The journal's.
pub async fn scan_recent(journal: &dyn Journal, limit: u32) -> keel_journal::Result<CorrectionStats> {
    let page = RunPage { state: None, before: None, limit: limit.clamp(1, RunPage::MAX) };
    let mut pairs = Vec::new();
    let mut stats = CorrectionStats::default();
    for run in journal.list_runs(&page).await? {
        if run.input.get("agent").is_none() {
            continue;
        }
        let Some(snap) = journal.snapshot(&run.run_id).await? else { continue };
        scan_run(&snap, &mut pairs, &mut stats);
    }
    Ok(stats)
}

fn scan_run(snap: &RunSnapshot, pairs: &mut Vec<Value>, stats: &mut CorrectionStats) {
    let mut steps: Vec<_> = snap.steps.iter().collect();
    steps.sort_by_key(|s| s.step);
    // The failed programs of the chain in progress, and its correction turns' tokens.
    let mut chain: Vec<(String, String)> = Vec::new();
    let mut chain_tokens = 0u64;
    // The strategy and kind of the latest turn, with its tokens, until its program ends.
    let mut open: Option<(String, String, u64)> = None;
    for s in steps {
        if s.target.starts_with(MODEL_TARGET_PREFIX) {
            if s.status != "succeeded" {
                continue;
            }
            let tokens = s.output.as_ref().and_then(|o| o["charged"]["tokens"].as_u64()).unwrap_or(0);
            open = s.input["strategy"].as_str().map(|strategy| {
                let kind = s.input["after_kind"].as_str().unwrap_or("error").to_owned();
                (strategy.to_owned(), kind, tokens)
            });
            if open.is_some() {
                chain_tokens = chain_tokens.saturating_add(tokens);
            }
            continue;
        }
        let Some(program) = program_of(&s.input) else { continue };
        let worked = s.status == "succeeded";
        if s.status != "succeeded" && s.status != "failed" {
            continue;
        }
        if let Some((strategy, kind, tokens)) = open.take() {
            let e = stats.by_kind.entry(kind).or_default().entry(strategy).or_default();
            e.tries += 1;
            e.fixed += u64::from(worked);
            e.tokens = e.tokens.saturating_add(tokens);
        }
        if worked {
            if let Some((failed, error)) = chain.last() {
                pairs.push(json!({
                    "run_id": snap.run.run_id,
                    "task": snap.run.input["agent"]["task"],
                    "failed": {"program": failed, "error": error},
                    // The program's `result`: the code tool's, or a command tool's JSON answer's.
                    "fixed": {"program": program, "result": s.output.as_ref().map(|o| {
                        program_result(o).unwrap_or(o)
                    })},
                    "failed_attempts": chain.len(),
                    "correction_tokens": chain_tokens,
                }));
                stats.chains_fixed += 1;
            }
            chain.clear();
            chain_tokens = 0;
        } else if s.error_class.as_deref() == Some("code_error") {
            chain.push((program.to_owned(), s.message.clone().unwrap_or_default()));
        }
    }
    if !chain.is_empty() {
        stats.chains_unsolved += 1;
        stats.tokens_unsolved = stats.tokens_unsolved.saturating_add(chain_tokens);
    }
}

impl CorrectionStats {
    /// The table people read.
    pub fn render(&self) -> String {
        let mut out =
            String::from("kind                 strategy    tries  fixed  rate   tokens  fixed/1k tok\n");
        for (kind, by) in &self.by_kind {
            for (strategy, s) in by {
                let rate = if s.tries == 0 { 0.0 } else { s.fixed as f64 / s.tries as f64 };
                let per_k = if s.tokens == 0 { 0.0 } else { s.fixed as f64 * 1000.0 / s.tokens as f64 };
                out.push_str(&format!(
                    "{kind:<20} {strategy:<10} {:>6} {:>6} {:>5.0}% {:>8} {per_k:>12.2}\n",
                    s.tries,
                    s.fixed,
                    rate * 100.0,
                    s.tokens
                ));
            }
        }
        out.push_str(&format!(
            "chains fixed: {}, unsolved: {} ({} tokens spent on unsolved chains)\n",
            self.chains_fixed, self.chains_unsolved, self.tokens_unsolved
        ));
        out
    }
}
