//! The gateway's own stream, read back at the edge.
//!
//! Every streamed call — whatever API the agent speaks — goes through the one
//! streaming path ([`Gateway::stream`](crate::Gateway::stream)), whose output is
//! OpenAI chat-completion chunks with Keel's rescue already applied (text spliced
//! or prefilled, never duplicated; an explicit error frame instead of a silent cut).
//! The Responses and Messages APIs re-frame that output in their own event
//! vocabularies: [`Internal`] is one frame of it, [`Reframe`] an API's translator,
//! [`reframe`] the loop that drives one over a stream.

use std::collections::VecDeque;
use std::convert::Infallible;

use bytes::Bytes;
use keel_core::ErrorClass;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Usage;

/// One tool-call delta of a chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ToolDelta {
    /// The call's index in the answer.
    #[serde(default)]
    pub index: usize,
    /// Its id (in the call's first delta).
    #[serde(default)]
    pub id: Option<String>,
    /// The function.
    #[serde(default)]
    pub function: Option<FunctionDelta>,
}

/// The function part of a tool-call delta.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FunctionDelta {
    /// The tool's name (in the call's first delta).
    #[serde(default)]
    pub name: Option<String>,
    /// A piece of the arguments.
    #[serde(default)]
    pub arguments: Option<String>,
}

/// One frame of the gateway's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Internal {
    /// A piece of the answer.
    Delta {
        /// Text.
        text: Option<String>,
        /// Tool-call pieces.
        tool_calls: Vec<ToolDelta>,
        /// The finish reason, in the answer's last piece.
        finish: Option<String>,
    },
    /// The chunk after the finish: the usage of every attempt the client received,
    /// and Keel's rescue note (`{"models", "rescue"}`) when the stream was rescued.
    Tail {
        /// The usage.
        usage: Option<Usage>,
        /// The rescue note.
        keel: Option<Value>,
    },
    /// The stream failed and was not rescued.
    Error {
        /// Keel's class of the original failure.
        class: ErrorClass,
        /// What happened.
        message: String,
    },
    /// `[DONE]`: the answer is complete.
    Done,
}

#[derive(Deserialize)]
struct ChunkWire {
    #[serde(default)]
    choices: Vec<ChoiceWire>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    keel: Option<Value>,
    #[serde(default)]
    error: Option<ErrorWire>,
}

#[derive(Deserialize)]
struct ChoiceWire {
    #[serde(default)]
    delta: DeltaWire,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct DeltaWire {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolDelta>>,
}

#[derive(Deserialize)]
struct ErrorWire {
    #[serde(default)]
    message: String,
    #[serde(default)]
    keel_class: Option<ErrorClass>,
}

/// Reads one frame (`data: ...\n\n`) of the gateway's stream. `None` for a frame
/// that is not one (never produced by the gateway; skipped).
pub fn parse_frame(frame: &[u8]) -> Option<Internal> {
    let text = std::str::from_utf8(frame).ok()?;
    let data = text.trim_end().strip_prefix("data: ")?;
    if data == "[DONE]" {
        return Some(Internal::Done);
    }
    let chunk: ChunkWire = serde_json::from_str(data).ok()?;
    if let Some(e) = chunk.error {
        return Some(Internal::Error {
            class: e.keel_class.unwrap_or(ErrorClass::ServerError),
            message: e.message,
        });
    }
    match chunk.choices.into_iter().next() {
        Some(c) => Some(Internal::Delta {
            text: c.delta.content.filter(|t| !t.is_empty()),
            tool_calls: c.delta.tool_calls.unwrap_or_default(),
            finish: c.finish_reason,
        }),
        None => Some(Internal::Tail { usage: chunk.usage, keel: chunk.keel }),
    }
}

/// An API's translator of the gateway's stream into its own events.
pub trait Reframe: Send + 'static {
    /// The events sent before any frame (`response.created`, `message_start`).
    fn start(&mut self, out: &mut Vec<Bytes>);
    /// The events of one frame.
    fn frame(&mut self, frame: Internal, out: &mut Vec<Bytes>);
    /// Whether the stream has ended (completed or failed): nothing more is read.
    fn ended(&self) -> bool;
    /// The gateway's stream ended without `[DONE]` or an error frame (its task
    /// stopped): the API's error event, so no client takes the answer as complete.
    fn cut(&mut self, out: &mut Vec<Bytes>) {
        self.frame(
            Internal::Error {
                class: ErrorClass::ServerError,
                message: "the stream ended before the answer finished".into(),
            },
            out,
        );
    }
}

/// The gateway's stream `rx`, re-framed by `api`.
pub fn reframe<R: Reframe>(
    rx: mpsc::Receiver<Bytes>,
    api: R,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    struct State<R> {
        rx: mpsc::Receiver<Bytes>,
        api: R,
        queue: VecDeque<Bytes>,
        started: bool,
    }
    let state = State { rx, api, queue: VecDeque::new(), started: false };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.queue.pop_front() {
                return Some((Ok(b), s));
            }
            let mut out = Vec::new();
            if !s.started {
                s.started = true;
                s.api.start(&mut out);
            } else if s.api.ended() {
                return None;
            } else {
                match s.rx.recv().await {
                    Some(frame) => {
                        if let Some(f) = parse_frame(&frame) {
                            s.api.frame(f, &mut out);
                        }
                    }
                    None => s.api.cut(&mut out),
                }
            }
            s.queue.extend(out);
        }
    })
}

/// An SSE frame with an event name (`event: NAME\ndata: JSON\n\n`).
pub(crate) fn named_frame(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_back() {
        let delta = br#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi","tool_calls":[{"index":1,"id":"t","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}

"#;
        match parse_frame(delta) {
            Some(Internal::Delta { text, tool_calls, finish }) => {
                assert_eq!(text.as_deref(), Some("Hi"));
                assert_eq!(tool_calls[0].index, 1);
                assert_eq!(tool_calls[0].function.as_ref().unwrap().name.as_deref(), Some("f"));
                assert_eq!(finish, None);
            }
            other => panic!("{other:?}"),
        }
        let tail = br#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"keel":{"rescue":"splice"}}"#;
        assert!(
            matches!(parse_frame(tail), Some(Internal::Tail { usage: Some(u), keel: Some(_) }) if u.total_tokens == 3)
        );
        let err = format!("data: {}\n\n", crate::wire::error_body(ErrorClass::Timeout, "stalled"));
        assert_eq!(
            parse_frame(err.as_bytes()),
            Some(Internal::Error { class: ErrorClass::Timeout, message: "stalled".into() })
        );
        assert_eq!(parse_frame(b"data: [DONE]\n\n"), Some(Internal::Done));
        assert_eq!(parse_frame(b"nonsense"), None);
        assert_eq!(parse_frame(b"data: {\"choices\": 3}"), None);
    }
}
