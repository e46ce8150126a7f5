//! Correcting generated code: what the agent does after a program the model wrote
//! failed (`code_error`), chosen per error kind and measured, not assumed.
//!
//! Two ways on, and a stop:
//! - **repair**: the error (class, message, traceback) goes back as the call's answer,
//!   the failed program beside it in the history, and the model fixes it;
//! - **regenerate**: the failed chain's exchanges are taken out of the history (a model
//!   shown its own broken program tends to return it unchanged: small coder models'
//!   repair answers were the failing program again 51–82% of the time elsewhere, every
//!   time in `bench/corrections`) and the model writes a fresh program from the task,
//!   warmer, with a one-line hint of what failed;
//! - **stop**: the same error twice in a row, two resubmissions of failed programs in a
//!   row, `code_attempts` failures in a chain, or an error kind whose corrections never
//!   succeed here (both strategies refused by the gate: their outcomes score under its
//!   threshold) ends the run with its partial result — spending nothing more on what
//!   the record says will not be fixed.
//!
//! A program identical to one that already failed (ignoring whitespace and comments)
//! is never run again: it counts as a failed attempt and the next turn switches
//! strategy. Which strategy follows which error kind is learned: each outcome (did the
//! next program succeed?) is recorded in the process's confidence gate under
//! `correct:STRATEGY:KIND` and pooled under `correct:STRATEGY:*` (which judges a kind
//! with no record of its own), persisted with the rest of the gate, and weighed by what
//! each strategy's turns cost in tokens ([`TokenCosts`]: the higher expected fixes per
//! token wins, so a strategy as good at a third of the price is taken, and a much
//! better one is worth its price); until there is data, a prior decides (repair for
//! kinds a model can see in its program — a misspelt name, a missing key — regenerate
//! for the rest, after the published finding that self-repair works far better on
//! some error kinds than others).
//!
//! When the loop stops, `[agent] on_unsolved` ([`Unsolved`]) says whether the run
//! fails with its partial result or a person is asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_core::{ConfidenceGate, ErrorClass};
use serde::{Deserialize, Serialize};

/// How the agent goes on after a failed program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The error back to the model, its program in view.
    Repair,
    /// A fresh program from the task, the failed one out of view.
    Regenerate,
}

impl Strategy {
    /// Its name in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Repair => "repair",
            Strategy::Regenerate => "regenerate",
        }
    }

    /// The other one.
    pub fn other(self) -> Strategy {
        match self {
            Strategy::Repair => Strategy::Regenerate,
            Strategy::Regenerate => Strategy::Repair,
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "repair" => Some(Strategy::Repair),
            "regenerate" => Some(Strategy::Regenerate),
            _ => None,
        }
    }
}

/// `[agent] correction`: learned per error kind, or one strategy always (for
/// comparison: the benchmark runs each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionMode {
    /// Learned from outcomes, a prior until there are some.
    #[default]
    Adaptive,
    /// Always repair.
    Repair,
    /// Always regenerate.
    Regenerate,
}

/// `[agent] on_unsolved`: what a correction loop that gives up does (the same error
/// twice, resubmissions, `code_attempts` spent, a kind the gate says does not pay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unsolved {
    /// The run fails with its partial result.
    #[default]
    Fail,
    /// A ticket with the context (the task, the last program, its error, the strategies
    /// tried): `retry` gives one more correction round, `skip` finishes the run with its
    /// partial result, `abort` ends it.
    Escalate,
}

/// A program with its comments and whitespace taken out (keel-core's, shared with the
/// Python package's `self_correct`).
pub use keel_core::correct::normalize_program as normalize;

/// The kind of a code error from its message: its first line's leading name
/// (`KeyError: 'total'` → `KeyError`, `CPUTimeExceeded: ...`), or, after a prefix such
/// as a command's `exited with status 3: `, the first `Name:` segment that names an
/// error or exception; else `error`.
pub fn error_kind(message: &str) -> String {
    let first = message.lines().next().unwrap_or("");
    let ident = |name: &str| {
        !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            && name.rsplit('.').next().and_then(|n| n.chars().next()).is_some_and(|c| c.is_ascii_uppercase())
    };
    let short = |name: &str| name.rsplit('.').next().unwrap_or(name).to_owned();
    let mut segments = first.split(':').map(str::trim);
    if let Some(head) = segments.next().filter(|h| ident(h) && first.contains(':')) {
        return short(head);
    }
    for name in first.split(':').map(str::trim) {
        if ident(name) && ["Error", "Exception", "Exit", "Interrupt"].iter().any(|e| short(name).ends_with(e))
        {
            return short(name);
        }
    }
    "error".to_owned()
}

