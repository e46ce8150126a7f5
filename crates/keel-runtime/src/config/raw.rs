//! The first stage of `keel.toml`: plain serde values, exactly as written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keel_core::budget::BudgetConfig;
use keel_core::classify::CommandConfig;
use keel_core::{LoopGuardConfig, PolicyConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// `keel.toml`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the journal lives.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The policy every tool starts from; each tool's `policy` overrides keys of it.
    #[serde(default)]
    #[schemars(with = "PolicyConfig")]
    pub defaults: Option<Spanned<toml::Table>>,
    /// Limits of each run.
    #[serde(default)]
    pub run: RunConfig,
    /// How approvals behave.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// Agent runs (`keel agent`): the model, the turn limit, the history kept.
    #[serde(default)]
    pub agent: AgentConfig,
    /// The tools, by name.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ToolConfig>")]
    pub tools: BTreeMap<String, Spanned<ToolConfig>>,
    /// `keel serve`: where it listens, who may call it.
    #[serde(default)]
    pub server: ServerConfig,
    /// The models agents reach through `/v1/chat/completions`, by the name they use.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, keel_gateway::ModelConfig>")]
    pub models: BTreeMap<String, Spanned<keel_gateway::ModelConfig>>,
    /// Gateway-wide limits: budgets per API key and per run, the loop guard.
    #[serde(default)]
    pub gateway: keel_gateway::GatewayConfig,
    /// Where Keel's traces go (`[telemetry.otlp]`).
    #[serde(default)]
    pub telemetry: keel_telemetry::TelemetryConfig,
    /// Alert routing: rules by class, target and rate; PagerDuty, Slack, webhooks.
    #[serde(default)]
    pub alerts: keel_telemetry::alert::AlertsConfig,
    /// MCP servers whose tools Keel offers as its own, each call under Keel's policies.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, McpServerConfig>")]
    pub mcp_servers: BTreeMap<String, Spanned<McpServerConfig>>,
}

/// Which of an MCP server's tools need a person's approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum McpApproval {
    /// None (advisory mode still asks for write-like tools).
    #[default]
    Never,
    /// Every call.
    Always,
    /// Calls of write-like tools (not `readOnlyHint`).
    Writes,
    /// Calls of write-like tools that may destroy (`destructiveHint`, true by the
    /// protocol's default).
    Destructive,
}

/// `[mcp_servers.NAME]`: an MCP server Keel starts (`command`) or connects to (`url`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// stdio: the program and its arguments (no shell). It gets a clean environment:
    /// PATH, HOME, LANG, LC_ALL, TZ and TMPDIR of Keel's, plus `env` and `env_from`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// stdio: the working directory, relative to keel.toml's (default: keel.toml's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// stdio: environment variables set for the server (not secrets).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: environment variables copied from Keel's by name (`{ TOKEN = "GH_TOKEN" }`).
    #[serde(default)]
    pub env_from: BTreeMap<String, String>,
    /// HTTP: the server's streamable-HTTP endpoint (`https://host/mcp`).
    #[serde(default)]
    pub url: Option<String>,
    /// HTTP: headers with literal values (not secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// HTTP: headers whose values come from environment variables, by name.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// HTTP: a PEM file of CA certificates trusted besides the built-in roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The tools are offered as `PREFIX_TOOL`; default the server's name. `""` for none.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Only these of the server's tools are offered (default: all).
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// Tools treated as read-only whatever their annotations say.
    #[serde(default)]
    pub read_only: Vec<String>,
    /// Tools treated as write-like whatever their annotations say.
    #[serde(default)]
    pub write: Vec<String>,
    /// Which calls need approval: `never` (default), `always`, `writes`, `destructive`.
    #[serde(default)]
    pub approval: McpApproval,
    /// The longest a request may go without an answer or a progress notification
    /// ("60s" by default); each progress notification starts it again.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub request_timeout: Option<Duration>,
    /// The longest a request may take whatever its progress ("10m" by default).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub max_request_time: Option<Duration>,
    /// stdio: the first wait before a crashed server is started again ("1s"); it
    /// doubles at each crash in a row, up to `restart_max` ("1m"). Meanwhile its tools
    /// answer `circuit_open`.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub restart_backoff: Option<Duration>,
    /// stdio: the longest wait before a restart.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub restart_max: Option<Duration>,
    /// How error results (`isError`) map to classes, by their text (as a command's
    /// stderr): `{ stderr = [{ pattern = "(?i)quota", class = "rate_limited" }] }`.
    #[serde(default)]
    pub classify: Option<CommandConfig>,
    /// Overrides of `[defaults]` for the server's tools. Without `timeout.attempt`,
    /// an attempt is bounded by `max_request_time` (progress keeps it alive).
    #[serde(default)]
    #[schemars(with = "Option<PolicyConfig>")]
    pub policy: Option<Spanned<toml::Table>>,
}

