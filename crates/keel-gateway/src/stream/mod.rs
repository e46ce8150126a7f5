//! Streamed answers, and what happens when an upstream stream fails.
//!
//! Streams are where gateways fail their users: a cut connection presented as a
//! finished answer, a retry that repeats text the user already read. Keel's rules:
//!
//! 1. **Before the first token** nothing has reached the client, so a failure is
//!    retried or falls back exactly like a whole answer, unseen. Reaching the first
//!    token is bounded by the model's `ttft_timeout`, which counts as `timeout`. An
//!    answer that ends without any token is `empty_output`. The response's status and
//!    headers are sent only once a model produced its first token, so they name it.
//! 2. **After the first token**, a cut connection, a stall longer than
//!    `stall_timeout` (`timeout`), an end without a finish reason, or an error event
//!    is rescued on the next model of the chain, in this order:
//!    - *prefill*: a model with `accepts_prefill = true` gets the request plus the
//!      partial answer as a trailing assistant message and continues it. The
//!      continuation is checked at the seam ([`seam`]): one that starts over —
//!      repeating the text already sent, or a long prefix of it — has the repeat
//!      dropped (or, if it then diverges, counts as a failed rescue), and the model is
//!      learned not to honour prefill (`prefill_restarts` in `/metrics`, rescue
//!      `prefill_restarted` in the journal and the last chunk), so later rescues on it
//!      splice;
//!    - *splice*: another model regenerates from the start; its output is held until
//!      it has reproduced exactly the text the client already has, and only the rest
//!      is sent. If it diverges, the next model is tried;
//!    - otherwise the stream ends with a well-formed SSE error event naming the
//!      *original* failure (`data: {"error": {...}}`), and no `[DONE]`.
//!
//!    Tool calls are never sent in part ([`tools`]): their deltas are held until
//!    the answer's finish reason (or `[DONE]`), checked (arguments are JSON; with
//!    validation, the answer's checks, tools and schemas as for whole answers) and
//!    passed through the run's loop guard, then released whole. A stream cut
//!    inside a tool call has sent nothing of it and is rescued like a cut text
//!    (with no text sent, the fallback regenerates the answer unseen; after text,
//!    it continues or splices the text and makes the call itself). A held call that
//!    fails its checks gets the model's `correct` rounds (the error sent back, a new
//!    stream on the same model, its text checked at the seam so none is repeated),
//!    then is a failure of the model like a cut. A looping call ends the stream with
//!    the `loop_detected` error event, the call unsent.
//! 3. A cut stream never ends with `finish_reason: "stop"`: only an upstream's own
//!    finish reason is ever forwarded.
//! 4. A malformed chunk is skipped and counted. A stream that ends without `[DONE]`
//!    after its finish reason is finalised at once: usage chunk (when asked for),
//!    then `[DONE]`.
//! 5. A client that goes away is noticed while the upstream stalls and while a
//!    rescue is being opened, not only at the next chunk: no new attempt is made for
//!    a client that is gone (the abandoned attempt is charged its bound once its
//!    provider answered, like any other).
//! 6. With `buffer = true` the whole answer is read before anything is sent, so every
//!    failure of the upstream is handled as in rule 1. Its tool calls are then
//!    checked as in rule 2 (after the headers: a failed check is corrected, rescued
//!    or an error event, never a call sent).
//!
//! Chunks keep the first upstream's `id`; each chunk's `model` names the model that
//! produced it. Every attempt is charged like a whole call's (see [`crate::charges`]):
//! to the per-key and per-run attempt budgets, and settled once from its own usage,
//! or at its upper bound when the upstream gave none (a cut, a stall, a client gone).
//! The final usage (sent only when the agent asked with
//! `stream_options.include_usage`) is the sum of every attempt's charge: the numbers
//! the budgets, the journal and `/metrics` have. A rescued stream's last chunk (empty
//! `choices`, like the usage chunk, which it is when usage was asked for) carries
//! `"keel": {"models": [...], "rescue": "prefill"|"splice"}`: every model whose text
//! the client received, since the headers went out before the cut.

pub(crate) mod source;
// SSE framing, also read by the runtime's MCP client (streamable HTTP answers).
pub use source::{SseEvent, SseParser};
mod tools;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use keel_core::{Disposition, ErrorClass, Failure, Rounds};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::charges::{AttemptCharge, Charges};
use crate::error::GatewayError;
use crate::gateway::{AttemptError, CallContext, Gateway, Model, Route, final_failure};
use crate::journal::{CallEnd, Prompted};
use crate::metrics::bump;
use crate::trace;
use crate::validate;
use crate::wire::{AnswerSummary, ChatRequest, Usage, error_body};
use source::{Item, Piece, Source};
use tools::HeldCalls;

