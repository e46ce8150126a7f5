//! The names Keel's spans and attributes use: the OpenTelemetry GenAI conventions
//! where they have a name, Keel's own (`keel.*`) where they have none.
//!
//! `tracing` field names must be literals, so the crates that make spans write these
//! names out; this module is where they are defined and documented, and the
//! end-to-end test checks the exported spans against it.
//!
//! | span | kind | made in | attributes |
//! | --- | --- | --- | --- |
//! | `{METHOD} {route}` | server | keel-server's request log | `http.request.method`, `http.route`, `http.response.status_code`, `keel.error_class` |
//! | `chat {model}` | client | keel-gateway, one per model tried | `gen_ai.operation.name` = `chat`, `gen_ai.provider.name`, `gen_ai.request.model` (the upstream's model), `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`, `error.type` on failure, `keel.model`, `keel.attempt`, `keel.error_class`, `keel.disposition`, `keel.fallback.from`, `keel.breaker.state` |
//! | `run` | internal | keel-runtime's `Runner::drive` | `keel.run.id`, `keel.run.status` |
//! | `invoke_agent {model}` | internal | keel-runtime's agent drive (inside `run`; parent of its turns' `chat` and calls' `execute_tool`) | `gen_ai.operation.name` = `invoke_agent`, `gen_ai.request.model` (the `[models]` name), `gen_ai.conversation.id` (the run id) |
//! | `execute_tool {tool}` | internal | keel-runtime's step | `gen_ai.operation.name` = `execute_tool`, `gen_ai.tool.name`, `gen_ai.tool.call.id` (`{run}/{step}`), `error.type`, `keel.attempt`, `keel.error_class`, `keel.disposition`, `keel.breaker.state` |
//!
//! Span events (from keel-core's decisions, inside the span of the call they belong
//! to): `retry scheduled` (`keel.attempt`, `keel.error_class`, `keel.retry.delay` in
//! seconds), `retry refused`, `attempt failed`, `circuit breaker transition`
//! (`keel.breaker.state`), `fallback taken` (`keel.fallback.from`,
//! `keel.fallback.to`).

/// `gen_ai.operation.name`.
pub const OPERATION_NAME: &str = "gen_ai.operation.name";
/// `gen_ai.provider.name`: `openai` or `anthropic`.
pub const PROVIDER_NAME: &str = "gen_ai.provider.name";
/// `gen_ai.request.model`.
pub const REQUEST_MODEL: &str = "gen_ai.request.model";
/// `gen_ai.response.model`.
pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
/// `gen_ai.usage.input_tokens`.
pub const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
/// `gen_ai.usage.output_tokens`.
pub const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
/// `gen_ai.response.finish_reasons` (a string array).
pub const FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
/// `gen_ai.tool.name`.
pub const TOOL_NAME: &str = "gen_ai.tool.name";
/// `gen_ai.tool.call.id`.
pub const TOOL_CALL_ID: &str = "gen_ai.tool.call.id";
/// `error.type`: Keel's error class of a failed call.
pub const ERROR_TYPE: &str = "error.type";
/// `keel.attempt`: attempts made (on a span), or the attempt's number (on an event).
pub const ATTEMPT: &str = "keel.attempt";
/// `keel.error_class`: the class of the failure (DESIGN.md's taxonomy).
pub const ERROR_CLASS: &str = "keel.error_class";
/// `keel.disposition`: what the class's policy does: `terminal`, `retry`, `correct`,
/// `fallback`, `escalate`.
pub const DISPOSITION: &str = "keel.disposition";
/// `keel.retry.delay`: seconds until the next attempt.
pub const RETRY_DELAY: &str = "keel.retry.delay";
/// `keel.fallback.from`: the model or tool that failed before this one.
pub const FALLBACK_FROM: &str = "keel.fallback.from";
/// `keel.fallback.to`: the alternative tried next.
pub const FALLBACK_TO: &str = "keel.fallback.to";
/// `keel.breaker.state`: `closed`, `open` or `half_open`.
pub const BREAKER_STATE: &str = "keel.breaker.state";

/// Attributes the conventions type as string arrays. `tracing` fields cannot hold
/// arrays, so they are recorded comma-joined and split by the exporter.
pub const ARRAY_ATTRIBUTES: &[&str] = &[FINISH_REASONS];

/// The `execute_tool {tool}` span of one tool call (the conventions' name and
/// attributes; `error.type`, `keel.*` left to record when it ends). `call_id`:
/// `gen_ai.tool.call.id`, when the call has one (`{run}/{step}`).
pub fn execute_tool_span(tool: &str, call_id: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "execute_tool",
        otel.name = %format_args!("execute_tool {tool}"),
        otel.kind = "internal",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = tool,
        gen_ai.tool.call.id = tracing::field::Empty,
        error.type = tracing::field::Empty,
        keel.error_class = tracing::field::Empty,
        keel.disposition = tracing::field::Empty,
        keel.attempt = tracing::field::Empty,
        keel.breaker.state = tracing::field::Empty,
    );
    if let Some(id) = call_id {
        span.record(TOOL_CALL_ID, id);
    }
    span
}
