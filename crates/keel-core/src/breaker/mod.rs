//! The circuit breaker: stop calling a target that is failing, and find out when it
//! has recovered.
//!
//! Retrying a target that is down multiplies its load and everyone's wait. The breaker
//! counts outcomes over a sliding time window; when the failure ratio reaches the
//! threshold with at least `min_calls` calls, it opens and calls fail fast with
//! `circuit_open` (a fallback can take over). After `open_for` it lets
//! `half_open_probes` calls through: if all succeed it closes, if one fails it opens
//! again. Every transition is an event.
//!
//! ```
//! # use keel_core::{Breaker, BreakerConfig, NullSink, TokioClock};
//! # use std::sync::Arc;
//! let breaker = Breaker::new("payments", BreakerConfig::default(), Arc::new(TokioClock::new()), Arc::new(NullSink));
//! ```

mod config;
mod state;
#[cfg(test)]
mod tests;

pub use config::BreakerConfig;
pub use state::{BreakerState, CallOutcome, Machine, Ticket, Transition};

use std::sync::{Arc, Mutex};

use crate::class::ErrorClass;
use crate::clock::Clock;
use crate::event::{Event, EventSink, emit};

/// A circuit breaker for one target, shared by every call to it.
#[derive(Debug)]
pub struct Breaker {
    target: Arc<str>,
    count: Vec<ErrorClass>,
    machine: Mutex<Machine>,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn EventSink>,
}

/// Permission for one call. Dropping it without [`Permit::record`] (the call was
/// cancelled) counts as [`CallOutcome::Ignored`], so a probe slot is never lost.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    ticket: Option<Ticket>,
    /// The call's sink, which hears of the transitions this call causes.
    sink: Option<&'a dyn EventSink>,
}

impl Breaker {
    /// A closed breaker for `target`.
    pub fn new(
        target: impl Into<Arc<str>>,
        config: BreakerConfig,
        clock: Arc<dyn Clock>,
        sink: Arc<dyn EventSink>,
    ) -> Self {
        let count = config.count.clone();
        let machine = Machine::new(config, clock.now());
        Self { target: target.into(), count, machine: Mutex::new(machine), clock, sink }
    }

    /// The target's name.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state_for(None)
    }

    /// The current state; a transition it causes (open → half-open once the open
    /// time passed) goes to `sink` when given, else to the breaker's own sink.
    pub fn state_for(&self, sink: Option<&dyn EventSink>) -> BreakerState {
        let (state, t) = self.lock().state(self.clock.now());
        self.announce(t, sink);
        state
    }

    /// Asks to make a call; `None` means fail fast with `circuit_open`.
    pub fn acquire(&self) -> Option<Permit<'_>> {
        self.acquire_for(None)
    }

    /// As [`acquire`](Self::acquire), for a call whose own sink (its run's journal,
    /// say) records the transitions it causes, instead of the breaker's sink: a
    /// breaker shared by many runs reports each transition where it happened.
    pub fn acquire_for<'a>(&'a self, sink: Option<&'a dyn EventSink>) -> Option<Permit<'a>> {
        let (ticket, t) = self.lock().acquire(self.clock.now());
        self.announce(t, sink);
        ticket.ok().map(|ticket| Permit { breaker: self, ticket: Some(ticket), sink })
    }

    /// Records a failure of `class` found after its call's permit was used (a stream
    /// cut after its first token): see [`Machine::record_late_failure`]. A
    /// transition goes to `sink` when given, else to the breaker's own.
    pub fn record_failure(&self, class: ErrorClass, sink: Option<&dyn EventSink>) {
        if !self.counts(class) {
            return;
        }
        let t = self.lock().record_late_failure(self.clock.now());
        self.announce(t, sink);
    }

    /// Whether failures of `class` count against the target.
    pub fn counts(&self, class: ErrorClass) -> bool {
        self.count.contains(&class)
    }

    fn finish(&self, ticket: Ticket, outcome: CallOutcome, sink: Option<&dyn EventSink>) {
        let t = self.lock().record(self.clock.now(), ticket, outcome);
        self.announce(t, sink);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self, transition: Option<Transition>, sink: Option<&dyn EventSink>) {
        if let Some(Transition { from, to }) = transition {
            let sink = sink.unwrap_or(&*self.sink);
            emit(sink, Event::BreakerTransition { target: self.target.clone(), from, to });
        }
    }
}

impl Permit<'_> {
    /// Records the call's result: `None` for success, or the failure's class.
    pub fn record(mut self, failure: Option<ErrorClass>) {
        let outcome = match failure {
            None => CallOutcome::Success,
            Some(class) if self.breaker.counts(class) => CallOutcome::Failure,
            Some(_) => CallOutcome::Ignored,
        };
        if let Some(ticket) = self.ticket.take() {
            self.breaker.finish(ticket, outcome, self.sink);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.finish(ticket, CallOutcome::Ignored, self.sink);
        }
    }
}
