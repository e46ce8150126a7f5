//! OpenAI's Responses API (`POST /v1/responses`), translated at the edge to the
//! gateway's chat request and back, so a Responses call takes the one routing path
//! (policies, budgets, fallbacks, validation, journal, stream rescue) of every call.
//!
//! | Responses | chat completions |
//! | --- | --- |
//! | `instructions` | a leading `system` message |
//! | `input` string | one `user` message |
//! | `message` items, `input_text`/`output_text`/`refusal` parts | messages, text parts |
//! | `input_image` parts (`image_url`) | `image_url` parts |
//! | `function_call` items | `assistant.tool_calls[]` (consecutive calls merged) |
//! | `function_call_output` items | `tool` messages (their images in a `user` message after) |
//! | `reasoning` items | dropped (an upstream cannot take another's reasoning back) |
//! | `tools[]` of type `function` (flat) | `tools[].function` |
//! | `tool_choice` `auto`/`none`/`required`/`{type: function, name}` | the same, nested |
//! | `max_output_tokens` | `max_tokens` (what every OpenAI-compatible server reads) |
//! | `text.format` | `response_format` |
//! | `reasoning.effort` | `reasoning_effort` |
//!
//! **Keel is stateless here.** `store: true`, `previous_response_id`,
//! `conversation`, `background`, stored `prompt`s and `item_reference` items would
//! need responses kept by the server; each is refused with a 400 that says so
//! (a request that leaves `store` out is answered statelessly and says
//! `"store": false`). Unknown fields and tool types Keel cannot honour (hosted tools:
//! web search, file search, computer use...) are refused too, never ignored.

use keel_core::{ErrorClass, Failure};
use serde_json::{Map, Value, json};

use super::chunks::{Internal, Reframe, named_frame};
use super::{AnswerSummary, ChatRequest, Usage};

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ErrorClass::InvalidRequest, message)
}

/// Fields mapped to the chat request.
const MAPPED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "stream",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "temperature",
    "top_p",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "user",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "store",
    "previous_response_id",
    "conversation",
    "background",
    "prompt",
];

/// Fields accepted and not acted on: hints with nothing to keep or return.
/// (`metadata` is echoed in the answer; `include` asks for extras Keel has none of;
/// `truncation` and `max_tool_calls` bound server-side state Keel does not keep;
/// `stream_options` has only `include_obfuscation`.)
const IGNORED: &[&str] =
    &["metadata", "include", "truncation", "max_tool_calls", "stream_options", "top_logprobs"];

/// The request fields the answer echoes, as OpenAI's does.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    instructions: Value,
    tools: Value,
    tool_choice: Value,
    temperature: Value,
    top_p: Value,
    max_output_tokens: Value,
    parallel_tool_calls: Value,
    text: Value,
    reasoning: Value,
    metadata: Value,
    user: Value,
}

/// A Responses request: the chat request it becomes, and what its answer echoes.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    /// The gateway's request.
    pub chat: ChatRequest,
    /// What the answer repeats.
    pub echo: Echo,
}

fn stateless(what: &str) -> Failure {
    invalid(format!(
        "{what}: Keel's /v1/responses is stateless and keeps no responses; send `store: false` and the \
         whole conversation in `input` on every turn"
    ))
}

