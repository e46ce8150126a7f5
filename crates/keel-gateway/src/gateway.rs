//! [`Gateway`]: the models, their policies and the accounts, and the calls through them.
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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use keel_core::event::{Event, EventSink, NullSink, emit};
use keel_core::{
    Breaker, Budget, BudgetKind, CallError, CallSignature, Classified, Clock, ConfidenceGate, Disposition,
    ErrorClass, ErrorKind, Failure, GateConfig, LoopGuard, Pipeline, PolicyConfig, TimeoutConfig, TokioClock,
};
use tracing::Instrument;

use crate::charges::{AttemptCharge, Charges, Spent, request_estimate};
use crate::config::{self, ConfigError, GatewayConfig, ModelConfig};
use crate::dialect::Wire;
use crate::error::GatewayError;
use crate::journal::{CallJournal, CallRecord, ModelFailure, Prompt};
use crate::metrics::{CountingSink, MetricsSnapshot, ModelCounters, bump};
use crate::trace;
use crate::upstream::{self, Endpoint};
use crate::validate;
use crate::wire::{AnswerSummary, ChatRequest, ParsedAnswer, Usage, anthropic, parse_answer};

/// What an admission is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A model turn: bounded at the dearest model of its fallback routes, a turn of
    /// its run (the loop guard).
    Turn,
    /// A call on the named model only that is not a turn (embeddings).
    Single,
}

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
    pub(crate) prefill_ignored: std::sync::atomic::AtomicBool,
}

impl Model {
    /// Whether a rescue on this model may continue the partial answer as a prefill.
    pub(crate) fn takes_prefill(&self) -> bool {
        self.config.accepts_prefill && !self.prefill_ignored.load(std::sync::atomic::Ordering::Relaxed)
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

/// A run's budget and loop guard.
#[derive(Debug)]
pub(crate) struct RunAccount {
    pub(crate) budget: Arc<Budget>,
    pub(crate) guard: LoopGuard,
}

/// The most runs (and keys) whose accounts are kept; beyond it the least recently
/// created half is dropped, so a long-lived gateway's memory stays bounded.
const MAX_ACCOUNTS: usize = 50_000;

#[derive(Debug, Default)]
struct Accounts {
    keys: Mutex<HashMap<String, Arc<Budget>>>,
    runs: Mutex<HashMap<String, (u64, Arc<RunAccount>)>>,
    created: std::sync::atomic::AtomicU64,
}

/// The model gateway: models, their breakers, budgets, journal and counters.
pub struct Gateway {
    pub(crate) models: BTreeMap<Arc<str>, Arc<Model>>,
    pub(crate) config: GatewayConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) sink: Arc<dyn EventSink>,
    pub(crate) journal: Option<Arc<dyn CallJournal>>,
    accounts: Accounts,
    /// Numbers the ids of answers the edge APIs mint (responses, messages).
    ids: std::sync::atomic::AtomicU64,
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

/// Looks up an environment variable.
type EnvLookup = Box<dyn Fn(&str) -> Option<String>>;

/// Builds a [`Gateway`].
pub struct GatewayBuilder {
    models: BTreeMap<String, ModelConfig>,
    env: EnvLookup,
    config: GatewayConfig,
    clock: Option<Arc<dyn Clock>>,
    sink: Arc<dyn EventSink>,
    journal: Option<Arc<dyn CallJournal>>,
    gate: Option<Arc<ConfidenceGate>>,
    proxies: Option<keel_http::Proxies>,
}

impl fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// Where API keys are looked up (default: the process environment).
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + 'static) -> Self {
        self.env = Box::new(env);
        self
    }

    /// Budgets per key and run, and the loop guard.
    pub fn config(mut self, config: GatewayConfig) -> Self {
        self.config = config;
        self
    }

