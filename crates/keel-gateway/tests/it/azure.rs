//! Azure OpenAI (issue 14, item 3): the deployment in the path, `api-version` in the
//! query, the key in `api-key`, OpenAI's wire format — whole, streamed (with Azure's
//! `prompt_filter_results` chunk that has no choices) and embeddings.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use keel_gateway::{ModelConfig, Provider};
use serde_json::{Value, json};

use crate::support::{ask, ask_stream, post, post_chat, serve};

#[derive(Default)]
struct Seen(Mutex<Vec<(String, String, String)>>);

async fn azure(
    State(seen): State<Arc<Seen>>,
    Path((deployment, what)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers.get("api-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let version = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .unwrap_or("")
        .to_owned();
    seen.0.lock().expect("the record").push((deployment.clone(), what.clone(), version.clone()));
    if key != "sk-test" || headers.contains_key("authorization") {
        let e =
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}});
        return (StatusCode::UNAUTHORIZED, Json(e)).into_response();
    }
    if version != "2024-10-21" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "404", "message": "Resource not found"}})),
        )
            .into_response();
    }
    match what.as_str() {
        "embeddings" => Json(json!({"object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}))
        .into_response(),
        _ if body["stream"] == true => {
            let chunks = [
                json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                       "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}),
                json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]}),
                json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                       "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}),
            ];
            let mut sse: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
            sse.push_str("data: [DONE]\n\n");
            ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], sse).into_response()
        }
        _ => Json(json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                         "content_filter_results": {}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}))
        .into_response(),
    }
}

async fn start() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/openai/deployments/{deployment}/{*what}", axum::routing::post(azure))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("an address"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serving") });
    (url, seen)
}

fn azure_model(url: &str) -> ModelConfig {
    let mut m = ModelConfig::new(Provider::Azure, url, "gpt4o-prod");
    m.api_key_env = Some("FAKE_KEY".into());
    m.api_version = Some("2024-10-21".into());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_deployment_answers_whole_streamed_and_embeddings() {
    let (url, seen) = start().await;
    let served = serve(vec![("az", azure_model(&url))]).await;
    let whole = post_chat(&served.url, ask("az"), &[]).await;
    assert_eq!(whole.status, 200, "{}", whole.text);
    assert_eq!(whole.json()["choices"][0]["message"]["content"], "Hello");
    let streamed = post_chat(&served.url, ask_stream("az"), &[]).await;
    assert_eq!(streamed.status, 200, "{}", streamed.text);
    assert_eq!(streamed.streamed_text(), "Hello", "the filter-results chunk with no choices is skipped");
    let emb = post(&served.url, "/v1/embeddings", json!({"model": "az", "input": "hi"}), &[]).await;
    assert_eq!(emb.status, 200, "{}", emb.text);
    assert_eq!(emb.json()["data"][0]["embedding"], json!([0.1, 0.2]));
    let seen = seen.0.lock().expect("the record").clone();
    let paths: Vec<(&str, &str, &str)> =
        seen.iter().map(|(d, w, v)| (d.as_str(), w.as_str(), v.as_str())).collect();
    assert_eq!(
        paths,
        [
            ("gpt4o-prod", "chat/completions", "2024-10-21"),
            ("gpt4o-prod", "chat/completions", "2024-10-21"),
            ("gpt4o-prod", "embeddings", "2024-10-21"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_azure_key_is_unauthorized_with_azures_message_and_not_retried() {
    let (url, seen) = start().await;
    let mut m = azure_model(&url);
    m.api_key_env = None;
    let served = serve(vec![("az", m)]).await;
    let answer = post_chat(&served.url, ask("az"), &[]).await;
    assert_eq!(answer.status, 401, "{}", answer.text);
    assert!(answer.text.contains("invalid subscription key"), "the upstream's own words: {}", answer.text);
    assert_eq!(seen.0.lock().expect("the record").len(), 1, "credentials are wrong: no retry");
}

#[test]
fn an_azure_model_without_its_api_version_is_refused_at_build() {
    let mut m = ModelConfig::new(Provider::Azure, "https://acme.openai.azure.com", "gpt4o-prod");
    m.api_key_env = None;
    let models = [("az".to_owned(), m)].into_iter().collect();
    let e = keel_gateway::Gateway::builder(models).build().expect_err("refused");
    assert!(e.to_string().contains("models.az.api_version"), "{e}");
}
