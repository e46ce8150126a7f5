//! Anthropic's Messages API as Keel serves it (`POST /v1/messages`), translated at the
//! edge to the gateway's chat request and back: the inverse of [`super::anthropic`],
//! which speaks Messages to Anthropic upstreams. Any model can answer — an Anthropic
//! one through `anthropic.rs` again, an OpenAI-compatible one directly — on the one
//! routing path (policies, budgets, fallbacks, validation, journal, stream rescue).
//!
//! | Messages | chat completions |
//! | --- | --- |
//! | `system` (a string or text blocks) | a leading `system` message |
//! | `text` / `image` blocks | text / `image_url` parts |
//! | `tool_use` blocks | `assistant.tool_calls[]` (`input` serialized to `arguments`) |
//! | `tool_result` blocks | `tool` messages, before the rest of their `user` turn (their images in it) |
//! | `thinking` / `redacted_thinking` blocks | dropped (signed for one provider only) |
//! | `tools[]` with `input_schema` | `tools[].function` with `parameters` |
//! | `tool_choice` `auto`/`any`/`tool`/`none` | `auto`/`required`/named/`none` |
//! | `stop_sequences` | `stop` |
//! | `metadata.user_id` | `user` |
//! | `stop_reason` `end_turn`/`max_tokens`/`tool_use`/`refusal` | `finish_reason` `stop`/`length`/`tool_calls`/`content_filter` |
//!
//! `max_tokens` is required, as Anthropic requires it. `cache_control` marks are
//! accepted and dropped (a cache hint); `thinking` is accepted and not acted on.
//! Server tools (web search, code execution...), `document` blocks, `mcp_servers`
//! and `container` are refused with a 400 saying so; so is any unknown field.

use keel_core::{ErrorClass, Failure};
use serde_json::{Map, Value, json};

use super::chunks::{Internal, Reframe, ToolDelta, named_frame};
use super::{AnswerSummary, ChatRequest, Usage};

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ErrorClass::InvalidRequest, message)
}

const MAPPED: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "tools",
    "tool_choice",
    "metadata",
];

/// Accepted and not acted on: `thinking` (a model may think; the answer is the
/// same shape), `service_tier`, `context_management` (Claude Code's hint to clear
/// old tool results, which a stateless gateway has nothing to do about).
const IGNORED: &[&str] = &["thinking", "service_tier", "context_management"];

/// A Messages request: the chat request it becomes.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    /// The gateway's request.
    pub chat: ChatRequest,
}

