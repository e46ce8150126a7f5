//! Scripted targets for keel-core's own tests: replay outcomes, record calls.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::class::ErrorClass;
use crate::classify::Failure;

/// One scripted outcome.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    Ok,
    Fail(ErrorClass),
    RetryAfter(ErrorClass, Duration),
    Hang,
}

/// A target that replays a script (then succeeds) and records when it was called.
#[derive(Debug, Default)]
pub(crate) struct Script {
    steps: Mutex<VecDeque<Step>>,
    calls: Mutex<Vec<Instant>>,
}

impl Script {
    pub(crate) fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self { steps: Mutex::new(steps.into_iter().collect()), calls: Mutex::default() }
    }

    pub(crate) fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) async fn call(&self) -> Result<&'static str, Failure> {
        self.calls.lock().unwrap().push(Instant::now());
        let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Ok);
        match step {
            Step::Ok => Ok("ok"),
            Step::Fail(class) => Err(Failure::new(class, "scripted")),
            Step::RetryAfter(class, d) => Err(Failure::new(class, "scripted").with_retry_after(Some(d))),
            Step::Hang => {
                std::future::pending::<()>().await;
                Ok("never")
            }
        }
    }
}
