//! The command line, as clap types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Keel: a failure-first runtime for AI agents.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, env = "KEEL_CONFIG", default_value = "keel.toml")]
    pub config: PathBuf,
    /// Print JSON for scripts instead of the human view.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// A command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a plan (TOML, YAML or JSON).
    Run {
        /// The plan's file.
        plan: PathBuf,
        /// Block while a step waits for an approval decided elsewhere.
        #[arg(long)]
        wait: bool,
    },
    /// Run an agent on a task: the model of `[agent]` (or `--model`) calls keel.toml's
    /// tools until it answers, under the run's policies, budget and turn limit; journaled,
    /// so `keel runs resume` carries it on after a crash without asking again.
    Agent {
        /// The task, in words.
        task: String,
        /// The model (a `[models]` name; default `[agent] model`).
        #[arg(long)]
        model: Option<String>,
        /// The most model turns (default `[agent] max_turns`).
        #[arg(long)]
        max_turns: Option<u32>,
        /// The tools offered, comma-separated (default: `[agent] tools`, else all).
        #[arg(long, value_delimiter = ',')]
        tools: Option<Vec<String>>,
        /// The task's check: a JSON Schema file every program's `result` must match (a
        /// result that does not is a `code_error` the model corrects).
        #[arg(long, value_name = "FILE.json")]
        result_schema: Option<std::path::PathBuf>,
        /// Block while a call waits for an approval decided elsewhere.
        #[arg(long)]
        wait: bool,
    },
    /// Serve the HTTP API, the web inbox and /metrics; work runs in the background.
    Serve {
        /// The address to listen on (default: keel.toml's `[server] listen`).
        #[arg(long)]
        listen: Option<String>,
        /// The log on stderr: `text` for people, `json` (one object a line) for
        /// machines. Which lines: `RUST_LOG` (default `info`), e.g.
        /// `RUST_LOG=keel::request=warn,info`.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Serve keel.toml's tools over MCP on stdin/stdout (for an MCP client that starts
    /// Keel as a subprocess); every call runs under its policies and is journaled.
    Mcp,
    /// A failure-injection drill: N synthetic calls per target (http tools and
    /// OpenAI-wire models) with timeouts, 5xx, latency, empty and malformed answers,
    /// cut and stalled streams, and lost responses injected on the wire; reports how
    /// every call ended and checks the invariants (every call ended, no side effect
    /// repeated, retries within policy, answers well-formed). Models are answered by
    /// a synthetic upstream (no provider is called); tools' services are called for
    /// real. On a journal of its own. Exit 1 when an invariant broke.
    Drill {
        /// Calls per target.
        #[arg(long, default_value_t = 20)]
        calls: usize,
        /// The share of requests that get a fault (0–1).
        #[arg(long, default_value_t = 0.3)]
        rate: f64,
        /// The faults drawn from, comma-separated (default: all of timeout,
        /// server_error, latency, empty, malformed, cut, stall, lost_response).
        #[arg(long, value_delimiter = ',')]
        faults: Vec<String>,
        /// Only these tools and models, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// The seed of the draws: the same seed, the same faults.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// How late a `latency` fault answers, e.g. "200ms".
        #[arg(long, default_value = "200ms")]
        latency: String,
        /// Also write the report as an HTML page with plots.
        #[arg(long)]
        html: Option<std::path::PathBuf>,
    },
    /// Runs: list, show, resume, cancel.
    Runs {
        /// What to do.
        #[command(subcommand)]
        action: RunsAction,
    },
    /// Approvals: list, show, approve, reject.
    Approvals {
        /// What to do.
        #[command(subcommand)]
        action: ApprovalsAction,
    },
    /// Tickets (escalations): list, show, resolve.
    Tickets {
        /// What to do.
        #[command(subcommand)]
        action: TicketsAction,
    },
    /// The configuration: check it, or print its JSON Schema.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Export what the journal learned: `corrections` writes failed → fixed program
    /// pairs of agent runs as JSONL.
    Export {
        /// What to export.
        #[command(subcommand)]
        what: ExportWhat,
    },
    /// Statistics from the journal: `corrections` shows, per error kind and strategy,
    /// how often a correction worked and what it cost.
    Stats {
        /// Which statistics.
        #[command(subcommand)]
        what: StatsWhat,
    },
}

/// `keel export ...`.
#[derive(Debug, Subcommand)]
pub enum ExportWhat {
    /// Failed → fixed program pairs of agent runs, one JSON object a line.
    Corrections,
}

/// `keel stats ...`.
#[derive(Debug, Subcommand)]
pub enum StatsWhat {
    /// Per error kind and correction strategy: tries, fixed, tokens.
    Corrections,
}

/// `keel runs ...`.
#[derive(Debug, Subcommand)]
pub enum RunsAction {
    /// List runs, newest first (the most recently active `--limit`, read by an index:
    /// as fast at 100,000 runs as at ten).
    List {
        /// The most runs listed (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only runs in this state (running, waiting_approval, escalated, completed,
        /// failed, cancelled…).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a run's steps and the timeline of its attempts.
    Show {
        /// The run.
        id: String,
    },
    /// Carry a run on (after a crash, an approval or a ticket).
    Resume {
        /// The run.
        id: String,
        /// Block while a step waits for an approval decided elsewhere.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a run.
    Cancel {
        /// The run.
        id: String,
    },
    /// Review-after-act: undo a succeeded step with its tool's undo tool.
    Undo {
        /// The run.
        id: String,
        /// The step's id.
        #[arg(long)]
        step: String,
    },
}

/// Who decides: a name for the journal.
#[derive(Debug, Args)]
pub struct By {
    /// Your name, recorded with the decision.
    #[arg(long, env = "USER", default_value = "cli")]
    pub by: String,
}

/// `keel approvals ...`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsAction {
    /// List approvals, pending first.
    List,
    /// Show an approval with its context.
    Show {
        /// The approval.
        id: String,
    },
    /// Approve.
    Approve {
        /// The approval.
        id: String,
        /// Who decides.
        #[command(flatten)]
        by: By,
    },
    /// Reject.
    Reject {
        /// The approval.
        id: String,
        /// Who decides.
        #[command(flatten)]
        by: By,
    },
}

/// A person's answer to a ticket.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TicketAction {
    /// Run the failing step again (with `--params` to change its parameters).
    Retry,
    /// Skip the failing step and go on.
    Skip,
    /// Stop the run.
    Abort,
}

/// `keel tickets ...`.
#[derive(Debug, Subcommand)]
pub enum TicketsAction {
    /// List tickets, open first.
    List,
    /// Show a ticket with its context package.
    Show {
        /// The ticket.
        id: String,
    },
    /// Answer a ticket.
    Resolve {
        /// The ticket.
        id: String,
        /// What to do.
        #[arg(long, value_enum)]
        action: TicketAction,
        /// New parameters for `retry`, as JSON.
        #[arg(long)]
        params: Option<String>,
        /// Who decides.
        #[command(flatten)]
        by: By,
    },
}

/// `keel config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the configuration; every problem is reported with its line.
    Check,
    /// Print the JSON Schema of keel.toml.
    Schema,
}

/// `keel serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO keel::request: request method=GET ...`.
    Text,
    /// One JSON object a line.
    Json,
}
