//! Tool calls of a stream, held until they are whole.
//!
//! Text deltas can be forwarded as they come: a cut text is continued (prefill) or
//! regenerated (splice) and the client's text stays right. A tool call cannot: half
//! of a call's arguments is not a call, and no continuation can be trusted to finish
//! it byte-exactly. So a stream's tool-call deltas (`delta.tool_calls[i]`, OpenAI's
//! shape; Anthropic's `tool_use` / `input_json_delta` arrive here translated to it)
//! are assembled here and nothing of them is sent until the answer's calls are
//! complete — its finish reason arrived (or its `[DONE]`) — their arguments parse as
//! JSON and, when validation is on, match the request's tools. Then they go out
//! together, one delta per call carrying its id, name and whole arguments, which
//! clients reassemble exactly as they would the original deltas.

use keel_core::{ErrorClass, Failure};
use serde_json::value::RawValue;

use crate::validate;
use crate::wire::{AnswerSummary, ChatRequest, FunctionCall, ToolCall};

/// One call being assembled from its deltas.
#[derive(Debug, Clone, Default)]
struct Held {
    index: u64,
    id: String,
    name: String,
    arguments: String,
}

/// The calls of the current attempt, none of them sent yet.
#[derive(Debug, Default)]
pub(crate) struct HeldCalls {
    calls: Vec<Held>,
}

#[derive(serde::Deserialize)]
struct Delta {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(serde::Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl HeldCalls {
    /// Whether any call is being held.
    pub(crate) fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Forgets the held calls (their attempt failed: nothing of them was sent).
    pub(crate) fn clear(&mut self) {
        self.calls.clear();
    }

    /// Adds one chunk's `delta.tool_calls`.
    ///
    /// # Errors
    /// `server_error` when the deltas are not an array of tool-call deltas.
    pub(crate) fn add(&mut self, raw: &RawValue) -> Result<(), Failure> {
        let deltas: Vec<Delta> = serde_json::from_str(raw.get()).map_err(|e| {
            Failure::new(
                ErrorClass::ServerError,
                format!("the upstream sent a malformed tool-call delta: {e}"),
            )
        })?;
        for d in deltas {
            // A delta without an index (some OpenAI-compatible servers leave it out)
            // belongs to the last call, unless it brings a new call's id.
            let index = d.index.unwrap_or_else(|| match self.calls.last() {
                Some(last) if d.id.as_deref().is_some_and(|id| !id.is_empty() && id != last.id) => {
                    last.index + 1
                }
                Some(last) => last.index,
                None => 0,
            });
            let pos = match self.calls.iter().position(|c| c.index == index) {
                Some(pos) => pos,
                None => {
                    self.calls.push(Held { index, ..Held::default() });
                    self.calls.len() - 1
                }
            };
            let call = &mut self.calls[pos];
            if let Some(id) = d.id.filter(|id| !id.is_empty()) {
                call.id = id;
            }
            if let Some(f) = d.function {
                call.name.push_str(f.name.as_deref().unwrap_or(""));
                call.arguments.push_str(f.arguments.as_deref().unwrap_or(""));
            }
        }
        Ok(())
    }

    /// The held calls, as a whole answer's.
    pub(crate) fn calls(&self) -> Vec<ToolCall> {
        self.calls
            .iter()
            .map(|c| ToolCall {
                id: c.id.clone(),
                function: FunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
            })
            .collect()
    }

    /// Checks the complete calls before any of them is released: the answer's own
    /// checks (truncated, unknown tool, arguments vs. the tool's schema) through
    /// [`validate::check`] when `validate` (tools included unless `tools` is false:
    /// the caller checks them), and, always, that every call has a name and JSON
    /// arguments — a truncated call is never sent, whatever the configuration.
    ///
    /// # Errors
    /// The [`Failure`] saying what is wrong, with the summary the correction round
    /// sends back.
    pub(crate) fn check(
        &self,
        content: &str,
        finish_reason: Option<&str>,
        req: &ChatRequest,
        validate: bool,
        tools: bool,
    ) -> Result<(), Box<(Failure, AnswerSummary)>> {
        let summary = AnswerSummary {
            content: (!content.is_empty()).then(|| content.to_owned()),
            refusal: None,
            tool_calls: self.calls(),
            finish_reason: finish_reason.map(str::to_owned),
            usage: None,
        };
        if validate {
            validate::check(&summary, req, tools).map_err(|f| Box::new((f, summary.clone())))?;
        }
        for call in &self.calls {
            if call.name.is_empty() {
                let f =
                    Failure::new(ErrorClass::InvalidToolCall, "the model sent a tool call without a name");
                return Err(Box::new((f, summary)));
            }
            let args = if call.arguments.trim().is_empty() { "{}" } else { &call.arguments };
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(args) {
                let f = Failure::new(
                    ErrorClass::InvalidToolCall,
                    format!("the arguments of `{}` are not JSON: {e}", call.name),
                );
                return Err(Box::new((f, summary)));
            }
        }
        Ok(())
    }

    /// The calls as one `delta.tool_calls` array (one whole delta per call), and
    /// forgets them.
    pub(crate) fn release(&mut self) -> Box<RawValue> {
        let deltas: Vec<serde_json::Value> = std::mem::take(&mut self.calls)
            .into_iter()
            .map(|c| {
                let mut d = serde_json::json!({
                    "index": c.index,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if !c.id.is_empty() {
                    d["id"] = c.id.into();
                }
                d
            })
            .collect();
        // A Vec of Values always serialises.
        serde_json::value::to_raw_value(&deltas)
            .unwrap_or_else(|_| RawValue::from_string("[]".into()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap_or_default()
    }

    #[test]
    fn deltas_are_assembled_per_index_and_released_whole() {
        let mut held = HeldCalls::default();
        held.add(&raw(r#"[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]"#)).unwrap_or_default();
        held.add(&raw(r#"[{"index":0,"function":{"arguments":"{\"city\":"}}]"#)).unwrap_or_default();
        held.add(&raw(r#"[{"index":0,"function":{"arguments":"\"Paris\"}"}}]"#)).unwrap_or_default();
        held.add(&raw(r#"[{"index":1,"id":"call_2","function":{"name":"now","arguments":"{}"}}]"#))
            .unwrap_or_default();
        let calls = held.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        let out: serde_json::Value = serde_json::from_str(held.release().get()).unwrap_or_default();
        assert_eq!(out[0]["id"], "call_1");
        assert_eq!(out[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(out[1]["index"], 1);
        assert!(held.is_empty());
        assert!(held.add(&raw(r#"{"not":"an array"}"#)).is_err());

        // Without indexes: a new id starts the next call.
        held.add(&raw(r#"[{"id":"a","function":{"name":"f","arguments":"{\"x\""}}]"#)).unwrap_or_default();
        held.add(&raw(r#"[{"function":{"arguments":":1}"}}]"#)).unwrap_or_default();
        held.add(&raw(r#"[{"id":"b","function":{"name":"g","arguments":"{}"}}]"#)).unwrap_or_default();
        let calls = held.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].function.arguments.as_str(), calls[1].function.name.as_str()),
            (r#"{"x":1}"#, "g")
        );
    }
}
