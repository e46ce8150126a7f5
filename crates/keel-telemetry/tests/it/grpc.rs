//! OTLP over gRPC: spans exported by keel-telemetry's layer reach a gRPC collector on
//! loopback (HTTP/2 with prior knowledge, `TraceService/Export`), decoded here as a
//! collector would; a collector that answers UNAVAILABLE is an error the exporter can
//! retry, never a success.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use http_body_util::StreamBody;
use hyper::body::Frame;
use keel_telemetry::config::GRPC_TRACE_EXPORT;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Clone, Default)]
struct Collector {
    /// Each request's content type and message.
    got: Arc<Mutex<Vec<(String, ExportTraceServiceRequest)>>>,
}

/// A gRPC answer: an empty response message, then `grpc-status` in the trailers.
fn grpc_answer(status: &'static str) -> Response {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    trailers.insert("grpc-message", http::HeaderValue::from_static("collector says so"));
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))), Ok(Frame::trailers(trailers))];
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(StreamBody::new(futures_util::stream::iter(frames))))
        .unwrap()
}

async fn start(collector: &Collector, status: &'static str) -> String {
    let me = collector.clone();
    let app = axum::Router::new().route(
        GRPC_TRACE_EXPORT,
        post(move |req: axum::http::Request<Body>| {
            let me = me.clone();
            async move {
                assert_eq!(req.version(), http::Version::HTTP_2, "gRPC is HTTP/2");
                let ct = req.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
                let body = axum::body::to_bytes(req.into_body(), 1 << 24).await.unwrap();
                assert_eq!(body[0], 0, "not compressed");
                let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                assert_eq!(body.len(), 5 + len, "one length-prefixed message");
                let message = ExportTraceServiceRequest::decode(&body[5..]).unwrap();
                me.got.lock().unwrap().push((ct, message));
                grpc_answer(status)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn otlp(endpoint: &str) -> keel_telemetry::Otlp {
    let text = format!("[otlp]\nendpoint = \"{endpoint}\"\nprotocol = \"grpc\"\n");
    let config: keel_telemetry::TelemetryConfig = toml::from_str(&text).unwrap();
    config.resolve(&|_| None).unwrap().otlp.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector() {
    let collector = Collector::default();
    let url = start(&collector, "0").await;
    let otlp = otlp(&url);
    let (layer, guard) = keel_telemetry::otlp::layer(&otlp, "grpc-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "execute_tool",
            otel.name = "execute_tool lookup",
            gen_ai.tool.name = "lookup",
            keel.attempt = 2_i64
        );
        let _in = span.enter();
        tracing::info!(keel.attempt = 1_i64, "retry scheduled");
    });
    tokio::task::spawn_blocking(move || guard.flush()).await.unwrap().unwrap();
    let got = collector.got.lock().unwrap().clone();
    assert!(!got.is_empty(), "the collector got an export");
    assert!(
        got.iter().all(|(ct, _)| ct == "application/grpc"),
        "{:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    let spans: Vec<_> = got
        .iter()
        .flat_map(|(_, m)| &m.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    let span = spans.iter().find(|s| s.name == "execute_tool lookup").expect("the span");
    let tool = span.attributes.iter().find(|kv| kv.key == "gen_ai.tool.name").unwrap();
    assert_eq!(tool.value.as_ref().unwrap().value, Some(Any::StringValue("lookup".into())));
    assert!(span.events.iter().any(|e| e.name == "retry scheduled"), "{:?}", span.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_answering_unavailable_is_an_error_to_retry() {
    let collector = Collector::default();
    let url = start(&collector, "14").await;
    let otlp = otlp(&url);
    let request = http::Request::post(otlp.endpoint.clone())
        .header("content-type", "application/x-protobuf")
        .body(Bytes::from(ExportTraceServiceRequest::default().encode_to_vec()))
        .unwrap();
    let answer = keel_telemetry::http::send_grpc(request, std::time::Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(answer.body()).into_owned();
    assert!(body.contains("gRPC status 14") && body.contains("collector says so"), "{body}");
    assert_eq!(collector.got.lock().unwrap().len(), 1, "the message arrived");
}
