//! The pipeline: every policy of a target, composed in one documented order.
//!
//! A call goes through, in this order:
//!
//! 1. **Loop guard** (once per step, for calls with a [`CallSignature`]): a repeated
//!    call is stopped with `loop_detected` before anything else is spent.
//! 2. **Deadline**: the step's deadline is the earlier of the run scope's deadline and
//!    `timeout.step`; nested calls inherit it through the [`RunScope`].
//!
//! Then, for each attempt:
//!
//! 3. **Budget**: one attempt is charged to the step's, the target's and the run's
//!    budgets, all or nothing; going over is `budget_exceeded`, terminal.
//! 4. **Circuit breaker**: an open breaker fails fast with `circuit_open` (not retried
//!    here; a fallback chain takes over). The attempt it refused is given back to the
//!    budgets: it never reached the target.
//! 5. **Fault injection**, then the **target**, under the attempt's timeout: the
//!    earlier of `timeout.attempt` and the step's deadline. A passed deadline is
//!    `deadline_exceeded` (terminal), a passed attempt timeout is `timeout`.
//! 6. The outcome goes to the breaker and, for a retry, to the **confidence gate**.
//! 7. **Retry**: the class must be retryable, attempts must be left (by
//!    `max_attempts` and by every attempt budget, checked before any wait: a call
//!    whose budget is spent ends at once as `budget_exceeded`, keeping its last
//!    failure), a `Retry-After` must be within the cap, the breaker must not have
//!    opened, the gate must allow it, and the delay
//!    (`Retry-After`, else backoff with jitter) must end before the deadline. Then the
//!    hook and the sink see the retry, and the pipeline sleeps. Otherwise the retry is
//!    refused with its reason, as an event and in the [`CallError`].
//!
//! No lock is held across an `.await`: every policy's lock is taken and released
//! within one synchronous call.
//!
//! ```
//! use keel_core::{ErrorClass, Failure, Pipeline, PolicyConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let pipeline = Pipeline::builder("weather", PolicyConfig::default()).build();
//! let answer = pipeline
//!     .call(|attempt| async move {
//!         if attempt.number < 2 {
//!             Err(Failure::new(ErrorClass::ServerError, "HTTP 503"))
//!         } else {
//!             Ok("sunny")
//!         }
//!     })
//!     .await;
//! assert_eq!(answer.unwrap(), "sunny");
//! # }
//! ```

mod error;
mod layer;
#[cfg(test)]
mod tests;

pub use error::{CallError, ErrorKind};
pub use layer::{PipelineLayer, PipelineService};

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerState};
use crate::budget::{Budget, BudgetKind};
use crate::class::{Classified, ErrorClass};
use crate::classify::Failure;
use crate::clock::{Clock, TokioClock, capped, deadline_after};
use crate::event::{AttemptOutcome, DelayReason, Event, EventSink, NullSink, RefusalReason, emit};
use crate::fault::{FaultInjector, FaultKind};
use crate::gate::ConfidenceGate;
use crate::loop_guard::LoopGuard;
use crate::policy::{PolicyConfig, TimeoutConfig};
use crate::retry::{RetryConfig, RetryDecision};
use crate::rng::SharedRng;
use crate::scope::RunScope;
use crate::signature::CallSignature;

/// What the target's closure learns about the attempt it is making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// When this attempt will be cut off, if ever.
    pub deadline: Option<Instant>,
}

/// What a retry hook sees: a retry about to wait.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryInfo {
    /// The target.
    pub target: Arc<str>,
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// Its class.
    pub class: ErrorClass,
    /// The wait before the next attempt.
    pub delay: Duration,
    /// Where the wait comes from.
    pub reason: DelayReason,
}

/// Where a call continues that an earlier process began (see [`Pipeline::call_resumed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Attempts already made; the next one is numbered `attempts + 1` and they count
    /// against `max_attempts` and the step's attempt budget (at least one attempt is
    /// always left: the last one's outcome was never recorded).
    pub attempts: u32,
    /// The class of the failure the next attempt retries, when known (the gate learns
    /// the retry's outcome under it).
    pub class: Option<ErrorClass>,
    /// What is left of the backoff the earlier process was waiting out.
    pub wait: Duration,
}

