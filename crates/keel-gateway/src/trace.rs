//! The `chat {model}` span of each model a call tries, named and attributed by the
//! OpenTelemetry GenAI conventions (keel-telemetry's `names` has the table).
//!
//! One span per model of the route: its attempts (retries are span events, from
//! keel-core's decisions inside it) and, for a whole answer, its correction rounds.
//! The span is a plain `tracing` span; whether it leaves the process is the
//! subscriber's business (`[telemetry.otlp]`).

use keel_core::{BreakerState, Disposition, ErrorClass, Failure};
use tracing::Span;
use tracing::field::Empty;

use crate::gateway::Model;
use crate::wire::{AnswerSummary, Usage};

/// The span of `model`'s part of a call; `fallback_from` names the model that failed
/// before it.
pub(crate) fn chat_span(model: &Model, fallback_from: Option<&str>) -> Span {
    let provider = model.endpoint.provider.trace_name();
    let span = tracing::info_span!(
        "chat",
        otel.name = %format_args!("chat {}", model.config.model),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = provider,
        gen_ai.request.model = %model.config.model,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        error.type = Empty,
        keel.model = %model.name,
        keel.attempt = Empty,
        keel.error_class = Empty,
        keel.disposition = Empty,
        keel.fallback.from = Empty,
        keel.breaker.state = Empty,
    );
    if let Some(from) = fallback_from {
        span.record("keel.fallback.from", from);
    }
    span
}

/// What an upstream answered, recorded on the current (`chat`) span by the attempt
/// that read it: a later attempt's answer replaces an earlier one's.
pub(crate) fn answer_read(summary: &AnswerSummary, upstream_body: &[u8]) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    if let Some(model) = response_model(upstream_body) {
        span.record("gen_ai.response.model", model.as_str());
    }
    if let Some(usage) = &summary.usage {
        usage_read(&span, usage);
    }
    if let Some(reason) = &summary.finish_reason {
        span.record("gen_ai.response.finish_reasons", reason.as_str());
    }
}

/// Token usage on `span`.
pub(crate) fn usage_read(span: &Span, usage: &Usage) {
    // OTLP has no unsigned integers: `tracing`'s u64 would be exported as a string.
    span.record("gen_ai.usage.input_tokens", i64::try_from(usage.prompt_tokens).unwrap_or(i64::MAX));
    span.record("gen_ai.usage.output_tokens", i64::try_from(usage.completion_tokens).unwrap_or(i64::MAX));
}

/// The model's part ended with an answer after `attempts` attempts.
pub(crate) fn answered(span: &Span, attempts: u32) {
    span.record("keel.attempt", i64::from(attempts));
}

/// The model's part failed with `failure` after `attempts` attempts, and the call
/// goes on as `disposition` says (`fallback` to the next model, or `terminal`).
pub(crate) fn failed(
    span: &Span,
    failure: &Failure,
    attempts: u32,
    breaker: Option<BreakerState>,
    disposition: Disposition,
) {
    record_failure(span, failure.class, attempts, disposition);
    if let Some(state) = breaker {
        span.record("keel.breaker.state", state.as_str());
    }
}

/// The failure attributes of any span (a stream cut after its opening included).
pub(crate) fn record_failure(span: &Span, class: ErrorClass, attempts: u32, disposition: Disposition) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", class.as_str());
    span.record("keel.error_class", class.as_str());
    span.record("keel.disposition", disposition.as_str());
    if attempts > 0 {
        span.record("keel.attempt", i64::from(attempts));
    }
}

/// The `model` an upstream's answer names (OpenAI and Anthropic both send it).
fn response_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model.filter(|m| m.len() <= 256)
}
