//! Budgets: tokens, cost and attempts, charged atomically.
//!
//! A runaway retry loop burns money. A [`Budget`] has an optional limit per kind and
//! charges with a compare-and-swap, so any number of concurrent tasks can share one
//! and it is never overspent: a charge that would go over is refused whole with
//! `budget_exceeded`. Calls whose real cost is known only afterwards (tokens of a model
//! answer) [`reserve`](Budget::reserve) their upper bound first and
//! [`settle`](Reservation::settle) with the real usage.
//!
//! **The overshoot bound.** A reservation is an upper bound only if the upstream keeps
//! to it; one that ignores `max_tokens` spends more. Such usage is counted anyway (it
//! happened), and from then on the budget admits no new reservation until every
//! reservation in flight has settled: the budget's overshoot is at most what the
//! reservations already in flight spend beyond their amounts, never what later calls
//! would. Once nothing is in flight the budget admits again, on its real balance.
//!
//! The budget's gauges: [`used`](Budget::used) (reservations included),
//! [`reserved`](Budget::reserved) (in flight), [`refusals`](Budget::refusals).

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::class::{Classified, ErrorClass};
use crate::event::{Event, EventSink, NullSink, emit};
use crate::policy::{Checks, PolicyError};

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// Model tokens, prompt and completion together.
    Tokens,
    /// Money, in micro-dollars (1 USD = 1,000,000).
    CostMicros,
    /// Attempts of calls.
    Attempts,
}

impl BudgetKind {
    const ALL: [BudgetKind; 3] = [BudgetKind::Tokens, BudgetKind::CostMicros, BudgetKind::Attempts];

    const fn index(self) -> usize {
        match self {
            BudgetKind::Tokens => 0,
            BudgetKind::CostMicros => 1,
            BudgetKind::Attempts => 2,
        }
    }

    /// The kind's name (`cost_micros`).
    pub const fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Tokens => "tokens",
            BudgetKind::CostMicros => "cost_micros",
            BudgetKind::Attempts => "attempts",
        }
    }
}

/// Limits of a budget; an absent limit is unlimited (but still counted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// The most tokens (any whole number; 0 allows none).
    pub tokens: Option<u64>,
    /// The most money, in US dollars, e.g. 2.50 (0 to 1,000,000,000,000).
    pub cost_usd: Option<f64>,
    /// The most attempts (any whole number; 0 allows none).
    pub attempts: Option<u64>,
}

impl BudgetConfig {
    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key (`cost_usd`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        if let Some(usd) = self.cost_usd {
            c.number("cost_usd", usd, 0.0..=1e12);
        }
        c.finish()
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.tokens.is_some() || self.cost_usd.is_some() || self.attempts.is_some()
    }
}

/// Converts dollars to the micro-dollars budgets count in.
pub fn usd_to_micros(usd: f64) -> u64 {
    (usd.max(0.0) * 1e6).round() as u64
}

/// A charge that was refused because it would exceed the limit (or, `held`, because
/// an earlier call spent past its reservation and calls are still in flight).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "budget `{budget}` exceeded: {requested} {kind} requested, {remaining} left of {limit}{held}",
    kind = kind.as_str(),
    held = if *held { " (held: a call spent past its reservation; new calls wait until the calls in flight settle)" } else { "" }
)]
pub struct BudgetExceeded {
    /// The budget's name.
    pub budget: Arc<str>,
    /// What was charged.
    pub kind: BudgetKind,
    /// How much was asked for.
    pub requested: u64,
    /// How much was left.
    pub remaining: u64,
    /// The limit.
    pub limit: u64,
    /// Refused while the budget is held after an overshoot.
    pub held: bool,
}

impl Classified for BudgetExceeded {
    fn class(&self) -> ErrorClass {
        ErrorClass::BudgetExceeded
    }
}

#[derive(Debug)]
struct Counter {
    limit: Option<u64>,
    used: AtomicU64,
}

