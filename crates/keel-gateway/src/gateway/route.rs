//! Routing: where a call goes after a model's final failure, by class
//! (`context_overflow` → `context_fallback`, `refusal` → `content_fallback`, a class in
//! `policy.fallback.on` → the next model of the chain), and the error the agent sees
//! when no model answered: the **first** failure's class, every failure told.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_core::event::{Event, emit};
use keel_core::{CallError, Classified, Disposition, ErrorClass, ErrorKind, Failure};
use tracing::Instrument;

use super::{Completion, Gateway, Model};
use crate::charges::Charges;
use crate::error::GatewayError;
use crate::journal::ModelFailure;
use crate::metrics::bump;
use crate::trace;
use crate::wire::{ChatRequest, ParsedAnswer};

/// Why one model could not answer: the failure and, for an invalid answer, the answer.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub(crate) failure: Failure,
    pub(crate) answer: Option<ParsedAnswer>,
}

impl From<Failure> for AttemptError {
    fn from(failure: Failure) -> Self {
        Self { failure, answer: None }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.failure.message)
    }
}

impl Classified for AttemptError {
    fn class(&self) -> ErrorClass {
        self.failure.class
    }

    fn retry_after(&self) -> Option<Duration> {
        self.failure.retry_after
    }
}

/// A model's final failure after its pipeline: the failure, the attempts it took and
/// the rejected answer, if it was one.
pub(crate) fn final_failure(e: CallError<AttemptError>) -> (Failure, u32, Option<ParsedAnswer>) {
    let attempts = e.attempts;
    let mut message = match &e.kind {
        ErrorKind::Target(a) => a.failure.message.clone(),
        other => other.to_string(),
    };
    if let Some(reason) = &e.refusal {
        message.push_str(&format!(" (not retried: {reason})"));
    }
    match e.kind {
        ErrorKind::Target(a) => {
            (Failure { class: e.class, message, retry_after: a.failure.retry_after }, attempts, a.answer)
        }
        _ => (Failure::new(e.class, message), attempts, None),
    }
}

/// Where a call goes next after a model's final failure.
pub(crate) struct Route {
    pub(crate) primary: Arc<Model>,
    visited: Vec<Arc<str>>,
    pub(crate) failures: Vec<ModelFailure>,
    pub(crate) first: Option<Failure>,
    pub(crate) attempts: u32,
}

impl Route {
    pub(crate) fn new(primary: Arc<Model>) -> Self {
        let visited = vec![primary.name.clone()];
        Self { primary, visited, failures: Vec::new(), first: None, attempts: 0 }
    }

    pub(crate) fn failed(&mut self, model: &Model, failure: &Failure, attempts: u32) {
        self.attempts += attempts;
        self.failures.push(ModelFailure {
            model: model.name.to_string(),
            class: failure.class,
            message: failure.message.clone(),
            attempts,
        });
        if self.first.is_none() {
            self.first = Some(failure.clone());
        }
    }

    /// The next model after `model` failed with `class`, if the class allows one.
    pub(crate) fn next(&mut self, gateway: &Gateway, model: &Model, class: ErrorClass) -> Option<Arc<Model>> {
        // Two classes have routes of their own; the rest take the chain if it lists them.
        let candidate = if class == ErrorClass::ContextOverflow {
            model.config.context_fallback.iter().find(|n| self.unvisited(n)).cloned()
        } else if class == ErrorClass::Refusal {
            model.config.content_fallback.iter().find(|n| self.unvisited(n)).cloned()
        } else if model.chain_on.contains(&class) {
            self.next_in_chain()
        } else {
            None
        }?;
        let next = gateway.models.get(candidate.as_str())?.clone();
        self.visited.push(next.name.clone());
        bump(&model.counters.fallbacks_from, 1);
        emit(&*gateway.sink, Event::FallbackTaken { from: model.name.clone(), to: next.name.clone(), class });
        Some(next)
    }

