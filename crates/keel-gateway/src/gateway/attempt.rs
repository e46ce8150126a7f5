//! One model's attempts: the request's body for its wire, the attempt's charge
//! reserved and armed, the answer read, settled and validated; whole answers under the
//! model's pipeline and its correction rounds.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};

use keel_core::correct::{Rounds, correcting};

use super::{AttemptError, Gateway, Model, final_failure};
use crate::charges::{AttemptCharge, Charges};
use crate::dialect::Wire;
use crate::trace;
use crate::upstream;
use crate::validate;
use crate::wire::{ChatRequest, ParsedAnswer, anthropic, parse_answer};
use keel_core::Failure;

impl Gateway {
    /// One model's answer, under its pipeline and its correction rounds (keel-core's
    /// [`correcting`]: an answer rejected with a correctable class is sent back with
    /// its mistake, `correct` times at most). The answer, the attempts made on the
    /// model, and the rounds; or the final failure, the attempts, and the last answer
    /// rejected (a refusal is passed on as it is when no model can take over).
    #[allow(clippy::result_large_err)] // the rejected answer travels by value, once per round
    pub(super) async fn answer_on(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(ParsedAnswer, u32, u32), (Failure, u32, Option<ParsedAnswer>)> {
        let attempts = AtomicU32::new(0);
        let mut rounds = Rounds::new(model.name.clone(), model.config.correct);
        let answered = correcting(
            &mut rounds,
            &*self.sink,
            Cow::Borrowed(req),
            |req: &Cow<'_, ChatRequest>| {
                let req = req.clone();
                let attempts = &attempts;
                async move {
                    let mut made = 0;
                    let result = model
                        .pipeline
                        .call(|a| {
                            made = a.number;
                            self.attempt(model, &req, charges)
                        })
                        .await;
                    result
                        .map_err(|e| {
                            let (failure, n, rejected) = final_failure(e);
                            attempts.fetch_add(n, Ordering::Relaxed);
                            AttemptError { failure, answer: rejected }
                        })
                        .inspect(|_| {
                            attempts.fetch_add(made, Ordering::Relaxed);
                        })
                }
            },
            |req, e| match e.answer {
                Some(answer) => {
                    let extra = validate::correction(&answer.summary, &e.failure);
                    req.with_appended(&extra).map(Cow::Owned).map_err(AttemptError::from)
                }
                None => Err(e),
            },
        )
        .await;
        match answered {
            Ok(done) => Ok((done.value, attempts.load(Ordering::Relaxed), done.rounds)),
            Err(e) => Err((e.failure, attempts.load(Ordering::Relaxed), e.answer)),
        }
    }

    /// The upstream body for `req` on `model`.
    pub(crate) fn body_for(&self, model: &Model, req: &ChatRequest) -> Result<Vec<u8>, Failure> {
        match model.endpoint.provider.wire() {
            Wire::OpenAi => Ok(req.openai_body(&model.config.model)),
            Wire::Anthropic => {
                anthropic::request_body(req, &model.config.model, model.config.default_max_tokens)
            }
        }
    }

    /// Sends `req` to `model`'s upstream: the start of every attempt, whole or streamed.
    /// The attempt's upper bound is reserved first; it is armed (charged whatever
    /// happens next) once the upstream answered with a success.
    pub(crate) async fn send_to(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, AttemptCharge), AttemptError> {
        let body = self.body_for(model, req)?;
        let mut charge = charges.attempt(model, &body)?;
        let resp = model.endpoint.send(body, &*self.clock).await?;
        charge.arm();
        Ok((resp, charge))
    }

    /// One attempt at a whole answer, charged from its usage (an answer rejected by
    /// validation included).
    async fn attempt(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<ParsedAnswer, AttemptError> {
        let (resp, charge) = self.send_to(model, req, charges).await?;
        let bytes = upstream::read_body(resp.into_body(), &model.endpoint.uri).await?;
        let answer = match model.endpoint.provider.wire() {
            Wire::OpenAi => parse_answer(&bytes, &model.name)?,
            Wire::Anthropic => {
                parse_answer(&anthropic::answer_to_openai(&bytes, &model.name, self.created())?, &model.name)?
            }
        };
        charge.settle(answer.summary.usage);
        trace::answer_read(&answer.summary, &bytes);
        if model.config.validate {
            if let Err(failure) = validate::check(&answer.summary, req, !charges.caller_checks_tools) {
                return Err(AttemptError { failure, answer: Some(answer) });
            }
        }
        Ok(answer)
    }
}
