//! What a call costs: one reservation per attempt, settled from that attempt's usage.
//!
//! The one home of the gateway's accounting, for whole and streamed calls alike:
//!
//! - **Admission** ([`Gateway::charge`](crate::Gateway)): a call is admitted only if
//!   its first attempt's upper bound fits every budget it charges (the API key's, the
//!   run's), at the dearest price of the models it may reach, and if those budgets
//!   have an attempt left. A refused call is not a turn of its run.
//! - **Every attempt** that is sent upstream reserves its own upper bound first
//!   ([`Charges::attempt`]): the prompt estimate plus the completion limit
//!   (`max_tokens`, else the model's `default_max_tokens`). The first attempt uses the
//!   admission's reservation; retries, correction rounds, fallbacks and stream
//!   rescues reserve anew, and a reservation that does not fit ends the call with
//!   `budget_exceeded`.
//! - **Settling** ([`AttemptCharge::settle`]): an attempt the provider answered
//!   (a 2xx) is billed by the provider, so it is charged: its reported usage, or,
//!   when the answer has no `usage` (or the stream was cut, stalled or abandoned),
//!   the reservation's upper bound — an estimate that can only over-count. An attempt
//!   that got an error status, or none, is given back.
//! - **The prompt estimate** is a conservative bound over everything sent: one token
//!   per 3 bytes of the serialized upstream request (messages, system, tools, every
//!   field). Tokenizers average about 4 bytes a token on English and JSON, so it
//!   over-counts; inline images (base64) are counted by their bytes, which exceeds
//!   their token cost; an image given by URL is counted as
//!   [`IMAGE_URL_TOKENS`], the most a high-detail image costs on OpenAI's models.
//!
//! Every settlement is counted at once in the budgets, the model's `/metrics`
//! counters, and the call's total, which the journal records and a stream's final
//! `usage` reports: the four always agree.
//!
//! The bound: a budget is exceeded only by usage beyond a reservation (an upstream
//! that ignores `max_tokens`); after that the budget admits nothing until the
//! reservations in flight settle (see `keel_core::budget`), so the overshoot is at
//! most what the attempts already in flight spend past their reservations.

use std::sync::{Arc, Mutex};

use keel_core::{Budget, BudgetKind, ErrorClass, Failure, Reservation, RunScope};

use crate::config::Prices;
use crate::gateway::{Model, RunAccount};
use crate::metrics::{ModelCounters, bump};
use crate::wire::Usage;

/// The tokens an image given by URL is counted as in the prompt estimate.
pub const IMAGE_URL_TOKENS: u64 = 1_700;

/// The prompt tokens a serialized request of `body` is counted as.
pub(crate) fn prompt_estimate(body: &[u8]) -> u64 {
    estimate(body.len(), images(body))
}

/// The prompt estimate of `req` as sent to `upstream_model`, without serializing it.
pub(crate) fn request_estimate(req: &crate::wire::ChatRequest, upstream_model: &str) -> u64 {
    estimate(req.openai_len(upstream_model), images(req.messages_raw().as_bytes()))
}

fn estimate(bytes: usize, images: u64) -> u64 {
    (bytes as u64).div_ceil(3).saturating_add(images.saturating_mul(IMAGE_URL_TOKENS))
}

/// Images given by URL (`"image_url"` keys; an inline one is counted by its bytes too).
fn images(body: &[u8]) -> u64 {
    const NEEDLE: &[u8] = b"\"image_url\"";
    body.windows(NEEDLE.len()).filter(|w| *w == NEEDLE).count() as u64
}

/// What a call's settled attempts charged, together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spent {
    pub(crate) usage: Usage,
    pub(crate) cost_micros: u64,
    /// Attempts charged (answered by a provider).
    pub(crate) attempts: u32,
}

/// The budgets a call charges, and what its attempts have charged.
#[derive(Debug, Default)]
pub(crate) struct Charges {
    pub(crate) budgets: Vec<Arc<Budget>>,
    /// The first attempt's reservation, made at admission.
    pub(crate) prepaid: Mutex<Option<Vec<(BudgetKind, Reservation)>>>,
    pub(crate) run: Option<Arc<RunAccount>>,
    /// The prompt estimate of the request as the agent sent it.
    pub(crate) prompt_estimate: u64,
    /// The request's completion limit, if it set one.
    pub(crate) max_tokens: Option<u64>,
    pub(crate) spent: Arc<Mutex<Spent>>,
    /// The caller checks tool calls itself (see `CallContext::caller_checks_tools`).
    pub(crate) caller_checks_tools: bool,
}

