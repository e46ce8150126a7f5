//! keel-runtime: the targets Keel calls on a user's behalf — command and HTTP tools —
//! the plans that sequence them, `keel.toml`, which declares both with their
//! policies, and [`invoke`], one tool call for an external agent (HTTP or MCP).
//!
//! A [`Config`] is loaded in two stages: raw serde values (unknown keys are errors,
//! every error names the key and line), then validated (references resolved, secrets
//! read from the environment, parameter schemas compiled). A [`Tool`] is called with
//! JSON parameters that are checked against its schema before anything runs, and
//! answers with JSON or a classified [`keel_core::Failure`].

pub mod agent;
pub mod config;
pub mod inbox;
pub mod invoke;
pub mod mcp;
pub mod plan;
pub mod runner;
pub mod template;
pub mod tool;

pub use config::{Config, ConfigError, ConfigErrors, Mode};
pub use invoke::{Call, InvokeError, Invoker, Outcome};
pub use plan::{Plan, PlanError, PlanStep};
pub use runner::{RunStatus, Runner};
pub use tool::{Charged, Tool, ToolCost, ToolKind};
