//! A call waiting for approval, for a 2026-07-28 client: the spec's input-required
//! result (a form telling the person what waits, and which approval), and the opaque
//! `requestState` the client echoes on its retry.
//!
//! The state is a pointer, never an authority: the run, the approval and the digest
//! of the arguments it was issued for. On a retry Keel checks it against the call
//! itself (same arguments, same key, so the same run) and against the journal (that
//! run holds that approval), then answers from the journal as for any call: still
//! pending, approved (the result), denied or expired (`approval_denied`). A forged or
//! altered state can name nothing the call could not reach by itself, and it is
//! refused; so it needs no signature (the spec allows none when tampering can cause
//! nothing worse than a failed request). What the person answers in the client's form
//! is never an approval: "accept" only means "look again", "decline" stop waiting.

use keel_runtime::invoke::{invocation_key, invocation_run_id};
use keel_runtime::runner::args_digest;
use serde_json::{Value, json};

use super::envelope::{RpcError, base64_decode, base64_encode};

/// The key of Keel's one input request.
pub(super) const INPUT_KEY: &str = "keel.approval";

const STATE_PREFIX: &str = "keel1.";

/// The longest `requestState` read.
const STATE_MAX: usize = 2048;

/// How much of the arguments the form shows.
const ARGS_SHOWN: usize = 400;

/// What a `requestState` points at.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct State {
    /// The invocation's run.
    pub(super) run: String,
    /// The approval it waited for.
    pub(super) approval: String,
    /// `args_digest` of the tool and arguments it was issued for.
    pub(super) digest: String,
    /// The invocation's key (the client's, or one minted for a call without one), if
    /// any: the derived key of a write-like tool is derived again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<String>,
}

impl State {
    /// The opaque string.
    pub(super) fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{STATE_PREFIX}{}", base64_encode(&json))
    }

    /// Reads a state this server wrote; `None` for anything else.
    pub(super) fn decode(text: &str) -> Option<Self> {
        if text.len() > STATE_MAX {
            return None;
        }
        let bytes = base64_decode(text.strip_prefix(STATE_PREFIX)?)?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Checks the state belongs to this call: issued for these arguments, and naming
    /// the run that this call's key leads to. Returns the key to call under.
    ///
    /// # Errors
    /// `-32602` when it does not.
    pub(super) fn check(
        &self,
        tool: &str,
        write: bool,
        params: &Value,
        client_key: Option<&str>,
    ) -> Result<Option<String>, RpcError> {
        if self.digest != args_digest(tool, params) {
            return Err(stale("it was issued for other arguments"));
        }
        let key = client_key.map(str::to_owned).or_else(|| self.key.clone());
        let run = invocation_key(tool, write, key.as_deref(), params).map(|k| invocation_run_id(&k));
        if run.as_deref() != Some(self.run.as_str()) {
            return Err(stale("it was issued for another call"));
        }
        Ok(key)
    }
}

/// A `requestState` refused.
pub(super) fn stale(why: &str) -> RpcError {
    RpcError::invalid_params(format!(
        "`requestState` is not one this server issued for this call ({why}); call again without it"
    ))
}

/// What the person answered in the form, if the retry carries an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Look again.
    Accept,
    /// Stop waiting (`decline` or `cancel`): the call answers "still pending".
    StopWaiting,
}

/// The person's answer in `inputResponses`, checked for shape.
///
/// # Errors
/// `-32602` for `inputResponses` that is not an object of objects, or an answer to
/// Keel's request without a known `action`.
pub(super) fn answer(params: &Value) -> Result<Option<Answer>, RpcError> {
    let responses = match params.get("inputResponses") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(RpcError::invalid_params("`inputResponses` must be an object")),
    };
    if responses.values().any(|r| !r.is_object()) {
        return Err(RpcError::invalid_params("each of `inputResponses` must be an object"));
    }
    // Other keys were never asked for: ignored, as the spec says.
    let Some(ours) = responses.get(INPUT_KEY) else { return Ok(None) };
    match ours.get("action").and_then(Value::as_str) {
        Some("accept") => Ok(Some(Answer::Accept)),
        Some("decline" | "cancel") => Ok(Some(Answer::StopWaiting)),
        _ => Err(RpcError::invalid_params(format!(
            "`inputResponses[\"{INPUT_KEY}\"].action` must be accept, decline or cancel"
        ))),
    }
}

/// The input-required result for a call to `tool` with `params` waiting for
/// `approval_id` on `run_id`.
pub(super) fn input_required(
    tool: &str,
    params: &Value,
    run_id: &str,
    approval_id: &str,
    state: &State,
) -> Value {
    let mut args = serde_json::to_string(params).unwrap_or_default();
    if args.len() > ARGS_SHOWN {
        let mut end = ARGS_SHOWN;
        while !args.is_char_boundary(end) {
            end -= 1;
        }
        args.truncate(end);
        args.push('…');
    }
    let message = format!(
        "Keel holds this call to `{tool}` until a person approves it (approval {approval_id}); \
         nothing has been done yet. Arguments: {args}. Approve or reject it in Keel's inbox, with \
         `keel approvals approve {approval_id}`, or POST /api/approvals/{approval_id}/approve. \
         Then choose Accept here to check again, or Decline to stop waiting. Accepting here does \
         not approve the call."
    );
    json!({
        "resultType": "input_required",
        "inputRequests": {
            INPUT_KEY: {
                "method": "elicitation/create",
                "params": {
                    "mode": "form",
                    "message": message,
                    "requestedSchema": { "type": "object", "properties": {} },
                    "_meta": { "keel/approvalId": approval_id, "keel/runId": run_id },
                },
            },
        },
        "requestState": state.encode(),
        "_meta": { "keel/approvalId": approval_id, "keel/runId": run_id },
    })
}
