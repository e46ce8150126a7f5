//! [`Gateway`]: the models, their policies and the accounts, and the calls through them.
//!
//! By concern: [`build`] checks the models' configuration and composes each one's
//! pipelines; [`accounts`] admits a call on the budgets (per API key, per run, the
//! caller's run scope) and its run's loop guard; [`route`] moves a failed call on to
//! the next model by class and keeps the original failure; [`attempt`] makes one
//! model's attempts, under its pipeline and correction rounds; the journal record of
//! a call is written by [`crate::journal`]. Whole calls start in [`Gateway::complete`]
//! here, streamed ones in [`crate::stream`]: both admit through [`accounts`], route
//! through [`route`] and send through [`attempt`], so they cannot drift apart.
//!
//! A call names a model. Its attempts go through that model's keel-core [`Pipeline`]
//! (attempt timeout, retries honouring `Retry-After`, the model's breaker). When the
//! model's final failure allows it, the call moves on, by class:
//!
//! - `context_overflow` → the model's `context_fallback`, else it fails cleanly;
//! - `refusal` → the model's `content_fallback`, else the provider's answer or reason
//!   is returned as it is;
//! - a class in `policy.fallback.on` → the next model of the named model's `fallbacks`;
//! - anything else is final.
//!
//! An answer that fails validation gets up to `correct` correction retries (the error
//! sent back to the model) before that. Budgets (per API key, per run) admit a call
//! from its first attempt's upper bound at the dearest price of the route, and every
//! attempt is reserved and settled on its own (see [`crate::charges`]). The answer's
//! `model` names the model that answered and its `usage` is that model's as the
//! provider sent it (the journal and `/metrics` have every attempt's charge); the
//! error of a call that failed names the original failure, never a fallback's.

mod accounts;
mod attempt;
mod build;
mod route;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use keel_core::event::EventSink;
use keel_core::{Breaker, Clock, ErrorClass, Pipeline};

pub(crate) use accounts::{Admit, RunAccount};
pub use build::GatewayBuilder;
pub(crate) use route::{AttemptError, Route, final_failure};

use crate::config::{GatewayConfig, ModelConfig};
use crate::error::GatewayError;
use crate::journal::{CallEnd, CallJournal, Prompted};
use crate::metrics::{MetricsSnapshot, ModelCounters, bump};
use crate::upstream::Endpoint;
use crate::wire::{AnswerSummary, ChatRequest, Usage};

/// Who is calling: the API key's id (set by the server's auth) and the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The API key's id, whose budget is charged.
    pub api_key: Option<String>,
    /// The run (`X-Keel-Run`), whose budget and loop guard apply.
    pub run: Option<String>,
    /// The caller checks the answer's tool calls itself (an agent run in this process:
    /// it checks them against its tools' own schemas and sends each mistake back to the
    /// model as the call's answer, journaled as a step, and has its own repeat guard
    /// and turn limit): the gateway still rejects empty, truncated and refused answers,
    /// but not tool calls, and applies no loop guard of its own.
    pub caller_checks_tools: bool,
}

/// A successful non-streamed call.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The model that answered (a Keel model name).
    pub model: Arc<str>,
    /// The answer as OpenAI's JSON, `model` naming the model that answered.
    pub body: Bytes,
    /// What Keel read from it.
    pub answer: AnswerSummary,
    /// The answering model's usage.
    pub usage: Usage,
    /// Attempts made on every model.
    pub attempts: u32,
    /// Whether a model other than the one named answered.
    pub fallback: bool,
    /// Correction retries made.
    pub corrections: u32,
    /// What the call was charged, every attempt that reached a provider included
    /// (corrections, fallbacks, answers without usage at their bound): the tokens.
    pub charged_tokens: u64,
    /// The same, in micro-dollars.
    pub charged_cost_micros: u64,
}

