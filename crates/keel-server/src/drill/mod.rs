//! `keel drill`: a failure-injection drill against the configured targets.
//!
//! Every drilled target gets a fault proxy where its URL was ([`proxy`]): models an
//! OpenAI-wire synthetic upstream (no provider is called, nothing is spent), http
//! tools a forwarder to their own service. Then N synthetic calls per target go
//! through the real path — the gateway for models (whole and streamed), durable
//! invocation for tools (`keel_runtime::invoke`, idempotency, approvals, tickets) —
//! on a journal of the drill's own (a temporary SQLite file: a drill never writes
//! into the production journal, pages no one, and its faults are not incidents).
//! A call that failed is made again once, as an agent would retry it.
//!
//! The report ([`report`]) has per target the calls, how they ended, the faults
//! injected, attempts, retries, fallbacks, corrections, stream rescues, breaker trips,
//! tickets and latency; and the invariants checked: every call ended, no side effect
//! repeated (a write's request that reached its service twice under different keys),
//! retries within the policy, every answer the agent got well-formed.
//!
//! Not drilled (listed as skipped): command, code and MCP tools (no wire to put a
//! proxy on; their policies' own `fault` injection drills them), models on the
//! Anthropic wire, and tools whose URL host is a template.

pub mod proxy;
pub mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{BreakerState, ErrorClass, Event, EventSink};
use keel_gateway::{CallContext, ChatRequest, Gateway, Provider};
use keel_journal::JournalEvent;
use keel_runtime::invoke::{Call, Outcome};
use keel_runtime::runner::Observer;
use keel_runtime::tool::ToolKind;
use keel_runtime::{Config, Invoker, Runner};
use serde_json::{Value, json};
use tokio::time::Instant;

pub use proxy::{DrillFault, FaultPlan, Proxy};
pub use report::{CallEnd, Invariant, Report, TargetReport};

/// What to drill, and how hard.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Calls per target.
    pub calls: usize,
    /// The share of requests that get a fault.
    pub rate: f64,
    /// The faults drawn from (each target uses those that apply to it).
    pub faults: Vec<DrillFault>,
    /// Only these targets (default: every one that can be drilled).
    pub targets: Option<Vec<String>>,
    /// The seed of every draw: the same seed, the same faults.
    pub seed: u64,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// How late a `latency` fault answers.
    pub latency: Duration,
    /// The longest the drill waits for one call; a call still going then breaks the
    /// "every call ended" invariant.
    pub call_bound: Duration,
}

impl Default for DrillOptions {
    fn default() -> Self {
        Self {
            calls: 20,
            rate: 0.3,
            faults: DrillFault::ALL.to_vec(),
            targets: None,
            seed: 1,
            concurrency: 4,
            latency: Duration::from_millis(200),
            call_bound: Duration::from_secs(120),
        }
    }
}

/// Why a drill could not run.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Options out of range, or nothing to drill.
    #[error("{0}")]
    Options(String),
    /// The drill's own journal, proxies or gateway.
    #[error("the drill cannot start: {0}")]
    Setup(String),
}

/// Counts the policy events of the drilled targets, from the gateway's sink and the
/// runner's observer alike; and runs `[alerts]`' rules over the failures (pure: no
/// sink is called), so the report says which incidents the drill would have opened.
#[derive(Debug)]
struct Counts {
    policy: Mutex<HashMap<String, report::Policy>>,
    rules: Mutex<keel_telemetry::alert::rules::Incidents>,
    fired: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn new(rules: Vec<keel_telemetry::alert::Rule>) -> Self {
        Self {
            policy: Mutex::default(),
            rules: Mutex::new(keel_telemetry::alert::rules::Incidents::new(rules)),
            fired: Mutex::default(),
        }
    }
}

impl EventSink for Counts {
    fn record(&self, event: &Event) {
        if let Some((class, target)) = keel_telemetry::alert::failure_of(event) {
            let mut incidents = self.rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for change in incidents.observe(Instant::now(), class, target) {
                if let keel_telemetry::alert::rules::Change::Trigger { rule, key, .. } = change {
                    let name = incidents.rules().get(rule).map_or("?", |r| r.name.as_str());
                    *self
                        .fired
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(format!("{name} ({key})"))
                        .or_default() += 1;
                }
            }
        }
        let mut map = self.policy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            Event::AttemptStarted { target, .. } => map.entry(target.to_string()).or_default().attempts += 1,
            Event::RetryScheduled { target, .. } => map.entry(target.to_string()).or_default().retries += 1,
            Event::FallbackTaken { from, .. } => map.entry(from.to_string()).or_default().fallbacks += 1,
            Event::CorrectionRound { target, .. } => {
                map.entry(target.to_string()).or_default().corrections += 1
            }
            Event::BreakerTransition { target, to: BreakerState::Open, .. } => {
                map.entry(target.to_string()).or_default().breaker_trips += 1;
            }
            _ => {}
        }
    }
}

