//! Tools: the targets Keel calls for an agent or a plan — a local command, an HTTP
//! endpoint or sandboxed model-written code — with parameters checked against the
//! tool's JSON Schema before any call.

pub mod code;
pub(crate) mod command;
pub mod fallback;
pub(crate) mod http;
#[cfg(test)]
mod tests;

pub use code::{CodeTool, code_error_kind};
pub use command::{CommandTool, INHERITED_ENV};
pub use fallback::{ResultCache, ToolFallback};
pub use http::HttpTool;

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use keel_core::{BudgetKind, Clock, ErrorClass, Failure, PolicyConfig, Reservation, RunScope};
use serde_json::Value;

use crate::config::{ApprovalRule, FixedApproval, Mode};

/// What one call of a tool costs (micro-dollars), from `cost = { ... }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCost {
    /// Charged for every attempt, failed ones included.
    pub per_call_micros: u64,
    /// A field of the answer (`a.b.c`) holding the call's cost in dollars.
    pub from_field: Option<String>,
    /// The most one call can cost: reserved before it.
    pub max_micros: u64,
}

impl ToolCost {
    /// What an attempt that ended with `result` is charged: the answer's own field
    /// (bounded by nothing: it happened), else the per-call price, else the bound — an
    /// unknown cost is never counted as zero.
    pub fn actual(&self, result: &Result<Value, Failure>) -> u64 {
        let reported = match (result, &self.from_field) {
            (Ok(v), Some(field)) => crate::template::lookup(v, field)
                .and_then(Value::as_f64)
                .filter(|usd| usd.is_finite() && *usd >= 0.0)
                .map(keel_core::budget::usd_to_micros),
            _ => None,
        };
        match (reported, &self.from_field, self.per_call_micros) {
            (Some(micros), _, _) => micros,
            // A field was promised and is missing: the most the call could cost.
            (None, Some(_), _) if result.is_ok() => self.max_micros,
            (None, _, per_call) if per_call > 0 => per_call,
            (None, _, _) => self.max_micros,
        }
    }
}

/// One attempt's result and what it was charged.
#[derive(Debug)]
pub struct Charged {
    /// The tool's answer.
    pub result: Result<Value, Failure>,
    /// What the attempt was charged, in micro-dollars.
    pub cost_micros: u64,
}

/// What a tool is.
#[derive(Debug, Clone)]
pub enum ToolKind {
    /// A local program.
    Command(CommandTool),
    /// An HTTP endpoint.
    Http(HttpTool),
    /// Model-written Python in a sandbox.
    Code(CodeTool),
    /// A tool of an MCP server (`[mcp_servers]`).
    Mcp(crate::mcp::McpTool),
}