/// What a key may do on `keel serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Invoke tools and start runs.
    Agent,
    /// Decide approvals and tickets (and read).
    Approver,
    /// Everything.
    Admin,
}

/// One API key: its secret comes from the environment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A name for logs and the journal (never the key itself).
    pub name: String,
    /// The environment variable holding the key.
    pub key_env: String,
    /// What the key may do.
    pub role: Role,
}

/// Per-key request rate limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per key.
    pub per_second: u32,
    /// Requests a key may make in a burst.
    pub burst: u32,
    /// Sustained requests per second per client address that present no valid key
    /// (guessing keys is limited even though no key name is known).
    pub unauthenticated_per_second: u32,
    /// Such requests a client address may make in a burst.
    pub unauthenticated_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { per_second: 200, burst: 400, unauthenticated_per_second: 5, unauthenticated_burst: 20 }
    }
}

/// `keel serve`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The address to listen on, `host:port` (e.g. "127.0.0.1:8080", "[::1]:8080").
    pub listen: String,
    /// API keys; every route but `/healthz` needs one.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// The largest request body, in bytes.
    pub body_limit: usize,
    /// Per-key rate limit.
    pub rate_limit: RateLimitConfig,
    /// Runs worked at once by the server.
    pub workers: usize,
    /// Connections held open at once (1 to 1000000). When all are taken, a
    /// connection with no request in flight is closed to make room; when every one
    /// is busy, the new connection is answered 503.
    pub max_connections: usize,
    /// How long a client has to send a request's headers once it started, and a new
    /// connection its first request, e.g. "10s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request, e.g. "60s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// How long a client has to send a request's whole body, e.g. "60s".
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_read_timeout: Duration,
    /// Serve HTTPS instead of HTTP: `{ cert_file, key_file }`, PEM files (relative to
    /// keel.toml); the certificate may carry its chain. Absent: plain HTTP (put a
    /// TLS-terminating proxy in front, or listen on loopback only).
    pub tls: Option<ServerTlsConfig>,
}

/// `[server] tls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The server's certificate, with its chain, in PEM.
    pub cert_file: std::path::PathBuf,
    /// Its private key in PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            keys: Vec::new(),
            body_limit: 1 << 20,
            rate_limit: RateLimitConfig::default(),
            workers: 4,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// Where the journal lives.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// A database URL: `sqlite://path/keel.db` (the default, next to keel.toml) or
    /// `postgres://...`. Never put a password here: use `url_env`.
    pub url: Option<String>,
    /// The name of an environment variable holding the database URL.
    pub url_env: Option<String>,
    /// How long an idempotency claim in progress (a tool call started and not yet
    /// answered) holds before another process may take the key over, presuming its
    /// holder dead; "5m" by default, from "1s" to "24h". Keys under a run's lease are
    /// taken over with the lease, sooner.
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub claim_ttl: Option<Duration>,
}

/// How much autonomy Keel has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Act, asking only where a tool's approval rule says so.
    #[default]
    Autonomous,
    /// Act only with approval: every write-like step asks first.
    Advisory,
    /// Do nothing.
    Stopped,
}

