//! Building a [`Gateway`]: every model's configuration checked (all problems at once),
//! its endpoint made, and its two pipelines (whole answers, streams until the first
//! token) composed over one breaker, the process's confidence gate and the counting
//! event sink.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_core::event::{EventSink, NullSink};
use keel_core::{
    Breaker, Clock, ConfidenceGate, ErrorClass, GateConfig, Pipeline, PolicyConfig, TimeoutConfig, TokioClock,
};

use super::{Gateway, Model, accounts::Accounts};
use crate::config::{self, ConfigError, GatewayConfig, ModelConfig};
use crate::journal::CallJournal;
use crate::metrics::{CountingSink, ModelCounters};
use crate::upstream::Endpoint;

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
                prefill_ignored: std::sync::atomic::AtomicBool::new({
                    let (class, attempt) = super::PREFILL_LESSON;
                    gate.outcomes(&super::prefill_target(&name), class, attempt).failures > 0
                }),
                gate: gate.clone(),
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
}
