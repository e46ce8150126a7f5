//! `POST /v1/embeddings`: passed through to the named model's OpenAI-compatible
//! upstream (`base_url` + `/embeddings`) under that model's policies — attempt
//! timeout, retries (`Retry-After` honoured), its breaker — and the per-key and
//! per-run budgets, journaled and counted like a chat call.
//!
//! There is no fallback: another model's vectors live in another space, and an agent
//! that mixed them would search nonsense without an error. Nor is there a
//! completion: an attempt is reserved at its prompt estimate alone and settled from
//! the upstream's `usage.prompt_tokens`. An Anthropic model has no embeddings
//! endpoint; naming one is a 400.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use keel_core::{ErrorClass, Failure};
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::charges::{Charges, prompt_estimate};
use crate::error::GatewayError;
use crate::gateway::{Admit, AttemptError, CallContext, Gateway, Model, final_failure};
use crate::journal::{CallEnd, Prompted};
use crate::metrics::bump;
use crate::trace;
use crate::upstream;
use crate::wire::{Raw, Usage};

/// An embeddings request: `model`, `input`, and every field as sent.
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    /// The model name the agent asked for.
    pub model: String,
    fields: BTreeMap<String, Raw>,
}

impl EmbeddingsRequest {
    /// Parses a request body.
    ///
    /// # Errors
    /// `invalid_request` when the body is not a JSON object with a string `model` and
    /// an `input` that is a non-empty string or a non-empty array.
    pub fn parse(body: &[u8]) -> Result<Self, Failure> {
        let bad = |m: String| Failure::new(ErrorClass::InvalidRequest, m);
        let fields: BTreeMap<String, Raw> =
            serde_json::from_slice(body).map_err(|e| bad(format!("the body is not a JSON object: {e}")))?;
        let model: String = match fields.get("model") {
            Some(raw) => {
                serde_json::from_str(raw.get()).map_err(|_| bad("`model` must be a string".into()))?
            }
            None => return Err(bad("missing field `model`".into())),
        };
        let input =
            fields.get("input").map(|r| r.get().trim()).ok_or_else(|| bad("missing field `input`".into()))?;
        match input.as_bytes().first() {
            Some(b'"') if input == "\"\"" => return Err(bad("`input` is empty".into())),
            Some(b'[') if serde_json::from_str::<Vec<&RawValue>>(input).map_or(true, |v| v.is_empty()) => {
                return Err(bad("`input` must be a non-empty array".into()));
            }
            Some(b'"' | b'[') => {}
            _ => return Err(bad("`input` must be a string or an array".into())),
        }
        Ok(Self { model, fields })
    }

    /// The raw `input`, as journaled (hashed unless the model says otherwise).
    fn input_raw(&self) -> &str {
        self.fields.get("input").map_or("", |r| r.get())
    }

    /// The upstream body: every field as sent, `model` replaced.
    fn body(&self, upstream_model: &str) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.fields.values().map(|r| r.get().len() + 16).sum::<usize>() + 64);
        out.extend_from_slice(b"{\"model\":");
        let _ = serde_json::to_writer(&mut out, upstream_model);
        for (key, raw) in &self.fields {
            if key == "model" {
                continue;
            }
            out.push(b',');
            let _ = serde_json::to_writer(&mut out, key);
            out.push(b':');
            out.extend_from_slice(raw.get().as_bytes());
        }
        out.push(b'}');
        out
    }
}

/// A successful embeddings call.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The model that answered.
    pub model: Arc<str>,
    /// The upstream's answer, `model` renamed to Keel's name.
    pub body: Bytes,
    /// Attempts made.
    pub attempts: u32,
}

/// Reads an embeddings answer: its usage, and the body with `model` renamed.
fn read_answer(bytes: &[u8], model: &str) -> Result<(Vec<u8>, Option<Usage>), Failure> {
    let malformed = |m: String| Failure::new(ErrorClass::ServerError, m);
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("the upstream's answer is not valid JSON: {e}")))?;
    if !fields.get("data").is_some_and(|d| d.get().trim_start().starts_with('[')) {
        return Err(malformed("the upstream's answer has no `data` array".into()));
    }
    let usage: Option<Usage> = fields.get("usage").and_then(|u| serde_json::from_str(u.get()).ok());
    let mut out = Vec::with_capacity(bytes.len() + model.len());
    out.extend_from_slice(b"{\"model\":");
    let _ = serde_json::to_writer(&mut out, model);
    for (key, raw) in &fields {
        if *key == "model" {
            continue;
        }
        out.push(b',');
        let _ = serde_json::to_writer(&mut out, key);
        out.push(b':');
        out.extend_from_slice(raw.get().as_bytes());
    }
    out.push(b'}');
    Ok((out, usage))
}