    /// The next unvisited model of the primary's chain (stream rescues use only this).
    pub(crate) fn next_in_chain(&self) -> Option<String> {
        self.primary.config.fallbacks.iter().find(|n| self.unvisited(n)).cloned()
    }

    pub(crate) fn take_chain(
        &mut self,
        gateway: &Gateway,
        from: &Model,
        class: ErrorClass,
    ) -> Option<Arc<Model>> {
        let name = self.next_in_chain()?;
        let next = gateway.models.get(name.as_str())?.clone();
        self.visited.push(next.name.clone());
        bump(&from.counters.fallbacks_from, 1);
        emit(&*gateway.sink, Event::FallbackTaken { from: from.name.clone(), to: next.name.clone(), class });
        Some(next)
    }

    fn unvisited(&self, name: &str) -> bool {
        !self.visited.iter().any(|v| &**v == name)
    }

    /// The error the agent sees: the original failure's class, every failure told.
    pub(crate) fn error(&self) -> GatewayError {
        let first =
            self.first.clone().unwrap_or_else(|| Failure::new(ErrorClass::CircuitOpen, "no model answered"));
        let message = if self.failures.len() <= 1 {
            first.message.clone()
        } else {
            self.failures
                .iter()
                .map(|f| format!("{}: {}", f.model, f.message))
                .collect::<Vec<_>>()
                .join("; then ")
        };
        GatewayError {
            class: first.class,
            message,
            attempts: self.attempts,
            failures: self.failures.clone(),
            retry_after: first.retry_after,
        }
    }
}

impl Gateway {
    pub(super) async fn complete_routed(
        &self,
        primary: Arc<Model>,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(Completion, Route), GatewayError> {
        let mut route = Route::new(primary.clone());
        let mut model = primary;
        let mut from: Option<Arc<str>> = None;
        loop {
            let span = trace::chat_span(&model, from.as_deref());
            match self.answer_on(&model, req, charges).instrument(span.clone()).await {
                Ok((answer, attempts, corrections)) => {
                    trace::answered(&span, attempts);
                    route.attempts += attempts;
                    let usage = answer.summary.usage.unwrap_or_default();
                    let fallback = route.primary.name != model.name;
                    let spent = charges.spent();
                    return Ok((
                        Completion {
                            model: model.name.clone(),
                            body: Bytes::from(answer.body),
                            answer: answer.summary,
                            usage,
                            attempts: route.attempts,
                            fallback,
                            corrections,
                            charged_tokens: spent.usage.total_tokens,
                            charged_cost_micros: spent.cost_micros,
                        },
                        route,
                    ));
                }
                Err((failure, attempts, rejected)) => {
                    route.failed(&model, &failure, attempts);
                    let next = route.next(self, &model, failure.class);
                    let disposition =
                        if next.is_some() { Disposition::Fallback } else { Disposition::Terminal };
                    let breaker = model.pipeline.breaker().map(|b| b.state());
                    trace::failed(&span, &failure, attempts, breaker, disposition);
                    match next {
                        Some(next) => {
                            from = Some(model.name.clone());
                            model = next;
                        }
                        None => {
                            // A refusal with no content fallback: the provider's own
                            // answer (with its reason) goes to the agent unchanged.
                            if let (ErrorClass::Refusal, Some(answer)) = (failure.class, rejected) {
                                let usage = answer.summary.usage.unwrap_or_default();
                                let spent = charges.spent();
                                return Ok((
                                    Completion {
                                        fallback: route.primary.name != model.name,
                                        model: model.name.clone(),
                                        body: Bytes::from(answer.body),
                                        answer: answer.summary,
                                        usage,
                                        attempts: route.attempts,
                                        corrections: 0,
                                        charged_tokens: spent.usage.total_tokens,
                                        charged_cost_micros: spent.cost_micros,
                                    },
                                    route,
                                ));
                            }
                            return Err(route.error());
                        }
                    }
                }
            }
        }
    }
}
