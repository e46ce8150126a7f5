//! Reading an upstream's event stream: SSE framing, then each provider's events as
//! [`Piece`]s of an answer.
//!
//! A malformed chunk (not JSON) is skipped and counted rather than ending the
//! answer: one bad line from a buggy server should not cost the agent its answer.

use std::collections::VecDeque;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use keel_core::{ErrorClass, Failure};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::Provider;
use crate::wire::Usage;
use crate::wire::anthropic::{StreamTranslator, Translated};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

/// Splits a byte stream into server-sent events (`data:` lines, blank-line separated).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Adds `bytes` and appends every event they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        self.buf.extend_from_slice(bytes);
        while let Some((end, skip)) = find_boundary(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end + skip).take(end).collect();
            if let Some(event) = parse_block(&String::from_utf8_lossy(&block)) {
                out.push(event);
            }
        }
    }

    /// What is left when the stream ends (an event without its blank line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let rest = std::mem::take(&mut self.buf);
        parse_block(&String::from_utf8_lossy(&rest))
    }
}

fn find_boundary(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => data = Some(v.to_owned()),
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_owned());
        }
    }
    data.map(|data| SseEvent { event, data })
}

/// A part of a streamed answer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Piece {
    pub(crate) id: Option<String>,
    pub(crate) role: bool,
    pub(crate) content: Option<String>,
    pub(crate) tool_calls: Option<Box<RawValue>>,
    pub(crate) finish_reason: Option<String>,
    pub(crate) usage: Option<Usage>,
}

impl Piece {
    /// Whether this piece carries part of the answer (text or a tool call).
    pub(crate) fn is_token(&self) -> bool {
        self.content.as_deref().is_some_and(|c| !c.is_empty()) || self.tool_calls.is_some()
    }
}

/// What the stream gave next.
#[derive(Debug)]
pub(crate) enum Item {
    Piece(Piece),
    /// The upstream said the answer is complete (`[DONE]`, `message_stop`).
    Done,
    /// The connection ended without saying so.
    Eof,
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow, default)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// An upstream's answer as a sequence of [`Item`]s.
#[derive(Debug)]
pub(crate) struct Source {
    body: Incoming,
    provider: Provider,
    parser: SseParser,
    events: Vec<SseEvent>,
    queue: VecDeque<Item>,
    translator: StreamTranslator,
    pub(crate) malformed: u64,
    ended: bool,
}

impl Source {
    pub(crate) fn new(body: Incoming, provider: Provider) -> Self {
        Self {
            body,
            provider,
            parser: SseParser::default(),
            events: Vec::new(),
            queue: VecDeque::new(),
            translator: StreamTranslator::default(),
            malformed: 0,
            ended: false,
        }
    }

    /// The next item.
    ///
    /// # Errors
    /// `network` when the connection fails, or the upstream's error event.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is either fully queued or not read.
    pub(crate) async fn next(&mut self) -> Result<Item, Failure> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(item);
            }
            if self.ended {
                return Ok(Item::Eof);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.feed(&data)?;
                    }
                }
                Some(Err(e)) => {
                    let f = keel_http::transport_failure(&e, "the upstream", keel_http::Stage::Body);
                    return Err(Failure::new(f.class, format!("the upstream stream broke: {}", f.message)));
                }
                None => {
                    self.ended = true;
                    if let Some(event) = self.parser.finish() {
                        self.handle(event)?;
                    }
                }
            }
        }
    }

    fn feed(&mut self, data: &Bytes) -> Result<(), Failure> {
        let mut events = std::mem::take(&mut self.events);
        self.parser.feed(data, &mut events);
        for event in events.drain(..) {
            self.handle(event)?;
        }
        self.events = events;
        Ok(())
    }

    fn handle(&mut self, event: SseEvent) -> Result<(), Failure> {
        match self.provider.wire() {
            crate::dialect::Wire::OpenAi => self.openai(&event.data),
            crate::dialect::Wire::Anthropic => self.anthropic(&event.data),
        }
    }

    fn openai(&mut self, data: &str) -> Result<(), Failure> {
        let data = data.trim();
        if data == "[DONE]" {
            self.queue.push_back(Item::Done);
            return Ok(());
        }
        let Ok(chunk) = serde_json::from_str::<ChunkView<'_>>(data) else {
            self.malformed += 1;
            return Ok(());
        };
        if let Some(error) = chunk.error {
            return Err(Failure::new(
                ErrorClass::ServerError,
                format!("the upstream sent an error event: {}", error.get()),
            ));
        }
        let mut piece = Piece { id: chunk.id, usage: chunk.usage, ..Piece::default() };
        if let Some(choice) = chunk.choices.into_iter().next() {
            piece.finish_reason = choice.finish_reason;
            if let Some(delta) = choice.delta {
                piece.role = delta.role.is_some();
                piece.content = delta.content;
                piece.tool_calls = delta.tool_calls.filter(|r| r.get() != "null").map(RawValue::to_owned);
            }
        }
        self.queue.push_back(Item::Piece(piece));
        Ok(())
    }

    fn anthropic(&mut self, data: &str) -> Result<(), Failure> {
        let translated = match self.translator.event(data) {
            Ok(t) => t,
            Err(_) => {
                self.malformed += 1;
                return Ok(());
            }
        };
        let id = Some(self.translator.id().to_owned());
        match translated {
            Translated::Nothing => {}
            Translated::Delta(delta) => {
                let piece = Piece {
                    id,
                    role: delta.get("role").is_some(),
                    content: delta.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                    tool_calls: delta.get("tool_calls").and_then(|t| serde_json::value::to_raw_value(t).ok()),
                    ..Piece::default()
                };
                self.queue.push_back(Item::Piece(piece));
            }
            Translated::Finish(reason) => {
                self.queue.push_back(Item::Piece(Piece {
                    id,
                    finish_reason: Some(reason.to_owned()),
                    ..Piece::default()
                }));
            }
            Translated::Done(usage) => {
                self.queue.push_back(Item::Piece(Piece { id, usage: Some(usage), ..Piece::default() }));
                self.queue.push_back(Item::Done);
            }
            Translated::Error(f) => return Err(f),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c.as_bytes(), &mut out);
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn frames_events_split_anywhere() {
        let all = events(&["data: {\"a\"", ":1}\n", "\ndata: [DONE]\n\n"]);
        assert_eq!(all.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["{\"a\":1}", "[DONE]"]);
        let crlf = events(&["event: ping\r\ndata: x\r\n\r\ndata: y"]);
        assert_eq!(crlf[0], SseEvent { event: Some("ping".into()), data: "x".into() });
        assert_eq!(crlf[1].data, "y", "an unterminated last event is kept at the end");
        assert!(events(&[": comment\n\n"]).is_empty());
    }
}
