//! Anthropic's Messages API, translated to and from OpenAI's chat completions.
//!
//! Agents speak OpenAI; an `anthropic` model is called with the Messages API and its
//! answers come back in OpenAI's shape, tool use included:
//!
//! | OpenAI | Anthropic |
//! | --- | --- |
//! | `system` messages | `system` |
//! | `assistant.tool_calls[]` | `tool_use` blocks (`arguments` parsed to `input`) |
//! | `tool` messages | `tool_result` blocks in a `user` message |
//! | `tools[].function` | `tools[]` with `input_schema` |
//! | `tool_choice` `auto`/`required`/`none`/named | `auto`/`any`/`none`/`tool` |
//! | `stop` | `stop_sequences` |
//! | `finish_reason` `stop`/`length`/`tool_calls`/`content_filter` | `stop_reason` `end_turn`/`max_tokens`/`tool_use`/`refusal` |
//!
//! Streams are translated event by event ([`StreamTranslator`]).

use keel_core::{ErrorClass, Failure};
use serde_json::{Map, Value, json};

use super::{ChatRequest, Usage};

/// The API version sent in `anthropic-version`.
pub const VERSION: &str = "2023-06-01";

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ErrorClass::InvalidRequest, message)
}

/// Text of an OpenAI `content` (a string, or an array of parts).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
        }
        _ => String::new(),
    }
}

/// Anthropic content blocks of an OpenAI `content`.
fn blocks_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Some(json!({"type": "text", "text": p.get("text").cloned().unwrap_or_default()})),
                Some("image_url") => {
                    let url = p.pointer("/image_url/url").and_then(Value::as_str)?;
                    let rest = url.strip_prefix("data:")?;
                    let (media, data) = rest.split_once(";base64,")?;
                    Some(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Appends `blocks` as a `role` message, merging with the previous one of the same
/// role (Anthropic wants roles to alternate).
fn push(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(content) = last["content"].as_array_mut() {
                content.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// The Messages API body for `req`.
///
/// # Errors
/// `invalid_request` when a message cannot be translated.
pub fn request_body(
    req: &ChatRequest,
    upstream_model: &str,
    default_max_tokens: u64,
) -> Result<Vec<u8>, Failure> {
    let messages: Vec<Value> =
        serde_json::from_str(req.messages_raw()).map_err(|e| invalid(format!("`messages`: {e}")))?;
    let mut system = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for m in &messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").cloned().unwrap_or(Value::Null);
        match role {
            "system" | "developer" => system.push(text_of(&content)),
            "user" => push(&mut out, "user", blocks_of(&content)),
            "assistant" => {
                let mut blocks = blocks_of(&content);
                for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    let args = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
                    let input: Value = serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                        .map_err(|e| invalid(format!("tool call arguments are not JSON: {e}")))?;
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or_default(),
                        "name": call.pointer("/function/name").cloned().unwrap_or_default(),
                        "input": input,
                    }));
                }
                push(&mut out, "assistant", blocks);
            }
            "tool" => push(
                &mut out,
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or_default(),
                    "content": text_of(&content),
                })],
            ),
            other => return Err(invalid(format!("unknown message role `{other}`"))),
        }
    }
    // A trailing assistant message is a prefill: Anthropic continues it. It must not
    // end with whitespace.
    if let Some(last) = out.last_mut() {
        if last["role"] == "assistant" {
            if let Some(Value::Object(block)) = last["content"].as_array_mut().and_then(|c| c.last_mut()) {
                if let Some(Value::String(text)) = block.get_mut("text") {
                    let trimmed = text.trim_end().len();
                    text.truncate(trimmed);
                }
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), upstream_model.into());
    body.insert("max_tokens".into(), req.max_tokens.unwrap_or(default_max_tokens).into());
    body.insert("messages".into(), Value::Array(out));
    if !system.is_empty() {
        body.insert("system".into(), system.join("\n\n").into());
    }
    if req.stream {
        body.insert("stream".into(), true.into());
    }
    let field = |key: &str| -> Option<Value> {
        req.field(key).and_then(|r| serde_json::from_str::<Value>(r.get()).ok()).filter(|v| !v.is_null())
    };
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = field(key) {
            body.insert(key.into(), v);
        }
    }
    match field("stop") {
        Some(Value::String(s)) => {
            body.insert("stop_sequences".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            body.insert("stop_sequences".into(), v);
        }
        _ => {}
    }
    if let Some(Value::Array(tools)) = field("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                json!({
                    "name": f.get("name").cloned().unwrap_or_default(),
                    "description": f.get("description").cloned().unwrap_or_else(|| "".into()),
                    "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = field("tool_choice") {
        let mapped = match &choice {
            Value::String(s) if s == "required" => Some(json!({"type": "any"})),
            Value::String(s) if s == "none" => Some(json!({"type": "none"})),
            Value::String(_) => Some(json!({"type": "auto"})),
            Value::Object(_) => {
                choice.pointer("/function/name").map(|name| json!({"type": "tool", "name": name}))
            }
            _ => None,
        };
        if let Some(mapped) = mapped {
            body.insert("tool_choice".into(), mapped);
        }
    }
    serde_json::to_vec(&Value::Object(body)).map_err(|e| invalid(e.to_string()))
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Translates a Messages API answer to an OpenAI chat completion named `model`.
///
/// # Errors
/// `server_error` when the answer is not a Messages API answer.
pub fn answer_to_openai(body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, Failure> {
    let malformed = |m: String| Failure::new(ErrorClass::ServerError, m);
    let answer: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("the upstream's answer is not valid JSON: {e}")))?;
    let blocks = answer
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("the upstream's answer has no `content`".into()))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or_default(),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let stop = answer.get("stop_reason").and_then(Value::as_str).unwrap_or("end_turn");
    let usage = Usage::new(
        answer.pointer("/usage/input_tokens").and_then(Value::as_u64).unwrap_or(0),
        answer.pointer("/usage/output_tokens").and_then(Value::as_u64).unwrap_or(0),
    );
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let completion = json!({
        "id": answer.get("id").cloned().unwrap_or_else(|| "msg".into()),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(stop)}],
        "usage": usage,
    });
    serde_json::to_vec(&completion).map_err(|e| malformed(e.to_string()))
}