/// The kinds a model tends to fix in its own program.
fn repairable(kind: &str) -> bool {
    matches!(
        kind,
        "NameError"
            | "KeyError"
            | "AttributeError"
            | "TypeError"
            | "SyntaxError"
            | "IndentationError"
            | "IndexError"
            | "ImportError"
            | "ModuleNotFoundError"
            | "UnboundLocalError"
    )
}

/// The kind under which outcomes of every kind are pooled.
pub const ANY_KIND: &str = "*";

/// The gate's key of a strategy's outcomes after errors of `kind`.
pub fn gate_target(strategy: Strategy, kind: &str) -> Arc<str> {
    Arc::from(format!("correct:{}:{kind}", strategy.as_str()))
}

/// The latest runs whose correction turns a process weighs token costs by.
pub const COST_HISTORY_RUNS: u32 = 500;

/// The most (strategy, kind) pairs whose costs a process keeps.
const MAX_COSTS: usize = 4096;

/// The tokens correction turns cost, per (strategy, error kind) and pooled under
/// [`ANY_KIND`]: seeded once from the journal's history ([`super::stats`]'s record:
/// tries and tokens), then added to from what this process sees. A turn seen before
/// the seed is not added: the journal already holds it, and the seed reads it.
#[derive(Debug, Default)]
pub struct TokenCosts(Mutex<Costs>);

#[derive(Debug, Default)]
struct Costs {
    seeded: bool,
    /// (strategy, kind) → (tries, tokens).
    by: HashMap<(Strategy, String), (u64, u64)>,
}

impl Costs {
    fn add(&mut self, strategy: Strategy, kind: &str, tries: u64, tokens: u64) {
        for k in [kind, ANY_KIND] {
            let key = (strategy, k.to_owned());
            if self.by.len() >= MAX_COSTS && !self.by.contains_key(&key) {
                continue;
            }
            let e = self.by.entry(key).or_default();
            *e = (e.0.saturating_add(tries), e.1.saturating_add(tokens));
        }
    }
}

impl TokenCosts {
    /// Whether the journal's history was read in.
    pub fn is_seeded(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).seeded
    }

    /// Reads in the journal's history (once: a later seed is ignored).
    pub fn seed(&self, stats: &super::stats::CorrectionStats) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if c.seeded {
            return;
        }
        c.seeded = true;
        for (kind, by) in &stats.by_kind {
            for (strategy, s) in by {
                if let Some(strategy) = Strategy::parse(strategy).filter(|_| s.tries > 0) {
                    c.add(strategy, kind, s.tries, s.tokens);
                }
            }
        }
    }

    /// One correction turn of `strategy` after an error of `kind` that cost `tokens`.
    pub fn add(&self, strategy: Strategy, kind: &str, tokens: u64) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if c.seeded {
            c.add(strategy, kind, 1, tokens);
        }
    }

    /// The mean tokens of a turn of `strategy` after `kind`, if any was counted.
    pub fn mean(&self, strategy: Strategy, kind: &str) -> Option<f64> {
        let c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        c.by.get(&(strategy, kind.to_owned()))
            .filter(|(tries, tokens)| *tries > 0 && *tokens > 0)
            .map(|(tries, tokens)| *tokens as f64 / *tries as f64)
    }
}

/// Whether the gate says corrections of `kind` do not pay off (adaptive mode only):
/// both strategies tried and both scored under the gate's threshold.
pub fn hopeless(mode: CorrectionMode, gate: &ConfidenceGate, kind: &str) -> bool {
    mode == CorrectionMode::Adaptive
        && gate.config().enabled
        && [Strategy::Repair, Strategy::Regenerate].iter().all(|s| {
            let target = gate_target(*s, kind);
            let o = gate.outcomes(&target, ErrorClass::CodeError, 2);
            o.successes + o.failures > 0 && !gate.check(&target, ErrorClass::CodeError, 2).allowed
        })
}