/// A shared, concurrency-safe budget.
pub struct Budget {
    name: Arc<str>,
    counters: [Counter; 3],
    sink: Arc<dyn EventSink>,
    /// Amounts reserved and not yet settled, by kind.
    reserved: [AtomicU64; 3],
    /// Reservations not yet settled.
    in_flight: AtomicU64,
    /// A reservation settled past its amount while others were in flight.
    held: AtomicBool,
    refusals: AtomicU64,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Budget");
        d.field("name", &self.name);
        for kind in BudgetKind::ALL {
            d.field(kind.as_str(), &(self.used(kind), self.limit(kind)));
        }
        d.finish()
    }
}

impl Budget {
    /// A budget named `name` with `config`'s limits; events go to `sink`.
    pub fn new(name: impl Into<Arc<str>>, config: &BudgetConfig, sink: Arc<dyn EventSink>) -> Self {
        let counter = |limit| Counter { limit, used: AtomicU64::new(0) };
        Self {
            name: name.into(),
            counters: [
                counter(config.tokens),
                counter(config.cost_usd.map(usd_to_micros)),
                counter(config.attempts),
            ],
            sink,
            reserved: Default::default(),
            in_flight: AtomicU64::new(0),
            held: AtomicBool::new(false),
            refusals: AtomicU64::new(0),
        }
    }

    /// An unlimited budget that only counts, with no events.
    pub fn unlimited(name: impl Into<Arc<str>>) -> Self {
        Self::new(name, &BudgetConfig::default(), Arc::new(NullSink))
    }

    /// The budget's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// What has been charged of `kind`.
    pub fn used(&self, kind: BudgetKind) -> u64 {
        self.counters[kind.index()].used.load(Ordering::Acquire)
    }

    /// The limit of `kind`, if any.
    pub fn limit(&self, kind: BudgetKind) -> Option<u64> {
        self.counters[kind.index()].limit
    }

    /// What of `used` is reserved by calls in flight.
    pub fn reserved(&self, kind: BudgetKind) -> u64 {
        self.reserved[kind.index()].load(Ordering::Acquire)
    }

