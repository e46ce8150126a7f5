//! Model and gateway configuration: the `[models.NAME]` tables of `keel.toml`, as plain
//! serde values.
//!
//! A model is a name agents use, a provider, an upstream and the policy it is called
//! under. Secrets never appear here: `api_key_env` names the environment variable
//! that holds the key, read once when the [`Gateway`](crate::Gateway) is built.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keel_core::policy::{Checks, PolicyError};
use keel_core::{BreakerConfig, BudgetConfig, ErrorClass, FallbackConfig, LoopGuardConfig, RetryConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which wire protocol an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama...
    Openai,
    /// Anthropic's Messages API, translated both ways.
    Anthropic,
    /// Azure OpenAI: `base_url` is the resource (`https://NAME.openai.azure.com`), `model`
    /// the deployment, `api_version` required; the key goes in `api-key`.
    Azure,
}

/// Prices of a model, in US dollars per million tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    /// Dollars per million prompt (input) tokens.
    pub input_per_mtok: f64,
    /// Dollars per million completion (output) tokens.
    pub output_per_mtok: f64,
}

impl Prices {
    /// The cost of `prompt` and `completion` tokens, in micro-dollars, rounded up.
    pub fn cost_micros(&self, prompt: u64, completion: u64) -> u64 {
        // USD per million tokens is micro-dollars per token.
        let micros =
            prompt as f64 * self.input_per_mtok.max(0.0) + completion as f64 * self.output_per_mtok.max(0.0);
        micros.ceil() as u64
    }
}

/// How one model is called: timeouts, retries, breaker and when to fall back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicy {
    /// The longest a whole non-streamed attempt may take, e.g. "60s" (1 ms to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// For streams: the longest until the first token, e.g. "10s". A stream that
    /// has not produced a token by then counts as `timeout` and fails over unseen
    /// (1 ms to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ttft_timeout: Duration,
    /// For streams: the longest pause between two chunks after the first token,
    /// e.g. "10s" (1 ms to "366d"). A stall counts as `timeout`; the stream is rescued.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stall_timeout: Duration,
    /// The shortest wait before retrying a `429` that came without `Retry-After`, so
    /// that a persistent rate limit is never hit more than a few times a second;
    /// the wait is this plus the backoff, e.g. "250ms" (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub rate_limit_floor: Duration,
    /// Retries on the same model. A model with fallbacks never retries a `timeout`:
    /// retrying a silent route only multiplies the wait, the fallback is tried at once.
    pub retry: RetryConfig,
    /// The model's circuit breaker. A model's breaker stays open `5s` by default (not
    /// the tools' `30s`): while it is open the fallback takes the traffic, and a
    /// primary that recovers gets it back within one `open_for` and its probes —
    /// even when a probe failed during the outage, which opens it again for only as
    /// long. A probe that fails costs its caller nothing more: the retry into the
    /// open breaker is refused at once and the call moves on to the fallback.
    #[serde(deserialize_with = "model_breaker")]
    pub breaker: BreakerConfig,
    /// The classes of a final failure that move to the next model of `fallbacks`.
    /// `context_overflow` and `refusal` have their own routes (`context_fallback`,
    /// `content_fallback`) and never take the generic chain.
    pub fallback: FallbackConfig,
}

impl ModelPolicy {
    /// Checks every value against its documented range, as
    /// [`PolicyConfig::validate`](keel_core::PolicyConfig::validate) does for tools.
    ///
    /// # Errors
    /// Every value out of range, by key (`retry.max_attempts`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        c.positive_duration("timeout", self.timeout);
        c.positive_duration("ttft_timeout", self.ttft_timeout);
        c.positive_duration("stall_timeout", self.stall_timeout);
        c.duration("rate_limit_floor", self.rate_limit_floor);
        c.nested("retry", self.retry.validate());
        c.nested("breaker", self.breaker.validate());
        c.finish()
    }
}