impl Gateway {
    /// Embeds `req.input` on model `req.model`, under its policies and the budgets.
    ///
    /// # Errors
    /// [`GatewayError`]: `not_found` for an unknown model, `invalid_request` for an
    /// Anthropic one, `budget_exceeded`, or the class the model failed with.
    pub async fn embed(&self, req: &EmbeddingsRequest, ctx: &CallContext) -> Result<Embedded, GatewayError> {
        let model = self.model(&req.model)?;
        bump(&model.counters.requests, 1);
        let journal = |e: Option<&GatewayError>, attempts: u32, spent| {
            let answered = e.is_none().then_some(&*model.name);
            let failures: Vec<_> = e.map(|e| e.failures.clone()).unwrap_or_default();
            let end = CallEnd {
                answered_by: answered,
                failures: &failures,
                attempts,
                spent,
                error: e,
                ..CallEnd::default()
            };
            self.journal_call(ctx, &model, Prompted::Input(req.input_raw()), end);
        };
        let Some(uri) = model.endpoint.embeddings_uri.clone() else {
            let e = GatewayError::new(
                ErrorClass::InvalidRequest,
                format!("the model `{}` is an Anthropic model, which has no embeddings endpoint", model.name),
            );
            model.counters.request_failed(e.class);
            journal(Some(&e), 0, None);
            return Err(e);
        };
        let body = req.body(&model.config.model);
        let charges = match self.admit(&model, prompt_estimate(&body), Some(0), Admit::Single, ctx) {
            Ok(c) => c,
            Err(e) => {
                model.counters.request_failed(e.class);
                journal(Some(&e), 0, None);
                return Err(e);
            }
        };
        let span = trace::chat_span(&model, None);
        let mut made = 0;
        let result = charges
            .under(model.pipeline.call(|a| {
                made = a.number;
                self.embed_attempt(&model, &uri, &body, &charges)
            }))
            .instrument(span.clone())
            .await;
        let spent = charges.spent();
        match result {
            Ok(answer) => {
                trace::answered(&span, made);
                bump(&model.counters.answered, 1);
                journal(None, made, Some(spent));
                Ok(Embedded { model: model.name.clone(), body: Bytes::from(answer), attempts: made })
            }
            Err(e) => {
                let (failure, attempts, _) = final_failure(e);
                let breaker = model.pipeline.breaker().map(|b| b.state());
                trace::failed(&span, &failure, attempts, breaker, keel_core::Disposition::Terminal);
                let mut route = crate::gateway::Route::new(model.clone());
                route.failed(&model, &failure, attempts);
                let e = route.error();
                model.counters.request_failed(e.class);
                journal(Some(&e), attempts, (spent.attempts > 0).then_some(spent));
                Err(e)
            }
        }
    }

    async fn embed_attempt(
        &self,
        model: &Model,
        uri: &http::Uri,
        body: &[u8],
        charges: &Charges,
    ) -> Result<Vec<u8>, AttemptError> {
        let mut charge = charges.attempt(model, body)?;
        let resp = model.endpoint.send_at(uri, body.to_vec(), &*self.clock).await?;
        charge.arm();
        let bytes = upstream::read_body(resp.into_body(), uri).await?;
        match read_answer(&bytes, &model.name) {
            Ok((out, usage)) => {
                charge.settle(usage);
                Ok(out)
            }
            Err(f) => {
                charge.settle(None);
                Err(f.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_and_passed_through() {
        let r = EmbeddingsRequest::parse(br#"{"model":"e","input":["a","b"],"dimensions":8}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body("text-embedding-3-small")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 8})
        );
        for bad in [
            &b"[]"[..],
            b"{}",
            br#"{"model":"e"}"#,
            br#"{"model":3,"input":"x"}"#,
            br#"{"model":"e","input":""}"#,
            br#"{"model":"e","input":[]}"#,
            br#"{"model":"e","input":7}"#,
            br#"{"model":"e","input":null}"#,
            br#"{"model":"e","input":{"a":1}}"#,
        ] {
            let e = EmbeddingsRequest::parse(bad).unwrap_err();
            assert_eq!(e.class, ErrorClass::InvalidRequest, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn answers_are_renamed_and_need_data() {
        let (out, usage) =
            read_answer(br#"{"object":"list","data":[{"embedding":[0.1]}],"model":"up","usage":{"prompt_tokens":3,"total_tokens":3}}"#, "e")
                .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "e");
        assert_eq!(usage.map(|u| u.prompt_tokens), Some(3));
        assert_eq!(read_answer(b"{}", "e").unwrap_err().class, ErrorClass::ServerError);
        assert_eq!(read_answer(b"nope", "e").unwrap_err().class, ErrorClass::ServerError);
    }
}
