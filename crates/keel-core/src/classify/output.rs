//! Checks of a model's answer: empty, truncated, refused.

use crate::class::ErrorClass;

/// The parts of a model's answer that the checks look at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelOutput<'a> {
    /// The text content, if any.
    pub content: Option<&'a str>,
    /// The provider's finish reason (`stop`, `length`, `content_filter`, `tool_calls`...).
    pub finish_reason: Option<&'a str>,
    /// A refusal message, when the provider reports one separately.
    pub refusal: Option<&'a str>,
    /// How many tool calls the answer carries.
    pub tool_calls: usize,
}

/// The class of a model's answer, or `None` when it passes the checks.
///
/// A refusal wins over truncation, truncation over emptiness: a cut-off answer is
/// often empty too, and "truncated" says what to do about it.
pub fn model_output(output: &ModelOutput<'_>) -> Option<ErrorClass> {
    let finish = output.finish_reason.unwrap_or("");
    if output.refusal.is_some_and(|r| !r.trim().is_empty())
        || finish == "content_filter"
        || finish == "refusal"
    {
        return Some(ErrorClass::Refusal);
    }
    if finish == "length" || finish == "max_tokens" {
        return Some(ErrorClass::TruncatedOutput);
    }
    let empty = output.content.is_none_or(|c| c.trim().is_empty());
    if empty && output.tool_calls == 0 {
        return Some(ErrorClass::EmptyOutput);
    }
    None
}