/// How long a model's breaker stays open by default.
pub const MODEL_OPEN_FOR: Duration = Duration::from_secs(5);

/// A model's `breaker` table: what it leaves out is the model's default (its
/// `open_for` is [`MODEL_OPEN_FOR`]), not the tools'.
fn model_breaker<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BreakerConfig, D::Error> {
    let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    table.entry("open_for").or_insert_with(|| "5s".into());
    serde_json::from_value(serde_json::Value::Object(table)).map_err(serde::de::Error::custom)
}

impl Default for ModelPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            ttft_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(20),
            rate_limit_floor: Duration::from_millis(250),
            retry: RetryConfig::default(),
            breaker: BreakerConfig { open_for: MODEL_OPEN_FOR, ..BreakerConfig::default() },
            fallback: FallbackConfig::default(),
        }
    }
}

/// One model agents can name in `model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The wire protocol of the upstream.
    pub provider: Provider,
    /// The upstream's base URL, e.g. "https://api.openai.com/v1" or
    /// "http://127.0.0.1:8080/v1"; `/chat/completions` (or `/messages`) is appended.
    pub base_url: String,
    /// The environment variable holding the upstream's API key; none for keyless
    /// local servers. The key is read once, never logged.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// For an `https` upstream behind an internal CA: a PEM file of CA certificates
    /// trusted for this model, besides the built-in (Mozilla) roots. A relative path is
    /// keel.toml's directory's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A PEM file of the client certificate (and its chain) shown to an upstream that
    /// requires one (mutual TLS); needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The PEM file of `client_cert_file`'s private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// The model id the upstream knows, e.g. "gpt-4o-mini" (for `azure`, the deployment).
    pub model: String,
    /// Azure OpenAI's `api-version`, e.g. "2024-10-21" (azure only, required there).
    #[serde(default)]
    pub api_version: Option<String>,
    /// How the model is called.
    #[serde(default)]
    pub policy: ModelPolicy,
    /// Models to try, in order, when this one fails with a class of
    /// `policy.fallback.on` (names of other `[models.*]`).
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// A larger-context model for `context_overflow` (never retried on this model).
    #[serde(default)]
    pub context_fallback: Option<String>,
    /// A model for `refusal` (a content-policy rejection); without it the
    /// provider's reason is returned to the agent.
    #[serde(default)]
    pub content_fallback: Option<String>,
    /// Whether this model continues a trailing assistant message (prefill), so a
    /// stream cut on another model can continue here from the partial answer.
    #[serde(default)]
    pub accepts_prefill: bool,
    /// Prices, for cost budgets.
    #[serde(default)]
    pub prices: Prices,
    /// How many correction retries an invalid answer gets (empty, truncated, unknown
    /// tool, bad tool arguments): the error is sent back to the model before the
    /// agent sees anything. 0 turns correction off.
    #[serde(default)]
    pub correct: u32,
    /// Whether answers are validated (empty, truncated, tool calls) at all.
    #[serde(default = "yes")]
    pub validate: bool,
    /// Whether a streamed answer is held until complete before it is sent: every
    /// failure is then invisible to the client, at the cost of streaming.
    #[serde(default)]
    pub buffer: bool,
    /// Whether prompts are journaled as SHA-256 digests (default) rather than whole.
    #[serde(default = "yes")]
    pub hash_prompts: bool,
    /// The completion tokens reserved from budgets when a request sets no
    /// `max_tokens` (and, for Anthropic, the `max_tokens` sent).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
}

fn yes() -> bool {
    true
}

fn default_max_tokens() -> u64 {
    4096
}

impl ModelConfig {
    /// A model with default policy and options.
    pub fn new(provider: Provider, base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider,
            base_url: base_url.into(),
            api_key_env: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            model: model.into(),
            api_version: None,
            policy: ModelPolicy::default(),
            fallbacks: Vec::new(),
            context_fallback: None,
            content_fallback: None,
            accepts_prefill: false,
            prices: Prices::default(),
            correct: 0,
            validate: true,
            buffer: false,
            hash_prompts: true,
            default_max_tokens: default_max_tokens(),
        }
    }
}

