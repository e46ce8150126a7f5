//! The error taxonomy: what went wrong ([`ErrorClass`]) and what to do about it
//! ([`Disposition`]).
//!
//! Every failure Keel sees is reduced to one class, so that policies can act on it
//! without knowing where it came from. The table of default dispositions is DESIGN.md's;
//! every `match` on these enums is exhaustive on purpose, so a new class forces each
//! decision to be revisited.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What went wrong with an attempt, in terms a policy can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Connect, reset or DNS failure.
    Network,
    /// The attempt exceeded its timeout.
    Timeout,
    /// HTTP 429 or a provider's rate limit.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 400/422 or parameters that fail validation.
    InvalidRequest,
    /// HTTP 401.
    Unauthorized,
    /// HTTP 403 or permission denied.
    Forbidden,
    /// HTTP 404 or "not found" from a tool.
    NotFound,
    /// HTTP 409 or an idempotency clash.
    Conflict,
    /// A model answered with empty content.
    EmptyOutput,
    /// A model's answer was cut off (`finish_reason=length`).
    TruncatedOutput,
    /// A tool call whose arguments do not match the tool's JSON schema.
    InvalidToolCall,
    /// A tool call naming a tool that was not offered.
    UnknownTool,
    /// A content filter or a refusal.
    Refusal,
    /// The context length was exceeded.
    ContextOverflow,
    /// An exception in generated code.
    CodeError,
    /// The same call repeated, or too many calls or turns.
    LoopDetected,
    /// Tokens, cost or attempts ran out.
    BudgetExceeded,
    /// The wall-time deadline of a step or run passed.
    DeadlineExceeded,
    /// The circuit breaker of the target is open.
    CircuitOpen,
    /// A person refused the action.
    ApprovalDenied,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Give up; retrying cannot help.
    Terminal,
    /// Send the same request again after a delay.
    Retry,
    /// Retry with the error fed back to the model.
    Correct,
    /// Try the next alternative of the fallback chain.
    Fallback,
    /// Hand the problem to a person.
    Escalate,
}

impl ErrorClass {
    /// Every class, in the order of DESIGN.md's table.
    pub const ALL: [ErrorClass; 21] = [
        ErrorClass::Network,
        ErrorClass::Timeout,
        ErrorClass::RateLimited,
        ErrorClass::ServerError,
        ErrorClass::InvalidRequest,
        ErrorClass::Unauthorized,
        ErrorClass::Forbidden,
        ErrorClass::NotFound,
        ErrorClass::Conflict,
        ErrorClass::EmptyOutput,
        ErrorClass::TruncatedOutput,
        ErrorClass::InvalidToolCall,
        ErrorClass::UnknownTool,
        ErrorClass::Refusal,
        ErrorClass::ContextOverflow,
        ErrorClass::CodeError,
        ErrorClass::LoopDetected,
        ErrorClass::BudgetExceeded,
        ErrorClass::DeadlineExceeded,
        ErrorClass::CircuitOpen,
        ErrorClass::ApprovalDenied,
    ];

