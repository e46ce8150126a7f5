//! A command's exit: exit status, signal and stderr patterns to a class.

use std::collections::BTreeMap;

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Failure;
use crate::class::ErrorClass;

/// One stderr rule: when `pattern` matches, the failure has `class`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StderrRule {
    /// A regular expression, e.g. `(?i)not found`.
    pub pattern: String,
    /// The class of a failure whose stderr matches.
    pub class: ErrorClass,
}

/// How a command tool's failures are classified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CommandConfig {
    /// Rules tried in order on stderr before the built-in ones.
    pub stderr: Vec<StderrRule>,
    /// Exit codes with a known meaning, e.g. `{ 3 = "conflict" }`.
    pub exit_codes: BTreeMap<i32, ErrorClass>,
    /// The class of a failure nothing else explains.
    pub default_class: ErrorClass,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self { stderr: Vec::new(), exit_codes: BTreeMap::new(), default_class: ErrorClass::ServerError }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Classifies command exits with a [`CommandConfig`]'s rules and the built-in ones.
#[derive(Debug, Clone)]
pub struct CommandClassifier {
    rules: Vec<(Regex, ErrorClass)>,
    exit_codes: BTreeMap<i32, ErrorClass>,
    default_class: ErrorClass,
}

/// Built-in stderr patterns, tried after the configured ones.
const BUILTIN: &[(&str, ErrorClass)] = &[
    (r"(?i)\b(Traceback \(most recent call last\)|[A-Z][A-Za-z]*Error:)", ErrorClass::CodeError),
    (r"(?i)permission denied|operation not permitted|access denied", ErrorClass::Forbidden),
    (r"(?i)unauthori[sz]ed|authentication failed|invalid api key", ErrorClass::Unauthorized),
    (r"(?i)not found|no such file or directory|does not exist", ErrorClass::NotFound),
    (r"(?i)too many requests|rate limit", ErrorClass::RateLimited),
    (r"(?i)timed? ?out", ErrorClass::Timeout),
    (
        r"(?i)connection (refused|reset)|could not resolve|network is unreachable|temporary failure in name resolution",
        ErrorClass::Network,
    ),
    (r"(?i)already exists|conflict", ErrorClass::Conflict),
    (r"(?i)usage:|invalid (argument|option)|unrecognized option", ErrorClass::InvalidRequest),
];

/// An invalid regular expression in a command's stderr rules.
#[derive(Debug, thiserror::Error)]
#[error("stderr pattern `{pattern}` is not a valid regular expression: {source}")]
pub struct PatternError {
    /// The pattern as configured.
    pub pattern: String,
    /// The parser's complaint.
    #[source]
    pub source: regex::Error,
}

impl CommandClassifier {
    /// Compiles `config`'s rules.
    ///
    /// # Errors
    /// A pattern that is not a valid regular expression.
    pub fn new(config: &CommandConfig) -> Result<Self, PatternError> {
        let mut rules = Vec::with_capacity(config.stderr.len() + BUILTIN.len());
        for rule in &config.stderr {
            let re = Regex::new(&rule.pattern)
                .map_err(|source| PatternError { pattern: rule.pattern.clone(), source })?;
            rules.push((re, rule.class));
        }
        for (pattern, class) in BUILTIN {
            let re = Regex::new(pattern)
                .map_err(|source| PatternError { pattern: (*pattern).to_owned(), source })?;
            rules.push((re, *class));
        }
        Ok(Self { rules, exit_codes: config.exit_codes.clone(), default_class: config.default_class })
    }

    /// The failure of a command that ended with `exit` and wrote `stderr`, or `None`
    /// when it exited with 0.
    ///
    /// Order: configured exit codes, configured then built-in stderr rules, the
    /// conventional exit codes (124 timeout, 126 not executable, 127 not found), then
    /// the default class. A command killed by a signal is a `timeout` when Keel killed
    /// it for one (the caller knows and says so), otherwise the default class.
    pub fn classify(&self, exit: CommandExit, stderr: &str) -> Option<Failure> {
        let tail = stderr_tail(stderr);
        let class = match exit {
            CommandExit::Code(0) => return None,
            CommandExit::Code(code) => {
                if let Some(class) = self.exit_codes.get(&code) {
                    *class
                } else if let Some(class) = self.match_stderr(stderr) {
                    class
                } else {
                    match code {
                        124 => ErrorClass::Timeout,
                        126 => ErrorClass::Forbidden,
                        127 => ErrorClass::NotFound,
                        _ => self.default_class,
                    }
                }
            }
            CommandExit::Signal(_) => self.match_stderr(stderr).unwrap_or(self.default_class),
        };
        let how = match exit {
            CommandExit::Code(code) => format!("exited with status {code}"),
            CommandExit::Signal(signal) => format!("killed by signal {signal}"),
        };
        let message = if tail.is_empty() { how } else { format!("{how}: {tail}") };
        Some(Failure::new(class, message))
    }

    fn match_stderr(&self, stderr: &str) -> Option<ErrorClass> {
        self.rules.iter().find(|(re, _)| re.is_match(stderr)).map(|(_, class)| *class)
    }
}

/// The last non-empty lines of stderr, at most 300 characters: what a person needs.
fn stderr_tail(stderr: &str) -> String {
    let trimmed = stderr.trim();
    let start = trimmed.char_indices().rev().nth(299).map_or(0, |(i, _)| i);
    trimmed[start..].to_owned()
}