/// The strategy after a failure of `kind`: a fixed one, or the one with the higher
/// expected fixes per token — its gate score after this kind over the mean tokens of
/// its turns (`costs`, for the same kind, else pooled) — or, while either strategy's
/// costs are unknown, the one whose outcomes score higher (the prior when both
/// outcomes are unknown). `switch` (the last program was a resubmission of a failed
/// one) takes the other strategy than `last`.
pub fn choose(
    mode: CorrectionMode,
    gate: &ConfidenceGate,
    costs: &TokenCosts,
    kind: &str,
    last: Option<Strategy>,
    switch: bool,
) -> Strategy {
    let chosen = match mode {
        CorrectionMode::Repair => Strategy::Repair,
        CorrectionMode::Regenerate => Strategy::Regenerate,
        CorrectionMode::Adaptive => {
            let score = |s: Strategy, kind: &str| {
                let o = gate.outcomes(&gate_target(s, kind), ErrorClass::CodeError, 2);
                (o.successes + o.failures > 0)
                    .then(|| gate.score(&gate_target(s, kind), ErrorClass::CodeError, 2))
            };
            let prior = if repairable(kind) { Strategy::Repair } else { Strategy::Regenerate };
            // A kind with no record of its own is judged by the pooled record of all.
            let (basis, (r, g)) = match (score(Strategy::Repair, kind), score(Strategy::Regenerate, kind)) {
                (None, None) => {
                    (ANY_KIND, (score(Strategy::Repair, ANY_KIND), score(Strategy::Regenerate, ANY_KIND)))
                }
                known => (kind, known),
            };
            let mean = |s: Strategy| costs.mean(s, basis).or_else(|| costs.mean(s, ANY_KIND));
            // Fixes per token when both strategies' costs are known, else per turn.
            let (r, g) = match (r, g, mean(Strategy::Repair), mean(Strategy::Regenerate)) {
                (Some(r), Some(g), Some(tr), Some(tg)) => (Some(r / tr), Some(g / tg)),
                _ => (r, g),
            };
            match (r, g) {
                (Some(r), Some(g)) if (r - g).abs() > 1e-9 * r.max(g) => {
                    if r > g {
                        Strategy::Repair
                    } else {
                        Strategy::Regenerate
                    }
                }
                (Some(r), None) if r < 0.5 => Strategy::Regenerate,
                (None, Some(g)) if g < 0.5 => Strategy::Repair,
                _ => prior,
            }
        }
    };
    match (switch, last) {
        (true, Some(l)) if mode == CorrectionMode::Adaptive => l.other(),
        _ => chosen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_that_differ_in_comments_and_spacing_are_the_same() {
        let a = "x = d['total']  # the total\nresult = x\n";
        let b = "# compute\nx=d['total']\n\n\nresult   =   x";
        assert_eq!(normalize(a), normalize(b));
        assert_ne!(normalize(a), normalize("x = d['sum']\nresult = x"));
        assert_ne!(normalize("s = '#'"), normalize("s = ''"), "a # in a string is code");
    }

    #[test]
    fn the_kind_is_the_leading_error_name() {
        assert_eq!(error_kind("KeyError: 'total'\n  line 3"), "KeyError");
        assert_eq!(error_kind("json.decoder.JSONDecodeError: bad"), "JSONDecodeError");
        assert_eq!(error_kind("the program did not set result"), "error");
        assert_eq!(error_kind(""), "error");
        assert_eq!(error_kind("exited with status 3: NameError: name 'x' is not defined"), "NameError");
        assert_eq!(error_kind("CPUTimeExceeded: the program used its 2 s of CPU"), "CPUTimeExceeded");
    }

    #[test]
    fn the_prior_decides_until_outcomes_say_otherwise() {
        let gate = ConfidenceGate::new(keel_core::gate::GateConfig::default());
        let none = TokenCosts::default();
        let choose = |kind: &str| choose(CorrectionMode::Adaptive, &gate, &none, kind, None, false);
        assert_eq!(choose("NameError"), Strategy::Repair);
        assert_eq!(choose("AssertionError"), Strategy::Regenerate);
        // Repair keeps failing on NameError here: regenerate is tried instead.
        for _ in 0..6 {
            gate.record(&gate_target(Strategy::Repair, "NameError"), ErrorClass::CodeError, 1, false);
        }
        assert_eq!(choose("NameError"), Strategy::Regenerate);
        for _ in 0..6 {
            gate.record(&gate_target(Strategy::Regenerate, "NameError"), ErrorClass::CodeError, 1, false);
        }
        gate.record(&gate_target(Strategy::Repair, "NameError"), ErrorClass::CodeError, 1, true);
        assert_eq!(choose("NameError"), Strategy::Repair, "the better record wins");
        let resubmitted =
            super::choose(CorrectionMode::Adaptive, &gate, &none, "NameError", Some(Strategy::Repair), true);
        assert_eq!(resubmitted, Strategy::Regenerate, "a resubmitted program switches strategy");
        let fixed = super::choose(CorrectionMode::Repair, &gate, &none, "AssertionError", None, false);
        assert_eq!(fixed, Strategy::Repair);
    }

    /// Outcomes of `strategy` after `kind`: `fixed` successes and `failed` failures.
    fn record(gate: &ConfidenceGate, strategy: Strategy, kind: &str, fixed: u32, failed: u32) {
        for i in 0..fixed + failed {
            gate.record(&gate_target(strategy, kind), ErrorClass::CodeError, 2, i < fixed);
        }
    }

    /// `tries` turns of `strategy` after `kind` at `tokens` each, as the journal says.
    fn history(kind: &str, by: &[(Strategy, u64, u64)]) -> crate::agent::stats::CorrectionStats {
        let mut stats = crate::agent::stats::CorrectionStats::default();
        for (strategy, tries, tokens) in by {
            stats.by_kind.entry(kind.to_owned()).or_default().insert(
                strategy.as_str().to_owned(),
                crate::agent::stats::StrategyStats { tries: *tries, fixed: 0, tokens: tries * tokens },
            );
        }
        stats
    }

    #[test]
    fn the_strategy_with_more_fixes_per_token_is_chosen() {
        let gate = ConfidenceGate::new(keel_core::gate::GateConfig::default());
        let adaptive = |costs: &TokenCosts, kind: &str| {
            super::choose(CorrectionMode::Adaptive, &gate, costs, kind, None, false)
        };
        // Equal records after a KeyError (the prior says repair): the cheaper one wins.
        record(&gate, Strategy::Repair, "KeyError", 3, 3);
        record(&gate, Strategy::Regenerate, "KeyError", 3, 3);
        let none = TokenCosts::default();
        assert_eq!(adaptive(&none, "KeyError"), Strategy::Repair, "no token data: today's rule");
        let costs = TokenCosts::default();
        costs.seed(&history("KeyError", &[(Strategy::Repair, 4, 900), (Strategy::Regenerate, 4, 300)]));
        assert_eq!(adaptive(&costs, "KeyError"), Strategy::Regenerate, "as good, a third of the tokens");
        // Costs seen by this process count too: repair gets cheap enough to win again.
        for _ in 0..40 {
            costs.add(Strategy::Repair, "KeyError", 100);
        }
        assert!(costs.mean(Strategy::Repair, "KeyError").unwrap() < 300.0);
        assert_eq!(adaptive(&costs, "KeyError"), Strategy::Repair);

        // A much better success rate is worth its price: repair fixes a NameError 9
        // times in 10 at three times the tokens of a regeneration that fixes 1 in 10.
        record(&gate, Strategy::Repair, "NameError", 9, 1);
        record(&gate, Strategy::Regenerate, "NameError", 1, 9);
        let costs = TokenCosts::default();
        costs.seed(&history("NameError", &[(Strategy::Repair, 10, 900), (Strategy::Regenerate, 10, 300)]));
        assert_eq!(adaptive(&costs, "NameError"), Strategy::Repair, "the dearer strategy still wins");
        // Only one strategy's costs known: the scores alone decide.
        let half = TokenCosts::default();
        half.seed(&history("NameError", &[(Strategy::Regenerate, 10, 1)]));
        assert_eq!(adaptive(&half, "NameError"), Strategy::Repair);
    }

    #[test]
    fn token_costs_are_seeded_once_and_count_only_turns_after_it() {
        let costs = TokenCosts::default();
        costs.add(Strategy::Repair, "KeyError", 1_000_000);
        assert_eq!(costs.mean(Strategy::Repair, "KeyError"), None, "before the seed: the journal has it");
        costs.seed(&history("KeyError", &[(Strategy::Repair, 2, 500)]));
        assert!(costs.is_seeded());
        costs.seed(&history("KeyError", &[(Strategy::Repair, 2, 5)]));
        assert_eq!(costs.mean(Strategy::Repair, "KeyError"), Some(500.0), "a second seed is ignored");
        costs.add(Strategy::Repair, "KeyError", 800);
        assert_eq!(costs.mean(Strategy::Repair, "KeyError"), Some(600.0));
        assert_eq!(costs.mean(Strategy::Repair, ANY_KIND), Some(600.0), "pooled too");
        assert_eq!(costs.mean(Strategy::Regenerate, "KeyError"), None);
    }

    #[test]
    fn a_kind_whose_corrections_never_succeed_is_hopeless() {
        let gate = ConfidenceGate::new(keel_core::gate::GateConfig::default());
        assert!(!hopeless(CorrectionMode::Adaptive, &gate, "AssertionError"), "no record: try");
        for s in [Strategy::Repair, Strategy::Regenerate] {
            for _ in 0..4 {
                gate.record(&gate_target(s, "AssertionError"), ErrorClass::CodeError, 2, false);
            }
        }
        assert!(hopeless(CorrectionMode::Adaptive, &gate, "AssertionError"));
        assert!(!hopeless(CorrectionMode::Repair, &gate, "AssertionError"), "a fixed mode always tries");
        assert!(!hopeless(CorrectionMode::Adaptive, &gate, "KeyError"));
        gate.record(&gate_target(Strategy::Repair, "AssertionError"), ErrorClass::CodeError, 2, true);
        gate.record(&gate_target(Strategy::Repair, "AssertionError"), ErrorClass::CodeError, 2, true);
        assert!(!hopeless(CorrectionMode::Adaptive, &gate, "AssertionError"), "it worked again: try");
    }
}
