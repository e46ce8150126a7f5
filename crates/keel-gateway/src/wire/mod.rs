//! OpenAI's chat-completions wire format, parsed shallowly.
//!
//! A gateway that builds a full JSON tree of every request and answer spends about a
//! third of its throughput doing so. Keel parses only what its policies need (the
//! model, `stream`, the token limit, the answer's text, tool calls, finish reason and
//! usage) and keeps everything else as raw JSON, passed through untouched: tools,
//! `response_format`, `logprobs`, vendor extensions all reach an OpenAI-kind upstream
//! as the agent wrote them.

pub mod anthropic;
pub mod chunks;
pub mod messages;
pub mod responses;

use std::borrow::Cow;
use std::collections::BTreeMap;

use keel_core::{ErrorClass, Failure};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A raw JSON value, kept as written.
pub type Raw = Box<RawValue>;

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens of the answer.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Both.
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Usage from its two parts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A chat-completions request: the fields Keel acts on, and every field as sent.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The model name the agent asked for.
    pub model: String,
    /// Whether the answer streams.
    pub stream: bool,
    /// Whether the agent asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u64>,
    fields: BTreeMap<String, Raw>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A function tool the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Its name.
    pub name: String,
    /// Its parameters' JSON schema, if given.
    pub parameters: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ToolWire {
    #[serde(default)]
    function: Option<FunctionWire>,
}

#[derive(Deserialize)]
struct FunctionWire {
    name: String,
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

impl ChatRequest {
    /// Parses a request body.
    ///
    /// # Errors
    /// `invalid_request` when the body is not a JSON object with a string `model`
    /// and an array `messages`.
    pub fn parse(body: &[u8]) -> Result<Self, Failure> {
        let fields: BTreeMap<String, Raw> = serde_json::from_slice(body).map_err(|e| {
            Failure::new(ErrorClass::InvalidRequest, format!("the body is not a JSON object: {e}"))
        })?;
        Self::from_fields(fields)
    }

    /// A request from a JSON value (for callers without HTTP).
    ///
    /// # Errors
    /// As [`parse`](Self::parse).
    pub fn from_value(value: &serde_json::Value) -> Result<Self, Failure> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Failure::new(ErrorClass::InvalidRequest, format!("unserialisable request: {e}")))?;
        Self::parse(&body)
    }

    fn from_fields(fields: BTreeMap<String, Raw>) -> Result<Self, Failure> {
        let bad = |m: String| Failure::new(ErrorClass::InvalidRequest, m);
        let model: String = match fields.get("model") {
            Some(raw) => {
                serde_json::from_str(raw.get()).map_err(|_| bad("`model` must be a string".into()))?
            }
            None => return Err(bad("missing field `model`".into())),
        };
        match fields.get("messages") {
            Some(raw) if raw.get().trim_start().starts_with('[') => {}
            Some(_) => return Err(bad("`messages` must be an array".into())),
            None => return Err(bad("missing field `messages`".into())),
        }
        let opt = |key: &str| fields.get(key).filter(|r| r.get() != "null");
        let stream = match opt("stream") {
            Some(raw) => {
                serde_json::from_str(raw.get()).map_err(|_| bad("`stream` must be a boolean".into()))?
            }
            None => false,
        };
        let include_usage = match opt("stream_options") {
            Some(raw) => {
                serde_json::from_str::<StreamOptions>(raw.get())
                    .map_err(|e| bad(format!("`stream_options`: {e}")))?
                    .include_usage
            }
            None => false,
        };
        let limit = |key: &str| -> Result<Option<u64>, Failure> {
            opt(key)
                .map(|raw| {
                    serde_json::from_str(raw.get()).map_err(|_| bad(format!("`{key}` must be a count")))
                })
                .transpose()
        };
        let max_tokens = limit("max_completion_tokens")?.or(limit("max_tokens")?);
        Ok(Self { model, stream, include_usage, max_tokens, fields })
    }

    /// A field as sent, raw.
    pub fn field(&self, key: &str) -> Option<&RawValue> {
        self.fields.get(key).map(|r| &**r)
    }

    /// The raw `messages` array.
    pub fn messages_raw(&self) -> &str {
        self.field("messages").map_or("[]", RawValue::get)
    }

    /// The messages, each kept raw.
    ///
    /// # Errors
    /// `invalid_request` when `messages` is not an array.
    pub fn messages(&self) -> Result<Vec<Raw>, Failure> {
        serde_json::from_str(self.messages_raw())
            .map_err(|e| Failure::new(ErrorClass::InvalidRequest, format!("`messages`: {e}")))
    }

    /// The same request with `messages` replaced.
    pub fn with_messages(&self, messages: &[Raw]) -> Self {
        let mut next = self.clone();
        if let Ok(raw) = serde_json::value::to_raw_value(messages) {
            next.fields.insert("messages".into(), raw);
        }
        next
    }

    /// The same request with one message appended.
    ///
    /// # Errors
    /// As [`messages`](Self::messages).
    pub fn with_appended(&self, extra: &[serde_json::Value]) -> Result<Self, Failure> {
        let mut messages = self.messages()?;
        for m in extra {
            let raw = serde_json::value::to_raw_value(m)
                .map_err(|e| Failure::new(ErrorClass::InvalidRequest, e.to_string()))?;
            messages.push(raw);
        }
        Ok(self.with_messages(&messages))
    }

    /// The function tools offered, with their schemas.
    pub fn tools(&self) -> Vec<ToolSpec> {
        let Some(raw) = self.field("tools") else { return Vec::new() };
        let tools: Vec<ToolWire> = serde_json::from_str(raw.get()).unwrap_or_default();
        tools
            .into_iter()
            .filter_map(|t| t.function)
            .map(|f| ToolSpec { name: f.name, parameters: f.parameters })
            .collect()
    }

    /// The length of [`openai_body`](Self::openai_body) for `upstream_model`, without
    /// serializing it (names that need escaping may make the body a few bytes longer).
    pub fn openai_len(&self, upstream_model: &str) -> usize {
        let fields: usize = self
            .fields
            .iter()
            .filter(|(k, _)| !(k.as_str() == "model" || (self.stream && k.as_str() == "stream_options")))
            .map(|(k, r)| k.len() + 4 + r.get().len())
            .sum();
        let usage = if self.stream { r#","stream_options":{"include_usage":true}"#.len() } else { 0 };
        r#"{"model":""}"#.len() + upstream_model.len() + fields + usage
    }

    /// The body for an OpenAI-kind upstream: every field as sent, `model` replaced by
    /// `upstream_model`; a stream always asks for usage (to settle budgets).
    pub fn openai_body(&self, upstream_model: &str) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.fields.values().map(|r| r.get().len() + 16).sum::<usize>() + 64);
        out.push(b'{');
        write_key(&mut out, "model");
        // A string always serialises.
        let _ = serde_json::to_writer(&mut out, upstream_model);
        for (key, raw) in &self.fields {
            match key.as_str() {
                "model" => continue,
                "stream_options" if self.stream => continue,
                _ => {}
            }
            out.push(b',');
            write_key(&mut out, key);
            out.extend_from_slice(raw.get().as_bytes());
        }
        if self.stream {
            out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
        }
        out.push(b'}');
        out
    }
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

