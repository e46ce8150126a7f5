//! Journaling model calls: one [`CallRecord`] per call, failed attempts included.
//!
//! Prompts are private: unless a model sets `hash_prompts = false`, a record holds
//! the SHA-256 of the prompt (the raw `messages` array), never the text. Records go to
//! a [`CallJournal`]; [`JournalWriter`] is one (batched, non-blocking), writing each
//! call as a step of its run (header `X-Keel-Run`, else the run `gateway`).

use std::fmt;
use std::sync::Mutex;

use keel_core::ErrorClass;
use keel_journal::{JournalEvent, JournalWriter, NewEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::charges::Spent;
use crate::error::GatewayError;
use crate::gateway::{CallContext, Model};
use crate::wire::{ChatRequest, Usage};

/// The run gateway calls without `X-Keel-Run` are journaled under.
pub const GATEWAY_RUN: &str = "gateway";

/// The prompt as journaled: a digest, or the text when configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// `sha256:` and the hex digest of the raw `messages` array.
    Hashed(String),
    /// The raw `messages` array.
    Plain(String),
}

impl Prompt {
    /// The prompt of `messages_raw`, hashed or not.
    pub fn new(messages_raw: &str, hash: bool) -> Self {
        if hash {
            Prompt::Hashed(sha256_hex(messages_raw.as_bytes()))
        } else {
            Prompt::Plain(messages_raw.to_owned())
        }
    }
}

/// `sha256:` followed by the lowercase hex digest of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// One failed attempt sequence on one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelFailure {
    /// The model.
    pub model: String,
    /// The class of its final failure.
    pub class: ErrorClass,
    /// In words.
    pub message: String,
    /// Attempts made on it.
    pub attempts: u32,
}

/// One model call through the gateway, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallRecord {
    /// The run (`X-Keel-Run`), if any.
    pub run: Option<String>,
    /// The API key's id, if the server set one.
    pub api_key: Option<String>,
    /// The model the agent named.
    pub model: String,
    /// The model that answered, if any did.
    pub answered_by: Option<String>,
    /// Whether the answer streamed.
    pub stream: bool,
    /// The prompt, hashed unless configured otherwise.
    pub prompt: Prompt,
    /// Attempts made on every model.
    pub attempts: u32,
    /// Correction retries made.
    pub corrections: u32,
    /// Failures before the answer (or before giving up), in order.
    pub failures: Vec<ModelFailure>,
    /// What the call's attempts were charged, together (every attempt a provider
    /// answered: retries, rejected answers and cut streams included; an unknown usage
    /// at its upper bound). The same numbers the budgets and `/metrics` counted.
    pub usage: Option<Usage>,
    /// Their cost, in micro-dollars.
    pub cost_micros: u64,
    /// How a stream was rescued (`prefill`, `splice`), if it was.
    pub rescue: Option<String>,
    /// `None` on success, else the class and message the agent saw.
    pub error: Option<(ErrorClass, String)>,
}

/// Where call records go.
pub trait CallJournal: Send + Sync + fmt::Debug {
    /// Records one call; must not block (queue and return).
    fn record(&self, record: CallRecord);

    /// Records queued and not yet durable: the gateway sheds load above a limit
    /// rather than let the queue, and memory, grow without bound.
    fn backlog(&self) -> usize {
        0
    }
}

/// Journals each call as one `model_called` event of its run (`X-Keel-Run`, or the
/// run `gateway`) through a [`JournalWriter`].
#[derive(Debug)]
pub struct WriterJournal {
    writer: JournalWriter,
}

impl WriterJournal {
    /// Records go to `writer`.
    pub fn new(writer: JournalWriter) -> Self {
        Self { writer }
    }
}

impl CallJournal for WriterJournal {
    fn record(&self, record: CallRecord) {
        let run = record.run.clone().unwrap_or_else(|| GATEWAY_RUN.to_owned());
        // Small rows: at thousands of calls a second the journal's bytes are its cost.
        let mut r = serde_json::json!({
            "prompt": record.prompt,
            "stream": record.stream,
            "api_key": record.api_key,
            "answered_by": record.answered_by,
            "attempts": record.attempts,
        });
        if record.usage.is_some() || record.error.is_none() {
            r["usage"] = serde_json::to_value(record.usage).unwrap_or_default();
            r["cost_micros"] = record.cost_micros.into();
        }
        if let Some((class, message)) = &record.error {
            r["error"] = serde_json::json!({"class": class, "message": message});
        }
        if !record.failures.is_empty() {
            r["failures"] = serde_json::to_value(&record.failures).unwrap_or_default();
        }
        if record.corrections > 0 {
            r["corrections"] = record.corrections.into();
        }
        if let Some(rescue) = &record.rescue {
            r["rescue"] = rescue.as_str().into();
        }
        self.writer
            .record(NewEvent::new(run, JournalEvent::ModelCalled { model: record.model.clone(), record: r }));
    }
}