/// Agent runs: a model-driven tool loop (`keel agent "TASK"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The model of `[models]` agent runs call (default: the only one, if one).
    pub model: Option<String>,
    /// The most model turns of a run (1–10,000); the run then stops with its partial result.
    pub max_turns: u32,
    /// The most tokens of history sent each turn (500–10,000,000): the system prompt, the
    /// task and the latest exchanges are kept, older ones dropped and summarised in a line.
    pub history_tokens: u64,
    /// The same tool with the same arguments this many times in a run (succeeded or
    /// not) pauses the run with a ticket (2–1000; 0 turns the check off).
    pub max_repeats: u32,
    /// The tools the model is offered (default: every tool of the config).
    pub tools: Option<Vec<String>>,
    /// The most tool calls of one turn carried out (1–1000); the rest are answered with
    /// an error, never run.
    pub max_calls_per_turn: u32,
    /// The system prompt.
    pub system: Option<String>,
    /// After a failed program: `adaptive` (learned per error kind), `repair` or
    /// `regenerate` always.
    pub correction: crate::agent::correct::CorrectionMode,
    /// The most failed programs in a row before the run stops (1–100).
    pub code_attempts: u32,
    /// Stop a chain of failed programs as soon as one error repeats unchanged (the
    /// correction is not converging); `false` spends every attempt (blind retries).
    pub stop_on_repeat: bool,
    /// A tool answering in a shape (keys and types) unlike its usual ones: `flag` (a
    /// `schema_drift` event), `correct` (the call fails, for the model to check) or
    /// `escalate` (a ticket before the answer is fed forward).
    pub on_schema_drift: crate::agent::shape::DriftPolicy,
    /// When the correction of a failed program gives up (the same error twice,
    /// resubmissions, `code_attempts` spent, the gate's refusal): `fail` (the run fails
    /// with its partial result) or `escalate` (a ticket: retry one more round, skip to
    /// finish with the partial result, or abort).
    pub on_unsolved: crate::agent::correct::Unsolved,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            model: None,
            max_turns: 20,
            history_tokens: 16_000,
            max_repeats: 3,
            tools: None,
            max_calls_per_turn: 32,
            system: None,
            correction: crate::agent::correct::CorrectionMode::Adaptive,
            code_attempts: 4,
            stop_on_repeat: true,
            on_schema_drift: crate::agent::shape::DriftPolicy::Flag,
            on_unsolved: crate::agent::correct::Unsolved::Fail,
        }
    }
}

impl AgentConfig {
    /// Checks every value against its documented range.
    ///
    /// # Errors
    /// Every value out of range, by key.
    pub fn validate(&self) -> Result<(), Vec<keel_core::PolicyError>> {
        let mut c = keel_core::policy::Checks::default();
        c.count("max_turns", self.max_turns, 1..=10_000);
        c.count("history_tokens", self.history_tokens, 500..=10_000_000);
        c.count("code_attempts", self.code_attempts, 1..=100);
        c.count("max_calls_per_turn", self.max_calls_per_turn, 1..=1000);
        match self.max_repeats {
            0 => {}
            1 => c.fail("max_repeats", "1 would stop every call: 0 turns the check off, 2 is the least"),
            n => c.count("max_repeats", n, 2..=1000),
        }
        c.finish()
    }
}

/// Limits of each run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The run's wall-time deadline, e.g. "30m" (1 ms to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub deadline: Duration,
    /// The run's budget.
    pub budget: BudgetConfig,
    /// Open a ticket after this many failures of the same class in a run (1–1000).
    pub escalate_after: u32,
    /// The mode runs start in.
    pub mode: Mode,
    /// The loop guard of each run.
    pub loop_guard: LoopGuardConfig,
    /// How long the process working a run holds it without renewing: after a crash,
    /// another process can take the run over this long after the last renewal
    /// ("1s" to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30 * 60),
            budget: BudgetConfig::default(),
            escalate_after: 3,
            mode: Mode::Autonomous,
            loop_guard: LoopGuardConfig::default(),
            lease: Duration::from_secs(15),
        }
    }
}

/// What an expired approval becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryOutcome {
    /// The action is denied (`approval_denied`).
    #[default]
    Deny,
    /// A ticket is opened for a person to decide.
    Escalate,
}