/// A callback that sees each retry before its sleep (never after the last attempt).
pub type RetryHook = Arc<dyn Fn(&RetryInfo) + Send + Sync>;

struct Inner {
    target: Arc<str>,
    timeout: TimeoutConfig,
    retry: RetryConfig,
    breaker: Option<Arc<Breaker>>,
    gate: Option<Arc<ConfidenceGate>>,
    budget: Option<Arc<Budget>>,
    step_budget: Option<crate::budget::BudgetConfig>,
    loop_guard: Option<Arc<LoopGuard>>,
    fault: Option<FaultInjector>,
    rng: SharedRng,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn EventSink>,
    on_retry: Option<RetryHook>,
}

/// The policies of one target, ready to wrap calls. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("target", &self.inner.target)
            .field("timeout", &self.inner.timeout)
            .field("retry", &self.inner.retry)
            .field("breaker", &self.inner.breaker.is_some())
            .field("gate", &self.inner.gate.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Pipeline`] from a [`PolicyConfig`] and shared parts.
pub struct PipelineBuilder {
    target: Arc<str>,
    config: PolicyConfig,
    clock: Option<Arc<dyn Clock>>,
    sink: Option<Arc<dyn EventSink>>,
    breaker: Option<Arc<Breaker>>,
    gate: Option<Arc<ConfidenceGate>>,
    budget: Option<Arc<Budget>>,
    loop_guard: Option<Arc<LoopGuard>>,
    on_retry: Option<RetryHook>,
}

impl fmt::Debug for PipelineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineBuilder").field("target", &self.target).finish_non_exhaustive()
    }
}

impl PipelineBuilder {
    /// The clock the policies read (default: [`TokioClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Where events go (default: tracing only).
    pub fn sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// A breaker shared with other pipelines of the same target (default: a new one
    /// from the config, when enabled).
    pub fn breaker(mut self, breaker: Arc<Breaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// A gate shared with other pipelines (default: a new one from the config).
    pub fn gate(mut self, gate: Arc<ConfidenceGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// A budget charged by every call of this pipeline (e.g. one per API key).
    pub fn budget(mut self, budget: Arc<Budget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// A loop guard for signed calls (default: the run scope's).
    pub fn loop_guard(mut self, guard: Arc<LoopGuard>) -> Self {
        self.loop_guard = Some(guard);
        self
    }

    /// A hook called before each retry's sleep.
    pub fn on_retry(mut self, hook: impl Fn(&RetryInfo) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    /// The pipeline.
    pub fn build(self) -> Pipeline {
        let clock: Arc<dyn Clock> = self.clock.unwrap_or_else(|| Arc::new(TokioClock::new()));
        let sink: Arc<dyn EventSink> = self.sink.unwrap_or_else(|| Arc::new(NullSink));
        let c = self.config;
        let breaker = self.breaker.or_else(|| {
            c.breaker.enabled.then(|| {
                Arc::new(Breaker::new(self.target.clone(), c.breaker.clone(), clock.clone(), sink.clone()))
            })
        });
        let gate =
            self.gate.or_else(|| c.gate.enabled.then(|| Arc::new(ConfidenceGate::new(c.gate.clone()))));
        Pipeline {
            inner: Arc::new(Inner {
                target: self.target,
                timeout: c.timeout,
                retry: c.retry,
                breaker,
                gate,
                budget: self.budget,
                step_budget: c.budget.is_limited().then_some(c.budget),
                loop_guard: self.loop_guard,
                fault: FaultInjector::new(c.fault),
                rng: SharedRng::new(c.seed),
                clock,
                sink,
                on_retry: self.on_retry,
            }),
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Pipeline {
    /// Starts building the pipeline of `target` with `config`.
    pub fn builder(target: impl Into<Arc<str>>, config: PolicyConfig) -> PipelineBuilder {
        PipelineBuilder {
            target: target.into(),
            config,
            clock: None,
            sink: None,
            breaker: None,
            gate: None,
            budget: None,
            loop_guard: None,
            on_retry: None,
        }
    }

    /// The target's name.
    pub fn target(&self) -> &Arc<str> {
        &self.inner.target
    }

    /// The target's breaker, if it has one.
    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.inner.breaker.as_ref()
    }

    /// The gate, if retries are gated.
    pub fn gate(&self) -> Option<&Arc<ConfidenceGate>> {
        self.inner.gate.as_ref()
    }

    /// Calls `op` under every policy; `op` is called once per attempt.
    ///
    /// # Errors
    /// A [`CallError`] with the final class: the target's own, or `timeout`,
    /// `deadline_exceeded`, `circuit_open`, `budget_exceeded`.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the current attempt; the breaker counts it as
    /// neither success nor failure and budgets keep what was charged.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        self.run(None, Resume::default(), op).await
    }

    /// Like [`call`](Self::call), continuing a call that an earlier process began and
    /// could not finish (it crashed, or lost its lease, during an attempt or a
    /// backoff): the next attempt waits out what is left of `from.wait` and is numbered
    /// after `from.attempts`, so a crash never grants a fresh set of attempts.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_resumed<T, E, F, Fut>(&self, from: Resume, op: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        self.run(None, from, op).await
    }

    /// Like [`call`](Self::call), for a call with a signature the loop guard checks.
    ///
    /// # Errors
    /// As [`call`](Self::call), and `loop_detected` before any attempt.
    pub async fn call_signed<T, E, F, Fut>(&self, signature: CallSignature, op: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        self.run(Some(signature), Resume::default(), op).await
    }

    /// [`call_signed`](Self::call_signed) when `signature` is given, else
    /// [`call`](Self::call): for callers whose calls are guarded only sometimes.
    ///
    /// # Errors
    /// As [`call_signed`](Self::call_signed).
    pub async fn call_with_signature<T, E, F, Fut>(
        &self,
        signature: Option<CallSignature>,
        op: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        self.run(signature, Resume::default(), op).await
    }

    async fn run<T, E, F, Fut>(
        &self,
        signature: Option<CallSignature>,
        from: Resume,
        mut op: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Classified,
    {
        let i = &*self.inner;
        let scope = RunScope::current();

        // 1. Loop guard.
        if let Some(sig) = signature {
            let guard = i.loop_guard.as_ref().or_else(|| scope.as_ref().and_then(|s| s.loop_guard.as_ref()));
            if let Some(guard) = guard {
                guard
                    .check_call(&i.target, sig)
                    .map_err(|e| CallError::new(0, ErrorKind::LoopDetected(e), None))?;
            }
        }

        // 2. Deadline.
        let start = i.clock.now();
        let scope_deadline = scope.as_ref().and_then(|s| s.deadline);
        let step_deadline = i.timeout.step.and_then(|d| deadline_after(start, d));
        let deadline = earliest(scope_deadline, step_deadline);
        let narrows_scope = step_deadline.is_some() && deadline != scope_deadline;
        let step_budget = i
            .step_budget
            .as_ref()
            .map(|c| Arc::new(Budget::new(format!("step:{}", i.target), c, i.sink.clone())));

        // A resumed call always makes at least one attempt: when every attempt was
        // used, the last one's outcome never reached the journal (the process died
        // during it), so it is made again, under the same idempotency key.
        let mut attempt = from.attempts.min(i.retry.max_attempts.saturating_sub(1));
        let mut retried_class: Option<ErrorClass> = from.class;
        if let Some(b) = &step_budget {
            // What the earlier process spent is spent.
            let _ = b.charge(BudgetKind::Attempts, u64::from(attempt));
        }
        if !from.wait.is_zero() {
            let wake = start.checked_add(from.wait).map_or(deadline, Some);
            if let Some(at) = earliest(wake, deadline) {
                tokio::time::sleep_until(at).await;
            }
        }
        loop {
            attempt += 1;
            let now = i.clock.now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(CallError::new(attempt - 1, ErrorKind::DeadlineExceeded, None));
            }

            // 3. Budgets: one attempt, all or nothing.
            let budgets =
                scope.iter().flat_map(|s| s.budgets.iter()).chain(i.budget.iter()).chain(step_budget.iter());
            if let Err(e) = charge_all(budgets.clone()) {
                return Err(CallError::new(attempt - 1, ErrorKind::BudgetExceeded(e), None));
            }

            // 4. Breaker.
            let permit = match &i.breaker {
                Some(b) => match b.acquire_for(Some(&*i.sink)) {
                    Some(p) => Some(p),
                    None => {
                        // Refused before reaching the target: not an attempt spent.
                        budgets.for_each(|b| b.refund(BudgetKind::Attempts, 1));
                        return Err(CallError::new(
                            attempt - 1,
                            ErrorKind::CircuitOpen(i.target.clone()),
                            None,
                        ));
                    }
                },
                None => None,
            };

            // 5. Fault injection and the target, under the attempt's timeout.
            emit(&*i.sink, Event::AttemptStarted { target: i.target.clone(), attempt });
            let attempt_deadline = earliest(deadline, i.timeout.attempt.and_then(|t| deadline_after(now, t)));
            let info = Attempt { number: attempt, deadline: attempt_deadline };
            let fault = i.fault.as_ref().and_then(FaultInjector::draw);
            if let Some(fault) = fault {
                emit(&*i.sink, Event::FaultInjected { target: i.target.clone(), attempt, fault });
            }
            let span = tracing::debug_span!("keel.attempt", keel.target = %i.target, keel.attempt = attempt);
            let fut = self.attempt_once(&mut op, info, fault).instrument(span);
            let result = match (narrows_scope, deadline) {
                (true, Some(d)) => RunScope::new().with_deadline(d).run(fut).await,
                _ => fut.await,
            };
            let result = result.map_err(|kind| match kind {
                // The attempt was cut at the step's deadline, not at its own timeout.
                ErrorKind::Timeout(_) if deadline.is_some() && attempt_deadline == deadline => {
                    ErrorKind::DeadlineExceeded
                }
                other => other,
            });
            let end = i.clock.now();
            let failure = result.as_ref().err().map(Classified::class);
            emit(
                &*i.sink,
                Event::AttemptEnded {
                    target: i.target.clone(),
                    attempt,
                    outcome: failure.map_or(AttemptOutcome::Ok, AttemptOutcome::Failed),
                    latency: end.saturating_duration_since(now),
                },
            );

            // 6. Breaker and gate learn the outcome.
            if let Some(permit) = permit {
                permit.record(failure);
            }
            if let (Some(gate), Some(class)) = (&i.gate, retried_class) {
                gate.record(&i.target, class, attempt, failure.is_none());
            }
            let kind = match result {
                Ok(value) => return Ok(value),
                Err(kind) => kind,
            };
            let class = kind.class();

            // 7. Retry, or say why not.
            let decision = if class == ErrorClass::DeadlineExceeded {
                RetryDecision::NotRetryable
            } else {
                i.retry.decide(attempt, class, kind.retry_after(), &i.rng)
            };
            let refusal = match decision {
                RetryDecision::NotRetryable => return Err(CallError::new(attempt, kind, None)),
                RetryDecision::Refused(reason) => reason,
                RetryDecision::Retry { delay, reason } => {
                    // The attempt budgets are checked before the wait, not after it: a
                    // retry they cannot pay for is refused now, with this failure.
                    let budgets = scope
                        .iter()
                        .flat_map(|s| s.budgets.iter())
                        .chain(i.budget.iter())
                        .chain(step_budget.iter());
                    if let Some(spent) =
                        budgets.clone().find(|b| b.remaining(BudgetKind::Attempts) == Some(0))
                    {
                        let refusal = RefusalReason::BudgetExhausted { budget: spent.name().to_string() };
                        emit(
                            &*i.sink,
                            Event::RetryRefused {
                                target: i.target.clone(),
                                attempt,
                                class,
                                reason: refusal.clone(),
                            },
                        );
                        // The call ends for want of budget; the last failure is kept.
                        let mut e = CallError::new(attempt, kind, Some(refusal));
                        e.class = ErrorClass::BudgetExceeded;
                        return Err(e);
                    }
                    match self.refuse_retry(class, attempt, delay, deadline) {
                        Some(refusal) => refusal,
                        None => {
                            emit(
                                &*i.sink,
                                Event::RetryScheduled {
                                    target: i.target.clone(),
                                    attempt,
                                    class,
                                    delay,
                                    reason,
                                },
                            );
                            if let Some(hook) = &i.on_retry {
                                hook(&RetryInfo { target: i.target.clone(), attempt, class, delay, reason });
                            }
                            tokio::time::sleep(capped(delay)).await;
                            retried_class = Some(class);
                            continue;
                        }
                    }
                }
            };
            emit(
                &*i.sink,
                Event::RetryRefused { target: i.target.clone(), attempt, class, reason: refusal.clone() },
            );
            return Err(CallError::new(attempt, kind, Some(refusal)));
        }
    }

    /// The gate's and the deadline's objections to retrying after `delay`.
    fn refuse_retry(
        &self,
        class: ErrorClass,
        attempt: u32,
        delay: Duration,
        deadline: Option<Instant>,
    ) -> Option<RefusalReason> {
        let i = &*self.inner;
        if i.breaker.as_ref().is_some_and(|b| b.state_for(Some(&*i.sink)) == BreakerState::Open) {
            return Some(RefusalReason::CircuitOpen);
        }
        if let Some(gate) = &i.gate {
            let verdict = gate.check(&i.target, class, attempt + 1);
            if !verdict.allowed {
                return Some(RefusalReason::LowConfidence {
                    score: verdict.score,
                    threshold: verdict.threshold,
                });
            }
        }
        let deadline = deadline?;
        let remaining = deadline.saturating_duration_since(i.clock.now());
        (delay >= remaining).then_some(RefusalReason::DeadlineTooClose { delay, remaining })
    }

    async fn attempt_once<T, E, F, Fut>(
        &self,
        op: &mut F,
        info: Attempt,
        fault: Option<FaultKind>,
    ) -> Result<T, ErrorKind<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let i = &*self.inner;
        let attempt_timeout = i.timeout.attempt.unwrap_or(Duration::MAX);
        let work = async {
            match fault {
                None => {}
                Some(FaultKind::ServerError) => {
                    return Err(ErrorKind::Injected(Failure::new(
                        ErrorClass::ServerError,
                        "HTTP 503 Service Unavailable",
                    )));
                }
                Some(FaultKind::EmptyOutput) => {
                    return Err(ErrorKind::Injected(Failure::new(ErrorClass::EmptyOutput, "empty output")));
                }
                Some(FaultKind::Latency) => {
                    if let Some(f) = &i.fault {
                        tokio::time::sleep(capped(f.latency())).await;
                    }
                }
                Some(FaultKind::Timeout) => {
                    if info.deadline.is_some() {
                        std::future::pending::<()>().await;
                    }
                    return Err(ErrorKind::Injected(Failure::new(ErrorClass::Timeout, "hung")));
                }
            }
            op(info).await.map_err(ErrorKind::Target)
        };
        match info.deadline {
            Some(d) => {
                tokio::time::timeout_at(d, work).await.unwrap_or(Err(ErrorKind::Timeout(attempt_timeout)))
            }
            None => work.await,
        }
    }
}

/// Charges one attempt to each budget; on a refusal, gives back what was charged.
fn charge_all<'a, I>(budgets: I) -> Result<(), crate::budget::BudgetExceeded>
where
    I: Iterator<Item = &'a Arc<Budget>> + Clone,
{
    for (n, budget) in budgets.clone().enumerate() {
        if let Err(e) = budget.charge(BudgetKind::Attempts, 1) {
            budgets.take(n).for_each(|b| b.refund(BudgetKind::Attempts, 1));
            return Err(e);
        }
    }
    Ok(())
}