/// Gateway-wide limits: budgets per API key and per run, the loop guard of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The budget of each API key (the server's `ApiKeyId`), over the process's life.
    pub key_budget: BudgetConfig,
    /// The budget of each run (header `X-Keel-Run`).
    pub run_budget: BudgetConfig,
    /// The loop guard over a run's tool calls.
    pub loop_guard: LoopGuardConfig,
    /// Journal events queued but not yet durable above which new calls are refused
    /// with 503 and `Retry-After` (overload is shed, never journaling skipped);
    /// 0 for no limit.
    pub max_journal_backlog: usize,
}

impl GatewayConfig {
    /// Checks the budgets and the loop guard.
    ///
    /// # Errors
    /// Every value out of range, by key (`run_budget.cost_usd`).
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut c = Checks::default();
        c.nested("key_budget", self.key_budget.validate());
        c.nested("run_budget", self.run_budget.validate());
        c.nested("loop_guard", self.loop_guard.validate());
        c.finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            key_budget: BudgetConfig::default(),
            run_budget: BudgetConfig::default(),
            loop_guard: LoopGuardConfig::default(),
            max_journal_backlog: 100_000,
        }
    }
}

/// Every problem of a set of model configs, found at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    /// One line per problem, `models.NAME.field: what is wrong`.
    pub problems: Vec<String>,
}

/// Checks references between models and their URLs; reads nothing.
pub(crate) fn check(models: &BTreeMap<String, ModelConfig>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, m) in models {
        let scheme_ok = m.base_url.starts_with("http://") || m.base_url.starts_with("https://");
        if !scheme_ok {
            problems
                .push(format!("models.{name}.base_url: `{}` is not an http:// or https:// URL", m.base_url));
        } else if let Err(e) = keel_http::parse_url(&m.base_url) {
            problems.push(format!("models.{name}.base_url: `{}` is not a valid URL: {e}", m.base_url));
        }
        let refs = m
            .fallbacks
            .iter()
            .map(|f| ("fallbacks", f))
            .chain(m.context_fallback.iter().map(|f| ("context_fallback", f)))
            .chain(m.content_fallback.iter().map(|f| ("content_fallback", f)));
        for (field, target) in refs {
            if target == name {
                problems.push(format!("models.{name}.{field}: a model cannot fall back to itself"));
            } else if !models.contains_key(target) {
                problems.push(format!("models.{name}.{field}: no model named `{target}`"));
            }
        }
        problems.extend(m.provider.check(name, m));
        for e in m.policy.validate().err().unwrap_or_default() {
            problems.push(format!("models.{name}.policy.{}: {}", e.key, e.message));
        }
    }
    problems
}

/// The classes that send a failure to the next model of the generic chain.
pub(crate) fn chain_classes(policy: &ModelPolicy) -> Vec<ErrorClass> {
    policy
        .fallback
        .on
        .iter()
        .copied()
        .filter(|c| !matches!(c, ErrorClass::ContextOverflow | ErrorClass::Refusal))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_breaker_table_keeps_the_models_defaults() {
        let p: ModelPolicy = serde_json::from_str(r#"{"breaker": {"min_calls": 4}}"#).unwrap();
        assert_eq!((p.breaker.min_calls, p.breaker.open_for), (4, MODEL_OPEN_FOR));
        let p: ModelPolicy = serde_json::from_str(r#"{"breaker": {"open_for": "1m"}}"#).unwrap();
        assert_eq!(p.breaker.open_for, Duration::from_secs(60));
        assert_eq!(ModelPolicy::default().breaker.open_for, MODEL_OPEN_FOR);
        let e = serde_json::from_str::<ModelPolicy>(r#"{"breaker": {"open_fro": "1m"}}"#).unwrap_err();
        assert!(e.to_string().contains("open_fro"), "{e}");
    }
}