/// How approvals behave.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// How long a request for approval stays valid, e.g. "24h" (up to "366d").
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub expires_after: Duration,
    /// What an expired request becomes.
    pub on_expiry: ExpiryOutcome,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self { expires_after: Duration::from_secs(24 * 3600), on_expiry: ExpiryOutcome::Deny }
    }
}

/// The kind of a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolKindName {
    /// A local program, run without a shell.
    Command,
    /// An HTTP endpoint.
    Http,
    /// Model-written Python, run in a sandbox.
    Code,
}

/// When a tool's call needs a person's approval.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ApprovalRule {
    /// `"never"` or `"always"`.
    Fixed(FixedApproval),
    /// Ask when a numeric parameter is above a threshold: `{ param = "amount", above = 100 }`.
    /// `params` must declare the parameter a number; a value the rule cannot compare
    /// (missing, a string, an array) asks too: a rule fails closed.
    Above {
        /// The parameter compared.
        param: String,
        /// The threshold.
        above: f64,
    },
}

/// A tool's fallback, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolFallbackConfig {
    /// A read-only tool answering the same parameters.
    #[serde(default)]
    pub twin: Option<String>,
    /// How old the last good result for the same arguments may be ("10m", 1s to "366d").
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub cached: Option<Duration>,
    /// The final failure classes that take the fallback.
    #[serde(default)]
    pub on: Option<Vec<keel_core::ErrorClass>>,
}

/// What one call of a tool costs, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCostConfig {
    /// Charged for every attempt, failed ones included (a failed call may have been
    /// billed; Keel cannot know, so it assumes it was).
    #[serde(default)]
    pub per_call_usd: Option<f64>,
    /// A field of the answer (`a.b.c`) holding what the call cost, in dollars.
    #[serde(default)]
    pub from_field: Option<String>,
    /// The most one call with `from_field` can cost: reserved before it, and charged
    /// when the answer lacks the field (or the call failed and no `per_call_usd` is set).
    #[serde(default)]
    pub max_usd: Option<f64>,
}

/// A fixed approval rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FixedApproval {
    /// Never ask (advisory mode still asks for write-like tools).
    Never,
    /// Always ask.
    Always,
}