/// Translates a Messages API event stream to OpenAI chunks, one event at a time.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    id: String,
    input_tokens: u64,
    output_tokens: u64,
    /// Anthropic block index → OpenAI tool-call index, for tool-use blocks.
    tool_index: Vec<(u64, u64)>,
    tools: u64,
}

/// What one Anthropic event means in OpenAI terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    /// Nothing to send (a ping, a block's end).
    Nothing,
    /// A `delta` object for the chunk's first choice.
    Delta(Value),
    /// The answer ended, with OpenAI's finish reason.
    Finish(&'static str),
    /// The stream is complete, with the usage.
    Done(Usage),
    /// The upstream reported an error mid-stream.
    Error(Failure),
}

impl StreamTranslator {
    /// The message id (from `message_start`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Usage so far.
    pub fn usage(&self) -> Usage {
        Usage::new(self.input_tokens, self.output_tokens)
    }

    /// Translates the `data` of one event.
    ///
    /// # Errors
    /// `server_error` when `data` is not JSON (a malformed chunk, skipped by callers).
    pub fn event(&mut self, data: &str) -> Result<Translated, Failure> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Failure::new(ErrorClass::ServerError, format!("malformed event: {e}")))?;
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        Ok(match kind {
            "message_start" => {
                self.id = v.pointer("/message/id").and_then(Value::as_str).unwrap_or("msg").to_owned();
                self.input_tokens =
                    v.pointer("/message/usage/input_tokens").and_then(Value::as_u64).unwrap_or(0);
                Translated::Delta(json!({"role": "assistant", "content": ""}))
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                match v.pointer("/content_block/type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let n = self.tools;
                        self.tools += 1;
                        self.tool_index.push((index, n));
                        Translated::Delta(json!({"tool_calls": [{
                            "index": n,
                            "id": v.pointer("/content_block/id").cloned().unwrap_or_default(),
                            "type": "function",
                            "function": {"name": v.pointer("/content_block/name").cloned().unwrap_or_default(), "arguments": ""},
                        }]}))
                    }
                    _ => Translated::Nothing,
                }
            }
            "content_block_delta" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                match v.pointer("/delta/type").and_then(Value::as_str) {
                    Some("text_delta") => Translated::Delta(
                        json!({"content": v.pointer("/delta/text").cloned().unwrap_or_default()}),
                    ),
                    Some("input_json_delta") => {
                        let n = self.tool_index.iter().find(|(i, _)| *i == index).map_or(0, |(_, n)| *n);
                        Translated::Delta(json!({"tool_calls": [{
                            "index": n,
                            "function": {"arguments": v.pointer("/delta/partial_json").cloned().unwrap_or_default()},
                        }]}))
                    }
                    _ => Translated::Nothing,
                }
            }
            "message_delta" => {
                if let Some(out) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.output_tokens = out;
                }
                match v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    Some(stop) => Translated::Finish(finish_reason(stop)),
                    None => Translated::Nothing,
                }
            }
            "message_stop" => Translated::Done(self.usage()),
            "error" => {
                let kind = v.pointer("/error/type").and_then(Value::as_str).unwrap_or("api_error");
                let message = v.pointer("/error/message").and_then(Value::as_str).unwrap_or("");
                let class = match kind {
                    "rate_limit_error" => ErrorClass::RateLimited,
                    "invalid_request_error" => ErrorClass::InvalidRequest,
                    _ => ErrorClass::ServerError,
                };
                Translated::Error(Failure::new(class, format!("{kind}: {message}")))
            }
            _ => Translated::Nothing,
        })
    }
}
