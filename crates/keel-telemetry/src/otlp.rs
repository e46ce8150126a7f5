//! Traces over OTLP — HTTP/protobuf, or gRPC (the same protobuf message framed for
//! `TraceService/Export` over HTTP/2): the `tracing` layer that turns Keel's spans
//! into OpenTelemetry spans, and the exporter behind it.
//!
//! Spans are made with plain `tracing` where the work happens (the gateway's
//! `chat {model}`, the runner's `execute_tool {tool}`, the server's request span);
//! this module only decides where they go. Finished spans are batched on the SDK's
//! own thread and posted through [`crate::http::send`] on the tokio runtime that
//! installed the layer, so an export never runs on, or waits in, a call's path.
//! A collector that is down costs dropped batches (the SDK's queue is bounded),
//! never a slower call.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanProcessor, Tracer,
};
use tracing_subscriber::registry::LookupSpan;

use crate::config::Otlp;
use crate::names;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// OTLP export needs a tokio runtime to send on.
    #[error("the OTLP exporter must be installed from inside a tokio runtime")]
    NoRuntime,
    /// The exporter refused its configuration.
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
}

/// Keeps the exporter alive; [`shutdown`](Self::shutdown) flushes what is queued.
#[derive(Debug, Clone)]
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl TraceGuard {
    /// Exports every finished span still queued. Blocks: call it off the runtime's
    /// worker threads (`spawn_blocking`) or from a thread of its own.
    ///
    /// # Errors
    /// The exporter's, in words (a collector that is down, a timeout).
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }

    /// Flushes and stops the exporter, within `timeout`.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub async fn shutdown(self, timeout: Duration) -> Result<(), String> {
        let provider = self.provider;
        let stop = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout.saturating_add(Duration::from_secs(1)), stop).await {
            Ok(Ok(result)) => result.map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("the exporter did not stop within {timeout:?}")),
        }
    }
}

/// The `tracing` layer exporting spans to `otlp`, named `service_name`, and the guard
/// that keeps it exporting.
///
/// # Errors
/// [`Error::NoRuntime`] outside a tokio runtime; [`Error::Build`] if the exporter
/// refuses its configuration.
pub fn layer<S>(
    otlp: &Otlp,
    service_name: &str,
) -> Result<(tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>, TraceGuard), Error>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    let headers = otlp
        .headers
        .iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_owned(), v.to_owned())))
        .collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Sender { runtime, timeout: otlp.timeout, grpc: otlp.grpc })
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(otlp.endpoint.to_string())
        .with_timeout(otlp.timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| Error::Build(e.to_string()))?;
    let batch = BatchSpanProcessor::builder(exporter).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(ArrayAttributes(batch))
        .with_resource(Resource::builder().with_service_name(service_name.to_owned()).build())
        .build();
    let tracer = provider.tracer("keel");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_level(false)
        .with_target(false);
    Ok((layer, TraceGuard { provider }))
}

/// The exporter's HTTP client: each request is sent on the runtime that installed
/// the layer (the SDK's batch thread has none of its own).
#[derive(Debug)]
struct Sender {
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    /// The SDK's protobuf body goes as a gRPC message instead (the same bytes, framed).
    grpc: bool,
}

#[async_trait::async_trait]
impl HttpClient for Sender {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let timeout = self.timeout;
        let sent = if self.grpc {
            self.runtime.spawn(crate::http::send_grpc(request, timeout))
        } else {
            self.runtime.spawn(crate::http::send(request, timeout))
        };
        Ok(sent.await??)
    }
}

/// Turns the attributes the conventions type as string arrays, which `tracing`
/// fields cannot carry, from their comma-joined form into arrays
/// ([`names::ARRAY_ATTRIBUTES`]).
#[derive(Debug)]
struct ArrayAttributes<P>(P);

impl<P: SpanProcessor> SpanProcessor for ArrayAttributes<P> {
    fn on_start(&self, span: &mut Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        for kv in &mut span.attributes {
            if names::ARRAY_ATTRIBUTES.contains(&kv.key.as_str()) {
                if let Value::String(joined) = &kv.value {
                    let items: Vec<StringValue> = joined
                        .as_str()
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| StringValue::from(s.to_owned()))
                        .collect();
                    *kv = KeyValue::new(kv.key.clone(), Value::Array(Array::String(items)));
                }
            }
        }
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}