/// One tool, as written. Which keys apply depends on `kind`; the second stage checks.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// `command`, `http` or `code`.
    pub kind: ToolKindName,
    /// What the tool does, for people and models.
    #[serde(default)]
    pub description: String,
    /// A JSON Schema of the parameters; calls are checked against it before running.
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    /// Whether the tool changes the world (charges, writes, sends). Write-like calls
    /// carry an idempotency key and ask for approval in advisory mode.
    #[serde(default)]
    pub write: bool,
    /// When a call needs approval.
    #[serde(default)]
    pub approval: Option<ApprovalRule>,
    /// A tool that undoes this one (review-after-act), called with the same parameters
    /// plus `result`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub undo: Option<Spanned<String>>,
    /// The array parameter holding a batch, for the canary rule.
    #[serde(default)]
    pub batch_param: Option<String>,
    /// A batch larger than this runs a canary of one item first and waits for a
    /// person's confirmation before the rest.
    #[serde(default)]
    pub canary_above: Option<usize>,
    /// What one call costs, charged to the cost budget of the plan run that makes it
    /// (`[run] budget`): `{ per_call_usd = 0.01 }`, or the cost the answer reports,
    /// `{ from_field = "body.fee.usd", max_usd = 0.5 }` (the result's field: `body.…` for an http
    /// tool, `json.…` for a command printing JSON; the bound is reserved before the
    /// call; an answer without the field is charged the bound).
    #[serde(default)]
    pub cost: Option<ToolCostConfig>,
    /// What a call falls back to once its own attempts failed: a read-only `twin` tool
    /// called with the same parameters, and/or the last good result for the same
    /// arguments if younger than `cached` ("10m"; never for a write-like tool), on the
    /// classes `on` (default: network, timeout, rate_limited, server_error,
    /// circuit_open). Every fallback is journaled as `fallback_taken`.
    #[serde(default)]
    pub fallback: Option<ToolFallbackConfig>,
    /// Overrides of `[defaults]` for this tool.
    #[serde(default)]
    #[schemars(with = "Option<PolicyConfig>")]
    pub policy: Option<Spanned<toml::Table>>,

    /// command: the program and its arguments, with `{{param}}` placeholders. No shell:
    /// each entry is one argument, whatever a value holds. Never put a placeholder in a
    /// `sh -c`/`python -c` script (a value there is code; `config check` warns): pass it
    /// as its own argument (`["sh", "-c", "echo \"$1\"", "sh", "{{x}}"]`).
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// command: the working directory, relative to keel.toml's; it must exist. Without
    /// it, each attempt runs in a fresh empty private directory, removed after.
    #[serde(default)]
    pub cwd: Option<String>,
    /// command: environment variables set for the program (not secrets). The program
    /// inherits only PATH, HOME, LANG, LC_ALL, TZ and TMPDIR of Keel's environment,
    /// plus `env`, `env_from` and `KEEL_IDEMPOTENCY_KEY`; `KEEL_*` names are Keel's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// command: environment variables copied from Keel's own environment by name
    /// (`{ API_TOKEN = "PAYMENTS_TOKEN" }`): how secrets reach a program.
    #[serde(default)]
    pub env_from: BTreeMap<String, String>,
    /// command: write the call's parameters to the program's stdin as one JSON document
    /// (the safe way to hand a program many or structured values; stdin is empty
    /// otherwise).
    #[serde(default)]
    pub params_on_stdin: bool,
    /// command: the most bytes kept of stdout and of stderr each. code: of the
    /// program's output (stdout and stderr together), 64 KiB by default.
    #[serde(default)]
    pub max_output: Option<usize>,
    /// command: how exits and stderr map to error classes.
    #[serde(default)]
    pub classify: Option<CommandConfig>,

    /// http: the method (default POST).
    #[serde(default)]
    pub method: Option<String>,
    /// http: the URL, with `{{param}}` placeholders in its path and query only (values
    /// are percent-encoded; a value making a `.`/`..` segment is refused). The scheme
    /// and host are written here, never taken from a parameter.
    #[serde(default)]
    pub url: Option<String>,
    /// http: headers with literal values (not secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// http: headers whose values come from environment variables, by name
    /// (`{ Authorization = "PAYMENTS_AUTH" }`).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// http: the JSON body template (default: the parameters themselves).
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// http: for an `https` URL behind an internal CA, a PEM file of CA certificates
    /// trusted for this tool besides the built-in (Mozilla) roots; relative to
    /// keel.toml's directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// http: a PEM file of the client certificate (mutual TLS); needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// http: the PEM file of `client_cert_file`'s private key.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,

    /// code: the wall time of one run, "10s" by default ("100ms" to "1h"); past it
    /// the program is killed (a `code_error`, `WallTimeExceeded`).
    #[serde(default, with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// code: CPU seconds of one run (1 to 3600; default 10).
    #[serde(default)]
    pub cpu_seconds: Option<u64>,
    /// code: the address space of the program, MiB (64 to 65536; default 512).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// code: processes and threads the program may run at once, itself included
    /// (1 to 4096; default 32). RLIMIT_NPROC counts per user: when Keel runs as root,
    /// programs run as `nobody`, and every process of `nobody` counts.
    #[serde(default)]
    pub max_processes: Option<u32>,
    /// code: the largest file the program may write, MiB (1 to 65536; default 16).
    #[serde(default)]
    pub max_file_mb: Option<u64>,
    /// code: `auto` (bubblewrap when it works on this machine, else rlimits),
    /// `bwrap` (refused at load when bubblewrap cannot run: never less isolated than
    /// asked) or `rlimits`.
    #[serde(default)]
    pub isolation: Option<crate::tool::code::IsolationRequest>,
    /// code: a JSON Schema the program's `result` must match (else a `code_error`).
    #[serde(default)]
    pub result_schema: Option<serde_json::Value>,
    /// code: the Python interpreter, a name on PATH or a path ("python3").
    #[serde(default)]
    pub python: Option<String>,
}
