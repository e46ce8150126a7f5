//! The breaker's pure state machine: it takes `now`, never reads a clock.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::BreakerConfig;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls fail fast until `open_for` has passed.
    Open,
    /// A bounded number of probe calls go through.
    HalfOpen,
}

impl BreakerState {
    /// The state's name (`half_open`).
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// How one call went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The target answered well.
    Success,
    /// A failure that counts against the target.
    Failure,
    /// A failure that says nothing about the target, or a call that was abandoned.
    Ignored,
}

/// Permission for one call, from [`Machine::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    probe: bool,
}

/// One state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

/// The state machine. Every method takes `now`.
///
/// Results are tagged with the generation (the number of transitions so far) in which
/// their call was admitted; a result from an earlier generation (a slow call admitted
/// while closed, ending after the breaker opened) does not move the state.
#[derive(Debug)]
pub struct Machine {
    config: BreakerConfig,
    state: BreakerState,
    generation: u64,
    origin: Instant,
    bucket_len: Duration,
    buckets: Vec<Bucket>,
    opened_at: Instant,
    probes_admitted: u32,
    probes_succeeded: u32,
}

impl Machine {
    /// A closed breaker.
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        // Clamped like the config check: a huge count would allocate before any call.
        let n = config.buckets.clamp(1, BreakerConfig::MAX_BUCKETS);
        let bucket_len = (config.window / n).max(Duration::from_millis(1));
        Self {
            buckets: vec![Bucket::default(); n as usize],
            config,
            state: BreakerState::Closed,
            generation: 0,
            origin: now,
            bucket_len,
            opened_at: now,
            probes_admitted: 0,
            probes_succeeded: 0,
        }
    }

    /// The current state, after any transition that `now` causes (open → half-open).
    pub fn state(&mut self, now: Instant) -> (BreakerState, Option<Transition>) {
        let t = self.tick(now);
        (self.state, t)
    }

    /// Calls and failures counted in the window at `now`.
    pub fn window_counts(&self, now: Instant) -> (u32, u32) {
        let current = self.bucket_index(now);
        let n = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.index + n > current && b.index <= current)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }

    fn bucket_index(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    fn tick(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Open
            && now.saturating_duration_since(self.opened_at) >= self.config.open_for
        {
            return Some(self.go(BreakerState::HalfOpen, now));
        }
        None
    }

    fn go(&mut self, to: BreakerState, now: Instant) -> Transition {
        let from = self.state;
        self.state = to;
        self.generation += 1;
        self.probes_admitted = 0;
        self.probes_succeeded = 0;
        match to {
            BreakerState::Open => self.opened_at = now,
            BreakerState::Closed => self.buckets.fill(Bucket::default()),
            BreakerState::HalfOpen => {}
        }
        Transition { from, to }
    }

    /// Asks to make a call at `now`. `Err` means the breaker is open (or half-open
    /// with all probes out): fail fast.
    pub fn acquire(&mut self, now: Instant) -> (Result<Ticket, ()>, Option<Transition>) {
        let t = self.tick(now);
        let ticket = match self.state {
            BreakerState::Closed => Ok(Ticket { generation: self.generation, probe: false }),
            BreakerState::Open => Err(()),
            BreakerState::HalfOpen => {
                if self.probes_admitted < self.config.half_open_probes.max(1) {
                    self.probes_admitted += 1;
                    Ok(Ticket { generation: self.generation, probe: true })
                } else {
                    Err(())
                }
            }
        };
        (ticket, t)
    }

    /// Records a failure found after its call's ticket was used (a stream that died
    /// after its first token counted as a success): counted in the window when
    /// closed, reopens when half-open (a probe's answer went bad), nothing when open.
    pub fn record_late_failure(&mut self, now: Instant) -> Option<Transition> {
        self.tick(now);
        match self.state {
            BreakerState::Closed => {
                let ticket = Ticket { generation: self.generation, probe: false };
                self.record(now, ticket, CallOutcome::Failure)
            }
            BreakerState::HalfOpen => Some(self.go(BreakerState::Open, now)),
            BreakerState::Open => None,
        }
    }

    /// Records how the call admitted with `ticket` went.
    pub fn record(&mut self, now: Instant, ticket: Ticket, outcome: CallOutcome) -> Option<Transition> {
        if ticket.generation != self.generation {
            return None;
        }
        match (self.state, ticket.probe) {
            (BreakerState::Closed, _) => {
                if outcome == CallOutcome::Ignored {
                    return None;
                }
                let index = self.bucket_index(now);
                let n = self.buckets.len() as u64;
                let bucket = &mut self.buckets[(index % n) as usize];
                if bucket.index != index {
                    *bucket = Bucket { index, calls: 0, failures: 0 };
                }
                bucket.calls += 1;
                if outcome == CallOutcome::Failure {
                    bucket.failures += 1;
                }
                let (calls, failures) = self.window_counts(now);
                let tripped = calls >= self.config.min_calls.max(1)
                    && f64::from(failures) >= self.config.failure_ratio * f64::from(calls);
                tripped.then(|| self.go(BreakerState::Open, now))
            }
            (BreakerState::HalfOpen, true) => match outcome {
                CallOutcome::Failure => Some(self.go(BreakerState::Open, now)),
                CallOutcome::Success => {
                    self.probes_succeeded += 1;
                    (self.probes_succeeded >= self.config.half_open_probes.max(1))
                        .then(|| self.go(BreakerState::Closed, now))
                }
                CallOutcome::Ignored => {
                    // The probe told us nothing: give its slot to another call.
                    self.probes_admitted = self.probes_admitted.saturating_sub(1);
                    None
                }
            },
            // A ticket of the current generation is a probe exactly when half-open, and
            // none is issued while open.
            (BreakerState::HalfOpen, false) | (BreakerState::Open, _) => None,
        }
    }
}