impl Charges {
    /// What the call's settled attempts charged so far.
    pub(crate) fn spent(&self) -> Spent {
        *self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The completion bound of an attempt on `model`.
    pub(crate) fn completion_bound(&self, model: &Model) -> u64 {
        self.max_tokens.unwrap_or(model.config.default_max_tokens)
    }

    /// Reserves the upper bound of one attempt on `model` whose upstream request is
    /// `body`.
    ///
    /// # Errors
    /// `budget_exceeded` when a budget cannot take it; nothing is reserved.
    pub(crate) fn attempt(&self, model: &Model, body: &[u8]) -> Result<AttemptCharge, Failure> {
        let prices = model.config.prices.clone();
        let prepaid = self.prepaid.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The first attempt's bound is the admission's, which its reservation holds
        // by construction; a later attempt's is its own request's.
        let prompt = if prepaid.is_some() { self.prompt_estimate } else { prompt_estimate(body) };
        let bound = Usage::new(prompt, self.completion_bound(model));
        let cost = prices.cost_micros(bound.prompt_tokens, bound.completion_tokens);
        let reservations = match prepaid {
            Some(r) => r,
            None => {
                let mut r = Vec::new();
                for budget in &self.budgets {
                    for (kind, amount) in
                        [(BudgetKind::Tokens, bound.total_tokens), (BudgetKind::CostMicros, cost)]
                    {
                        if amount == 0 && budget.limit(kind).is_none() {
                            continue;
                        }
                        let reserved = budget.reserve(kind, amount).map_err(|e| {
                            Failure::new(
                                ErrorClass::BudgetExceeded,
                                format!("{e} (before attempt on `{}`)", model.name),
                            )
                        })?;
                        r.push((kind, reserved));
                    }
                }
                r
            }
        };
        Ok(AttemptCharge {
            reservations,
            prices,
            bound,
            counters: model.counters.clone(),
            spent: self.spent.clone(),
            armed: false,
            settled: false,
        })
    }

    /// Runs `fut` with the call's budgets current, so the pipeline charges each
    /// attempt to them (the per-key and per-run attempt budgets).
    pub(crate) async fn under<F: std::future::Future>(&self, fut: F) -> F::Output {
        if self.budgets.is_empty() {
            return fut.await;
        }
        let scope = self.budgets.iter().fold(RunScope::new(), |s, b| s.with_budget(b.clone()));
        scope.run(fut).await
    }
}

/// One attempt's reservation, until it is settled.
#[derive(Debug)]
pub(crate) struct AttemptCharge {
    reservations: Vec<(BudgetKind, Reservation)>,
    prices: Prices,
    bound: Usage,
    counters: Arc<ModelCounters>,
    spent: Arc<Mutex<Spent>>,
    /// The provider answered with a success: it bills this attempt.
    armed: bool,
    settled: bool,
}

impl AttemptCharge {
    /// The provider answered with a success: from now on the attempt is charged,
    /// even if it is dropped before its usage is known.
    pub(crate) fn arm(&mut self) {
        self.armed = true;
    }

    /// Settles the attempt with `usage`, or its upper bound when the usage is unknown;
    /// returns what was charged.
    pub(crate) fn settle(mut self, usage: Option<Usage>) -> Usage {
        self.finish(usage)
    }

    fn finish(&mut self, usage: Option<Usage>) -> Usage {
        self.settled = true;
        let charged = match usage {
            // A total above its parts counts as prompt, so every count agrees.
            Some(u) => Usage::new(
                u.prompt_tokens.max(u.total_tokens.saturating_sub(u.completion_tokens)),
                u.completion_tokens,
            ),
            None => self.bound,
        };
        let cost = self.prices.cost_micros(charged.prompt_tokens, charged.completion_tokens);
        for (kind, r) in self.reservations.drain(..) {
            let actual = match kind {
                BudgetKind::Tokens => charged.total_tokens,
                BudgetKind::CostMicros => cost,
                BudgetKind::Attempts => continue,
            };
            // Usage beyond the reservation is counted anyway; the budget then holds.
            let _ = r.settle(actual);
        }
        bump(&self.counters.prompt_tokens, charged.prompt_tokens);
        bump(&self.counters.completion_tokens, charged.completion_tokens);
        bump(&self.counters.cost_micros, cost);
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        spent.usage = Usage::new(
            spent.usage.prompt_tokens.saturating_add(charged.prompt_tokens),
            spent.usage.completion_tokens.saturating_add(charged.completion_tokens),
        );
        spent.cost_micros = spent.cost_micros.saturating_add(cost);
        spent.attempts += 1;
        charged
    }
}

impl Drop for AttemptCharge {
    fn drop(&mut self) {
        // Abandoned after the provider answered (a timeout, a cut, a client gone):
        // billed, so charged at the bound. Before that, the reservations go back.
        if !self.settled && self.armed {
            self.finish(None);
        }
    }
}
