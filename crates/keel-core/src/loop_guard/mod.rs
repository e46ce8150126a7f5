//! The loop guard: stop an agent that repeats itself or never ends.
//!
//! A model that loops calls the same tool with the same arguments again and again, each
//! call "succeeding", burning budget without progress. The guard keeps the signatures
//! of the last `window` calls and refuses a call whose signature already appears
//! `max_repeats - 1` times among them (so the `max_repeats`-th identical call is
//! stopped); it also caps calls per turn and turns per run. A refusal is
//! `loop_detected`, whose disposition is to stop and escalate.

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::{Classified, ErrorClass};
use crate::event::{Event, EventSink, emit};
use crate::policy::{Checks, PolicyError};
use crate::signature::CallSignature;

/// The loop guard's values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoopGuardConfig {
    /// Stop the call that would make this many identical calls within `window`
    /// (2–1000; 0 turns the check off).
    pub max_repeats: u32,
    /// How many recent calls are compared (0–10,000).
    pub window: u32,
    /// The most calls in one turn of an agent, if capped (1–1,000,000).
    pub max_calls_per_turn: Option<u32>,
    /// The most turns in one run, if capped (1–1,000,000).
    pub max_turns_per_run: Option<u32>,
}

impl LoopGuardConfig {
    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`max_repeats`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        match self.max_repeats {
            0 => {}
            1 => c.fail("max_repeats", "1 would stop every call: 0 turns the check off, 2 is the least"),
            n => c.count("max_repeats", n, 2..=1000),
        }
        c.count("window", self.window, 0..=10_000);
        let caps =
            [("max_calls_per_turn", self.max_calls_per_turn), ("max_turns_per_run", self.max_turns_per_run)];
        for (key, cap) in caps {
            match cap {
                Some(0) => c.fail(key, "0 would stop every call: at least 1"),
                Some(n) => c.count(key, n, 1..=1_000_000),
                None => {}
            }
        }
        c.finish()
    }
}

impl Default for LoopGuardConfig {
    fn default() -> Self {
        Self { max_repeats: 3, window: 10, max_calls_per_turn: Some(32), max_turns_per_run: Some(50) }
    }
}

/// Why the loop guard stopped a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoopDetected {
    /// The same call again.
    #[error("the same call to `{target}` was made {count} times within the last {window} calls")]
    Repeated {
        /// The target.
        target: Arc<str>,
        /// How many identical calls, this one included.
        count: u32,
        /// The window compared.
        window: u32,
    },
    /// Too many calls in one turn.
    #[error("more than {limit} calls in one turn")]
    CallsPerTurn {
        /// The cap.
        limit: u32,
    },
    /// Too many turns in one run.
    #[error("more than {limit} turns in one run")]
    TurnsPerRun {
        /// The cap.
        limit: u32,
    },
}

impl Classified for LoopDetected {
    fn class(&self) -> ErrorClass {
        ErrorClass::LoopDetected
    }
}

#[derive(Debug, Default)]
struct State {
    recent: VecDeque<CallSignature>,
    calls_this_turn: u32,
    turns: u32,
}

/// A loop guard for one run (or one agent session).
#[derive(Debug)]
pub struct LoopGuard {
    config: LoopGuardConfig,
    state: Mutex<State>,
    sink: Arc<dyn EventSink>,
}

impl LoopGuard {
    /// A guard with `config`; detections go to `sink`.
    pub fn new(config: LoopGuardConfig, sink: Arc<dyn EventSink>) -> Self {
        Self { config, state: Mutex::new(State::default()), sink }
    }

    /// Checks, and on success counts, one call to `target` with `signature`.
    ///
    /// # Errors
    /// [`LoopDetected`] when the call would repeat itself too often or exceed the
    /// calls-per-turn cap; the call is not counted.
    pub fn check_call(&self, target: &Arc<str>, signature: CallSignature) -> Result<(), LoopDetected> {
        let result = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let repeats = s.recent.iter().filter(|&&sig| sig == signature).count() as u32 + 1;
            if self.config.max_repeats > 0 && repeats >= self.config.max_repeats {
                Err(LoopDetected::Repeated {
                    target: target.clone(),
                    count: repeats,
                    window: self.config.window,
                })
            } else if self.config.max_calls_per_turn.is_some_and(|l| s.calls_this_turn >= l) {
                Err(LoopDetected::CallsPerTurn { limit: self.config.max_calls_per_turn.unwrap_or(0) })
            } else {
                s.calls_this_turn += 1;
                if self.config.window > 0 {
                    if s.recent.len() >= self.config.window as usize {
                        s.recent.pop_front();
                    }
                    s.recent.push_back(signature);
                }
                Ok(())
            }
        };
        if let Err(e) = &result {
            emit(&*self.sink, Event::LoopDetected { target: target.clone(), reason: e.to_string() });
        }
        result
    }

    /// Starts a new turn of the agent.
    ///
    /// # Errors
    /// [`LoopDetected`] when the run would pass its turn cap.
    pub fn begin_turn(&self) -> Result<(), LoopDetected> {
        let result = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match self.config.max_turns_per_run {
                Some(limit) if s.turns >= limit => Err(LoopDetected::TurnsPerRun { limit }),
                _ => {
                    s.turns += 1;
                    s.calls_this_turn = 0;
                    Ok(())
                }
            }
        };
        if let Err(e) = &result {
            emit(&*self.sink, Event::LoopDetected { target: Arc::from("run"), reason: e.to_string() });
        }
        result
    }
}