/// Parses and translates a Responses request body.
///
/// # Errors
/// `invalid_request`, saying which field is wrong: not a JSON object, `model` or
/// `input` missing or of the wrong type, an empty `input`, an item, part or tool
/// type Keel does not support, an unknown field, or any field that needs server
/// state (`store: true`, `previous_response_id`...).
pub fn parse(body: &[u8]) -> Result<ResponsesRequest, Failure> {
    let req: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not a JSON object: {e}")))?;
    if let Some(key) = req.keys().find(|k| !MAPPED.contains(&k.as_str()) && !IGNORED.contains(&k.as_str())) {
        return Err(invalid(format!("unknown field `{key}` (not supported by Keel's /v1/responses)")));
    }
    let get = |k: &str| req.get(k).filter(|v| !v.is_null());
    if get("store").and_then(Value::as_bool) == Some(true) {
        return Err(stateless("`store: true`"));
    }
    if get("store").is_some_and(|v| !v.is_boolean()) {
        return Err(invalid("`store` must be a boolean"));
    }
    for key in ["previous_response_id", "conversation", "prompt"] {
        if get(key).is_some() {
            return Err(stateless(&format!("`{key}`")));
        }
    }
    if get("background").and_then(Value::as_bool) == Some(true) {
        return Err(stateless("`background: true`"));
    }
    let model = match get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("`model` must be a non-empty string")),
        None => return Err(invalid("missing field `model`")),
    };
    let mut messages = Vec::new();
    match get("instructions") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(invalid("`instructions` must be a string")),
    }
    match get("input") {
        None => return Err(invalid("missing field `input`")),
        Some(Value::String(s)) if s.is_empty() => return Err(invalid("`input` is empty")),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) if items.is_empty() => return Err(invalid("`input` is empty")),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, &mut messages).map_err(|m| invalid(format!("`input[{i}]`: {m}")))?;
            }
        }
        Some(_) => return Err(invalid("`input` must be a string or an array of items")),
    }
    if !messages.iter().any(|m| m["role"] != "system") {
        return Err(invalid("`input` has no message to answer"));
    }
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    let stream = match get("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean")),
    };
    if stream {
        chat.insert("stream".into(), true.into());
        // The usage of every attempt, for `response.completed`.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = get("tools") {
        chat.insert("tools".into(), translate_tools(tools)?);
    }
    if let Some(choice) = get("tool_choice") {
        chat.insert("tool_choice".into(), translate_tool_choice(choice)?);
    }
    match get("max_output_tokens") {
        None => {}
        Some(v) if v.as_u64().is_some_and(|n| n > 0) => {
            chat.insert("max_tokens".into(), v.clone());
        }
        Some(_) => return Err(invalid("`max_output_tokens` must be a positive integer")),
    }
    for key in ["temperature", "top_p"] {
        match get(key) {
            None => {}
            Some(v) if v.is_number() => {
                chat.insert(key.into(), v.clone());
            }
            Some(_) => return Err(invalid(format!("`{key}` must be a number"))),
        }
    }
    match get("parallel_tool_calls") {
        None => {}
        Some(v @ Value::Bool(_)) => {
            chat.insert("parallel_tool_calls".into(), v.clone());
        }
        Some(_) => return Err(invalid("`parallel_tool_calls` must be a boolean")),
    }
    for key in ["user", "service_tier", "prompt_cache_key", "safety_identifier"] {
        match get(key) {
            None => {}
            Some(v @ Value::String(_)) => {
                chat.insert(key.into(), v.clone());
            }
            Some(_) => return Err(invalid(format!("`{key}` must be a string"))),
        }
    }
    if let Some(text) = get("text") {
        if let Some(format) = translate_text(text)? {
            chat.insert("response_format".into(), format);
        }
    }
    match get("reasoning") {
        None => {}
        Some(Value::Object(r)) => {
            if let Some(effort) = r.get("effort").filter(|v| !v.is_null()) {
                if !effort.is_string() {
                    return Err(invalid("`reasoning.effort` must be a string"));
                }
                chat.insert("reasoning_effort".into(), effort.clone());
            }
        }
        Some(_) => return Err(invalid("`reasoning` must be an object")),
    }
    let echo = Echo {
        instructions: get("instructions").cloned().unwrap_or(Value::Null),
        tools: get("tools").cloned().unwrap_or_else(|| json!([])),
        tool_choice: get("tool_choice").cloned().unwrap_or_else(|| "auto".into()),
        temperature: get("temperature").cloned().unwrap_or(Value::Null),
        top_p: get("top_p").cloned().unwrap_or(Value::Null),
        max_output_tokens: get("max_output_tokens").cloned().unwrap_or(Value::Null),
        parallel_tool_calls: get("parallel_tool_calls").cloned().unwrap_or(Value::Bool(true)),
        text: get("text").cloned().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        reasoning: get("reasoning").cloned().unwrap_or_else(|| json!({"effort": null, "summary": null})),
        metadata: get("metadata").cloned().unwrap_or_else(|| json!({})),
        user: get("user").cloned().unwrap_or(Value::Null),
    };
    let chat = ChatRequest::from_value(&Value::Object(chat))?;
    Ok(ResponsesRequest { chat, echo })
}

