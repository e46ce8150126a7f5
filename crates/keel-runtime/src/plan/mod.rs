//! Plans: an input and an ordered list of steps (tool + parameters), written in TOML,
//! YAML or JSON.
//!
//! Step parameters are templates over the run's context: `{{input.order_id}}` reads the
//! plan's input, `{{steps.charge.output.body.id}}` the output of an earlier step. A
//! plan is checked whole before a run starts — unknown tools, duplicate step ids,
//! references to later steps — so a bad plan touches nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanStep {
    /// The step's id, unique in the plan (default: `step-N`).
    #[serde(default)]
    pub id: Option<String>,
    /// The tool called.
    pub tool: String,
    /// Its parameters (a template over `input` and earlier `steps`).
    #[serde(default = "empty_object")]
    pub params: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A name for people.
    #[serde(default)]
    pub name: Option<String>,
    /// The plan's input.
    #[serde(default = "empty_object")]
    pub input: Value,
    /// A deadline overriding `[run] deadline`, e.g. "5m".
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// The steps, in order.
    pub steps: Vec<PlanStep>,
}

/// A plan that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", file.display(), problems.join(&format!("\n{}: ", file.display())))]
pub struct PlanError {
    /// The plan's file.
    pub file: PathBuf,
    /// Every problem found.
    pub problems: Vec<String>,
}

impl keel_core::Classified for PlanError {
    fn class(&self) -> keel_core::ErrorClass {
        keel_core::ErrorClass::InvalidRequest
    }
}

impl Plan {
    /// Reads a plan; the format follows the extension (`.toml`, `.yaml`/`.yml`, `.json`).
    ///
    /// # Errors
    /// [`PlanError`] naming the file and, where the parser knows it, the line.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let fail = |m: String| PlanError { file: path.to_owned(), problems: vec![m] };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the plan: {e}")))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        Self::parse(&text, &ext).map_err(fail)
    }

    /// Parses `text` in the format named by `format` (`toml`, `yaml`, `yml`, `json`).
    ///
    /// # Errors
    /// The parser's message, with the line.
    pub fn parse(text: &str, format: &str) -> Result<Plan, String> {
        let mut plan: Plan = match format {
            "toml" => toml::from_str(text).map_err(|e| {
                let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
                match line {
                    Some(l) => format!("line {l}: {}", e.message().trim()),
                    None => e.message().trim().to_owned(),
                }
            })?,
            "yaml" | "yml" => serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?,
            "json" => serde_json::from_str(text).map_err(|e| e.to_string())?,
            other => return Err(format!("unknown plan format `{other}`: use .toml, .yaml or .json")),
        };
        plan.fill_ids();
        Ok(plan)
    }

    /// Names steps without an id `step-N` (1-based).
    pub fn fill_ids(&mut self) {
        for (i, step) in self.steps.iter_mut().enumerate() {
            if step.id.is_none() {
                step.id = Some(format!("step-{}", i + 1));
            }
        }
    }

    /// The id of step `index`.
    pub fn step_id(&self, index: usize) -> &str {
        self.steps.get(index).and_then(|s| s.id.as_deref()).unwrap_or("")
    }

    /// Checks the plan against `config`: tools exist, ids are unique, references
    /// point to earlier steps.
    ///
    /// # Errors
    /// Every problem found.
    pub fn check(&self, config: &Config, file: &Path) -> Result<(), PlanError> {
        let mut problems = Vec::new();
        if self.steps.is_empty() {
            problems.push("the plan has no steps".to_owned());
        }
        if let Some(deadline) = self.deadline {
            let mut c = keel_core::policy::Checks::default();
            c.positive_duration("deadline", deadline);
            for e in c.finish().err().unwrap_or_default() {
                problems.push(format!("{}: {}", e.key, e.message));
            }
        }
        let mut seen = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let id = self.step_id(i);
            if !config.tools.contains_key(&step.tool) {
                let known: Vec<_> = config.tools.keys().map(String::as_str).collect();
                problems.push(format!(
                    "step `{id}`: no tool named `{}` in {} (known: {})",
                    step.tool,
                    config.file.display(),
                    known.join(", ")
                ));
            }
            for reference in step_references(&step.params) {
                if !seen.contains(reference.as_str()) {
                    problems.push(format!(
                        "step `{id}`: `{{{{steps.{reference}...}}}}` does not name an earlier step"
                    ));
                }
            }
            if !seen.insert(id.to_owned()) {
                problems.push(format!("step id `{id}` is used twice"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(PlanError { file: file.to_owned(), problems }) }
    }
}

/// The step ids referenced as `{{steps.ID...}}` in a template.
fn step_references(template: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut visit = vec![template];
    while let Some(v) = visit.pop() {
        match v {
            Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(i) = rest.find("{{") {
                    let after = rest[i + 2..].trim_start();
                    if let Some(path) = after.strip_prefix("steps.") {
                        let id: String =
                            path.chars().take_while(|c| *c != '.' && *c != '}' && *c != ' ').collect();
                        out.push(id);
                    }
                    rest = &rest[i + 2..];
                }
            }
            Value::Array(items) => visit.extend(items),
            Value::Object(map) => visit.extend(map.values()),
            _ => {}
        }
    }
    out
}