impl Observer for Counts {
    fn event(&self, _run_id: &str, event: &JournalEvent) {
        if let JournalEvent::Policy { event, .. } = event {
            self.record(event);
        }
    }
}

/// One drilled target.
enum Drilled {
    Model { name: String, proxy: Proxy },
    Tool { name: String, proxy: Proxy, write: bool, max_attempts: u32, schema: Option<Value> },
}

/// The scheme and authority of a URL template (`http://host:port`), unless its host
/// is a template.
fn origin(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains("{{") || authority.is_empty() {
        return None;
    }
    Some((format!("{scheme}://{authority}"), rest[end..].to_owned()))
}

/// Whether `--targets` (when given) names `name`.
fn selects(opts: &DrillOptions, name: &str) -> bool {
    opts.targets.as_ref().is_none_or(|t| t.iter().any(|n| n == name))
}

/// How many targets of `config` the drill calls (http tools with a fixed host,
/// OpenAI-wire models, of `opts.targets` when named): the progress bar's length is
/// this times `opts.calls`.
pub fn drillable(config: &Config, opts: &DrillOptions) -> usize {
    let wanted = |name: &str| selects(opts, name);
    let tools = config
        .tools
        .iter()
        .filter(|(n, t)| wanted(n) && matches!(&t.kind, ToolKind::Http(h) if origin(&h.url).is_some()))
        .count();
    let models = config.models.iter().filter(|(n, m)| wanted(n) && m.provider == Provider::Openai).count();
    tools + models
}