    /// The class's name as written in config, events and APIs (`rate_limited`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Network => "network",
            ErrorClass::Timeout => "timeout",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::ServerError => "server_error",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::Unauthorized => "unauthorized",
            ErrorClass::Forbidden => "forbidden",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Conflict => "conflict",
            ErrorClass::EmptyOutput => "empty_output",
            ErrorClass::TruncatedOutput => "truncated_output",
            ErrorClass::InvalidToolCall => "invalid_tool_call",
            ErrorClass::UnknownTool => "unknown_tool",
            ErrorClass::Refusal => "refusal",
            ErrorClass::ContextOverflow => "context_overflow",
            ErrorClass::CodeError => "code_error",
            ErrorClass::LoopDetected => "loop_detected",
            ErrorClass::BudgetExceeded => "budget_exceeded",
            ErrorClass::DeadlineExceeded => "deadline_exceeded",
            ErrorClass::CircuitOpen => "circuit_open",
            ErrorClass::ApprovalDenied => "approval_denied",
        }
    }

    /// The default disposition from DESIGN.md's taxonomy.
    ///
    /// Where the table lists a sequence ("correct, then fallback model"), this is its
    /// first step; the pipeline moves on to the next one when the first is exhausted.
    pub const fn default_disposition(self) -> Disposition {
        match self {
            ErrorClass::Network | ErrorClass::Timeout | ErrorClass::RateLimited | ErrorClass::ServerError => {
                Disposition::Retry
            }
            ErrorClass::InvalidRequest
            | ErrorClass::Unauthorized
            | ErrorClass::Forbidden
            | ErrorClass::NotFound
            | ErrorClass::Conflict
            | ErrorClass::BudgetExceeded
            | ErrorClass::DeadlineExceeded
            | ErrorClass::ApprovalDenied => Disposition::Terminal,
            ErrorClass::EmptyOutput
            | ErrorClass::TruncatedOutput
            | ErrorClass::InvalidToolCall
            | ErrorClass::UnknownTool
            | ErrorClass::CodeError => Disposition::Correct,
            ErrorClass::Refusal | ErrorClass::ContextOverflow | ErrorClass::CircuitOpen => {
                Disposition::Fallback
            }
            ErrorClass::LoopDetected => Disposition::Escalate,
        }
    }

    /// Whether a failure of this class should alert someone even when handled
    /// (credentials are wrong, or a server keeps failing).
    pub const fn alerts(self) -> bool {
        match self {
            ErrorClass::Unauthorized | ErrorClass::Forbidden | ErrorClass::ServerError => true,
            ErrorClass::Network
            | ErrorClass::Timeout
            | ErrorClass::RateLimited
            | ErrorClass::InvalidRequest
            | ErrorClass::NotFound
            | ErrorClass::Conflict
            | ErrorClass::EmptyOutput
            | ErrorClass::TruncatedOutput
            | ErrorClass::InvalidToolCall
            | ErrorClass::UnknownTool
            | ErrorClass::Refusal
            | ErrorClass::ContextOverflow
            | ErrorClass::CodeError
            | ErrorClass::LoopDetected
            | ErrorClass::BudgetExceeded
            | ErrorClass::DeadlineExceeded
            | ErrorClass::CircuitOpen
            | ErrorClass::ApprovalDenied => false,
        }
    }

    /// Whether a step that failed with this class goes straight to a person (a ticket)
    /// instead of waiting for `escalate_after` failures: its disposition is to
    /// escalate, or it is terminal and alerts (credentials are wrong: no retry and no
    /// fallback can fix that). Derived from the two tables above, not a third list.
    pub const fn needs_person(self) -> bool {
        match self.default_disposition() {
            Disposition::Escalate => true,
            Disposition::Terminal => self.alerts(),
            Disposition::Retry | Disposition::Correct | Disposition::Fallback => false,
        }
    }

    /// Whether a failure of this class says something about the target's health, so a
    /// circuit breaker should count it. A bad request is the caller's fault, not the
    /// target's; so are policy refusals that never reached the target.
    pub const fn is_target_fault(self) -> bool {
        match self {
            ErrorClass::Network
            | ErrorClass::Timeout
            | ErrorClass::RateLimited
            | ErrorClass::ServerError
            | ErrorClass::EmptyOutput
            | ErrorClass::TruncatedOutput => true,
            ErrorClass::InvalidRequest
            | ErrorClass::Unauthorized
            | ErrorClass::Forbidden
            | ErrorClass::NotFound
            | ErrorClass::Conflict
            | ErrorClass::InvalidToolCall
            | ErrorClass::UnknownTool
            | ErrorClass::Refusal
            | ErrorClass::ContextOverflow
            | ErrorClass::CodeError
            | ErrorClass::LoopDetected
            | ErrorClass::BudgetExceeded
            | ErrorClass::DeadlineExceeded
            | ErrorClass::CircuitOpen
            | ErrorClass::ApprovalDenied => false,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown class name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error class `{0}`")]
pub struct UnknownClass(pub String);

impl FromStr for ErrorClass {
    type Err = UnknownClass;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorClass::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| UnknownClass(s.to_owned()))
    }
}

impl Disposition {
    /// The disposition's name as written in config and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Disposition::Terminal => "terminal",
            Disposition::Retry => "retry",
            Disposition::Correct => "correct",
            Disposition::Fallback => "fallback",
            Disposition::Escalate => "escalate",
        }
    }
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that knows its [`ErrorClass`].
///
/// Every error type that crosses a policy implements this, so the pipeline can decide
/// without string matching. `retry_after` carries a server's requested delay (HTTP
/// `Retry-After`) when there was one.
pub trait Classified {
    /// What went wrong.
    fn class(&self) -> ErrorClass;

    /// The delay the target asked for before the next attempt, if any.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for class in ErrorClass::ALL {
            let json = serde_json::to_string(&class).unwrap();
            assert_eq!(json, format!("\"{}\"", class.as_str()));
            assert_eq!(class.as_str().parse::<ErrorClass>().unwrap(), class);
        }
        assert!("bogus".parse::<ErrorClass>().is_err());
    }

    #[test]
    fn defaults_follow_the_design_table() {
        use Disposition::*;
        let check = |class: ErrorClass, expected: Disposition| {
            assert_eq!(class.default_disposition(), expected, "{class}");
        };
        check(ErrorClass::Network, Retry);
        check(ErrorClass::Timeout, Retry);
        check(ErrorClass::RateLimited, Retry);
        check(ErrorClass::ServerError, Retry);
        check(ErrorClass::InvalidRequest, Terminal);
        check(ErrorClass::Unauthorized, Terminal);
        check(ErrorClass::Forbidden, Terminal);
        check(ErrorClass::NotFound, Terminal);
        check(ErrorClass::Conflict, Terminal);
        check(ErrorClass::EmptyOutput, Correct);
        check(ErrorClass::TruncatedOutput, Correct);
        check(ErrorClass::InvalidToolCall, Correct);
        check(ErrorClass::UnknownTool, Correct);
        check(ErrorClass::Refusal, Fallback);
        check(ErrorClass::ContextOverflow, Fallback);
        check(ErrorClass::CodeError, Correct);
        check(ErrorClass::LoopDetected, Escalate);
        check(ErrorClass::BudgetExceeded, Terminal);
        check(ErrorClass::DeadlineExceeded, Terminal);
        check(ErrorClass::CircuitOpen, Fallback);
        check(ErrorClass::ApprovalDenied, Terminal);
    }
}