/// A validated tool from `keel.toml`.
#[derive(Clone)]
pub struct Tool {
    /// Its name.
    pub name: Arc<str>,
    /// What it does.
    pub description: String,
    /// Whether it changes the world.
    pub write: bool,
    /// When a call needs approval.
    pub approval: ApprovalRule,
    /// The tool that undoes it, if any.
    pub undo: Option<String>,
    /// The array parameter holding a batch.
    pub batch_param: Option<String>,
    /// Batches larger than this run a canary first.
    pub canary_above: Option<usize>,
    /// What a call costs, if the tool declares it.
    pub cost: Option<ToolCost>,
    /// What a call falls back to once its attempts failed, if anything.
    pub fallback: Option<ToolFallback>,
    /// Its policy: `[defaults]` with its overrides.
    pub policy: PolicyConfig,
    /// The JSON Schema of its parameters.
    pub params_schema: Option<Value>,
    pub(crate) validator: Option<Arc<jsonschema::Validator>>,
    /// How it is called.
    pub kind: ToolKind,
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.name)
            .field("write", &self.write)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Tool {
    /// Checks `params` against the tool's schema.
    ///
    /// # Errors
    /// `invalid_request`, listing every violation with its JSON path.
    pub fn check_params(&self, params: &Value) -> Result<(), Failure> {
        let Some(v) = &self.validator else { return Ok(()) };
        let problems: Vec<String> = v
            .iter_errors(params)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() { e.to_string() } else { format!("{path}: {e}") }
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorClass::InvalidRequest,
                format!("parameters of `{}` do not match its schema: {}", self.name, problems.join("; ")),
            ))
        }
    }

    /// Whether a call with `params` needs a person's approval in `mode`.
    ///
    /// A rule fails closed: an `above` rule whose parameter is missing or not a JSON
    /// number (`"5000"`, `[5000]`, `null`) cannot be evaluated, so it asks.
    pub fn needs_approval(&self, params: &Value, mode: Mode) -> bool {
        if mode == Mode::Advisory && self.write {
            return true;
        }
        match &self.approval {
            ApprovalRule::Fixed(FixedApproval::Never) => false,
            ApprovalRule::Fixed(FixedApproval::Always) => true,
            ApprovalRule::Above { param, above } => {
                match crate::template::lookup(params, param).and_then(Value::as_f64) {
                    // A threshold that compares with nothing (NaN) asks too.
                    Some(v) => !matches!(v.partial_cmp(above), Some(Ordering::Less | Ordering::Equal)),
                    None => true,
                }
            }
        }
    }

    /// The size of the call's batch, when the tool has a batch parameter.
    pub fn batch_len(&self, params: &Value) -> Option<usize> {
        let p = self.batch_param.as_deref()?;
        crate::template::lookup(params, p).and_then(Value::as_array).map(Vec::len)
    }

    /// Calls the tool once (one attempt) with checked `params`.
    ///
    /// # Errors
    /// A classified [`Failure`].
    ///
    /// # Cancel safety
    /// Dropping the future kills a command's whole process group; an HTTP request
    /// already sent may still take effect (which is why write-like calls carry an
    /// idempotency key).
    pub async fn invoke(&self, params: &Value, clock: &dyn Clock) -> Result<Value, Failure> {
        match &self.kind {
            ToolKind::Command(c) => c.run(params).await,
            ToolKind::Http(h) => Box::pin(h.send(params, clock, None)).await,
            ToolKind::Code(c) => c.run(params).await,
            ToolKind::Mcp(m) => Box::pin(m.call(params, None)).await,
        }
    }

    /// One attempt charged to the cost budgets of the current [`RunScope`] (a run's):
    /// the call's bound is reserved before it — a call that does not fit is refused
    /// with `budget_exceeded` and never runs — and settled from its real cost after.
    /// Returns the result and what was charged (micro-dollars), for the journal.
    ///
    /// A tool without a declared cost is free and charges nothing.
    pub async fn invoke_charged(&self, params: &Value, clock: &dyn Clock, key: &str) -> Charged {
        let Some(cost) = self.cost.as_ref().filter(|c| c.max_micros > 0) else {
            return Charged { result: self.invoke_with_key(params, clock, key).await, cost_micros: 0 };
        };
        let budgets = RunScope::current().map(|s| s.budgets.clone()).unwrap_or_default();
        let mut reserved: Vec<Reservation> = Vec::with_capacity(budgets.len());
        for budget in &budgets {
            match budget.reserve(BudgetKind::CostMicros, cost.max_micros) {
                Ok(r) => reserved.push(r),
                Err(e) => {
                    let message = format!("{e} (before a call of `{}`)", self.name);
                    return Charged {
                        result: Err(Failure::new(ErrorClass::BudgetExceeded, message)),
                        cost_micros: 0,
                    };
                }
            }
        }
        let result = self.invoke_with_key(params, clock, key).await;
        let actual = cost.actual(&result);
        for r in reserved {
            // Past the bound, the budget counts it anyway and admits nothing more.
            let _ = r.settle(actual);
        }
        Charged { result, cost_micros: actual }
    }

    /// Like [`invoke`](Self::invoke), passing an idempotency key to an HTTP tool as the
    /// `Idempotency-Key` header (commands get it as `KEEL_IDEMPOTENCY_KEY`).
    ///
    /// # Errors
    /// A classified [`Failure`].
    pub async fn invoke_with_key(
        &self,
        params: &Value,
        clock: &dyn Clock,
        key: &str,
    ) -> Result<Value, Failure> {
        match &self.kind {
            ToolKind::Command(c) => c.run_with_env(params, &[("KEEL_IDEMPOTENCY_KEY", key)]).await,
            // Boxed: the transport's future is large; kept off the caller's stack.
            ToolKind::Http(h) => Box::pin(h.send(params, clock, Some(key))).await,
            // A program has no effect outside its sandbox: nothing to key.
            ToolKind::Code(c) => c.run(params).await,
            // In `_meta`, where Keel's own MCP server reads it.
            ToolKind::Mcp(m) => Box::pin(m.call(params, Some(key))).await,
        }
    }
}
