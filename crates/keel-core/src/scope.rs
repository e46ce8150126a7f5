//! The run scope: the deadline, budgets and loop guard that nested calls inherit.
//!
//! A run has a deadline and a budget; every call made on its behalf, however deeply
//! nested (a tool that calls a model that calls a tool), must respect them without
//! each layer passing them down by hand. [`RunScope::run`] makes them current for a
//! future (a tokio task-local); a pipeline reads the current scope, and an inner scope
//! can only tighten the outer one: its deadline is the earlier of the two, its budgets
//! are charged in addition to the outer ones.
//!
//! Task-locals do not cross `tokio::spawn`: a spawned task re-enters the scope with
//! `RunScope::current()` and [`RunScope::run`].

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::budget::Budget;
use crate::loop_guard::LoopGuard;

tokio::task_local! {
    static CURRENT: Arc<RunScope>;
}

/// What nested calls inherit: a deadline, budgets, a loop guard.
#[derive(Debug, Clone, Default)]
pub struct RunScope {
    /// No call made in the scope may run past this.
    pub deadline: Option<Instant>,
    /// Charged for every attempt (and by targets, for tokens and cost).
    pub budgets: Vec<Arc<Budget>>,
    /// Sees every call that has a signature.
    pub loop_guard: Option<Arc<LoopGuard>>,
}

impl RunScope {
    /// An empty scope.
    pub fn new() -> Self {
        Self::default()
    }

    /// The scope with a deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The scope with one more budget.
    pub fn with_budget(mut self, budget: Arc<Budget>) -> Self {
        self.budgets.push(budget);
        self
    }

    /// The scope with a loop guard.
    pub fn with_loop_guard(mut self, guard: Arc<LoopGuard>) -> Self {
        self.loop_guard = Some(guard);
        self
    }

    /// The scope current in this task, if any.
    pub fn current() -> Option<Arc<RunScope>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// The current scope's deadline, if any.
    pub fn current_deadline() -> Option<Instant> {
        CURRENT.try_with(|s| s.deadline).ok().flatten()
    }

    /// Runs `fut` with this scope current, merged into the enclosing one.
    pub async fn run<F: Future>(self, fut: F) -> F::Output {
        let merged = match Self::current() {
            Some(outer) => outer.merge(self),
            None => self,
        };
        CURRENT.scope(Arc::new(merged), fut).await
    }

    fn merge(&self, inner: RunScope) -> RunScope {
        let deadline = match (self.deadline, inner.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A budget already current is not added twice: it would charge every call twice.
        let mut budgets = self.budgets.clone();
        for b in inner.budgets {
            if !budgets.iter().any(|o| Arc::ptr_eq(o, &b)) {
                budgets.push(b);
            }
        }
        RunScope { deadline, budgets, loop_guard: inner.loop_guard.or_else(|| self.loop_guard.clone()) }
    }
}
