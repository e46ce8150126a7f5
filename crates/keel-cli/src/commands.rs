//! What each command does. Every command returns its exit code or an error for the
//! single report path in `lib.rs`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_core::{Classified, Clock, ErrorClass, TokioClock};
use keel_journal::Journal;
use keel_runtime::inbox::{self, Guidance};
use keel_runtime::runner::{NullObserver, Observer};
use keel_runtime::{Config, Plan, RunStatus, Runner};
use serde_json::{Value, json};

use crate::cli::{
    ApprovalsAction, Cli, Command, ConfigAction, ExportWhat, RunsAction, StatsWhat, TicketAction,
    TicketsAction,
};
use crate::render::{Live, eprint, print};

/// A command line that makes no sense (bad JSON in `--params`...).
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl Classified for UsageError {
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidRequest
    }
}

fn emit_json(value: &Value) {
    print(&serde_json::to_string_pretty(value).unwrap_or_default());
}

struct Ctx {
    config: Arc<Config>,
    journal: Arc<dyn Journal>,
    clock: Arc<dyn Clock>,
    json: bool,
}

async fn open(cli: &Cli) -> Result<Ctx> {
    let config = Config::load(&cli.config)?;
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let journal = keel_journal::open(&config.storage_url, config.journal_options(clock.clone()))
        .await
        .context("cannot open the journal")?;
    Ok(Ctx { config: Arc::new(config), journal, clock, json: cli.json })
}

/// Like [`open`], with `[mcp_servers]` started and their tools added: for the
/// commands that call tools.
async fn open_tools(cli: &Cli) -> Result<Ctx> {
    open(cli).await?.with_tools().await
}

impl Ctx {
    /// This context with `[mcp_servers]` started and their tools added.
    async fn with_tools(self) -> Result<Ctx> {
        if self.config.mcp_servers.is_empty() {
            return Ok(self);
        }
        let mut config = (*self.config).clone();
        config.connect_mcp().await?;
        Ok(Ctx { config: Arc::new(config), ..self })
    }

    async fn runner(&self) -> Result<Runner> {
        self.runner_alerting(None, None).await
    }

    /// A runner whose policy events also reach `alerts` and Sentry.
    async fn runner_alerting(
        &self,
        alerts: Option<Arc<dyn keel_core::EventSink>>,
        sentry: Option<Arc<keel_telemetry::sentry::Reporter>>,
    ) -> Result<Runner> {
        let view: Arc<dyn Observer> =
            if self.json { Arc::new(NullObserver) } else { Arc::new(Live::new(false)) };
        let mut observers = vec![view];
        if let Some(sink) = alerts {
            observers.push(Arc::new(keel_runtime::runner::PolicySink(sink)));
        }
        if let Some(reporter) = sentry {
            observers.push(Arc::new(keel_runtime::runner::SentryObserver(reporter)));
        }
        let observer: Arc<dyn Observer> = Arc::new(keel_runtime::runner::Observers(observers));
        Ok(Runner::new(self.config.clone(), self.journal.clone(), self.clock.clone(), observer).await?)
    }
}