/// Parses and translates a Messages request body.
///
/// # Errors
/// `invalid_request`, saying which field is wrong: not a JSON object, `model`,
/// `max_tokens` or `messages` missing or of the wrong type, no messages, an unknown
/// role or block type, a server tool, an unknown field.
pub fn parse(body: &[u8]) -> Result<MessagesRequest, Failure> {
    let req: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not a JSON object: {e}")))?;
    if let Some(key) = req.keys().find(|k| !MAPPED.contains(&k.as_str()) && !IGNORED.contains(&k.as_str())) {
        return Err(invalid(format!(
            "{key}: Extra inputs are not permitted (not supported by Keel's /v1/messages)"
        )));
    }
    let get = |k: &str| req.get(k).filter(|v| !v.is_null());
    let model = match get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("model: must be a non-empty string")),
        None => return Err(invalid("model: Field required")),
    };
    let max_tokens = match get("max_tokens") {
        Some(v) if v.as_u64().is_some_and(|n| n > 0) => v.clone(),
        Some(_) => return Err(invalid("max_tokens: must be a positive integer")),
        None => return Err(invalid("max_tokens: Field required")),
    };
    let mut messages = Vec::new();
    match get("system") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let mut text = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push(t),
                    _ => return Err(invalid(format!("system.{i}: only text blocks are supported"))),
                }
            }
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text.join("\n\n")}));
            }
        }
        Some(_) => return Err(invalid("system: must be a string or an array of text blocks")),
    }
    match get("messages") {
        None => return Err(invalid("messages: Field required")),
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(invalid("messages: at least one message is required"));
        }
        Some(Value::Array(list)) => {
            for (i, m) in list.iter().enumerate() {
                message(m, &mut messages).map_err(|e| invalid(format!("messages.{i}: {e}")))?;
            }
        }
        Some(_) => return Err(invalid("messages: must be an array")),
    }
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert("max_tokens".into(), max_tokens);
    match get("stream") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            chat.insert("stream".into(), true.into());
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(_) => return Err(invalid("stream: must be a boolean")),
    }
    for key in ["temperature", "top_p", "top_k"] {
        match get(key) {
            None => {}
            Some(v) if v.is_number() => {
                chat.insert(key.into(), v.clone());
            }
            Some(_) => return Err(invalid(format!("{key}: must be a number"))),
        }
    }
    match get("stop_sequences") {
        None => {}
        Some(Value::Array(s)) if s.is_empty() => {}
        Some(Value::Array(s)) if s.iter().all(Value::is_string) => {
            chat.insert("stop".into(), Value::Array(s.clone()));
        }
        Some(_) => return Err(invalid("stop_sequences: must be an array of strings")),
    }
    if let Some(tools) = get("tools") {
        chat.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = get("tool_choice") {
        let (choice, parallel) = translate_tool_choice(choice)?;
        if let Some(choice) = choice {
            chat.insert("tool_choice".into(), choice);
        }
        if parallel == Some(false) {
            chat.insert("parallel_tool_calls".into(), false.into());
        }
    }
    match get("metadata") {
        None => {}
        Some(Value::Object(m)) => {
            if let Some(user) = m.get("user_id").and_then(Value::as_str) {
                chat.insert("user".into(), user.into());
            }
        }
        Some(_) => return Err(invalid("metadata: must be an object")),
    }
    Ok(MessagesRequest { chat: ChatRequest::from_value(&Value::Object(chat))? })
}