/// A tool call in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ToolCall {
    /// Its id, to which a `tool` message answers.
    #[serde(default)]
    pub id: String,
    /// The function called.
    pub function: FunctionCall,
}

/// The function of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments, a JSON document as a string.
    #[serde(default)]
    pub arguments: String,
}

#[derive(Deserialize)]
pub(crate) struct ResponseView<'a> {
    #[serde(borrow, default)]
    pub(crate) choices: Vec<ChoiceView<'a>>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
}

#[derive(Deserialize)]
pub(crate) struct ChoiceView<'a> {
    #[serde(borrow, default)]
    pub(crate) message: Option<MessageView<'a>>,
    #[serde(borrow, default)]
    pub(crate) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(crate) struct MessageView<'a> {
    #[serde(borrow, default)]
    pub(crate) content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) refusal: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(crate) tool_calls: Option<Vec<ToolCall>>,
}

/// What validation and accounting need from an answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerSummary {
    /// The first choice's text.
    pub content: Option<String>,
    /// Its refusal, if any.
    pub refusal: Option<String>,
    /// Its tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// Why it ended.
    pub finish_reason: Option<String>,
    /// The upstream's usage, if reported.
    pub usage: Option<Usage>,
}

/// A parsed answer: the body to send (with `model` rewritten) and its summary.
#[derive(Debug, Clone)]
pub(crate) struct ParsedAnswer {
    pub(crate) body: Vec<u8>,
    pub(crate) summary: AnswerSummary,
}

/// Parses an OpenAI answer and rewrites its `model` to `model` (the Keel name).
pub(crate) fn parse_answer(body: &[u8], model: &str) -> Result<ParsedAnswer, Failure> {
    let malformed = |e: serde_json::Error| {
        Failure::new(ErrorClass::ServerError, format!("the upstream's answer is not valid JSON: {e}"))
    };
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(body).map_err(malformed)?;
    let choices: Vec<ChoiceView<'_>> = match fields.get("choices") {
        Some(raw) => serde_json::from_str(raw.get()).map_err(malformed)?,
        None => Vec::new(),
    };
    let usage: Option<Usage> = match fields.get("usage") {
        Some(raw) => serde_json::from_str(raw.get()).map_err(malformed)?,
        None => None,
    };
    let view = ResponseView { choices, usage };
    let first = view.choices.into_iter().next();
    let (message, finish_reason) = match first {
        Some(c) => (c.message, c.finish_reason.map(Cow::into_owned)),
        None => (None, None),
    };
    let summary = AnswerSummary {
        content: message.as_ref().and_then(|m| m.content.as_ref()).map(|c| c.to_string()),
        refusal: message.as_ref().and_then(|m| m.refusal.as_ref()).map(|c| c.to_string()),
        tool_calls: message.and_then(|m| m.tool_calls).unwrap_or_default(),
        finish_reason,
        usage: view.usage,
    };
    let mut out = Vec::with_capacity(body.len() + model.len());
    out.push(b'{');
    write_key(&mut out, "model");
    let _ = serde_json::to_writer(&mut out, model);
    for (key, raw) in &fields {
        if *key == "model" {
            continue;
        }
        out.push(b',');
        write_key(&mut out, key);
        out.extend_from_slice(raw.get().as_bytes());
    }
    out.push(b'}');
    Ok(ParsedAnswer { body: out, summary })
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code", "keel_class"}}`.
pub fn error_body(class: ErrorClass, message: &str) -> serde_json::Value {
    crate::error::Shape::Openai.body(class, message)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile_tests;
