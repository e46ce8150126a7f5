//! Fallback chains: when a target cannot answer, ask the next one.
//!
//! An ordered list of alternatives, each a [`Pipeline`] with its own policy. A call
//! goes to the first; when its final failure has a class listed in the chain's
//! [`FallbackConfig`] (an outage, an open breaker, a refusal...), the next alternative
//! is tried, and so on. A class may also have a **route** of its own
//! ([`FallbackChain::with_route`]: a context overflow goes to a larger-context model,
//! a refusal to another provider), tried instead of the chain's next alternative
//! whatever the chain's classes are, once per call. Every move is a `fallback_taken`
//! event, and the answer says which alternative gave it: a fallback is never hidden.
//! When all fail, the error keeps every alternative's failure and is classified by
//! the **first** (the primary's): the fallback's own error never masks the original.

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::class::{Classified, ErrorClass};
use crate::event::{Event, EventSink, NullSink, emit};
use crate::pipeline::{Attempt, CallError, Pipeline};
use crate::policy::FallbackConfig;

/// An answer from a chain, and who gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    /// The answer.
    pub value: T,
    /// The alternative that gave it.
    pub target: Arc<str>,
    /// How many fallbacks were taken before it (0: the primary answered).
    pub index: usize,
}

impl<T> Served<T> {
    /// Whether a fallback gave the answer.
    pub fn fell_back(&self) -> bool {
        self.index > 0
    }
}

/// Every alternative failed; their failures in order.
#[derive(Debug)]
pub struct ChainError<E> {
    /// (alternative, its failure), the primary first.
    pub failures: Vec<(Arc<str>, CallError<E>)>,
}

impl<E> ChainError<E> {
    /// The primary's failure: what originally went wrong.
    pub fn primary(&self) -> Option<&CallError<E>> {
        self.failures.first().map(|(_, e)| e)
    }

    /// The last alternative's failure.
    pub fn last(&self) -> Option<&CallError<E>> {
        self.failures.last().map(|(_, e)| e)
    }
}

impl<E> Classified for ChainError<E> {
    /// The class of the primary's failure: what originally went wrong (DESIGN.md: the
    /// fallback's error never masks the original). [`ChainError::last`] has the rest.
    fn class(&self) -> ErrorClass {
        self.primary().map_or(ErrorClass::CircuitOpen, |e| e.class)
    }
}

impl<E: fmt::Display> fmt::Display for ChainError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (target, e)) in self.failures.iter().enumerate() {
            if n > 0 {
                f.write_str("; then ")?;
            }
            write!(f, "{target}: {e}")?;
        }
        Ok(())
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ChainError<E> {}

/// An ordered list of alternatives.
#[derive(Debug, Clone)]
pub struct FallbackChain {
    alternatives: Vec<Pipeline>,
    routes: Vec<(ErrorClass, Pipeline)>,
    config: FallbackConfig,
    sink: Arc<dyn EventSink>,
}

impl FallbackChain {
    /// A chain trying `alternatives` in order, moving on for `config`'s classes.
    pub fn new(alternatives: Vec<Pipeline>, config: FallbackConfig) -> Self {
        Self { alternatives, routes: Vec::new(), config, sink: Arc::new(NullSink) }
    }

    /// The chain, with a route of its own for failures of `class`: `to` is tried next
    /// (once per call) instead of the chain's next alternative.
    pub fn with_route(mut self, class: ErrorClass, to: Pipeline) -> Self {
        self.routes.push((class, to));
        self
    }

    /// The chain, with `fallback_taken` events going to `sink`.
    pub fn with_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// The alternatives, in order.
    pub fn alternatives(&self) -> &[Pipeline] {
        &self.alternatives
    }

    /// Calls `op(target, attempt)` through each alternative's pipeline in turn.
    ///
    /// # Errors
    /// [`ChainError`] with every alternative's failure, when the last one tried failed
    /// with a class that does not fall back or no alternative is left.
    pub async fn call<T, E, F, Fut>(&self, mut op: F) -> Result<Served<T>, ChainError<E>>
    where
        F: FnMut(&Arc<str>, Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        let mut failures = Vec::new();
        let mut routed = vec![false; self.routes.len()];
        let mut chain = self.alternatives.iter().skip(1);
        let Some(mut pipeline) = self.alternatives.first() else { return Err(ChainError { failures }) };
        loop {
            let target = pipeline.target().clone();
            let class = match pipeline.call(|attempt| op(&target, attempt)).await {
                Ok(value) => return Ok(Served { value, target, index: failures.len() }),
                Err(e) => {
                    let class = e.class;
                    failures.push((target.clone(), e));
                    class
                }
            };
            let route =
                self.routes.iter().zip(routed.iter_mut()).find(|((c, _), used)| *c == class && !**used);
            let next = match route {
                Some(((_, to), used)) => {
                    *used = true;
                    to
                }
                None if self.config.on.contains(&class) => match chain.next() {
                    Some(next) => next,
                    None => break,
                },
                None => break,
            };
            emit(&*self.sink, Event::FallbackTaken { from: target, to: next.target().clone(), class });
            pipeline = next;
        }
        Err(ChainError { failures })
    }
}