/// Appends the chat messages of one input item.
fn input_item(item: &Value, messages: &mut Vec<Value>) -> Result<(), String> {
    let Value::Object(obj) = item else { return Err("an item must be an object".into()) };
    let kind = match obj.get("type") {
        None | Some(Value::Null) if obj.contains_key("role") => "message",
        None | Some(Value::Null) => return Err("an item needs a `type` (or a `role`)".into()),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("`type` must be a string".into()),
    };
    let string = |key: &str| -> Result<String, String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("`{key}` must be a string")),
            None => Err(format!("missing field `{key}`")),
        }
    };
    match kind {
        "message" => {
            let role = string("role")?;
            if !matches!(role.as_str(), "user" | "assistant" | "system" | "developer") {
                return Err(format!("unknown role `{role}`"));
            }
            let content = match obj.get("content") {
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(Value::Array(parts)) => {
                    let parts = parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| content_part(p).map_err(|m| format!("`content[{i}]`: {m}")));
                    let parts = parts.collect::<Result<Vec<_>, _>>()?;
                    if role == "user" && parts.iter().any(|p| p["type"] != "text") {
                        Value::Array(parts)
                    } else if parts.iter().any(|p| p["type"] != "text") {
                        return Err(format!("a `{role}` message can carry only text"));
                    } else {
                        Value::String(
                            parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
                        )
                    }
                }
                Some(_) => return Err("`content` must be a string or an array of parts".into()),
                None => return Err("missing field `content`".into()),
            };
            let role = if role == "developer" { "system".to_owned() } else { role };
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call = json!({
                "id": string("call_id")?,
                "type": "function",
                "function": {"name": string("name")?, "arguments": string("arguments")?},
            });
            // Consecutive calls are one assistant turn (as are a text and its calls).
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" => match last.get_mut("tool_calls") {
                    Some(Value::Array(calls)) => calls.push(call),
                    _ => {
                        last["tool_calls"] = json!([call]);
                    }
                },
                _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let call_id = string("call_id")?;
            let mut images = Vec::new();
            let output = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("input_text" | "output_text"), Some(t)) => text.push_str(t),
                            (Some("input_image"), _) => images.push(content_part(p)?),
                            _ => {
                                return Err(
                                    "`output` parts other than text and images are not supported".into()
                                );
                            }
                        }
                    }
                    text
                }
                Some(_) => return Err("`output` must be a string or an array of parts".into()),
                None => return Err("missing field `output`".into()),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            // A chat `tool` message carries only text: its images follow as the user's.
            if !images.is_empty() {
                images.insert(
                    0,
                    json!({"type": "text", "text": format!("(the image returned by tool call {call_id})")}),
                );
                messages.push(json!({"role": "user", "content": images}));
            }
        }
        // Reasoning a model did on an earlier turn: no upstream takes it back through
        // chat completions (and another provider's is opaque to it).
        "reasoning" => {}
        "item_reference" => {
            return Err("`item_reference` needs stored items: Keel's /v1/responses is stateless; send \
                        the items themselves"
                .into());
        }
        other => return Err(format!("input items of type `{other}` are not supported by Keel")),
    }
    Ok(())
}

