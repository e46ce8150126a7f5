//! Correction rounds: a target that answered with a mistake it can see (an empty or
//! cut-off answer, a tool call that does not parse or match its schema, a program that
//! raised) is asked again with its mistake shown to it, a bounded number of times.
//!
//! What makes a failure correctable is its class's [`Disposition::Correct`] (one table,
//! [`ErrorClass::default_disposition`]), not a list kept by each caller. [`Rounds`]
//! counts the rounds of one step and says whether another is due; [`correcting`] drives
//! a whole call through them with a hook that rewrites the request from the failure.
//! Each round taken is an [`Event::CorrectionRound`] on the step's sink, so the journal,
//! `/metrics` and traces see corrections as they see retries.
//!
//! A correction is not a retry: a retry sends the same request again because the
//! failure was the target's health; a correction changes the request because the
//! failure was the answer's content. The two compose — each round runs under the
//! target's whole [`Pipeline`](crate::Pipeline).

use std::future::Future;
use std::sync::Arc;

use crate::class::{Classified, Disposition, ErrorClass};
use crate::event::{Event, EventSink, emit};

/// The correction rounds of one step on one target.
#[derive(Debug)]
pub struct Rounds {
    target: Arc<str>,
    limit: u32,
    used: u32,
}

impl Rounds {
    /// At most `limit` rounds on `target` (0: never corrected).
    pub fn new(target: Arc<str>, limit: u32) -> Self {
        Self { target, limit, used: 0 }
    }

    /// Whether a failure of `class` may get another round: its disposition is to
    /// correct and a round is left.
    pub fn due(&self, class: ErrorClass) -> bool {
        class.default_disposition() == Disposition::Correct && self.used < self.limit
    }

    /// Counts a round taken for a failure of `class` and records it on `sink`.
    pub fn take(&mut self, class: ErrorClass, sink: &dyn EventSink) {
        self.used += 1;
        emit(sink, Event::CorrectionRound { target: self.target.clone(), round: self.used, class });
    }

    /// [`due`](Self::due), then [`take`](Self::take) if it is: whether the round is taken.
    pub fn admit(&mut self, class: ErrorClass, sink: &dyn EventSink) -> bool {
        let due = self.due(class);
        if due {
            self.take(class, sink);
        }
        due
    }

    /// The rounds taken so far.
    pub fn used(&self) -> u32 {
        self.used
    }
}

/// A corrected call's value and the rounds it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrected<T> {
    /// The value of the round that succeeded.
    pub value: T,
    /// Correction rounds before it (0: the first answer was right).
    pub rounds: u32,
}

/// Calls `call` with `request`; while it fails with a correctable class and rounds are
/// left, `rewrite` makes the next request from the last one and the failure (shown to
/// the target), or gives back an error to stop with (the failure cannot be shown, the
/// rewritten request is invalid) — a round is counted only once its request is made.
///
/// # Errors
/// The last failure: not correctable, out of rounds, or `rewrite`'s.
pub async fn correcting<R, T, E, F, Fut, W>(
    rounds: &mut Rounds,
    sink: &dyn EventSink,
    mut request: R,
    mut call: F,
    mut rewrite: W,
) -> Result<Corrected<T>, E>
where
    E: Classified,
    F: FnMut(&R) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    W: FnMut(&R, E) -> Result<R, E>,
{
    loop {
        match call(&request).await {
            Ok(value) => return Ok(Corrected { value, rounds: rounds.used() }),
            Err(e) if rounds.due(e.class()) => {
                let class = e.class();
                request = rewrite(&request, e)?;
                rounds.take(class, sink);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A program (Python source) with its comments and whitespace taken out: two programs
/// that differ only there are the same program, and a correction that repeats one is
/// not run again (agent runs, the Python package's `self_correct`).
pub fn normalize_program(program: &str) -> String {
    let mut out = String::with_capacity(program.len());
    for line in program.lines() {
        let code = strip_comment(line);
        out.extend(code.chars().filter(|c| !c.is_whitespace()));
        if !code.trim().is_empty() {
            out.push('\n');
        }
    }
    out
}

/// A line without its `#` comment (a `#` inside a string literal is kept).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(_), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySink;
    use crate::classify::Failure;

    #[tokio::test]
    async fn a_correctable_failure_is_shown_to_the_target_until_it_answers() {
        let sink = MemorySink::new();
        let mut rounds = Rounds::new(Arc::from("gpt"), 2);
        let out = correcting(
            &mut rounds,
            &*sink,
            vec!["ask".to_owned()],
            |req: &Vec<String>| {
                let n = req.len();
                async move {
                    if n < 3 { Err(Failure::new(ErrorClass::InvalidToolCall, "bad args")) } else { Ok(n) }
                }
            },
            |req, e| {
                let mut next = req.clone();
                next.push(e.message);
                Ok(next)
            },
        )
        .await
        .unwrap();
        assert_eq!(out, Corrected { value: 3, rounds: 2 });
        let rounds: Vec<u32> = sink
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::CorrectionRound { round, class: ErrorClass::InvalidToolCall, .. } => Some(*round),
                _ => None,
            })
            .collect();
        assert_eq!(rounds, [1, 2], "each round is an event");
    }

    #[tokio::test]
    async fn rounds_are_bounded_and_the_last_failure_is_returned() {
        let sink = MemorySink::new();
        let mut rounds = Rounds::new(Arc::from("gpt"), 2);
        let calls = std::cell::Cell::new(0);
        let err = correcting(
            &mut rounds,
            &*sink,
            (),
            |_: &()| {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { Err::<(), _>(Failure::new(ErrorClass::EmptyOutput, format!("empty #{n}"))) }
            },
            |_, _| Ok(()),
        )
        .await
        .unwrap_err();
        assert_eq!(calls.get(), 3, "the first call and two rounds");
        assert_eq!(err.message, "empty #3");
        assert_eq!(rounds.used(), 2);
    }

    #[tokio::test]
    async fn only_the_correct_disposition_is_corrected() {
        for class in &ErrorClass::ALL {
            let sink = MemorySink::new();
            let mut rounds = Rounds::new(Arc::from("t"), 5);
            let admitted = rounds.admit(*class, &*sink);
            assert_eq!(admitted, class.default_disposition() == Disposition::Correct, "{class}");
            assert_eq!(sink.events().len(), usize::from(admitted));
        }
        // A limit of 0 never corrects.
        let mut none = Rounds::new(Arc::from("t"), 0);
        assert!(!none.admit(ErrorClass::EmptyOutput, &crate::NullSink));
    }

    #[tokio::test]
    async fn a_rewrite_that_cannot_show_the_failure_stops_with_its_error() {
        let mut rounds = Rounds::new(Arc::from("t"), 3);
        let err = correcting(
            &mut rounds,
            &crate::NullSink,
            (),
            |_: &()| async { Err::<(), _>(Failure::new(ErrorClass::TruncatedOutput, "cut")) },
            |_, _| Err(Failure::new(ErrorClass::InvalidRequest, "too long to append")),
        )
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert_eq!(rounds.used(), 0, "no round without a request to send");
    }
}
