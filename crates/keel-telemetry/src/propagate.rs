//! W3C trace context: an incoming `traceparent` (and `tracestate`) continued, so an
//! agent's trace and Keel's are one trace; and the trace id of the current span, for
//! answers that name it.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the remote span that `headers`' `traceparent` names. A
/// missing or malformed header (wrong version, bad hex, all-zero ids) leaves `span`
/// a root: a caller's header can never fail a request.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is already started or not exported: either way
        // there is nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span` as 32 hex digits, when it is exported over OTLP.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}