/// A chat content part of a Responses content part.
fn content_part(part: &Value) -> Result<Value, String> {
    let kind = part.get("type").and_then(Value::as_str).ok_or("a part needs a string `type`")?;
    let text = |key: &str| part.get(key).and_then(Value::as_str).map(str::to_owned);
    match kind {
        "input_text" | "output_text" => {
            Ok(json!({"type": "text", "text": text("text").ok_or("a text part needs a string `text`")?}))
        }
        "refusal" => {
            Ok(json!({"type": "text", "text": text("refusal").ok_or("`refusal` must be a string")?}))
        }
        "input_image" => {
            let url =
                text("image_url").ok_or("an image part needs `image_url` (file ids need stored files)")?;
            let mut image = json!({"url": url});
            if let Some(detail) = text("detail") {
                image["detail"] = detail.into();
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        other => Err(format!("content parts of type `{other}` are not supported by Keel")),
    }
}

fn translate_tools(tools: &Value) -> Result<Value, Failure> {
    let Value::Array(tools) = tools else { return Err(invalid("`tools` must be an array")) };
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let bad = |m: &str| invalid(format!("`tools[{i}]`: {m}"));
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "tools of type `{other}` are not supported by Keel (only `function`)"
                )));
            }
            None => return Err(bad("a tool needs a string `type`")),
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("a function tool needs a `name`"))?;
        let mut function = json!({"name": name});
        for key in ["description", "parameters", "strict"] {
            if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                function[key] = v.clone();
            }
        }
        if t.get("parameters").is_some_and(|p| !p.is_object() && !p.is_null()) {
            return Err(bad("`parameters` must be a JSON schema object"));
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn translate_tool_choice(choice: &Value) -> Result<Value, Failure> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`tool_choice.name` must be a string"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(invalid(
            "`tool_choice` must be `auto`, `none`, `required` or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

fn translate_text(text: &Value) -> Result<Option<Value>, Failure> {
    let Value::Object(t) = text else { return Err(invalid("`text` must be an object")) };
    let Some(format) = t.get("format").filter(|f| !f.is_null()) else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            if !schema.contains_key("name") || !schema.get("schema").is_some_and(Value::is_object) {
                return Err(invalid(
                    "`text.format` of type `json_schema` needs a `name` and a `schema` object",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid("`text.format.type` must be `text`, `json_object` or `json_schema`")),
    }
}

/// Responses usage of a chat usage.
fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The status and `incomplete_details` of a finish reason.
fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

impl Echo {
    /// The response object.
    fn response(&self, id: &str, created: u64, model: &str, status: &str, output: Vec<Value>) -> Value {
        json!({
            "id": id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": self.reasoning,
            "store": false,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": null,
            "user": self.user,
            "metadata": self.metadata,
        })
    }
}

fn message_item(id: &str, status: &str, text: &str) -> Value {
    json!({
        "type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn call_item(call_id: &str, status: &str, name: &str, arguments: &str) -> Value {
    json!({
        "type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
        "name": name, "arguments": arguments, "status": status,
    })
}

/// The whole answer: a response object of the gateway's answer.
pub fn answer(
    echo: &Echo,
    id: &str,
    created: u64,
    model: &str,
    summary: &AnswerSummary,
    usage: Usage,
) -> Value {
    let mut output = Vec::new();
    if let Some(refusal) = summary.refusal.as_deref().filter(|r| !r.is_empty()) {
        output.push(json!({
            "type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
            "content": [{"type": "refusal", "refusal": refusal}],
        }));
    } else if let Some(text) = summary.content.as_deref().filter(|t| !t.is_empty()) {
        output.push(message_item(&format!("msg_{id}"), "completed", text));
    }
    for call in &summary.tool_calls {
        output.push(call_item(&call.id, "completed", &call.function.name, &call.function.arguments));
    }
    let (status, incomplete) = status_of(summary.finish_reason.as_deref());
    let mut response = echo.response(&format!("resp_{id}"), created, model, status, output);
    response["incomplete_details"] = incomplete;
    response["usage"] = usage_json(usage);
    response
}

/// An output item being streamed.
#[derive(Debug)]
enum Open {
    Message { output_index: usize, id: String, text: String },
    Call { chat_index: usize, output_index: usize, call_id: String, name: String, arguments: String },
}

/// The Responses event stream of the gateway's stream.
#[derive(Debug)]
pub struct ResponsesStream {
    echo: Echo,
    id: String,
    created: u64,
    model: String,
    seq: u64,
    open: Vec<Open>,
    output: Vec<Value>,
    items: usize,
    finish: Option<String>,
    usage: Usage,
    keel: Option<Value>,
    ended: bool,
}

impl ResponsesStream {
    /// A translator for a response `id` from `model`.
    pub fn new(echo: Echo, id: &str, created: u64, model: &str) -> Self {
        Self {
            echo,
            id: id.to_owned(),
            created,
            model: model.to_owned(),
            seq: 0,
            open: Vec::new(),
            output: Vec::new(),
            items: 0,
            finish: None,
            usage: Usage::default(),
            keel: None,
            ended: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<bytes::Bytes>, kind: &str, mut event: Value) {
        event["type"] = kind.into();
        event["sequence_number"] = self.seq.into();
        self.seq += 1;
        out.push(named_frame(kind, &event));
    }

    fn snapshot(&self, status: &str) -> Value {
        let mut output = self.output.clone();
        for open in &self.open {
            output.push(match open {
                Open::Message { id, text, .. } => message_item(id, "in_progress", text),
                Open::Call { call_id, name, arguments, .. } => {
                    call_item(call_id, "in_progress", name, arguments)
                }
            });
        }
        let mut r =
            self.echo.response(&format!("resp_{}", self.id), self.created, &self.model, status, output);
        if let Some(keel) = &self.keel {
            r["keel"] = keel.clone();
        }
        r
    }

    /// Closes every open item (its `.done` events), in order.
    fn close_all(&mut self, out: &mut Vec<bytes::Bytes>) {
        for open in std::mem::take(&mut self.open) {
            match open {
                Open::Message { output_index, id, text } => {
                    let part =
                        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                    self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": output_index, "content_index": 0, "text": text, "logprobs": []}));
                    self.emit(out, "response.content_part.done", json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": part}));
                    let item = message_item(&id, "completed", &text);
                    self.emit(
                        out,
                        "response.output_item.done",
                        json!({"output_index": output_index, "item": item}),
                    );
                    self.output.push(item);
                }
                Open::Call { output_index, call_id, name, arguments, .. } => {
                    let item_id = format!("fc_{call_id}");
                    self.emit(out, "response.function_call_arguments.done", json!({"item_id": item_id, "output_index": output_index, "name": name, "arguments": arguments}));
                    let item = call_item(&call_id, "completed", &name, &arguments);
                    self.emit(
                        out,
                        "response.output_item.done",
                        json!({"output_index": output_index, "item": item}),
                    );
                    self.output.push(item);
                }
            }
        }
    }

    fn text(&mut self, text: String, out: &mut Vec<bytes::Bytes>) {
        if !matches!(self.open.last(), Some(Open::Message { .. })) {
            self.close_all(out);
            let output_index = self.items;
            self.items += 1;
            let id = format!("msg_{}_{output_index}", self.id);
            self.emit(out, "response.output_item.added", json!({"output_index": output_index, "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
            self.emit(out, "response.content_part.added", json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
            self.open.push(Open::Message { output_index, id, text: String::new() });
        }
        let Some(Open::Message { output_index, id, text: all }) = self.open.last_mut() else { return };
        all.push_str(&text);
        let event = json!({"item_id": id, "output_index": output_index, "content_index": 0, "delta": text, "logprobs": []});
        self.emit(out, "response.output_text.delta", event);
    }

    fn tool(&mut self, delta: super::chunks::ToolDelta, out: &mut Vec<bytes::Bytes>) {
        let function = delta.function.unwrap_or_default();
        let known = self
            .open
            .iter()
            .any(|o| matches!(o, Open::Call { chat_index, .. } if *chat_index == delta.index));
        if !known {
            // A new call: what was open before it is complete.
            self.close_all(out);
            let output_index = self.items;
            self.items += 1;
            let call_id = delta
                .id
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| format!("call_{}_{output_index}", self.id));
            let name = function.name.clone().unwrap_or_default();
            self.emit(
                out,
                "response.output_item.added",
                json!({"output_index": output_index, "item": call_item(&call_id, "in_progress", &name, "")}),
            );
            self.open.push(Open::Call {
                chat_index: delta.index,
                output_index,
                call_id,
                name,
                arguments: String::new(),
            });
        }
        let Some(args) = function.arguments.filter(|a| !a.is_empty()) else { return };
        let Some(Open::Call { output_index, call_id, arguments, .. }) = self
            .open
            .iter_mut()
            .find(|o| matches!(o, Open::Call { chat_index, .. } if *chat_index == delta.index))
        else {
            return;
        };
        arguments.push_str(&args);
        let event = json!({"item_id": format!("fc_{call_id}"), "output_index": *output_index, "delta": args});
        self.emit(out, "response.function_call_arguments.delta", event);
    }
}

impl Reframe for ResponsesStream {
    fn start(&mut self, out: &mut Vec<bytes::Bytes>) {
        let response = self.snapshot("in_progress");
        self.emit(out, "response.created", json!({"response": response}));
        let response = self.snapshot("in_progress");
        self.emit(out, "response.in_progress", json!({"response": response}));
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
                self.close_all(out);
                let (status, incomplete) = status_of(self.finish.as_deref());
                let mut response = self.snapshot(status);
                response["incomplete_details"] = incomplete;
                response["usage"] = usage_json(self.usage);
                let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
                self.emit(out, kind, json!({"response": response}));
                self.ended = true;
            }
            Internal::Error { class, message } => {
                let mut response = self.snapshot("failed");
                response["error"] = json!({"code": crate::error::openai_code(class), "message": message, "keel_class": class.as_str()});
                self.emit(out, "response.failed", json!({"response": response}));
                self.ended = true;
            }
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
#[path = "responses_tests.rs"]
mod tests;