    /// Reservations in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Charges and reservations refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Whether new reservations wait for the calls in flight (see the module docs).
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire) && self.in_flight() > 0
    }

    /// What is left of `kind`'s limit, if it has one.
    pub fn remaining(&self, kind: BudgetKind) -> Option<u64> {
        self.limit(kind).map(|l| l.saturating_sub(self.used(kind)))
    }

    /// Charges `amount` of `kind`, all or nothing.
    ///
    /// # Errors
    /// [`BudgetExceeded`] when the charge would pass the limit; nothing is charged.
    pub fn charge(&self, kind: BudgetKind, amount: u64) -> Result<(), BudgetExceeded> {
        let counter = &self.counters[kind.index()];
        let result = match counter.limit {
            None => {
                // Counted, saturating (fetch_update never fails with a closure that
                // always returns Some).
                let _ = counter.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    Some(used.saturating_add(amount))
                });
                Ok(None)
            }
            Some(limit) => counter
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(amount).filter(|&next| next <= limit)
                })
                .map(|prev| Some(limit - prev - amount))
                .map_err(|used| BudgetExceeded {
                    budget: self.name.clone(),
                    kind,
                    requested: amount,
                    remaining: limit.saturating_sub(used),
                    limit,
                    held: false,
                }),
        };
        match result {
            Ok(remaining) => {
                emit(
                    &*self.sink,
                    Event::BudgetCharged { budget: self.name.clone(), kind, amount, remaining },
                );
                Ok(())
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    fn refused(&self, e: BudgetExceeded) -> BudgetExceeded {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        emit(
            &*self.sink,
            Event::BudgetExceeded {
                budget: self.name.clone(),
                kind: e.kind,
                requested: e.requested,
                remaining: e.remaining,
            },
        );
        e
    }

    /// Gives back `amount` of `kind` (a reservation larger than the real usage).
    pub(crate) fn refund(&self, kind: BudgetKind, amount: u64) {
        let counter = &self.counters[kind.index()];
        // fetch_update never fails with a closure that always returns Some.
        let _ = counter
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(amount)));
    }

    /// Charges usage that already happened beyond a reservation: it cannot be refused,
    /// so it is counted even past the limit, and reported.
    fn force(&self, kind: BudgetKind, amount: u64) -> Result<(), BudgetExceeded> {
        let counter = &self.counters[kind.index()];
        // Saturating: an upstream's usage is not to be trusted with overflow.
        let prev = counter
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_add(amount)))
            .unwrap_or_else(|prev| prev);
        let total = prev.saturating_add(amount);
        match counter.limit {
            Some(limit) if total > limit => {
                let e = BudgetExceeded {
                    budget: self.name.clone(),
                    kind,
                    requested: amount,
                    remaining: limit.saturating_sub(prev),
                    limit,
                    held: false,
                };
                emit(
                    &*self.sink,
                    Event::BudgetExceeded {
                        budget: self.name.clone(),
                        kind,
                        requested: amount,
                        remaining: e.remaining,
                    },
                );
                Err(e)
            }
            limit => {
                let remaining = limit.map(|l| l.saturating_sub(total));
                emit(
                    &*self.sink,
                    Event::BudgetCharged { budget: self.name.clone(), kind, amount, remaining },
                );
                Ok(())
            }
        }
    }

    /// Reserves `amount` of `kind` before a call whose real usage is known after it.
    ///
    /// # Errors
    /// [`BudgetExceeded`] when the reservation does not fit, or while the budget is
    /// held after an overshoot (see the module docs); nothing is reserved.
    pub fn reserve(self: &Arc<Self>, kind: BudgetKind, amount: u64) -> Result<Reservation, BudgetExceeded> {
        if self.is_held() {
            let limit = self.limit(kind).unwrap_or(u64::MAX);
            return Err(self.refused(BudgetExceeded {
                budget: self.name.clone(),
                kind,
                requested: amount,
                remaining: limit.saturating_sub(self.used(kind)),
                limit,
                held: true,
            }));
        }
        self.charge(kind, amount)?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.reserved[kind.index()].fetch_add(amount, Ordering::AcqRel);
        Ok(Reservation { budget: self.clone(), kind, amount, settled: false })
    }

    /// A reservation of `kind` ends; `over` when it settled past its amount.
    fn release(&self, kind: BudgetKind, amount: u64, over: bool) {
        let _ = self.reserved[kind.index()]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(amount)));
        let left = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)))
            .map_or(0, |prev| prev.saturating_sub(1));
        let limited = self.counters.iter().any(|c| c.limit.is_some());
        if left == 0 {
            self.held.store(false, Ordering::Release);
        } else if over && limited {
            self.held.store(true, Ordering::Release);
        }
    }
}

/// A reserved amount; settle it with the real usage. Dropped unsettled (the call was
/// abandoned before it used anything), it is given back.
#[derive(Debug)]
#[must_use = "a reservation is settled with the real usage"]
pub struct Reservation {
    budget: Arc<Budget>,
    kind: BudgetKind,
    amount: u64,
    settled: bool,
}

impl Reservation {
    /// The reserved amount.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Replaces the reservation with the real usage `actual`.
    ///
    /// # Errors
    /// [`BudgetExceeded`] when `actual` is above the reservation and the excess passes
    /// the limit. The usage is counted anyway (it happened); later charges will fail.
    pub fn settle(mut self, actual: u64) -> Result<(), BudgetExceeded> {
        self.settled = true;
        self.budget.release(self.kind, self.amount, actual > self.amount);
        if actual <= self.amount {
            self.budget.refund(self.kind, self.amount - actual);
            Ok(())
        } else {
            self.budget.force(self.kind, actual - self.amount)
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budget.release(self.kind, self.amount, false);
            self.budget.refund(self.kind, self.amount);
        }
    }
}