/// Runs the drill on `config` (its tools and models; its journal is not touched).
/// `progress` is told each call that ended.
///
/// # Errors
/// [`DrillError`] when the options are out of range, nothing can be drilled, or the
/// drill's own journal or proxies cannot start.
pub async fn run(
    config: &Config,
    opts: &DrillOptions,
    progress: &(dyn Fn() + Sync),
) -> Result<Report, DrillError> {
    if !(0.0..=1.0).contains(&opts.rate) || opts.rate.is_nan() {
        return Err(DrillError::Options(format!("--rate {} is not between 0 and 1", opts.rate)));
    }
    if opts.calls == 0 || opts.calls > 100_000 {
        return Err(DrillError::Options(format!("--calls {} is not between 1 and 100000", opts.calls)));
    }
    if opts.concurrency == 0 || opts.concurrency > 1024 {
        return Err(DrillError::Options(format!(
            "--concurrency {} is not between 1 and 1024",
            opts.concurrency
        )));
    }
    if let Some(names) = &opts.targets {
        for n in names {
            if !config.tools.contains_key(n) && !config.models.contains_key(n) {
                return Err(DrillError::Options(format!("--targets: no tool or model named `{n}`")));
            }
        }
    }
    let wanted = |name: &str| selects(opts, name);
    let plan = |applies: fn(DrillFault) -> bool| FaultPlan {
        rate: opts.rate,
        faults: opts.faults.iter().copied().filter(|f| applies(*f)).collect(),
        latency: opts.latency,
    };
    let setup = |e: std::io::Error| DrillError::Setup(e.to_string());
    let client = keel_http::Client::default_shared()
        .map_err(|e| DrillError::Setup(e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;

    let mut drilled = Vec::new();
    let mut skipped = Vec::new();
    let mut config = config.clone();
    let mut seed = opts.seed;
    for (name, tool) in config.tools.clone() {
        if !wanted(&name) {
            continue;
        }
        let ToolKind::Http(h) = &tool.kind else {
            let kind = match &tool.kind {
                ToolKind::Command(_) => "a command tool",
                ToolKind::Code(_) => "a code tool",
                _ => "an MCP tool",
            };
            skipped.push((name, format!("{kind}: no wire to inject into (its policy's `fault` drills it)")));
            continue;
        };
        let Some((origin, path)) = origin(&h.url) else {
            skipped.push((name, "its URL's host is a template".to_owned()));
            continue;
        };
        seed = seed.wrapping_add(1);
        let proxy =
            Proxy::tool(origin, client.clone(), plan(DrillFault::for_tools), seed).await.map_err(setup)?;
        let mut t = (*tool).clone();
        if let ToolKind::Http(h) = &mut t.kind {
            h.url = format!("{}{path}", proxy.url);
        }
        drilled.push(Drilled::Tool {
            name: name.clone(),
            proxy,
            write: t.write,
            max_attempts: t.policy.retry.max_attempts,
            schema: t.params_schema.clone(),
        });
        config.tools.insert(name, Arc::new(t));
    }
    for (name, model) in config.models.clone() {
        if !wanted(&name) {
            continue;
        }
        if model.provider != Provider::Openai {
            skipped.push((name, "not on the OpenAI wire: the synthetic upstream speaks only it".to_owned()));
            continue;
        }
        seed = seed.wrapping_add(1);
        let proxy = Proxy::model(plan(DrillFault::for_models), seed).await.map_err(setup)?;
        if let Some(m) = config.models.get_mut(&name) {
            m.base_url = format!("{}/v1", proxy.url);
        }
        drilled.push(Drilled::Model { name, proxy });
    }
    if drilled.is_empty() {
        return Err(DrillError::Options(
            "nothing to drill: no http tool or OpenAI-wire model selected".into(),
        ));
    }

    // The drill's own journal.
    let clock: Arc<dyn keel_core::Clock> = Arc::new(keel_core::TokioClock::new());
    let dir = std::env::temp_dir().join(format!(
        "keel-drill-{}-{}",
        std::process::id(),
        clock.wall().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(setup)?;
    config.storage_url = format!("sqlite://{}", dir.join("drill.db").display());
    let journal = keel_journal::open(&config.storage_url, config.journal_options(clock.clone()))
        .await
        .map_err(|e| DrillError::Setup(e.to_string()))?;
    let counts = Arc::new(Counts::new(config.alerts.rules.clone()));
    let config = Arc::new(config);
    let runner = Arc::new(
        Runner::new(config.clone(), journal, clock.clone(), counts.clone())
            .await
            .map_err(|e| DrillError::Setup(e.to_string()))?,
    );
    let invoker = Arc::new(Invoker::new(runner.clone(), Arc::default(), clock));
    let gateway = if drilled.iter().any(|d| matches!(d, Drilled::Model { .. })) {
        let built = config
            .gateway_builder()
            .sink(counts.clone())
            .build()
            .map_err(|e| DrillError::Setup(format!("the gateway: {e}")))?;
        Some(Arc::new(built))
    } else {
        None
    };

    // The calls: every target's, interleaved, a bounded number in flight.
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut ends: Vec<(usize, CallEnd)> = Vec::new();
    for i in 0..opts.calls {
        for (t, d) in drilled.iter().enumerate() {
            let permit = limit.clone().acquire_owned().await.map_err(|e| DrillError::Setup(e.to_string()))?;
            let call = match d {
                Drilled::Model { name, .. } => Work::Model { name: name.clone(), stream: i % 2 == 1, n: i },
                Drilled::Tool { name, schema, .. } => {
                    Work::Tool { name: name.clone(), params: synthetic_params(schema.as_ref(), i) }
                }
            };
            let (gateway, invoker, bound) = (gateway.clone(), invoker.clone(), opts.call_bound);
            tasks.spawn(async move {
                let end = call.run(gateway.as_ref(), &invoker, bound).await;
                drop(permit);
                (t, end)
            });
            while let Some(done) = tasks.try_join_next() {
                collect(done, &mut ends, progress);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        collect(done, &mut ends, progress);
    }
    let _ = runner.flush().await;
    let policy = counts.policy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let metrics = gateway.as_ref().map(|g| g.metrics());
    let mut report = report::build(opts, &drilled_view(&drilled), ends, &policy, metrics.as_ref(), skipped);
    report.alerts_fired = counts.fired.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

fn collect(
    done: Result<(usize, CallEnd), tokio::task::JoinError>,
    ends: &mut Vec<(usize, CallEnd)>,
    progress: &(dyn Fn() + Sync),
) {
    progress();
    match done {
        Ok(end) => ends.push(end),
        Err(e) => tracing::error!(error = %e, "a drill call panicked"),
    }
}

fn drilled_view(drilled: &[Drilled]) -> Vec<report::Target> {
    drilled
        .iter()
        .map(|d| match d {
            Drilled::Model { name, proxy } => report::Target {
                name: name.clone(),
                model: true,
                write: false,
                max_attempts: 0,
                seen: proxy.seen(),
            },
            Drilled::Tool { name, proxy, write, max_attempts, .. } => report::Target {
                name: name.clone(),
                model: false,
                write: *write,
                max_attempts: *max_attempts,
                seen: proxy.seen(),
            },
        })
        .collect()
}

/// Parameters for call `i` made from a tool's schema: every required property, of
/// values unique to the call (integers `1000 + i`, strings `DRILL-i`), so each call
/// is its own effect. A tool without a schema gets `{"drill_call": i}`.
pub fn synthetic_params(schema: Option<&Value>, i: usize) -> Value {
    let Some(schema) = schema else { return json!({ "drill_call": i }) };
    let mut out = serde_json::Map::new();
    let props = schema["properties"].as_object();
    let required: Vec<&str> =
        schema["required"].as_array().map_or_else(Vec::new, |r| r.iter().filter_map(Value::as_str).collect());
    for name in required {
        let p = props.and_then(|p| p.get(name)).cloned().unwrap_or_default();
        let value = if let Some(first) = p["enum"].as_array().and_then(|e| e.first()) {
            first.clone()
        } else {
            match p["type"].as_str() {
                Some("integer") => json!(1000 + i),
                Some("number") => json!(1.0),
                Some("boolean") => json!(false),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!(format!("DRILL-{i}")),
            }
        };
        out.insert(name.to_owned(), value);
    }
    Value::Object(out)
}

enum Work {
    Model { name: String, stream: bool, n: usize },
    Tool { name: String, params: Value },
}

impl Work {
    async fn run(self, gateway: Option<&Arc<Gateway>>, invoker: &Invoker, bound: Duration) -> CallEnd {
        let started = Instant::now();
        let end = tokio::time::timeout(bound, async {
            match self {
                Work::Model { name, stream, n } => model_call(gateway, &name, stream, n).await,
                Work::Tool { name, params } => tool_call(invoker, &name, params, bound).await,
            }
        })
        .await;
        let mut end = end.unwrap_or(CallEnd { ended: false, ..CallEnd::default() });
        end.latency = started.elapsed();
        end
    }
}

async fn model_call(gateway: Option<&Arc<Gateway>>, name: &str, stream: bool, n: usize) -> CallEnd {
    let Some(gateway) = gateway else { return CallEnd::default() };
    let body = json!({
        "model": name, "stream": stream, "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("drill call {n}: say something")}],
    });
    let Ok(req) = ChatRequest::from_value(&body) else { return CallEnd::default() };
    let ctx = CallContext::default();
    let mut end = CallEnd { ended: true, ..CallEnd::default() };
    if !stream {
        match gateway.complete(&req, &ctx).await {
            Ok(done) => {
                end.answered = true;
                end.fallback = done.fallback;
                end.well_formed = done.answer.content.as_deref().is_some_and(|c| !c.is_empty())
                    || !done.answer.tool_calls.is_empty();
            }
            Err(e) => {
                end.class = Some(e.class);
                end.well_formed = true;
            }
        }
        return end;
    }
    // A stream ends with `[DONE]` or with an error event naming the failure, never
    // just stops; nothing comes after either.
    match gateway.stream(req, ctx).await {
        Ok(mut s) => {
            end.fallback = s.fallback;
            let mut frames = Vec::new();
            while let Some(frame) = s.body.recv().await {
                frames.push(frame);
            }
            let last = frames.last().map(|f| String::from_utf8_lossy(f).into_owned()).unwrap_or_default();
            let done = last.contains("[DONE]");
            let error = last.contains("\"error\"");
            end.answered = done;
            end.class = (!done).then_some(ErrorClass::ServerError);
            end.well_formed = done || error;
        }
        Err(e) => {
            end.class = Some(e.class);
            end.well_formed = true;
        }
    }
    end
}

async fn tool_call(invoker: &Invoker, name: &str, params: Value, bound: Duration) -> CallEnd {
    let call = Call {
        tool: name.to_owned(),
        params,
        key: None,
        wait: Some(bound),
        caller: Some("drill".to_owned()),
        minted: false,
    };
    let mut end = CallEnd::default();
    for round in 0..2 {
        let outcome = invoker.invoke(call.clone()).await;
        end.ended = true;
        end.well_formed = true;
        end.agent_retried = round == 1;
        match outcome {
            Ok(Outcome::Completed { .. }) => {
                end.answered = true;
                end.class = None;
                return end;
            }
            Ok(Outcome::WaitingApproval { .. }) => {
                end.waiting = true;
                return end;
            }
            Ok(Outcome::Escalated { class, ticket_id, .. } | Outcome::Failed { class, ticket_id, .. }) => {
                end.class = Some(class);
                end.ticket |= ticket_id.is_some();
            }
            Ok(Outcome::Running { .. }) => {
                end.ended = false;
                return end;
            }
            Err(e) => {
                end.class = Some(keel_core::Classified::class(&e));
                end.error = Some(e.to_string());
                return end;
            }
        }
    }
    end
}
