//! Admission: a call's first attempt's upper bound reserved on every budget it draws
//! on (its API key's, its run's, the caller's run scope), then counted as a turn of
//! its run under the run's loop guard. The accounts are kept per key and per run,
//! bounded in number.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use keel_core::{Budget, BudgetKind, CallSignature, ErrorClass, LoopGuard};

use super::{CallContext, Gateway, Model};
use crate::charges::{Charges, request_estimate};
use crate::error::GatewayError;
use crate::wire::ChatRequest;

/// What an admission is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A model turn: bounded at the dearest model of its fallback routes, a turn of
    /// its run (the loop guard).
    Turn,
    /// A call on the named model only that is not a turn (embeddings).
    Single,
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
pub(crate) struct Accounts {
    pub(super) keys: Mutex<HashMap<String, Arc<Budget>>>,
    pub(super) runs: Mutex<HashMap<String, (u64, Arc<RunAccount>)>>,
    pub(super) created: std::sync::atomic::AtomicU64,
}

impl Gateway {
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
}