    /// The clock policies read (default: [`TokioClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Where policy events go (retries, breaker transitions, fallbacks, budgets).
    pub fn sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// Where call records go.
    pub fn journal(mut self, journal: Arc<dyn CallJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The confidence gate retries are judged by: the process's one gate (the
    /// runner's, whose history the journal keeps), so what the gateway learns about
    /// its models survives a restart. Default: a gate of its own, in memory.
    pub fn gate(mut self, gate: Arc<ConfidenceGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The proxies upstreams are reached through (default: the process's
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, read once).
    pub fn proxies(mut self, proxies: keel_http::Proxies) -> Self {
        self.proxies = Some(proxies);
        self
    }

    /// The gateway, once every model checks out.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem: unknown fallback names, bad URLs, keys
    /// missing from the environment.
    pub fn build(self) -> Result<Gateway, ConfigError> {
        let mut problems = config::check(&self.models);
        for e in self.config.validate().err().unwrap_or_default() {
            problems.push(format!("gateway.{}: {}", e.key, e.message));
        }
        let clock = self.clock.unwrap_or_else(|| Arc::new(TokioClock::new()));
        let counters: BTreeMap<Arc<str>, Arc<ModelCounters>> =
            self.models.keys().map(|name| (Arc::from(name.as_str()), Arc::default())).collect();
        let sink: Arc<dyn EventSink> =
            Arc::new(CountingSink { inner: self.sink, counters: counters.clone() });
        let gate = self.gate.unwrap_or_else(|| Arc::new(ConfidenceGate::new(GateConfig::default())));
        let mut models = BTreeMap::new();
        let proxies = self.proxies.unwrap_or_else(keel_http::Proxies::from_env);
        for (name, config) in self.models {
            let key = match &config.api_key_env {
                None => None,
                Some(var) => match (self.env)(var) {
                    Some(key) if !key.is_empty() => Some(key),
                    _ => {
                        problems.push(format!(
                            "models.{name}.api_key_env: the environment variable `{var}` is not set"
                        ));
                        None
                    }
                },
            };
            let endpoint = match Endpoint::new(&name, &config, key, &proxies) {
                Ok(e) => e,
                Err(found) => {
                    problems.extend(found);
                    continue;
                }
            };
            let name: Arc<str> = Arc::from(name.as_str());
            let mut retry = config.policy.retry.clone();
            // The model's floor, unless its retry table set one.
            if retry.rate_limit_floor.is_zero() {
                retry.rate_limit_floor = config.policy.rate_limit_floor;
            }
            if !config.fallbacks.is_empty() {
                // A silent route is not retried when another model can answer now.
                retry.retry_on.retain(|c| *c != ErrorClass::Timeout);
            }
            let policy = |attempt: Duration| PolicyConfig {
                timeout: TimeoutConfig { attempt: Some(attempt), step: None },
                retry: retry.clone(),
                breaker: config.policy.breaker.clone(),
                fallback: config.policy.fallback.clone(),
                ..PolicyConfig::default()
            };
            let breaker = config.policy.breaker.enabled.then(|| {
                Arc::new(Breaker::new(
                    name.clone(),
                    config.policy.breaker.clone(),
                    clock.clone(),
                    sink.clone(),
                ))
            });
            let build = |attempt: Duration| {
                let mut b = Pipeline::builder(name.clone(), policy(attempt))
                    .clock(clock.clone())
                    .sink(sink.clone())
                    .gate(gate.clone());
                if let Some(breaker) = &breaker {
                    b = b.breaker(breaker.clone());
                }
                b.build()
            };
            let model = Model {
                pipeline: build(config.policy.timeout),
                stream_pipeline: build(if config.buffer {
                    config.policy.timeout
                } else {
                    config.policy.ttft_timeout
                }),
                chain_on: config::chain_classes(&config.policy),
                counters: counters.get(&name).cloned().unwrap_or_default(),
                prefill_ignored: std::sync::atomic::AtomicBool::new(false),
                endpoint,
                name: name.clone(),
                config,
            };
            models.insert(name, Arc::new(model));
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Gateway {
            models,
            config: self.config,
            clock,
            sink,
            journal: self.journal,
            accounts: Accounts::default(),
            ids: std::sync::atomic::AtomicU64::new(0),
            streams: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// Why one model could not answer: the failure and, for an invalid answer, the answer.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub(crate) failure: Failure,
    pub(crate) answer: Option<ParsedAnswer>,
}

impl From<Failure> for AttemptError {
    fn from(failure: Failure) -> Self {
        Self { failure, answer: None }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.failure.message)
    }
}

impl Classified for AttemptError {
    fn class(&self) -> ErrorClass {
        self.failure.class
    }

    fn retry_after(&self) -> Option<Duration> {
        self.failure.retry_after
    }
}

/// A model's final failure after its pipeline: the failure, the attempts it took and
/// the rejected answer, if it was one.
pub(crate) fn final_failure(e: CallError<AttemptError>) -> (Failure, u32, Option<ParsedAnswer>) {
    let attempts = e.attempts;
    let mut message = match &e.kind {
        ErrorKind::Target(a) => a.failure.message.clone(),
        other => other.to_string(),
    };
    if let Some(reason) = &e.refusal {
        message.push_str(&format!(" (not retried: {reason})"));
    }
    match e.kind {
        ErrorKind::Target(a) => {
            (Failure { class: e.class, message, retry_after: a.failure.retry_after }, attempts, a.answer)
        }
        _ => (Failure::new(e.class, message), attempts, None),
    }
}

/// Where a call goes next after a model's final failure.
pub(crate) struct Route {
    pub(crate) primary: Arc<Model>,
    visited: Vec<Arc<str>>,
    pub(crate) failures: Vec<ModelFailure>,
    pub(crate) first: Option<Failure>,
    pub(crate) attempts: u32,
}

impl Route {
    pub(crate) fn new(primary: Arc<Model>) -> Self {
        let visited = vec![primary.name.clone()];
        Self { primary, visited, failures: Vec::new(), first: None, attempts: 0 }
    }

    pub(crate) fn failed(&mut self, model: &Model, failure: &Failure, attempts: u32) {
        self.attempts += attempts;
        self.failures.push(ModelFailure {
            model: model.name.to_string(),
            class: failure.class,
            message: failure.message.clone(),
            attempts,
        });
        if self.first.is_none() {
            self.first = Some(failure.clone());
        }
    }

    /// The next model after `model` failed with `class`, if the class allows one.
    pub(crate) fn next(&mut self, gateway: &Gateway, model: &Model, class: ErrorClass) -> Option<Arc<Model>> {
        // Two classes have routes of their own; the rest take the chain if it lists them.
        let candidate = if class == ErrorClass::ContextOverflow {
            model.config.context_fallback.iter().find(|n| self.unvisited(n)).cloned()
        } else if class == ErrorClass::Refusal {
            model.config.content_fallback.iter().find(|n| self.unvisited(n)).cloned()
        } else if model.chain_on.contains(&class) {
            self.next_in_chain()
        } else {
            None
        }?;
        let next = gateway.models.get(candidate.as_str())?.clone();
        self.visited.push(next.name.clone());
        bump(&model.counters.fallbacks_from, 1);
        emit(&*gateway.sink, Event::FallbackTaken { from: model.name.clone(), to: next.name.clone(), class });
        Some(next)
    }

    /// The next unvisited model of the primary's chain (stream rescues use only this).
    pub(crate) fn next_in_chain(&self) -> Option<String> {
        self.primary.config.fallbacks.iter().find(|n| self.unvisited(n)).cloned()
    }

    pub(crate) fn take_chain(
        &mut self,
        gateway: &Gateway,
        from: &Model,
        class: ErrorClass,
    ) -> Option<Arc<Model>> {
        let name = self.next_in_chain()?;
        let next = gateway.models.get(name.as_str())?.clone();
        self.visited.push(next.name.clone());
        bump(&from.counters.fallbacks_from, 1);
        emit(&*gateway.sink, Event::FallbackTaken { from: from.name.clone(), to: next.name.clone(), class });
        Some(next)
    }

    fn unvisited(&self, name: &str) -> bool {
        !self.visited.iter().any(|v| &**v == name)
    }

    /// The error the agent sees: the original failure's class, every failure told.
    pub(crate) fn error(&self) -> GatewayError {
        let first =
            self.first.clone().unwrap_or_else(|| Failure::new(ErrorClass::CircuitOpen, "no model answered"));
        let message = if self.failures.len() <= 1 {
            first.message.clone()
        } else {
            self.failures
                .iter()
                .map(|f| format!("{}: {}", f.model, f.message))
                .collect::<Vec<_>>()
                .join("; then ")
        };
        GatewayError {
            class: first.class,
            message,
            attempts: self.attempts,
            failures: self.failures.clone(),
            retry_after: first.retry_after,
        }
    }
}

impl Gateway {
    /// Starts building a gateway of `models` (the `[models.*]` tables of `keel.toml`).
    pub fn builder(models: BTreeMap<String, ModelConfig>) -> GatewayBuilder {
        GatewayBuilder {
            models,
            env: Box::new(|k| std::env::var(k).ok()),
            config: GatewayConfig::default(),
            clock: None,
            sink: Arc::new(NullSink),
            journal: None,
            gate: None,
            proxies: None,
        }
    }

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

    /// The budget of API key `key`, if it has been charged.
    pub fn key_budget(&self, key: &str) -> Option<Arc<Budget>> {
        self.accounts.keys.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// The scope of run `run` (its account, made if new): calls made in it — a tool
    /// invoked on the run's behalf — draw on the same budget as its model calls.
    pub fn run_scope(&self, run: &str) -> keel_core::RunScope {
        keel_core::RunScope::new().with_budget(self.run_account(run).budget.clone())
    }

    /// The budget of run `run`, if it has been charged.
    pub fn run_budget(&self, run: &str) -> Option<Arc<Budget>> {
        self.accounts.runs.lock().unwrap_or_else(|e| e.into_inner()).get(run).map(|(_, a)| a.budget.clone())
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

    /// Every API key's budget (`key:NAME`), and every run's summed as `runs`: what is
    /// used, reserved in flight, refused, and whether a budget is held.
    pub fn budgets(&self) -> BTreeMap<String, crate::metrics::BudgetMetrics> {
        let mut out = BTreeMap::new();
        for budget in self.accounts.keys.lock().unwrap_or_else(|e| e.into_inner()).values() {
            out.entry(budget.name().to_string())
                .or_insert_with(crate::metrics::BudgetMetrics::default)
                .add(budget);
        }
        let runs = self.accounts.runs.lock().unwrap_or_else(|e| e.into_inner());
        if !runs.is_empty() {
            let sum = out.entry("runs".to_owned()).or_default();
            for (_, account) in runs.values() {
                sum.add(&account.budget);
            }
        }
        out
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

    fn run_account(&self, run: &str) -> Arc<RunAccount> {
        let mut runs = self.accounts.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, a)) = runs.get(run) {
            return a.clone();
        }
        if runs.len() >= MAX_ACCOUNTS {
            let mut ages: Vec<u64> = runs.values().map(|(n, _)| *n).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            runs.retain(|_, (n, _)| *n > cut);
        }
        let n = self.accounts.created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let account = Arc::new(RunAccount {
            budget: Arc::new(Budget::new(format!("run:{run}"), &self.config.run_budget, self.sink.clone())),
            guard: LoopGuard::new(self.config.loop_guard.clone(), self.sink.clone()),
        });
        runs.insert(run.to_owned(), (n, account.clone()));
        account
    }

    fn key_account(&self, key: &str) -> Arc<Budget> {
        let mut keys = self.accounts.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = keys.get(key) {
            return b.clone();
        }
        if keys.len() >= MAX_ACCOUNTS {
            keys.clear();
        }
        let budget = Arc::new(Budget::new(format!("key:{key}"), &self.config.key_budget, self.sink.clone()));
        keys.insert(key.to_owned(), budget.clone());
        budget
    }

    /// Admits a call (see [`crate::charges`]): its first attempt's upper bound is
    /// reserved on the key's and the run's budgets, at the dearest price of every
    /// model the call may reach; only then is it a turn of its run.
    pub(crate) fn charge(
        &self,
        primary: &Model,
        req: &ChatRequest,
        ctx: &CallContext,
    ) -> Result<Charges, GatewayError> {
        self.admit(primary, request_estimate(req, &primary.config.model), req.max_tokens, Admit::Turn, ctx)
    }

    /// Admits a call whose first attempt is bounded by `prompt_estimate` and
    /// `max_tokens` (`charge` for chat; embeddings with no completion, no fallback
    /// route and no turn of the run).
    pub(crate) fn admit(
        &self,
        primary: &Model,
        prompt_estimate: u64,
        max_tokens: Option<u64>,
        kind: Admit,
        ctx: &CallContext,
    ) -> Result<Charges, GatewayError> {
        let mut charges = Charges {
            prompt_estimate,
            max_tokens,
            caller_checks_tools: ctx.caller_checks_tools,
            ..Charges::default()
        };
        let account = ctx.run.as_ref().map(|run| self.run_account(run));
        if let Some(account) = &account {
            charges.budgets.push(account.budget.clone());
        }
        if let Some(key) = &ctx.api_key {
            charges.budgets.push(self.key_account(key));
        }
        // The caller's run scope (an agent run driven in this process, a tool invoked
        // under `X-Keel-Run`): its budgets are the run's one budget, charged like ours.
        if let Some(scope) = keel_core::RunScope::current() {
            for b in &scope.budgets {
                if !charges.budgets.iter().any(|o| Arc::ptr_eq(o, b)) {
                    charges.budgets.push(b.clone());
                }
            }
        }
        let refused =
            |e: keel_core::BudgetExceeded| GatewayError::new(ErrorClass::BudgetExceeded, e.to_string());
        // No attempt left: refused now, not after a turn was counted.
        for budget in &charges.budgets {
            if budget.remaining(BudgetKind::Attempts) == Some(0) {
                return Err(refused(keel_core::BudgetExceeded {
                    budget: budget.name().clone(),
                    kind: BudgetKind::Attempts,
                    requested: 1,
                    remaining: 0,
                    limit: budget.limit(BudgetKind::Attempts).unwrap_or(0),
                    held: false,
                }));
            }
        }
        if !charges.budgets.is_empty() {
            let primary_name = primary.name.to_string();
            let fallbacks: &[String] = if kind == Admit::Turn { &primary.config.fallbacks } else { &[] };
            let (context, content) = if kind == Admit::Turn {
                (&primary.config.context_fallback, &primary.config.content_fallback)
            } else {
                (&None, &None)
            };
            let route = std::iter::once(&primary_name)
                .chain(fallbacks)
                .chain(context)
                .chain(content)
                .filter_map(|n| self.models.get(n.as_str()))
                .collect::<Vec<_>>();
            let completion = route.iter().map(|m| charges.completion_bound(m)).max().unwrap_or(0);
            let tokens = charges.prompt_estimate + completion;
            let cost = route
                .iter()
                .map(|m| m.config.prices.cost_micros(charges.prompt_estimate, completion))
                .max()
                .unwrap_or(0);
            let mut prepaid = Vec::new();
            for budget in &charges.budgets {
                for (kind, amount) in [(BudgetKind::Tokens, tokens), (BudgetKind::CostMicros, cost)] {
                    if amount == 0 && budget.limit(kind).is_none() {
                        continue;
                    }
                    prepaid.push((kind, budget.reserve(kind, amount).map_err(refused)?));
                }
            }
            charges.prepaid = std::sync::Mutex::new(Some(prepaid));
        }
        if let Some(account) = account.filter(|_| kind == Admit::Turn) {
            // A caller that checks its tool calls itself (an agent run here) has its own
            // turn limit and repeat guard; the run's account still charges its budget.
            if !ctx.caller_checks_tools {
                account
                    .guard
                    .begin_turn()
                    .map_err(|e| GatewayError::new(ErrorClass::LoopDetected, e.to_string()))?;
            }
            charges.run = Some(account);
        }
        Ok(charges)
    }

    /// Checks the answer's tool calls against the run's loop guard.
    pub(crate) fn guard_tools(
        &self,
        charges: &Charges,
        calls: &[crate::wire::ToolCall],
    ) -> Result<(), GatewayError> {
        let Some(run) = &charges.run else { return Ok(()) };
        if charges.caller_checks_tools {
            return Ok(());
        }
        for call in calls {
            let args: serde_json::Value =
                serde_json::from_str(&call.function.arguments).unwrap_or(serde_json::Value::Null);
            let tool: Arc<str> = Arc::from(call.function.name.as_str());
            run.guard.check_call(&tool, CallSignature::new(&call.function.name, &args)).map_err(|e| {
                GatewayError::new(ErrorClass::LoopDetected, format!("the run was stopped: {e}"))
            })?;
        }
        Ok(())
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
                self.journal_call(ctx, &primary, req, None, &e.failures, 0, None, 0, None, Some(&e));
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
                self.journal_call(
                    ctx,
                    &primary,
                    req,
                    Some(&done.model),
                    &route.failures,
                    done.attempts,
                    Some(spent),
                    done.corrections,
                    None,
                    None,
                );
                Ok(done)
            }
            Err(e) => {
                primary.counters.request_failed(e.class);
                let spent = (spent.attempts > 0).then_some(spent);
                self.journal_call(
                    ctx,
                    &primary,
                    req,
                    None,
                    &e.failures,
                    e.attempts,
                    spent,
                    0,
                    None,
                    Some(&e),
                );
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn journal_call(
        &self,
        ctx: &CallContext,
        primary: &Model,
        req: &ChatRequest,
        answered_by: Option<&str>,
        failures: &[ModelFailure],
        attempts: u32,
        spent: Option<Spent>,
        corrections: u32,
        rescue: Option<&str>,
        error: Option<&GatewayError>,
    ) {
        let call = (Some(req), req.messages_raw());
        self.journal_prompt(
            ctx,
            primary,
            call,
            answered_by,
            failures,
            attempts,
            spent,
            corrections,
            rescue,
            error,
        );
    }

    /// As [`journal_call`](Self::journal_call) for any prompt: a chat request's
    /// messages, or an embeddings request's `input` (with no request).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn journal_prompt(
        &self,
        ctx: &CallContext,
        primary: &Model,
        (req, prompt): (Option<&ChatRequest>, &str),
        answered_by: Option<&str>,
        failures: &[ModelFailure],
        attempts: u32,
        spent: Option<Spent>,
        corrections: u32,
        rescue: Option<&str>,
        error: Option<&GatewayError>,
    ) {
        let Some(journal) = &self.journal else { return };
        let usage = spent.map(|s| s.usage);
        let cost = spent.map_or(0, |s| s.cost_micros);
        journal.record(CallRecord {
            run: ctx.run.clone(),
            api_key: ctx.api_key.clone(),
            model: primary.name.to_string(),
            answered_by: answered_by.map(str::to_owned),
            stream: req.is_some_and(|r| r.stream),
            prompt: Prompt::new(prompt, primary.config.hash_prompts),
            attempts,
            corrections,
            failures: failures.to_vec(),
            usage,
            cost_micros: cost,
            rescue: rescue.map(str::to_owned),
            error: error.map(|e| (e.class, e.message.clone())),
        });
    }

    async fn complete_routed(
        &self,
        primary: Arc<Model>,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(Completion, Route), GatewayError> {
        let mut route = Route::new(primary.clone());
        let mut model = primary;
        let mut from: Option<Arc<str>> = None;
        loop {
            let span = trace::chat_span(&model, from.as_deref());
            match self.answer_on(&model, req, charges).instrument(span.clone()).await {
                Ok((answer, attempts, corrections)) => {
                    trace::answered(&span, attempts);
                    route.attempts += attempts;
                    let usage = answer.summary.usage.unwrap_or_default();
                    let fallback = route.primary.name != model.name;
                    return Ok((
                        Completion {
                            model: model.name.clone(),
                            body: Bytes::from(answer.body),
                            answer: answer.summary,
                            usage,
                            attempts: route.attempts,
                            fallback,
                            corrections,
                        },
                        route,
                    ));
                }
                Err((failure, attempts, rejected)) => {
                    route.failed(&model, &failure, attempts);
                    let next = route.next(self, &model, failure.class);
                    let disposition =
                        if next.is_some() { Disposition::Fallback } else { Disposition::Terminal };
                    let breaker = model.pipeline.breaker().map(|b| b.state());
                    trace::failed(&span, &failure, attempts, breaker, disposition);
                    match next {
                        Some(next) => {
                            from = Some(model.name.clone());
                            model = next;
                        }
                        None => {
                            // A refusal with no content fallback: the provider's own
                            // answer (with its reason) goes to the agent unchanged.
                            if let (ErrorClass::Refusal, Some(answer)) = (failure.class, rejected) {
                                let usage = answer.summary.usage.unwrap_or_default();
                                return Ok((
                                    Completion {
                                        fallback: route.primary.name != model.name,
                                        model: model.name.clone(),
                                        body: Bytes::from(answer.body),
                                        answer: answer.summary,
                                        usage,
                                        attempts: route.attempts,
                                        corrections: 0,
                                    },
                                    route,
                                ));
                            }
                            return Err(route.error());
                        }
                    }
                }
            }
        }
    }

    /// One model's answer, with correction retries.
    async fn answer_on(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(ParsedAnswer, u32, u32), (Failure, u32, Option<ParsedAnswer>)> {
        let mut req = Cow::Borrowed(req);
        let mut attempts = 0;
        let mut round = 0;
        loop {
            let mut made = 0;
            let result = model
                .pipeline
                .call(|a| {
                    made = a.number;
                    self.attempt(model, &req, charges)
                })
                .await;
            match result {
                Ok(answer) => return Ok((answer, attempts + made, round)),
                Err(e) => {
                    let (failure, n, rejected) = final_failure(e);
                    attempts += n;
                    match rejected {
                        Some(answer)
                            if round < model.config.correct && validate::correctable(failure.class) =>
                        {
                            round += 1;
                            bump(&model.counters.corrections, 1);
                            let extra = validate::correction(&answer.summary, &failure);
                            req = Cow::Owned(req.with_appended(&extra).map_err(|f| (f, attempts, None))?);
                        }
                        rejected => return Err((failure, attempts, rejected)),
                    }
                }
            }
        }
    }

    /// The upstream body for `req` on `model`.
    pub(crate) fn body_for(&self, model: &Model, req: &ChatRequest) -> Result<Vec<u8>, Failure> {
        match model.endpoint.provider.wire() {
            Wire::OpenAi => Ok(req.openai_body(&model.config.model)),
            Wire::Anthropic => {
                anthropic::request_body(req, &model.config.model, model.config.default_max_tokens)
            }
        }
    }

    /// Sends `req` to `model`'s upstream: the start of every attempt, whole or streamed.
    /// The attempt's upper bound is reserved first; it is armed (charged whatever
    /// happens next) once the upstream answered with a success.
    pub(crate) async fn send_to(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, AttemptCharge), AttemptError> {
        let body = self.body_for(model, req)?;
        let mut charge = charges.attempt(model, &body)?;
        let resp = model.endpoint.send(body, &*self.clock).await?;
        charge.arm();
        Ok((resp, charge))
    }

    /// One attempt at a whole answer, charged from its usage (an answer rejected by
    /// validation included).
    async fn attempt(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<ParsedAnswer, AttemptError> {
        let (resp, charge) = self.send_to(model, req, charges).await?;
        let bytes = upstream::read_body(resp.into_body(), &model.endpoint.uri).await?;
        let answer = match model.endpoint.provider.wire() {
            Wire::OpenAi => parse_answer(&bytes, &model.name)?,
            Wire::Anthropic => {
                parse_answer(&anthropic::answer_to_openai(&bytes, &model.name, self.created())?, &model.name)?
            }
        };
        charge.settle(answer.summary.usage);
        trace::answer_read(&answer.summary, &bytes);
        if model.config.validate {
            if let Err(failure) = validate::check(&answer.summary, req, !charges.caller_checks_tools) {
                return Err(AttemptError { failure, answer: Some(answer) });
            }
        }
        Ok(answer)
    }
}