/// A stream that has started: which model produced the first token, and the SSE body.
#[derive(Debug)]
pub struct StreamResponse {
    /// The model that produced the first token.
    pub model: Arc<str>,
    /// Attempts made before the first token.
    pub attempts: u32,
    /// Whether a model other than the one named produced it.
    pub fallback: bool,
    /// The SSE body, frame by frame (`data: ...\n\n`).
    pub body: mpsc::Receiver<Bytes>,
}

impl StreamResponse {
    /// The body as a `Stream` of frames, for an HTTP response.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self.body, |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) })
    }
}

/// An upstream stream that reached its first token (or, buffered, its end).
pub(crate) struct Opened {
    source: Source,
    pending: Vec<Piece>,
    charge: AttemptCharge,
}

impl Gateway {
    /// Calls model `req.model` (and its fallbacks) for a streamed answer; returns once
    /// a model produced its first token (or, with `buffer`, its whole answer).
    ///
    /// # Errors
    /// As [`complete`](Gateway::complete), for failures before the first token.
    /// Later failures are handled inside the stream (see the module docs).
    pub async fn stream(
        self: &Arc<Self>,
        req: ChatRequest,
        ctx: CallContext,
    ) -> Result<StreamResponse, GatewayError> {
        let primary = self.model(&req.model)?;
        bump(&primary.counters.requests, 1);
        let charges = match self.charge(&primary, &req, &ctx) {
            Ok(c) => c,
            Err(e) => {
                primary.counters.request_failed(e.class);
                let end = CallEnd { error: Some(&e), ..CallEnd::default() };
                self.journal_call(&ctx, &primary, Prompted::Chat(&req), end);
                return Err(e);
            }
        };
        let mut route = Route::new(primary.clone());
        let mut model = primary.clone();
        let mut from: Option<Arc<str>> = None;
        let (opened, span) = loop {
            let span = trace::chat_span(&model, from.as_deref());
            match charges.under(self.open_on(&model, &req, &charges)).instrument(span.clone()).await {
                Ok((opened, attempts)) => {
                    trace::answered(&span, attempts);
                    route.attempts += attempts;
                    break (opened, span);
                }
                Err((failure, attempts)) => {
                    route.failed(&model, &failure, attempts);
                    let next = route.next(self, &model, failure.class);
                    let disposition =
                        if next.is_some() { Disposition::Fallback } else { Disposition::Terminal };
                    let breaker = model.stream_pipeline.breaker().map(|b| b.state());
                    trace::failed(&span, &failure, attempts, breaker, disposition);
                    if let Some(next) = next {
                        from = Some(model.name.clone());
                        model = next;
                        continue;
                    }
                    let e = route.error();
                    primary.counters.request_failed(e.class);
                    let end = CallEnd {
                        failures: &e.failures,
                        attempts: e.attempts,
                        error: Some(&e),
                        ..CallEnd::default()
                    };
                    self.journal_call(&ctx, &primary, Prompted::Chat(&req), end);
                    return Err(e);
                }
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let response = StreamResponse {
            model: model.name.clone(),
            attempts: route.attempts,
            fallback: model.name != primary.name,
            body: rx,
        };
        let pump = Pump {
            gateway: self.clone(),
            tx,
            req,
            ctx,
            charges,
            route,
            id: None,
            created: self.created(),
            sent_text: String::new(),
            sent_tools: false,
            held: HeldCalls::default(),
            corrected: None,
            corrections: 0,
            role_sent: false,
            finish: None,
            usage: None,
            charge: None,
            rescue: None,
            answered: Vec::new(),
            span,
        };
        self.streams.spawn(pump.run(model, opened));
        Ok(response)
    }

    /// One model's stream up to its first token, through its pipeline.
    async fn open_on(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<(Opened, u32), (Failure, u32)> {
        let mut made = 0;
        let result = model
            .stream_pipeline
            .call(|a| {
                made = a.number;
                self.open(model, req, charges)
            })
            .await;
        match result {
            Ok(opened) => Ok((opened, made)),
            Err(e) => {
                let (failure, attempts, _) = final_failure(e);
                Err((failure, attempts))
            }
        }
    }

    /// One attempt: connect, then read until the first token (or the end, buffered).
    async fn open(
        &self,
        model: &Model,
        req: &ChatRequest,
        charges: &Charges,
    ) -> Result<Opened, AttemptError> {
        let (resp, charge) = self.send_to(model, req, charges).await?;
        let mut source = Source::new(resp.into_body(), model.endpoint.provider);
        let mut pending = Vec::new();
        let mut finish: Option<String> = None;
        let buffer = model.config.buffer;
        loop {
            let item = if buffer {
                tokio::time::timeout(model.config.policy.stall_timeout, source.next()).await.map_err(
                    |_| {
                        Failure::new(
                            ErrorClass::Timeout,
                            format!("no chunk for {:?}", model.config.policy.stall_timeout),
                        )
                    },
                )??
            } else {
                source.next().await?
            };
            match item {
                Item::Piece(p) => {
                    let token = p.is_token();
                    if p.finish_reason.is_some() {
                        finish = p.finish_reason.clone();
                    }
                    pending.push(p);
                    if token && !buffer {
                        return Ok(Opened { source, pending, charge });
                    }
                }
                Item::Done | Item::Eof => {
                    let tokens = pending.iter().any(Piece::is_token);
                    let failure = match (&finish, tokens) {
                        (None, _) => Failure::new(
                            ErrorClass::Network,
                            "the upstream closed the stream before it finished",
                        ),
                        (Some(f), false) if f == "length" => Failure::new(
                            ErrorClass::TruncatedOutput,
                            "the answer was cut off at the token limit",
                        ),
                        (Some(f), false) if f == "content_filter" => {
                            Failure::new(ErrorClass::Refusal, "the content filter stopped the answer")
                        }
                        (Some(_), false) => {
                            Failure::new(ErrorClass::EmptyOutput, "the model answered with an empty stream")
                        }
                        (Some(_), true) => {
                            // Buffered and complete; `Done` vs `Eof` no longer matters.
                            if matches!(item, Item::Eof) {
                                bump(&model.counters.finalised_without_done, 1);
                            }
                            return Ok(Opened { source, pending, charge });
                        }
                    };
                    charge.settle(pending.iter().find_map(|p| p.usage));
                    return Err(failure.into());
                }
            }
        }
    }
}

/// The bytes of already-sent text a continuation must repeat to count as a restart
/// when it then diverges (a shorter match is taken for a continuation that happens
/// to begin like the answer did).
pub const RESTART_PREFIX: usize = 16;

/// What the start of a prefill continuation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seam {
    /// It matches the start of the sent text so far: hold it and read on.
    Hold,
    /// A real continuation: send it all.
    Continue(String),
    /// The model started over and repeated the sent text: send only what follows it.
    Restart(String),
    /// The model started over and then said something else: the client's text and
    /// this answer cannot be joined.
    Diverged,
}

/// Judges the held start `held` of a continuation of `sent`; `must_decide` when no
/// more text will come before it is released (a finish reason, a tool call).
pub fn seam(sent: &str, held: &str, must_decide: bool) -> Seam {
    if held.len() >= sent.len() && held.starts_with(sent) {
        return Seam::Restart(held[sent.len()..].to_owned());
    }
    let common: usize =
        sent.chars().zip(held.chars()).take_while(|(a, b)| a == b).map(|(a, _)| a.len_utf8()).sum();
    let long = common >= RESTART_PREFIX.min(sent.len());
    if common == held.len() && !must_decide {
        return Seam::Hold;
    }
    if long { Seam::Diverged } else { Seam::Continue(held.to_owned()) }
}

/// How a stream's output is being forwarded.
enum Mode {
    /// Straight through.
    Direct,
    /// A prefill continuation (or a correction round's answer), held at the seam
    /// until [`seam`] can tell whether it continues the sent text or starts over;
    /// `learn`: a restart means the model ignores prefills (not so for a
    /// correction, which asks for a new answer).
    Seam { held: String, learn: bool },
    /// A restarted answer, held until it has reproduced `sent_text`.
    Splice { regenerated: String },
}

/// The task that copies an upstream stream to the client and rescues it.
struct Pump {
    gateway: Arc<Gateway>,
    tx: mpsc::Sender<Bytes>,
    req: ChatRequest,
    ctx: CallContext,
    charges: Charges,
    route: Route,
    id: Option<String>,
    created: u64,
    sent_text: String,
    sent_tools: bool,
    /// The current attempt's tool calls, none of them sent yet.
    held: HeldCalls,
    /// The request of the current correction round (`req` plus the corrections).
    corrected: Option<ChatRequest>,
    /// Correction rounds made, for the journal.
    corrections: u32,
    role_sent: bool,
    finish: Option<String>,
    /// The current attempt's usage, as its upstream reported it.
    usage: Option<Usage>,
    /// The current attempt's reservation.
    charge: Option<AttemptCharge>,
    rescue: Option<&'static str>,
    /// The models whose text reached the client, in order.
    answered: Vec<Arc<str>>,
    /// The `chat` span of the model now streaming.
    span: tracing::Span,
}

/// How a rescue went.
enum Rescue {
    /// The next model took over.
    On(Arc<Model>, Box<Opened>, Mode, &'static str, tracing::Span),
    /// No model could.
    Failed,
    /// The client went away: nobody would receive it.
    Gone,
}

/// Runs `fut` unless the client goes away first (`None`).
async fn watch_client<F: std::future::Future>(tx: &mpsc::Sender<Bytes>, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = tx.closed() => None,
        out = fut => Some(out),
    }
}

/// How forwarding a piece went.
enum Forwarded {
    Ok,
    /// The client went away.
    Gone,
    /// A spliced answer diverged from what the client has.
    Diverged,
    /// The held tool calls failed their checks (nothing of them was sent).
    Invalid(Box<(Failure, AnswerSummary)>),
    /// The run's loop guard stopped the held calls.
    Looping(GatewayError),
}

/// What came of the next item, before the run loop acts on it.
enum Outcome {
    Forwarded(Forwarded),
    Failed(Failure),
}

/// How opening a correction round went.
enum Corrected {
    On(Box<Opened>, ChatRequest),
    Failed(Failure),
    Gone,
}

impl Pump {
    /// Journals the call as it ended (the route's failures and attempts, the rescue).
    fn journal(&self, answered_by: Option<&str>, error: Option<&GatewayError>) {
        let end = CallEnd {
            answered_by,
            failures: &self.route.failures,
            attempts: self.route.attempts,
            spent: Some(self.charges.spent()),
            corrections: self.corrections,
            rescue: self.rescue,
            error,
        };
        self.gateway.journal_call(&self.ctx, &self.route.primary, Prompted::Chat(&self.req), end);
    }

    /// Settles the current attempt from its usage (its bound, when it gave none).
    /// The current attempt's usage on its span (before settling takes it).
    fn record_usage(&self) {
        if let Some(usage) = &self.usage {
            trace::usage_read(&self.span, usage);
        }
    }

    fn settle_attempt(&mut self) {
        if let Some(charge) = self.charge.take() {
            charge.settle(self.usage.take());
        }
    }

    async fn run(mut self, mut model: Arc<Model>, opened: Opened) {
        self.charge = Some(opened.charge);
        let mut source = opened.source;
        let mut queue: VecDeque<Piece> = opened.pending.into();
        let mut mode = Mode::Direct;
        let mut original: Option<Failure> = None;
        // Correction rounds made on the model now streaming.
        let mut rounds = Rounds::new(model.name.clone(), model.config.correct);
        loop {
            let stall = model.config.policy.stall_timeout;
            let next = match queue.pop_front() {
                Some(piece) => Ok(Ok(Item::Piece(piece))),
                // A client that leaves during a stall is noticed at once: no rescue is
                // paid for that nobody would receive.
                None => match watch_client(&self.tx, tokio::time::timeout(stall, source.next())).await {
                    Some(next) => next,
                    None => return self.finish_gone(&model, source.malformed),
                },
            };
            // A continuation still held at the seam must not end unjudged.
            let splicing = match &mode {
                Mode::Splice { .. } => true,
                Mode::Seam { held, .. } => !held.is_empty(),
                Mode::Direct => false,
            };
            // Whether the stream ends well once the outcome is `Ok`.
            let mut ending = false;
            let outcome = match next {
                Err(_) => Outcome::Failed(Failure::new(
                    ErrorClass::Timeout,
                    format!("the upstream stalled: no chunk for {stall:?}"),
                )),
                Ok(Err(f)) => Outcome::Failed(f),
                Ok(Ok(Item::Piece(piece))) => {
                    Outcome::Forwarded(self.forward(&model, piece, &mut mode).await)
                }
                Ok(Ok(Item::Done)) if !splicing => {
                    ending = true;
                    // `[DONE]` without a finish reason: the held calls are complete.
                    Outcome::Forwarded(self.release_held(&model, Piece::default()).await)
                }
                Ok(Ok(Item::Eof)) if self.finish.is_some() && !splicing => {
                    bump(&model.counters.finalised_without_done, 1);
                    ending = true;
                    Outcome::Forwarded(Forwarded::Ok)
                }
                Ok(Ok(Item::Done | Item::Eof)) if splicing => Outcome::Failed(Failure::new(
                    ErrorClass::ServerError,
                    "the regenerated answer ended before it reached the text already sent",
                )),
                Ok(Ok(Item::Done | Item::Eof)) => Outcome::Failed(Failure::new(
                    ErrorClass::Network,
                    "the upstream closed the stream before the answer finished",
                )),
            };
            let failure = match outcome {
                Outcome::Failed(f) => f,
                Outcome::Forwarded(Forwarded::Ok) if ending => {
                    bump(&model.counters.malformed_chunks, source.malformed);
                    return self.finish_ok(&model).await;
                }
                Outcome::Forwarded(Forwarded::Ok) => continue,
                Outcome::Forwarded(Forwarded::Gone) => return self.finish_gone(&model, source.malformed),
                Outcome::Forwarded(Forwarded::Looping(e)) => {
                    bump(&model.counters.malformed_chunks, source.malformed);
                    return self.finish_stopped(&model, e).await;
                }
                Outcome::Forwarded(Forwarded::Diverged) => Failure::new(
                    ErrorClass::ServerError,
                    "the regenerated answer diverged from the text already sent",
                ),
                Outcome::Forwarded(Forwarded::Invalid(invalid)) => {
                    let (failure, summary) = *invalid;
                    self.held.clear();
                    if rounds.due(failure.class) {
                        rounds.take(failure.class, &*self.gateway.sink);
                        match self.correct(&model, &failure, &summary).await {
                            Corrected::On(opened, req) => {
                                bump(&model.counters.malformed_chunks, source.malformed);
                                let opened = *opened;
                                self.corrected = Some(req);
                                self.charge = Some(opened.charge);
                                source = opened.source;
                                queue = opened.pending.into();
                                // The new answer's text must not repeat the client's.
                                mode = if self.sent_text.is_empty() {
                                    Mode::Direct
                                } else {
                                    Mode::Seam { held: String::new(), learn: false }
                                };
                                continue;
                            }
                            Corrected::Gone => return self.finish_gone(&model, source.malformed),
                            Corrected::Failed(f) => f,
                        }
                    } else {
                        failure
                    }
                }
            };
            // The stream failed after tokens reached the client; nothing of its held
            // tool calls did.
            self.held.clear();
            bump(&model.counters.malformed_chunks, source.malformed);
            if original.is_none() {
                // The breaker counted this stream a success at its first token; the cut
                // is a failure of the model too.
                if let Some(breaker) = model.stream_pipeline.breaker() {
                    breaker.record_failure(failure.class, None);
                }
                model.counters.attempt_failed(failure.class);
                original = Some(failure.clone());
            }
            self.route.failed(&model, &failure, 0);
            self.record_usage();
            self.settle_attempt();
            let class = original.as_ref().map_or(failure.class, |f| f.class);
            let rescue = self.rescue_on(&model, class).await;
            let disposition =
                if matches!(rescue, Rescue::On(..)) { Disposition::Fallback } else { Disposition::Terminal };
            trace::record_failure(&self.span, failure.class, 0, disposition);
            match rescue {
                Rescue::Gone => return self.finish_gone(&model, 0),
                Rescue::On(next, opened, next_mode, how, span) => {
                    self.span = span;
                    let counter = match how {
                        "prefill" => &next.counters.rescued_prefill,
                        _ => &next.counters.rescued_splice,
                    };
                    bump(counter, 1);
                    self.rescue = Some(how);
                    self.usage = None;
                    let opened = *opened;
                    self.charge = Some(opened.charge);
                    self.corrected = None;
                    rounds = Rounds::new(next.name.clone(), next.config.correct);
                    model = next;
                    source = opened.source;
                    queue = opened.pending.into();
                    mode = next_mode;
                }
                Rescue::Failed => {
                    let original = original.unwrap_or(failure);
                    bump(&self.route.primary.counters.rescue_failed, 1);
                    return self.finish_error(original).await;
                }
            }
        }
    }

    /// A correction round on `model`: its held calls failed with `failure`, which is
    /// sent back to it after its answer (as whole answers' rounds do), on a new
    /// stream. The current attempt is settled first.
    async fn correct(&mut self, model: &Arc<Model>, failure: &Failure, summary: &AnswerSummary) -> Corrected {
        self.corrections += 1;
        self.record_usage();
        self.settle_attempt();
        self.usage = None;
        let extra = validate::correction(summary, failure);
        let req = match self.corrected.as_ref().unwrap_or(&self.req).with_appended(&extra) {
            Ok(req) => req,
            Err(f) => return Corrected::Failed(f),
        };
        let gateway = self.gateway.clone();
        let opening =
            self.charges.under(gateway.open_on(model, &req, &self.charges)).instrument(self.span.clone());
        match watch_client(&self.tx, Box::pin(opening)).await {
            None => Corrected::Gone,
            Some(Ok((opened, attempts))) => {
                self.route.attempts += attempts;
                Corrected::On(Box::new(opened), req)
            }
            Some(Err((f, attempts))) => {
                self.route.attempts += attempts;
                Corrected::Failed(f)
            }
        }
    }

    /// The next model of the chain that takes over, by prefill or by splice.
    async fn rescue_on(&mut self, from: &Model, class: ErrorClass) -> Rescue {
        if self.sent_tools || !self.route.primary.chain_on.contains(&class) {
            return Rescue::Failed;
        }
        let gateway = self.gateway.clone();
        let Some(mut from) = gateway.models.get(&from.name).cloned() else { return Rescue::Failed };
        loop {
            if self.tx.is_closed() {
                return Rescue::Gone;
            }
            let Some(next) = self.route.take_chain(&gateway, &from, class) else { return Rescue::Failed };
            let prefill = next.takes_prefill() && !self.sent_text.is_empty();
            let req = if prefill {
                match self
                    .req
                    .with_appended(&[serde_json::json!({"role": "assistant", "content": self.sent_text})])
                {
                    Ok(req) => req,
                    Err(_) => return Rescue::Failed,
                }
            } else {
                self.req.clone()
            };
            // An attempt abandoned for a gone client settles as its charge says (its
            // bound once the provider answered: it bills what it generated).
            let span = trace::chat_span(&next, Some(&from.name));
            let opening =
                self.charges.under(gateway.open_on(&next, &req, &self.charges)).instrument(span.clone());
            let Some(opened) = watch_client(&self.tx, opening).await else { return Rescue::Gone };
            match opened {
                Ok((opened, attempts)) => {
                    trace::answered(&span, attempts);
                    self.route.attempts += attempts;
                    let (mode, how) = if prefill {
                        (Mode::Seam { held: String::new(), learn: true }, "prefill")
                    } else {
                        (Mode::Splice { regenerated: String::new() }, "splice")
                    };
                    return Rescue::On(next, Box::new(opened), mode, how, span);
                }
                Err((failure, attempts)) => {
                    self.route.failed(&next, &failure, attempts);
                    let breaker = next.stream_pipeline.breaker().map(|b| b.state());
                    trace::failed(&span, &failure, attempts, breaker, Disposition::Fallback);
                    from = next;
                }
            }
        }
    }

    async fn send(&self, frame: Bytes) -> bool {
        self.tx.send(frame).await.is_ok()
    }

    /// Sends one piece to the client (or holds it, while splicing).
    async fn forward(&mut self, model: &Model, mut piece: Piece, mode: &mut Mode) -> Forwarded {
        if self.id.is_none() {
            self.id = piece.id.clone();
        }
        if let Some(usage) = piece.usage.take() {
            self.usage = Some(usage);
        }
        if let Mode::Seam { held, learn } = mode {
            if let Some(text) = piece.content.take() {
                held.push_str(&text);
            }
            let must_decide = piece.finish_reason.is_some() || piece.tool_calls.is_some();
            let learn = *learn;
            match seam(&self.sent_text, held, must_decide) {
                Seam::Hold => return Forwarded::Ok,
                Seam::Continue(text) => piece.content = Some(text),
                Seam::Restart(rest) => {
                    if learn {
                        self.prefill_restarted(model);
                    }
                    piece.content = Some(rest);
                }
                Seam::Diverged => {
                    if learn {
                        self.prefill_restarted(model);
                    }
                    return Forwarded::Diverged;
                }
            }
            *mode = Mode::Direct;
        }
        if let Mode::Splice { regenerated } = mode {
            if let Some(text) = piece.content.take() {
                regenerated.push_str(&text);
            }
            let sent = &self.sent_text;
            if regenerated.len() <= sent.len() {
                if !sent.starts_with(regenerated.as_str()) {
                    return Forwarded::Diverged;
                }
                if regenerated.len() < sent.len() {
                    // Still catching up: a finish or a tool call now would make a
                    // shorter answer than the client's.
                    let ends = piece.finish_reason.is_some() || piece.tool_calls.is_some();
                    return if ends { Forwarded::Diverged } else { Forwarded::Ok };
                }
            } else if !regenerated.starts_with(sent.as_str()) {
                return Forwarded::Diverged;
            }
            // Caught up: only what the client has not seen goes out.
            let rest = regenerated[sent.len()..].to_owned();
            piece.content = (!rest.is_empty()).then_some(rest);
            *mode = Mode::Direct;
        }
        if piece.role && self.role_sent {
            piece.role = false;
        }
        // Tool-call deltas are held, never forwarded as they come.
        if let Some(raw) = piece.tool_calls.take() {
            if let Err(f) = self.held.add(&raw) {
                return Forwarded::Invalid(Box::new((f, AnswerSummary::default())));
            }
        }
        if piece.finish_reason.is_some() && !self.held.is_empty() {
            return self.release_held(model, piece).await;
        }
        self.send_piece(model, piece).await
    }

    /// Checks the held tool calls, complete now that `piece` (the finish reason, or
    /// nothing at a `[DONE]`) came, runs them past the loop guard, and sends them
    /// with `piece`.
    async fn release_held(&mut self, model: &Model, mut piece: Piece) -> Forwarded {
        if self.held.is_empty() {
            return self.send_piece(model, piece).await;
        }
        let validate = model.config.validate;
        let tools = !self.charges.caller_checks_tools;
        let req = self.corrected.as_ref().unwrap_or(&self.req);
        if let Err(invalid) =
            self.held.check(&self.sent_text, piece.finish_reason.as_deref(), req, validate, tools)
        {
            return Forwarded::Invalid(invalid);
        }
        if let Err(e) = self.gateway.guard_tools(&self.charges, &self.held.calls()) {
            return Forwarded::Looping(e);
        }
        if self.answered.last() != Some(&model.name) {
            self.answered.push(model.name.clone());
        }
        // The calls in a chunk of their own and the finish reason in the next, as
        // OpenAI sends them: the official Python client's stream helper fires its
        // `tool_calls.function.arguments.done` only for a call already seen when the
        // finish reason arrives.
        let calls = Piece {
            id: piece.id.clone(),
            role: std::mem::take(&mut piece.role),
            content: piece.content.take(),
            tool_calls: Some(self.held.release()),
            ..Piece::default()
        };
        match self.send_piece(model, calls).await {
            Forwarded::Ok => self.send_piece(model, piece).await,
            other => other,
        }
    }

    /// Sends `piece` as it is now.
    async fn send_piece(&mut self, model: &Model, mut piece: Piece) -> Forwarded {
        if piece.role && self.role_sent {
            piece.role = false;
        }
        if piece.finish_reason.is_some() {
            self.finish = piece.finish_reason.clone();
        }
        let has_delta = piece.role
            || piece.content.as_deref().is_some_and(|c| !c.is_empty())
            || piece.tool_calls.is_some();
        if !has_delta && piece.finish_reason.is_none() {
            return Forwarded::Ok;
        }
        if piece.role {
            self.role_sent = true;
        }
        if let Some(text) = &piece.content {
            self.sent_text.push_str(text);
            if !text.is_empty() && self.answered.last() != Some(&model.name) {
                self.answered.push(model.name.clone());
            }
        }
        if piece.tool_calls.is_some() {
            self.sent_tools = true;
        }
        let frame = self.chunk(&model.name, &piece);
        if self.send(frame).await { Forwarded::Ok } else { Forwarded::Gone }
    }

    /// `model` restarted its answer instead of continuing the prefill: learned (later
    /// rescues on it splice), counted and journaled.
    fn prefill_restarted(&mut self, model: &Model) {
        if model.learn_prefill_ignored() {
            tracing::warn!(
                model = %model.name,
                "the model restarted its answer instead of continuing the prefill: later rescues on it \
                 splice (kept in the confidence gate's history; `accepts_prefill = false` in keel.toml \
                 says it for good)"
            );
        }
        bump(&model.counters.prefill_restarts, 1);
        self.rescue = Some("prefill_restarted");
    }

    fn chunk(&self, model: &str, piece: &Piece) -> Bytes {
        let mut delta = serde_json::Map::new();
        if piece.role {
            delta.insert("role".into(), "assistant".into());
        }
        if let Some(c) = &piece.content {
            delta.insert("content".into(), c.as_str().into());
        }
        let tool_calls = piece.tool_calls.as_deref().map(RawValue::get);
        let delta = serde_json::Value::Object(delta).to_string();
        let delta = match tool_calls {
            Some(raw) if delta == "{}" => format!("{{\"tool_calls\":{raw}}}"),
            Some(raw) => format!("{},\"tool_calls\":{raw}}}", &delta[..delta.len() - 1]),
            None => delta,
        };
        let finish = match &piece.finish_reason {
            Some(f) => serde_json::Value::from(f.as_str()).to_string(),
            None => "null".into(),
        };
        frame(&format!(
            "{{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}",
            serde_json::Value::from(self.id.as_deref().unwrap_or("chatcmpl-keel")),
            self.created,
            serde_json::Value::from(model),
        ))
    }

    /// The run's loop guard stopped the held tool calls: the stream ends with the
    /// error, not `[DONE]`, and the calls unsent.
    async fn finish_stopped(mut self, model: &Model, e: GatewayError) {
        self.record_usage();
        self.settle_attempt();
        self.send(frame(&error_body(e.class, &e.message).to_string())).await;
        self.route.primary.counters.request_failed(e.class);
        self.journal(Some(&model.name), Some(&e));
    }

    async fn finish_ok(mut self, model: &Model) {
        self.record_usage();
        if let Some(reason) = &self.finish {
            self.span.record("gen_ai.response.finish_reasons", reason.as_str());
        }
        self.settle_attempt();
        let usage = self.charges.spent().usage;
        // A rescued answer's last chunk says which models wrote it (the headers, sent
        // before the cut, name only the first); the usage covers every attempt.
        let keel = self.rescue.map(|how| {
            serde_json::json!({"models": self.answered.iter().map(|m| &**m).collect::<Vec<_>>(), "rescue": how})
        });
        if self.req.include_usage || keel.is_some() {
            let mut chunk = serde_json::json!({
                "id": self.id.as_deref().unwrap_or("chatcmpl-keel"),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": &*model.name,
                "choices": [],
            });
            if self.req.include_usage {
                chunk["usage"] = serde_json::to_value(usage).unwrap_or(serde_json::Value::Null);
            }
            if let Some(keel) = keel {
                chunk["keel"] = keel;
            }
            self.send(frame(&chunk.to_string())).await;
        }
        self.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        bump(&model.counters.answered, 1);
        self.journal(Some(&model.name), None);
    }

    async fn finish_error(mut self, original: Failure) {
        let sent = self.sent_text.chars().count();
        let mut message =
            format!("the stream failed after {sent} characters were sent: {}", original.message);
        if self.route.failures.len() > 1 {
            let tried: Vec<String> =
                self.route.failures.iter().skip(1).map(|f| format!("{}: {}", f.model, f.message)).collect();
            message.push_str(&format!(" (rescue failed: {})", tried.join("; ")));
        }
        let body = error_body(original.class, &message);
        self.send(frame(&body.to_string())).await;
        self.settle_attempt();
        let e = GatewayError {
            class: original.class,
            message,
            attempts: self.route.attempts,
            failures: self.route.failures.clone(),
            retry_after: None,
        };
        self.route.primary.counters.request_failed(e.class);
        self.journal(None, Some(&e));
    }

    fn finish_gone(mut self, model: &Model, malformed: u64) {
        bump(&model.counters.malformed_chunks, malformed);
        // The upstream billed what it generated, which Keel does not know: the bound.
        self.settle_attempt();
        let e = GatewayError::new(ErrorClass::Network, "the client closed the connection mid-stream");
        self.journal(Some(&model.name), Some(&e));
    }
}

fn frame(json: &str) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::{RESTART_PREFIX, Seam, seam};

    #[test]
    fn the_seam_tells_a_continuation_from_a_restart() {
        let sent = "The answer is";
        // A continuation differs from the sent text's start at once.
        assert_eq!(seam(sent, " 42.", false), Seam::Continue(" 42.".into()));
        // A restart is held while it repeats, then only the rest goes out.
        assert_eq!(seam(sent, "The ans", false), Seam::Hold);
        assert_eq!(seam(sent, "The answer is", false), Seam::Restart(String::new()));
        assert_eq!(seam(sent, "The answer is 42.", false), Seam::Restart(" 42.".into()));
        // A short match that diverges is a continuation that began like the answer.
        assert_eq!(seam(sent, "The end", false), Seam::Continue("The end".into()));
        // A long repeat that diverges cannot be joined to what the client has.
        let long = "Paris is the capital of France, and";
        assert!(long.len() > RESTART_PREFIX);
        assert_eq!(seam(long, "Paris is the capital of Italy", false), Seam::Diverged);
        // The end (or a tool call) forces a decision on a held repeat.
        assert_eq!(seam(long, "Paris is the capital", true), Seam::Diverged);
        assert_eq!(seam(long, "Par", true), Seam::Continue("Par".into()));
        assert_eq!(seam(sent, "", true), Seam::Continue(String::new()));
        // Characters, not bytes: no cut inside a multi-byte one.
        assert_eq!(seam("été", "ét", false), Seam::Hold);
        assert_eq!(seam("été", "étéx", false), Seam::Restart("x".into()));
        assert_eq!(seam("été", "éa", false), Seam::Continue("éa".into()));
    }
}