/// Keeps records in memory (tests, and callers that journal elsewhere).
#[derive(Debug, Default)]
pub struct MemoryJournal {
    records: Mutex<Vec<CallRecord>>,
}

impl MemoryJournal {
    /// The records so far.
    pub fn records(&self) -> Vec<CallRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl CallJournal for MemoryJournal {
    fn record(&self, record: CallRecord) {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).push(record);
    }
}

/// Passes on only the events that are decisions (retries, refusals, breaker
/// transitions, fallbacks, corrections, budgets exceeded, loops), not the per-attempt start/end and
/// budget-charge events a [`CallRecord`] already sums up: at thousands of calls a
/// second, those would be most of the journal's writes.
#[derive(Debug)]
pub struct DecisionsOnly<S>(pub S);

impl<S: keel_core::EventSink> keel_core::EventSink for DecisionsOnly<S> {
    fn record(&self, event: &keel_core::Event) {
        use keel_core::Event as E;
        match event {
            E::AttemptStarted { .. } | E::BudgetCharged { .. } => {}
            E::AttemptEnded { outcome: keel_core::AttemptOutcome::Ok, .. } => {}
            E::AttemptEnded { .. }
            | E::RetryScheduled { .. }
            | E::RetryRefused { .. }
            | E::BreakerTransition { .. }
            | E::FallbackTaken { .. }
            | E::CorrectionRound { .. }
            | E::BudgetExceeded { .. }
            | E::FaultInjected { .. }
            | E::SchemaDrift { .. }
            | E::LoopDetected { .. } => self.0.record(event),
        }
    }
}

/// What a call's record names as its prompt: a chat request's messages, or an
/// embeddings request's `input`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Prompted<'a> {
    /// A chat request (whole or streamed, from any of the edge APIs).
    Chat(&'a ChatRequest),
    /// An embeddings request's raw `input`.
    Input(&'a str),
}

/// How a call ended, as its record says it. The default: nobody answered, no failure,
/// no attempt, nothing spent.
#[derive(Debug, Default)]
pub(crate) struct CallEnd<'a> {
    /// The model that answered.
    pub(crate) answered_by: Option<&'a str>,
    /// The models that failed on the way, in order.
    pub(crate) failures: &'a [ModelFailure],
    /// Attempts made on every model.
    pub(crate) attempts: u32,
    /// What the attempts charged, if any reached a provider.
    pub(crate) spent: Option<Spent>,
    /// Correction rounds.
    pub(crate) corrections: u32,
    /// How a stream was rescued.
    pub(crate) rescue: Option<&'a str>,
    /// The error the client got.
    pub(crate) error: Option<&'a GatewayError>,
}

/// The record of one call, written where every kind of call (whole, streamed,
/// embeddings, the edge APIs) ends.
impl crate::gateway::Gateway {
    pub(crate) fn journal_call(
        &self,
        ctx: &CallContext,
        primary: &Model,
        prompt: Prompted<'_>,
        end: CallEnd<'_>,
    ) {
        let CallEnd { answered_by, failures, attempts, spent, corrections, rescue, error } = end;
        let (stream, prompt) = match prompt {
            Prompted::Chat(req) => (req.stream, req.messages_raw()),
            Prompted::Input(input) => (false, input),
        };
        let Some(journal) = &self.journal else { return };
        let usage = spent.map(|s| s.usage);
        let cost = spent.map_or(0, |s| s.cost_micros);
        journal.record(CallRecord {
            run: ctx.run.clone(),
            api_key: ctx.api_key.clone(),
            model: primary.name.to_string(),
            answered_by: answered_by.map(str::to_owned),
            stream,
            prompt: Prompt::new(prompt, primary.config.hash_prompts),
            attempts,
            corrections,
            failures: failures.to_vec(),
            usage,
            cost_micros: cost,
            rescue: rescue.map(str::to_owned),
            error: error.map(|e| (e.class, e.message.clone())),
        });
    }
}
