//! Validating a model's answer before the agent sees it.
//!
//! A model can "succeed" with an answer the agent cannot use: nothing at all, a text
//! cut off at the token limit, a call to a tool it was never offered, arguments that
//! are not JSON or do not match the tool's schema. Each is classified
//! (`empty_output`, `truncated_output`, `unknown_tool`, `invalid_tool_call`) so that
//! the model's policy can correct it, fall back, or report it.

use keel_core::classify::{ModelOutput, model_output};
use keel_core::{ErrorClass, Failure};
use serde_json::{Value, json};

use crate::wire::{AnswerSummary, ChatRequest};

/// Checks an answer against the tools the request offered (read from the request
/// only when the answer calls one); with `tools` false, only its content.
///
/// # Errors
/// A [`Failure`] of class `refusal`, `truncated_output`, `empty_output`,
/// `unknown_tool` or `invalid_tool_call`, saying what is wrong.
pub fn check(answer: &AnswerSummary, req: &ChatRequest, tools: bool) -> Result<(), Failure> {
    let output = ModelOutput {
        content: answer.content.as_deref(),
        finish_reason: answer.finish_reason.as_deref(),
        refusal: answer.refusal.as_deref(),
        tool_calls: answer.tool_calls.len(),
    };
    if let Some(class) = model_output(&output) {
        let message = match class {
            ErrorClass::Refusal => format!(
                "the model refused: {}",
                answer.refusal.as_deref().or(answer.content.as_deref()).unwrap_or("content filter")
            ),
            ErrorClass::TruncatedOutput => {
                "the answer was cut off at the token limit (finish_reason=length)".into()
            }
            ErrorClass::EmptyOutput => "the model answered with empty content and no tool call".into(),
            other => format!("the answer is unusable ({other})"),
        };
        return Err(Failure::new(class, message));
    }
    if !tools {
        return Ok(());
    }
    let tools = if answer.tool_calls.is_empty() { Vec::new() } else { req.tools() };
    for call in &answer.tool_calls {
        let name = &call.function.name;
        let Some(tool) = tools.iter().find(|t| &t.name == name) else {
            let offered: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
            return Err(Failure::new(
                ErrorClass::UnknownTool,
                format!("the model called `{name}`, which was not offered (offered: {})", offered.join(", ")),
            ));
        };
        let args = if call.function.arguments.trim().is_empty() { "{}" } else { &call.function.arguments };
        let args: Value = serde_json::from_str(args).map_err(|e| {
            Failure::new(ErrorClass::InvalidToolCall, format!("the arguments of `{name}` are not JSON: {e}"))
        })?;
        if let Some(schema) = &tool.parameters {
            let validator = jsonschema::validator_for(schema).map_err(|e| {
                Failure::new(
                    ErrorClass::InvalidRequest,
                    format!("the schema of tool `{name}` is invalid: {e}"),
                )
            })?;
            let problems: Vec<String> = validator
                .iter_errors(&args)
                .take(5)
                .map(|e| format!("{} at `{}`", e, e.instance_path()))
                .collect();
            if !problems.is_empty() {
                return Err(Failure::new(
                    ErrorClass::InvalidToolCall,
                    format!("the arguments of `{name}` do not match its schema: {}", problems.join("; ")),
                ));
            }
        }
    }
    Ok(())
}

/// The messages that send `failure` back to the model after its `answer`.
///
/// A bad tool call is answered in the conversation's own terms: the assistant message
/// with its calls, then a `tool` message per call carrying the error, as the agent
/// would have answered. An empty or cut-off answer gets a `user` message saying so.
pub fn correction(answer: &AnswerSummary, failure: &Failure) -> Vec<Value> {
    if answer.tool_calls.is_empty() {
        let ask = if failure.class == ErrorClass::TruncatedOutput {
            "Your previous answer was cut off at the token limit. Answer again, more briefly."
        } else {
            "Your previous answer was empty. Answer the last message again."
        };
        return vec![json!({"role": "user", "content": ask})];
    }
    let calls: Vec<Value> = answer
        .tool_calls
        .iter()
        .map(|c| {
            json!({
                "id": c.id, "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            })
        })
        .collect();
    let mut messages = vec![json!({"role": "assistant", "content": answer.content, "tool_calls": calls})];
    for c in &answer.tool_calls {
        messages.push(json!({
            "role": "tool",
            "tool_call_id": c.id,
            "content": format!("error[{}]: {}. Call the tool again with valid arguments.", failure.class, failure.message),
        }));
    }
    messages
}