/// Appends the chat messages of one Messages message.
fn message(m: &Value, out: &mut Vec<Value>) -> Result<(), String> {
    let role = m.get("role").and_then(Value::as_str).ok_or("role: Field required (a string)")?;
    if role != "user" && role != "assistant" {
        return Err(format!("role: `{role}` is not one of `user`, `assistant`"));
    }
    let blocks = match m.get("content") {
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(b)) => b.clone(),
        Some(_) => return Err("content: must be a string or an array of blocks".into()),
        None => return Err("content: Field required".into()),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let at = |e: String| format!("content.{i}: {e}");
        let kind = b.get("type").and_then(Value::as_str).ok_or_else(|| at("type: Field required".into()))?;
        let text = |key: &str| b.get(key).and_then(Value::as_str).map(str::to_owned);
        match (role, kind) {
            (_, "text") => {
                let t = text("text").ok_or_else(|| at("text: must be a string".into()))?;
                parts.push(json!({"type": "text", "text": t}));
            }
            ("user", "image") => parts.push(image(b).map_err(at)?),
            ("user", "tool_result") => {
                let id = text("tool_use_id").ok_or_else(|| at("tool_use_id: Field required".into()))?;
                let mut content = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => {
                        let mut s = String::new();
                        for c in inner {
                            match (
                                c.get("type").and_then(Value::as_str),
                                c.get("text").and_then(Value::as_str),
                            ) {
                                (Some("text"), Some(t)) => s.push_str(t),
                                // A chat `tool` message carries only text: the image
                                // follows in the user turn, after the tool messages.
                                (Some("image"), _) => {
                                    parts.push(json!({"type": "text", "text": format!("(the image returned by tool call {id})")}));
                                    parts.push(image(c).map_err(at)?);
                                }
                                _ => {
                                    return Err(at(
                                        "tool_result content: only text and image blocks are supported"
                                            .into(),
                                    ));
                                }
                            }
                        }
                        s
                    }
                    Some(_) => return Err(at("content: must be a string or an array of blocks".into())),
                };
                if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    content = format!("Error: {content}");
                }
                // A chat `tool` message answers the assistant's call: it goes first.
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            ("assistant", "tool_use") => {
                let id = text("id").ok_or_else(|| at("id: Field required".into()))?;
                let name = text("name").ok_or_else(|| at("name: Field required".into()))?;
                let input = match b.get("input") {
                    Some(v @ Value::Object(_)) => v.to_string(),
                    _ => return Err(at("input: must be an object".into())),
                };
                calls.push(
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}}),
                );
            }
            ("assistant", "thinking" | "redacted_thinking") => {}
            (_, other) => {
                return Err(at(format!(
                    "blocks of type `{other}` in a `{role}` message are not supported by Keel"
                )));
            }
        }
    }
    if role == "assistant" {
        let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        if text.is_empty() && calls.is_empty() {
            return Ok(());
        }
        let mut msg =
            json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { text.into() }});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    } else if !parts.is_empty() {
        let content = if parts.iter().all(|p| p["type"] == "text") {
            Value::String(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n\n"))
        } else {
            Value::Array(parts)
        };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

fn image(b: &Value) -> Result<Value, String> {
    let source = b.get("source").ok_or("source: Field required")?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = source
                .get("media_type")
                .and_then(Value::as_str)
                .ok_or("source.media_type: Field required")?;
            let data = source.get("data").and_then(Value::as_str).ok_or("source.data: Field required")?;
            format!("data:{media};base64,{data}")
        }
        Some("url") => {
            source.get("url").and_then(Value::as_str).ok_or("source.url: Field required")?.to_owned()
        }
        _ => return Err("source.type: must be `base64` or `url`".into()),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn translate_tools(tools: &Value) -> Result<Value, Failure> {
    let Value::Array(tools) = tools else { return Err(invalid("tools: must be an array")) };
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let bad = |m: &str| invalid(format!("tools.{i}: {m}"));
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(other) => return Err(bad(&format!("server tools (`{other}`) are not supported by Keel"))),
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("name: Field required"))?;
        let schema = match t.get("input_schema") {
            Some(s @ Value::Object(_)) => s.clone(),
            Some(_) => return Err(bad("input_schema: must be a JSON schema object")),
            None => return Err(bad("input_schema: Field required")),
        };
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(d) = t.get("description").and_then(Value::as_str) {
            function["description"] = d.into();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn translate_tool_choice(choice: &Value) -> Result<(Option<Value>, Option<bool>), Failure> {
    let kind = choice.get("type").and_then(Value::as_str);
    let parallel = choice.get("disable_parallel_tool_use").and_then(Value::as_bool).map(|d| !d);
    let mapped = match kind {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("tool_choice.name: Field required"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(invalid("tool_choice.type: must be `auto`, `any`, `tool` or `none`")),
    };
    Ok((Some(mapped), parallel))
}

/// Anthropic's `stop_reason` for a chat `finish_reason`.
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// The whole answer: a Messages answer of the gateway's answer.
///
/// # Errors
/// `server_error` when a tool call's arguments are not a JSON object (possible only
/// for a model with `validate = false`): Anthropic's `input` must be one.
pub fn answer(id: &str, model: &str, summary: &AnswerSummary, usage: Usage) -> Result<Value, Failure> {
    let mut content = Vec::new();
    let text = summary.content.as_deref().or(summary.refusal.as_deref()).unwrap_or("");
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in &summary.tool_calls {
        let args = if call.function.arguments.trim().is_empty() { "{}" } else { &call.function.arguments };
        let input: Value = serde_json::from_str(args).ok().filter(Value::is_object).ok_or_else(|| {
            Failure::new(
                ErrorClass::ServerError,
                format!("the arguments of `{}` are not a JSON object", call.function.name),
            )
        })?;
        content.push(json!({"type": "tool_use", "id": call.id, "name": call.function.name, "input": input}));
    }
    Ok(json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(summary.finish_reason.as_deref()),
        "stop_sequence": null,
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
    }))
}

#[derive(Debug)]
enum Block {
    Text,
    Tool,
}

/// The Messages event stream of the gateway's stream.
#[derive(Debug)]
pub struct MessagesStream {
    id: String,
    model: String,
    blocks: usize,
    /// The open block: its index and kind.
    open: Option<(usize, Block)>,
    /// Chat tool-call index → block index.
    tools: Vec<(usize, usize)>,
    finish: Option<String>,
    usage: Usage,
    keel: Option<Value>,
    ended: bool,
}

impl MessagesStream {
    /// A translator for message `id` from `model`.
    pub fn new(id: &str, model: &str) -> Self {
        Self {
            id: id.to_owned(),
            model: model.to_owned(),
            blocks: 0,
            open: None,
            tools: Vec::new(),
            finish: None,
            usage: Usage::default(),
            keel: None,
            ended: false,
        }
    }

    fn close(&mut self, out: &mut Vec<bytes::Bytes>) {
        if let Some((index, _)) = self.open.take() {
            out.push(named_frame(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn text(&mut self, text: String, out: &mut Vec<bytes::Bytes>) {
        if !matches!(self.open, Some((_, Block::Text))) {
            self.close(out);
            let index = self.blocks;
            self.blocks += 1;
            out.push(named_frame(
                "content_block_start",
                &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
            ));
            self.open = Some((index, Block::Text));
        }
        let index = self.open.as_ref().map_or(0, |(i, _)| *i);
        out.push(named_frame(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
        ));
    }

    fn tool(&mut self, delta: ToolDelta, out: &mut Vec<bytes::Bytes>) {
        let function = delta.function.unwrap_or_default();
        let index = match self.tools.iter().find(|(c, _)| *c == delta.index) {
            Some((_, b)) => *b,
            None => {
                self.close(out);
                let index = self.blocks;
                self.blocks += 1;
                self.tools.push((delta.index, index));
                let id = delta
                    .id
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| format!("toolu_{}_{index}", self.id));
                out.push(named_frame(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": id, "name": function.name.clone().unwrap_or_default(), "input": {},
                    }}),
                ));
                self.open = Some((index, Block::Tool));
                index
            }
        };
        if let Some(args) = function.arguments.filter(|a| !a.is_empty()) {
            out.push(named_frame(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": args}}),
            ));
        }
    }
}

impl Reframe for MessagesStream {
    fn start(&mut self, out: &mut Vec<bytes::Bytes>) {
        out.push(named_frame(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": format!("msg_{}", self.id), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        ));
    }

    fn frame(&mut self, frame: Internal, out: &mut Vec<bytes::Bytes>) {
        match frame {
            Internal::Delta { text, tool_calls, finish } => {
                if let Some(text) = text {
                    self.text(text, out);
                }
                for d in tool_calls {
                    self.tool(d, out);
                }
                if finish.is_some() {
                    self.finish = finish;
                }
            }
            Internal::Tail { usage, keel } => {
                if let Some(u) = usage {
                    self.usage = u;
                }
                self.keel = keel;
            }
            Internal::Done => {
                self.close(out);
                let mut delta = json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
                    "usage": {"input_tokens": self.usage.prompt_tokens, "output_tokens": self.usage.completion_tokens},
                });
                if let Some(keel) = &self.keel {
                    delta["keel"] = keel.clone();
                }
                out.push(named_frame("message_delta", &delta));
                out.push(named_frame("message_stop", &json!({"type": "message_stop"})));
                self.ended = true;
            }
            Internal::Error { class, message } => {
                let body = crate::error::Shape::Anthropic.body(class, &message);
                out.push(named_frame("error", &body));
                self.ended = true;
            }
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