impl Completion {
    /// The answer as a JSON value.
    ///
    /// # Errors
    /// Never for an answer the gateway produced; a parse error otherwise.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// One model, ready to call.
pub(crate) struct Model {
    pub(crate) name: Arc<str>,
    pub(crate) config: ModelConfig,
    pub(crate) endpoint: Endpoint,
    /// Whole answers: attempts bounded by `policy.timeout`.
    pub(crate) pipeline: Pipeline,
    /// Streams until their first token: attempts bounded by `policy.ttft_timeout`.
    pub(crate) stream_pipeline: Pipeline,
    pub(crate) chain_on: Vec<ErrorClass>,
    pub(crate) counters: Arc<ModelCounters>,
    /// Learned: this model restarted its answer when given a prefill, whatever
    /// `accepts_prefill` says, so rescues on it splice instead (see `stream::seam`).
    /// Loaded from, and kept in, the process's confidence gate (whose history the
    /// journal keeps): the lesson survives a restart.
    pub(crate) prefill_ignored: std::sync::atomic::AtomicBool,
    /// The process's confidence gate, where the lesson is recorded.
    pub(crate) gate: Arc<keel_core::ConfidenceGate>,
}

/// The gate's record of a model's prefill continuations: a failure is a continuation
/// that restarted its answer. No pipeline calls a target by this name.
pub(crate) fn prefill_target(model: &str) -> Arc<str> {
    Arc::from(format!("prefill:{model}"))
}

/// The class and attempt under which [`prefill_target`]'s outcomes are kept.
pub(crate) const PREFILL_LESSON: (ErrorClass, u32) = (ErrorClass::TruncatedOutput, 2);

impl Model {
    /// Whether a rescue on this model may continue the partial answer as a prefill.
    pub(crate) fn takes_prefill(&self) -> bool {
        self.config.accepts_prefill && !self.prefill_ignored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Learns that this model restarts its answer when given a prefill: true the
    /// first time (in this process or in the gate's history it was not known yet).
    pub(crate) fn learn_prefill_ignored(&self) -> bool {
        let first = !self.prefill_ignored.swap(true, std::sync::atomic::Ordering::Relaxed);
        if first {
            let (class, attempt) = PREFILL_LESSON;
            self.gate.record(&prefill_target(&self.name), class, attempt, false);
        }
        first
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The model gateway: models, their breakers, budgets, journal and counters.
pub struct Gateway {
    pub(crate) models: BTreeMap<Arc<str>, Arc<Model>>,
    pub(crate) config: GatewayConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) sink: Arc<dyn EventSink>,
    pub(crate) journal: Option<Arc<dyn CallJournal>>,
    pub(crate) accounts: accounts::Accounts,
    /// Numbers the ids of answers the edge APIs mint (responses, messages).
    pub(crate) ids: std::sync::atomic::AtomicU64,
    /// The streams being pumped to clients, for a shutdown to wait on.
    pub(crate) streams: tokio_util::task::TaskTracker,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Whether the journal is too far behind to take another call (see
    /// [`GatewayConfig::max_journal_backlog`]).
    pub fn overloaded(&self) -> bool {
        let limit = self.config.max_journal_backlog;
        limit > 0 && self.journal.as_ref().is_some_and(|j| j.backlog() > limit)
    }

    /// The model names, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(|k| &**k)
    }

    /// The configuration of model `name`.
    pub fn model_config(&self, name: &str) -> Option<&ModelConfig> {
        self.models.get(name).map(|m| &m.config)
    }

    /// Whether model `name` is taken to continue a prefill: `accepts_prefill`, unless a
    /// rescue on it saw it restart the answer instead (then it is spliced onto).
    pub fn takes_prefill(&self, name: &str) -> Option<bool> {
        self.models.get(name).map(|m| m.takes_prefill())
    }

    /// The circuit breaker of model `name`.
    pub fn breaker(&self, name: &str) -> Option<&Arc<Breaker>> {
        self.models.get(name).and_then(|m| m.pipeline.breaker())
    }

    /// Waits (up to `grace`) for the streams being pumped to end — each ends with its
    /// client, its upstream or its stall timeout, and journals itself — so a shutdown
    /// loses no stream's record. Whether they all ended.
    pub async fn wait_for_streams(&self, grace: std::time::Duration) -> bool {
        self.streams.close();
        let ended = tokio::time::timeout(grace, self.streams.wait()).await.is_ok();
        self.streams.reopen();
        ended
    }
    /// Every model's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            models: self
                .models
                .iter()
                .map(|(name, m)| {
                    (name.to_string(), m.counters.snapshot(m.pipeline.breaker().map(|b| b.state())))
                })
                .collect(),
            budgets: self.budgets(),
        }
    }
    /// A fresh id for an answer (`resp_ID`, `msg_ID`): unique in the process, and
    /// across processes by the wall time it is drawn from.
    pub(crate) fn new_id(&self) -> String {
        use sha2::Digest;
        let n = self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = self.clock.wall().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let digest = sha2::Sha256::digest(format!("{nanos}/{n}/{}", std::process::id()));
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn created(&self) -> u64 {
        self.clock.wall().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    pub(crate) fn model(&self, name: &str) -> Result<Arc<Model>, GatewayError> {
        self.models.get(name).cloned().ok_or_else(|| {
            GatewayError::new(
                ErrorClass::NotFound,
                format!(
                    "The model `{name}` does not exist (known: {})",
                    self.models.keys().map(|k| &**k).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
    /// Calls model `req.model` (and its fallbacks) for a whole answer.
    ///
    /// # Errors
    /// [`GatewayError`] with the original failure's class: `not_found` for an unknown
    /// model, `budget_exceeded`, `loop_detected`, or the class every model failed
    /// with (`timeout`, `rate_limited`, `server_error`, `context_overflow`,
    /// `refusal`, `empty_output`, `invalid_tool_call`, ...).
    ///
    /// # Cancel safety
    /// Dropping the future abandons the call; reservations are given back.
    pub async fn complete(&self, req: &ChatRequest, ctx: &CallContext) -> Result<Completion, GatewayError> {
        let primary = self.model(&req.model)?;
        bump(&primary.counters.requests, 1);
        let charges = match self.charge(&primary, req, ctx) {
            Ok(c) => c,
            Err(e) => {
                primary.counters.request_failed(e.class);
                let end = CallEnd { failures: &e.failures, error: Some(&e), ..CallEnd::default() };
                self.journal_call(ctx, &primary, Prompted::Chat(req), end);
                return Err(e);
            }
        };
        let routed = charges.under(self.complete_routed(primary.clone(), req, &charges)).await;
        let result = routed.and_then(|(done, route)| {
            self.guard_tools(&charges, &done.answer.tool_calls).map(|()| (done, route))
        });
        let spent = charges.spent();
        match result {
            Ok((done, route)) => {
                bump(&self.models[&done.model].counters.answered, 1);
                let end = CallEnd {
                    answered_by: Some(&done.model),
                    failures: &route.failures,
                    attempts: done.attempts,
                    spent: Some(spent),
                    corrections: done.corrections,
                    ..CallEnd::default()
                };
                self.journal_call(ctx, &primary, Prompted::Chat(req), end);
                Ok(done)
            }
            Err(e) => {
                primary.counters.request_failed(e.class);
                let spent = (spent.attempts > 0).then_some(spent);
                let end = CallEnd {
                    failures: &e.failures,
                    attempts: e.attempts,
                    spent,
                    error: Some(&e),
                    ..CallEnd::default()
                };
                self.journal_call(ctx, &primary, Prompted::Chat(req), end);
                Err(e)
            }
        }
    }
}