/// Runs one command.
pub(crate) async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Config { action: ConfigAction::Schema } => {
            emit_json(&Config::schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { action: ConfigAction::Check } => {
            let mut config = Config::load(&cli.config)?;
            // A server's tools are known once it is started: the check starts them.
            config.connect_mcp().await?;
            warn_all(&config);
            // Which sandbox each code tool's programs run in on this machine.
            let sandboxes: Vec<(&String, String)> = config
                .tools
                .iter()
                .filter_map(|(name, t)| match &t.kind {
                    keel_runtime::tool::ToolKind::Code(c) => Some((name, c.sandbox.describe())),
                    _ => None,
                })
                .collect();
            if cli.json {
                let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
                let isolation: serde_json::Map<String, serde_json::Value> =
                    sandboxes.iter().map(|(n, d)| ((*n).clone(), json!(d))).collect();
                emit_json(&json!({
                    "ok": true,
                    "tools": config.tools.keys().collect::<Vec<_>>(),
                    "warnings": warnings,
                    "code_isolation": isolation,
                }));
            } else {
                print(&format!("{}: ok ({} tools)", cli.config.display(), config.tools.len()));
                for (name, sandbox) in &sandboxes {
                    print(&format!("  code tool `{name}`: isolation {sandbox}"));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { plan, wait } => {
            // Check the config and the plan before touching anything.
            let config = Config::load(&cli.config)?;
            let p = Plan::load(plan)?;
            if config.mcp_servers.is_empty() {
                p.check(&config, plan)?;
            }
            // `keel run` writes no log (its output is the live view); its spans are
            // exported when `[telemetry.otlp]` is set.
            let traces = init_tracing(None, &config.telemetry)?;
            let ctx = open_tools(&cli).await?;
            // With the MCP servers' tools known.
            p.check(&ctx.config, plan)?;
            // Alerts a run's failures open are sent before `keel run` exits, and
            // recorded in the journal (the inbox's incidents); an incident already
            // open there is not paged again. Their resolution is a long-running
            // process's (`keel serve`).
            let alerts = if ctx.config.alerts.is_enabled() {
                let log = Arc::new(keel_server::api::incidents::JournalLog(ctx.journal.clone()));
                let open = keel_server::api::incidents::open_before(&*ctx.journal).await;
                Some(keel_telemetry::alert::spawn_logged(
                    ctx.config.alerts.clone(),
                    ctx.clock.clone(),
                    log,
                    open,
                ))
            } else {
                None
            };
            let sink = alerts.as_ref().map(|(router, _)| router.clone() as Arc<dyn keel_core::EventSink>);
            let sentry = match &ctx.config.telemetry.sentry {
                Some(s) => Some(keel_telemetry::sentry::Reporter::start(s)?),
                None => None,
            };
            let runner = ctx.runner_alerting(sink, sentry.clone()).await?;
            let run_id = runner.create(&p).await?;
            if !ctx.json {
                print(&format!(
                    "run {run_id}: {} ({} steps)",
                    p.name.as_deref().unwrap_or("plan"),
                    p.steps.len()
                ));
            }
            let code = drive(&ctx, &runner, &run_id, *wait, Duration::ZERO).await;
            if let Some((_, tasks)) = alerts {
                tasks.shutdown(Duration::from_secs(10)).await;
            }
            if let Some(sentry) = sentry {
                sentry.shutdown(Duration::from_secs(5)).await;
            }
            flush_traces(traces).await;
            code
        }
        Command::Agent { task, model, max_turns, tools, result_schema, wait } => {
            let config = Config::load(&cli.config)?;
            let result_schema = match result_schema {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| UsageError(format!("--result-schema {}: {e}", path.display())))?;
                    let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        UsageError(format!("--result-schema {}: not JSON: {e}", path.display()))
                    })?;
                    Some(schema)
                }
                None => None,
            };
            let traces = init_tracing(None, &config.telemetry)?;
            let ctx = open_tools(&cli).await?;
            let runner = ctx.runner().await?;
            let task = keel_runtime::agent::AgentTask {
                task: task.clone(),
                model: model.clone(),
                max_turns: *max_turns,
                tools: tools.clone(),
                system: None,
                result_schema,
            };
            let run_id = runner.create_agent(&task, None).await.map_err(|e| UsageError(e.to_string()))?;
            if !ctx.json {
                print(&format!("run {run_id}: agent"));
            }
            let code = drive(&ctx, &runner, &run_id, *wait, Duration::ZERO).await;
            flush_traces(traces).await;
            code
        }
        Command::Export { what: ExportWhat::Corrections } => {
            let ctx = open(&cli).await?;
            let (pairs, _) = keel_runtime::agent::stats::scan(&*ctx.journal).await?;
            for p in pairs {
                print(&p.to_string());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { what: StatsWhat::Corrections } => {
            let ctx = open(&cli).await?;
            let (_, stats) = keel_runtime::agent::stats::scan(&*ctx.journal).await?;
            if ctx.json {
                emit_json(&serde_json::to_value(&stats).unwrap_or_default());
            } else {
                print(stats.render().trim_end());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { listen, log_format } => serve(&cli, listen.as_deref(), *log_format).await,
        Command::Mcp => mcp(&cli).await,
        Command::Drill { calls, rate, faults, targets, seed, concurrency, latency, html } => {
            let mut opts = keel_server::drill::DrillOptions {
                calls: *calls,
                rate: *rate,
                targets: (!targets.is_empty()).then(|| targets.clone()),
                seed: *seed,
                concurrency: *concurrency,
                ..Default::default()
            };
            if !faults.is_empty() {
                opts.faults = faults
                    .iter()
                    .map(|f| {
                        keel_server::drill::DrillFault::parse(f.trim())
                            .ok_or_else(|| anyhow::anyhow!("--faults: no fault named `{f}`"))
                    })
                    .collect::<Result<_>>()?;
            }
            opts.latency = humantime::parse_duration(latency)
                .map_err(|e| anyhow::anyhow!("--latency `{latency}`: {e}"))?;
            drill(&cli, opts, html.as_deref()).await
        }
        Command::Runs { action } => runs(&cli, action).await,
        Command::Approvals { action } => approvals(&cli, action).await,
        Command::Tickets { action } => tickets(&cli, action).await,
    }
}

/// Prints the config's warnings (dangerous but valid settings) to stderr.
fn warn_all(config: &Config) {
    for w in &config.warnings {
        eprint(&format!("keel: warning: {w}"));
    }
}

/// The only tracing subscriber: `keel serve`'s log on stderr (`log`), filtered by
/// `RUST_LOG` (default `info`), and the OTLP exporter when `[telemetry.otlp]` is set
/// (its own filter, `info`: `RUST_LOG` quietens the log, not the traces).
fn init_tracing(log: Option<crate::cli::LogFormat>, telemetry: &keel_telemetry::Telemetry) -> Result<Logs> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let mut log_guard = None;
    let fmt = match log {
        None => None,
        Some(format) => {
            let filter = match std::env::var("RUST_LOG") {
                Ok(spec) if !spec.trim().is_empty() => {
                    EnvFilter::try_new(&spec).map_err(|e| UsageError(format!("RUST_LOG=`{spec}`: {e}")))?
                }
                _ => EnvFilter::new("info"),
            };
            // Written by a thread of its own through a bounded queue, lossy: a reader
            // of stderr that stalls (a full pipe, a stopped log shipper) costs lines,
            // never a request.
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(true)
                .thread_name("keel-log")
                .finish(std::io::stderr());
            log_guard = Some(guard);
            let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false);
            Some(match format {
                crate::cli::LogFormat::Text => layer.with_filter(filter).boxed(),
                crate::cli::LogFormat::Json => layer.json().flatten_event(true).with_filter(filter).boxed(),
            })
        }
    };
    let (otel, guard) = match &telemetry.otlp {
        None => (None, None),
        Some(otlp) => {
            let (layer, guard) = keel_telemetry::otlp::layer(otlp, &telemetry.service_name)?;
            (Some(layer.with_filter(EnvFilter::new("info"))), Some(guard))
        }
    };
    if fmt.is_none() && otel.is_none() {
        return Ok(Logs::default());
    }
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log: {e}"))?;
    Ok(Logs { traces: guard, log: log_guard })
}

/// What must outlive the command for its log and traces to be written out.
#[derive(Default)]
struct Logs {
    traces: Option<keel_telemetry::TraceGuard>,
    /// Writes out the log lines still queued when dropped (at the command's end).
    log: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Exports the spans still queued (bounded: a collector that is down costs at most
/// this wait at exit).
async fn flush_traces(logs: Logs) {
    let Logs { traces, log } = logs;
    if let Some(guard) = traces {
        if let Err(e) = guard.shutdown(Duration::from_secs(5)).await {
            eprint(&format!("keel: warning: exporting traces at exit: {e}"));
        }
    }
    // The log last, so that what the exporter said is in it (a stalled reader costs
    // at most the worker's own bounded wait).
    drop(log);
}

/// `keel serve`: until SIGINT or SIGTERM, then a graceful stop.
async fn serve(cli: &Cli, listen: Option<&str>, log: crate::cli::LogFormat) -> Result<ExitCode> {
    // The config first: the log and the exporter depend on it.
    let config = Config::load(&cli.config)?;
    let traces = init_tracing(Some(log), &config.telemetry)?;
    let ctx = open_tools(cli).await?;
    warn_all(&ctx.config);
    if ctx.config.keys.is_empty() {
        return Err(UsageError(
            "keel serve needs at least one API key: add [[server.keys]] with name, key_env and role".into(),
        )
        .into());
    }
    let addr = listen.unwrap_or(&ctx.config.server.listen).to_owned();
    let state = keel_server::state(ctx.config.clone(), ctx.journal.clone(), ctx.clock.clone()).await?;
    let listener =
        tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let scheme = if ctx.config.server_tls.is_some() { "https" } else { "http" };
    print(&format!("keel serve listening on {scheme}://{}", listener.local_addr()?));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    keel_server::serve(state, listener, shutdown, Duration::from_secs(30)).await?;
    flush_traces(traces).await;
    print("keel serve stopped");
    Ok(ExitCode::SUCCESS)
}

/// `keel drill`: the drill on keel.toml's targets, a progress bar on stderr, the
/// report as a table (or `--json`), and as HTML when asked.
async fn drill(cli: &Cli, opts: keel_server::drill::DrillOptions, html: Option<&Path>) -> Result<ExitCode> {
    let config = Config::load(&cli.config)?;
    let total = (opts.calls * keel_server::drill::drillable(&config, &opts)) as u64;
    let bar = if cli.json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} calls {elapsed}") {
            bar.set_style(style);
        }
        bar
    };
    let report = keel_server::drill::run(&config, &opts, &|| bar.inc(1)).await?;
    bar.finish_and_clear();
    if let Some(path) = html {
        std::fs::write(path, report.html()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if cli.json {
        emit_json(&serde_json::to_value(&report)?);
    } else {
        print(&report.table());
        if let Some(path) = html {
            print(&format!("report: {}", path.display()));
        }
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `keel mcp`: the MCP server on stdio, until stdin closes. Nothing else is written
/// to stdout (it is the protocol's).
async fn mcp(cli: &Cli) -> Result<ExitCode> {
    let ctx = open_tools(cli).await?;
    let observer: Arc<dyn Observer> = Arc::new(NullObserver);
    let runner =
        Arc::new(Runner::new(ctx.config.clone(), ctx.journal.clone(), ctx.clock.clone(), observer).await?);
    let invoker = keel_runtime::Invoker::new(runner.clone(), Arc::default(), ctx.clock.clone());
    let server = keel_server::mcp::McpServer::new(invoker).for_caller("stdio");
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    keel_server::mcp::serve_stdio(server, stdin, tokio::io::stdout()).await.context("MCP on stdio")?;
    runner.flush().await?;
    Ok(ExitCode::SUCCESS)
}

/// Drives a run, waiting for people where asked, and reports where it stands.
async fn drive(ctx: &Ctx, runner: &Runner, run_id: &str, wait: bool, patience: Duration) -> Result<ExitCode> {
    let interactive = !ctx.json && !wait && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    loop {
        let status = runner.drive_when_free(run_id, patience).await?;
        // An agent run's answer, or its partial result and why it stopped.
        let result = runner.snapshot(run_id).await.ok().and_then(|snap| {
            snap.steps
                .iter()
                .rev()
                .find(|s| s.target == keel_runtime::agent::RESULT_TARGET && s.name == "result")
                .and_then(|s| s.output.clone())
        });
        match &status {
            RunStatus::WaitingApproval { approval_id } if wait => {
                wait_for_decision(ctx, approval_id).await?;
            }
            RunStatus::WaitingApproval { approval_id } if interactive => {
                if !prompt_decision(ctx, approval_id).await? {
                    return Ok(finish(ctx, run_id, &status, result.as_ref()));
                }
            }
            _ => return Ok(finish(ctx, run_id, &status, result.as_ref())),
        }
    }
}

fn finish(ctx: &Ctx, run_id: &str, status: &RunStatus, result: Option<&serde_json::Value>) -> ExitCode {
    if ctx.json {
        let mut v = serde_json::to_value(status).unwrap_or_default();
        v["run_id"] = json!(run_id);
        v["exit_code"] = json!(status.exit_code());
        if let Some(r) = result {
            v["result"] = r.clone();
        }
        emit_json(&v);
    } else {
        if let Some(r) = result {
            match r["answer"].as_str() {
                Some(answer) => print(answer),
                None => {
                    if let Some(text) = r["last_text"].as_str() {
                        print(&format!("partial result: {text}"));
                    }
                    let outputs = r["tool_outputs"].as_object().map_or(0, |o| o.len());
                    print(&format!("stopped after {} turns ({outputs} tool outputs kept)", r["turns"]));
                }
            }
        }
        let text = match status {
            RunStatus::Completed => "completed".to_owned(),
            RunStatus::Failed { class, message } => format!("failed: {class}: {message}"),
            RunStatus::WaitingApproval { approval_id } => format!("waiting for approval {approval_id}"),
            RunStatus::Escalated { ticket_id } => format!("escalated: ticket {ticket_id}"),
            RunStatus::TimedOut => "timed out".to_owned(),
            RunStatus::Cancelled => "cancelled".to_owned(),
        };
        print(&format!("run {run_id}: {text}"));
        if !status.is_final() {
            print(&format!("  continue with: keel runs resume {run_id}"));
        }
    }
    ExitCode::from(status.exit_code())
}

/// Polls the journal until the approval is decided or has expired.
async fn wait_for_decision(ctx: &Ctx, approval_id: &str) -> Result<()> {
    if !ctx.json {
        print(&format!("waiting for a decision on {approval_id}…"));
    }
    loop {
        let item = inbox::approval(&*ctx.journal, approval_id).await?;
        let now_ms =
            ctx.clock.wall().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        if item.approval.status != "pending" || item.approval.expires_at_ms <= now_ms {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asks on the terminal; `false` leaves the approval waiting.
async fn prompt_decision(ctx: &Ctx, approval_id: &str) -> Result<bool> {
    let item = inbox::approval(&*ctx.journal, approval_id).await?;
    let params = item.step.as_ref().map(|s| s.input.to_string()).unwrap_or_default();
    print(&format!(
        "approve {} with {params}? [y]es / [n]o / [enter] leave it waiting: ",
        item.approval.tool
    ));
    let mut answer = String::new();
    let stdin = tokio::io::stdin();
    let mut reader = tokio::io::BufReader::new(stdin);
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut answer).await?;
    let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    match answer.trim() {
        "y" | "yes" => {
            inbox::decide(&*ctx.journal, approval_id, true, &by, ctx.clock.wall()).await.map(|_| true)
        }
        "n" | "no" => {
            inbox::decide(&*ctx.journal, approval_id, false, &by, ctx.clock.wall()).await.map(|_| true)
        }
        _ => Ok(false),
    }
    .map_err(Into::into)
}

fn ago(now_ms: i64, at_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn now_ms(ctx: &Ctx) -> i64 {
    ctx.clock.wall().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn runs(cli: &Cli, action: &RunsAction) -> Result<ExitCode> {
    // Resuming and undoing call tools: those of MCP servers too.
    let ctx = match action {
        RunsAction::Resume { .. } | RunsAction::Undo { .. } => open_tools(cli).await?,
        _ => open(cli).await?,
    };
    match action {
        RunsAction::List { limit, state } => {
            let state = match state.as_deref() {
                None => None,
                Some(st) => Some(
                    keel_journal::RunState::parse(st)
                        .ok_or_else(|| UsageError(format!("--state: no run state `{st}`")))?,
                ),
            };
            // One row more than asked: the gateway's own record is not a run.
            let page = keel_journal::RunPage {
                state,
                before: None,
                limit: limit.saturating_add(1).min(keel_journal::RunPage::MAX),
            };
            let mut rows = ctx.journal.list_runs(&page).await?;
            rows.retain(|r| !keel_server::api::runs::is_internal(&r.run_id));
            rows.truncate(*limit as usize);
            if ctx.json {
                emit_json(&serde_json::to_value(&rows)?);
            } else {
                let now = now_ms(&ctx);
                for r in rows {
                    print(&format!(
                        "{}  {:<16} {:<20} {}",
                        r.run_id,
                        r.state.as_str(),
                        r.name,
                        ago(now, r.updated_at_ms)
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsAction::Show { id } => {
            let export = ctx
                .journal
                .export_run(id)
                .await?
                .ok_or_else(|| keel_runtime::runner::Error::UnknownRun(id.clone()))?;
            if ctx.json {
                emit_json(&serde_json::to_value(&export)?);
                return Ok(ExitCode::SUCCESS);
            }
            let run = &export.state.run;
            print(&format!("run {}  {}  {}", run.run_id, run.name, run.state.as_str()));
            if let Some(r) = &run.reason {
                print(&format!("  reason: {r}"));
            }
            print("steps:");
            for s in &export.state.steps {
                let detail = match (&s.error_class, &s.message) {
                    (Some(c), Some(m)) => format!("  {c}: {m}"),
                    _ => String::new(),
                };
                print(&format!("  {:>2}. {:<16} {:<12} {}{detail}", s.step, s.name, s.target, s.status));
            }
            print("timeline:");
            let start = export.events.first().map_or(0, |e| e.recorded_at_ms);
            for e in &export.events {
                if let Some(what) = crate::render::describe(&e.event) {
                    let t = format!("+{:.3}s", (e.recorded_at_ms - start) as f64 / 1000.0);
                    print(&format!("  {t:>9}  {what}"));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsAction::Resume { id, wait } => {
            let runner = ctx.runner().await?;
            let patience = ctx.config.run.lease + Duration::from_secs(2);
            drive(&ctx, &runner, id, *wait, patience).await
        }
        RunsAction::Undo { id, step } => {
            let runner = ctx.runner().await?;
            let output = runner.undo(id, step).await?;
            if ctx.json {
                emit_json(&json!({"run_id": id, "step": step, "undone": true, "output": output}));
            } else {
                print(&format!("step {step} of run {id} undone: {output}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsAction::Cancel { id } => {
            if keel_server::api::runs::is_internal(id) {
                return Err(UsageError(format!("`{id}` is the model gateway's journal, not a run")).into());
            }
            let runner = ctx.runner().await?;
            runner.cancel(id, &std::env::var("USER").unwrap_or_else(|_| "cli".into())).await?;
            if ctx.json {
                emit_json(&json!({"run_id": id, "status": "cancelled"}));
            } else {
                print(&format!("run {id}: cancelled"));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn approvals(cli: &Cli, action: &ApprovalsAction) -> Result<ExitCode> {
    let ctx = open(cli).await?;
    let show = |item: &inbox::ApprovalItem| {
        if ctx.json {
            emit_json(&serde_json::to_value(item).unwrap_or_default());
        } else {
            let a = &item.approval;
            print(&format!(
                "approval {}  {}  tool {}  run {} ({})",
                a.approval_id, a.status, a.tool, a.run_id, item.run.name
            ));
            if let Some(s) = &item.step {
                print(&format!("  step {}: {}", s.name, s.input));
            }
            print(&format!(
                "  digest {}  expires in {}s",
                a.args_digest,
                (a.expires_at_ms - now_ms(&ctx)) / 1000
            ));
            if let Some(by) = &a.decided_by {
                print(&format!("  decided by {by}"));
            }
        }
    };
    match action {
        ApprovalsAction::List => {
            let items = inbox::approvals(&*ctx.journal).await?;
            if ctx.json {
                emit_json(&serde_json::to_value(&items)?);
            } else {
                for i in items {
                    let a = &i.approval;
                    let args = i.step.as_ref().map(|s| s.input.to_string()).unwrap_or_default();
                    print(&format!(
                        "{}  {:<8} {:<12} {}  run {}",
                        a.approval_id, a.status, a.tool, args, a.run_id
                    ));
                }
            }
        }
        ApprovalsAction::Show { id } => show(&inbox::approval(&*ctx.journal, id).await?),
        ApprovalsAction::Approve { id, by } => {
            show(&inbox::decide(&*ctx.journal, id, true, &by.by, ctx.clock.wall()).await?)
        }
        ApprovalsAction::Reject { id, by } => {
            show(&inbox::decide(&*ctx.journal, id, false, &by.by, ctx.clock.wall()).await?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tickets(cli: &Cli, action: &TicketsAction) -> Result<ExitCode> {
    let ctx = open(cli).await?;
    let show = |item: &inbox::TicketItem| {
        if ctx.json {
            emit_json(&serde_json::to_value(item).unwrap_or_default());
        } else {
            let t = &item.ticket;
            print(&format!(
                "ticket {}  {}  {}  run {} ({})",
                t.ticket_id, t.status, t.class, t.run_id, item.run.name
            ));
            print(&format!("  {}", t.summary));
            print(&format!("  context: {}", serde_json::to_string_pretty(&t.context).unwrap_or_default()));
            if let Some(r) = &t.resolution {
                print(&format!("  resolution: {r} by {}", t.resolved_by.as_deref().unwrap_or("?")));
            }
        }
    };
    match action {
        TicketsAction::List => {
            let items = inbox::tickets(&*ctx.journal).await?;
            if ctx.json {
                emit_json(&serde_json::to_value(&items)?);
            } else {
                for i in items {
                    let t = &i.ticket;
                    print(&format!("{}  {:<8} {:<16} {}", t.ticket_id, t.status, t.class, t.summary));
                }
            }
        }
        TicketsAction::Show { id } => show(&inbox::ticket(&*ctx.journal, id).await?),
        TicketsAction::Resolve { id, action, params, by } => {
            let guidance = match action {
                TicketAction::Skip => Guidance::Skip,
                TicketAction::Abort => Guidance::Abort,
                TicketAction::Retry => Guidance::Retry {
                    params: params
                        .as_deref()
                        .map(serde_json::from_str::<Value>)
                        .transpose()
                        .map_err(|e| UsageError(format!("--params is not JSON: {e}")))?,
                },
            };
            let item = inbox::resolve(&*ctx.journal, id, &guidance, &by.by).await?;
            if ctx.json {
                show(&item);
            } else {
                let action = item.ticket.resolution.as_ref().map(ToString::to_string).unwrap_or_default();
                print(&format!("ticket {id} resolved by {}: {action}", by.by));
                print(&format!("  continue with: keel runs resume {}", item.run.run_id));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
