//! `keel._keel`: keel-core's policy engine for the `keel` Python package.
//!
//! One [`Step`] is one target's keel-core [`Pipeline`] (timeout, retry with backoff and
//! `Retry-After`, breaker, budget), on a tokio runtime of its own whose thread drives
//! its timers: a sync call releases the GIL while the pipeline waits (backoffs,
//! `Retry-After`) and takes it to call the Python function once per attempt; an async
//! call runs the pipeline on that thread and each attempt's coroutine on the caller's
//! event loop (`asyncio.run_coroutine_threadsafe`), so the loop is never blocked and an
//! attempt timeout cancels the coroutine. Python owns what is Python's — exceptions and how
//! they map to an [`ErrorClass`] (`keel/__init__.py`'s `classify`) — and Rust owns the
//! decisions, so a step behaves exactly as the same policy does in `keel serve`.
//!
//! With `virtual_time`, the runtime's clock is paused and advances only when every
//! task waits: backoffs are instant, and `elapsed()` says how much policy time passed
//! (tests on a fake clock).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{ErrorClass, ErrorKind, Event, EventSink, Failure, Pipeline, PolicyConfig};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

mod telemetry;

/// The most recent events a step keeps (`events()`): a long-lived step's memory stays
/// bounded.
const RECENT: usize = 1024;

/// The step's last [`RECENT`] policy events.
#[derive(Debug, Default)]
struct Recent(Mutex<std::collections::VecDeque<Event>>);

impl EventSink for Recent {
    fn record(&self, event: &Event) {
        {
            let mut events = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if events.len() == RECENT {
                events.pop_front();
            }
            events.push_back(event.clone());
        }
        ToCall.record(event);
    }
}

/// The call being made collects its own events (a sync call's pipeline runs on the
/// caller's thread, an async call's in a task of its own): the loop guard's refusals
/// join the call they refused.
#[derive(Debug)]
struct ToCall;

impl EventSink for ToCall {
    fn record(&self, event: &Event) {
        CALL_EVENTS.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(event.clone());
            }
        });
        let _ = TASK_EVENTS.try_with(|v| v.borrow_mut().push(event.clone()));
    }
}

thread_local! {
    static CALL_EVENTS: std::cell::RefCell<Option<Vec<Event>>> = const { std::cell::RefCell::new(None) };
}

tokio::task_local! {
    static TASK_EVENTS: std::cell::RefCell<Vec<Event>>;
}

/// One target's policies, ready to call functions under.
#[pyclass(module = "keel._keel", frozen)]
struct Step {
    target: Arc<str>,
    pipeline: Pipeline,
    runtime: tokio::runtime::Handle,
    events: Arc<Recent>,
    started: tokio::time::Instant,
    /// Calls are signed for the loop guard (the step was given one).
    guarded: bool,
    /// Each call is an `execute_tool` span (the step was given telemetry).
    traced: bool,
}

/// The runtime of every step on real time: one thread for the process, however many
/// functions are decorated.
static SHARED: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// The runtime a step runs on: the process's shared one, or (virtual time) a paused
/// one of its own, so that one step's clock never moves another's.
fn runtime(virtual_time: bool) -> PyResult<tokio::runtime::Handle> {
    if virtual_time {
        return new_runtime(true);
    }
    if let Some(h) = SHARED.get() {
        return Ok(h.clone());
    }
    let made = new_runtime(false)?;
    Ok(SHARED.get_or_init(|| made).clone())
}

/// A current-thread runtime driven by a thread of its own (paused: virtual time).
fn new_runtime(virtual_time: bool) -> PyResult<tokio::runtime::Handle> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time();
    if virtual_time {
        builder.start_paused(true);
    }
    let rt = builder.build().map_err(|e| PyRuntimeError::new_err(format!("a runtime: {e}")))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("keel-step".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| PyRuntimeError::new_err(format!("a runtime thread: {e}")))?;
    Ok(handle)
}

/// A runtime owned by a Python object. Python frees objects wherever it runs — also
/// on a step's runtime thread, inside an attempt, where dropping a runtime the plain
/// way panics — so it is shut down in the background, waiting for nothing.
pub(crate) struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    /// A multi-thread runtime of one worker named `name`, with I/O and time.
    pub(crate) fn new(name: &str) -> PyResult<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .map(|rt| OwnRuntime(Some(rt)))
            .map_err(|e| PyRuntimeError::new_err(format!("a runtime: {e}")))
    }
}

impl std::ops::Deref for OwnRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        // Taken only in `drop`.
        self.0.as_ref().unwrap_or_else(|| unreachable!("the runtime is taken only when dropped"))
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Cancels an attempt's coroutine when the attempt is abandoned (its timeout fired).
struct CancelOnDrop(Option<Py<PyAny>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cf) = self.0.take() {
            Python::with_gil(|py| {
                let _ = cf.call_method0(py, "cancel");
            });
        }
    }
}

/// The answer tuple for the Python side: `(True, value, events_json)` or `(False,
/// class, attempts, message, last_exception, events_json)`, the events the call's own.
fn answer(
    py: Python<'_>,
    outcome: Result<Py<PyAny>, keel_core::CallError<Failure>>,
    last: Option<PyErr>,
    events: &[Event],
) -> PyResult<Py<PyTuple>> {
    let events = serde_json::to_string(events).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let events = events.into_pyobject(py)?.into_any();
    match outcome {
        Ok(value) => Ok(PyTuple::new(
            py,
            [true.into_pyobject(py)?.to_owned().into_any(), value.into_bound(py), events],
        )?
        .unbind()),
        Err(e) => {
            let message = match &e.kind {
                ErrorKind::Target(f) => f.message.clone(),
                other => other.to_string(),
            };
            let message = match &e.refusal {
                Some(reason) => format!("{message} (not retried: {reason})"),
                None => message,
            };
            let exc: Py<PyAny> = match (&e.kind, last) {
                (ErrorKind::Target(_), Some(err)) => err.into_value(py).into_any(),
                _ => py.None(),
            };
            let items: Vec<Py<PyAny>> = vec![
                false.into_pyobject(py)?.to_owned().into_any().unbind(),
                e.class.as_str().into_pyobject(py)?.into_any().unbind(),
                e.attempts.into_pyobject(py)?.into_any().unbind(),
                message.into_pyobject(py)?.into_any().unbind(),
                exc,
                events.unbind(),
            ];
            Ok(PyTuple::new(py, items)?.unbind())
        }
    }
}

fn policy_error(errors: &[keel_core::PolicyError]) -> PyErr {
    let message = errors.iter().map(|e| format!("{}: {}", e.key, e.message)).collect::<Vec<_>>().join("; ");
    PyValueError::new_err(message)
}

/// [`policy_error`] with every key under `prefix` (`loop_guard.max_repeats`).
fn policy_error_under(prefix: &str, errors: Vec<keel_core::PolicyError>) -> PyErr {
    let prefixed: Vec<_> = errors
        .into_iter()
        .map(|mut p| {
            p.key = format!("{prefix}.{}", p.key);
            p
        })
        .collect();
    policy_error(&prefixed)
}

/// What `classify(exc)` answered: a class name and an optional `Retry-After` in seconds.
fn failure_of(py: Python<'_>, classify: &Py<PyAny>, err: &PyErr) -> Failure {
    let message = err.value(py).str().map(|s| s.to_string()).unwrap_or_default();
    let kind = err.get_type(py).name().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into());
    let answered = classify.call1(py, (err.value(py),)).and_then(|v| v.extract::<(String, Option<f64>)>(py));
    let (class, retry_after) = match answered {
        Ok((name, after)) => (ErrorClass::from_str(&name).unwrap_or(ErrorClass::CodeError), after),
        // A classifier that cannot say fails closed: not retried.
        Err(_) => (ErrorClass::CodeError, None),
    };
    let mut failure = Failure::new(class, format!("{kind}: {message}"));
    failure.retry_after = retry_after.filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64);
    failure
}

#[pymethods]
impl Step {
    /// A step named `target` under `policy` (keel-core's `PolicyConfig` as JSON, the
    /// `[defaults]`/`policy` tables of keel.toml).
    /// `loop_guard`: the guard its calls are checked by (each call signed by
    /// `signature`, its canonical arguments). `traced`: each call is a span.
    #[new]
    #[pyo3(signature = (target, policy_json, virtual_time = false, loop_guard = None, traced = false))]
    fn new(
        target: &str,
        policy_json: &str,
        virtual_time: bool,
        loop_guard: Option<PyRef<'_, LoopGuard>>,
        traced: bool,
    ) -> PyResult<Self> {
        let policy: PolicyConfig =
            serde_json::from_str(policy_json).map_err(|e| PyValueError::new_err(format!("policy: {e}")))?;
        policy.validate().map_err(|e| policy_error(&e))?;
        let runtime = runtime(virtual_time)?;
        let events = Arc::new(Recent::default());
        let target: Arc<str> = Arc::from(target);
        let guarded = loop_guard.is_some();
        let (pipeline, started) = {
            let _in = runtime.enter();
            let mut builder = Pipeline::builder(target.clone(), policy).sink(events.clone());
            if let Some(guard) = &loop_guard {
                builder = builder.loop_guard(guard.0.clone());
            }
            (builder.build(), tokio::time::Instant::now())
        };
        Ok(Step { target, pipeline, runtime, events, started, guarded, traced })
    }

    /// Calls `func(*args, **kwargs)` under the policies. `classify(exc)` names each
    /// exception's class. `(True, value)`, or `(False, class, attempts, message,
    /// last_exception)` for the Python side to raise.
    #[pyo3(signature = (func, args, kwargs, classify, collect = false, signature = None))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        func: Py<PyAny>,
        args: Py<PyTuple>,
        kwargs: Option<Py<PyDict>>,
        classify: Py<PyAny>,
        collect: bool,
        signature: Option<&str>,
    ) -> PyResult<Py<PyTuple>> {
        let signature = self.signature(signature);
        let last: Mutex<Option<PyErr>> = Mutex::new(None);
        let (outcome, events) = py.allow_threads(|| {
            // Collected only when asked (a journal or alerts read them): the plain call
            // pays nothing for them.
            if collect {
                CALL_EVENTS.with(|c| *c.borrow_mut() = Some(Vec::new()));
            }
            let outcome =
                self.block_on(self.under_span(self.pipeline.call_with_signature(signature, |_attempt| {
                    let answer = Python::with_gil(|py| {
                        let kwargs = kwargs.as_ref().map(|k| k.bind(py));
                        match func.bind(py).call(args.bind(py), kwargs) {
                            Ok(v) => Ok(v.unbind()),
                            Err(e) => {
                                let failure = failure_of(py, &classify, &e);
                                *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                                Err(failure)
                            }
                        }
                    });
                    std::future::ready(answer)
                })));
            (outcome, CALL_EVENTS.with(|c| c.borrow_mut().take()).unwrap_or_default())
        });
        let last = last.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        answer(py, outcome, last, &events)
    }

    /// Calls the coroutine function `func(*args, **kwargs)` under the policies: the
    /// pipeline runs on the step's thread, each attempt's coroutine on `event_loop`.
    /// Returns at once; `resolve(answer)` is called on the loop with the answer tuple
    /// of [`call`](Self::call).
    #[pyo3(signature = (func, args, kwargs, classify, event_loop, resolve, collect = false, signature = None))]
    #[allow(clippy::too_many_arguments)]
    fn call_async(
        &self,
        func: Py<PyAny>,
        args: Py<PyTuple>,
        kwargs: Option<Py<PyDict>>,
        classify: Py<PyAny>,
        event_loop: Py<PyAny>,
        resolve: Py<PyAny>,
        collect: bool,
        signature: Option<&str>,
    ) {
        let signature = self.signature(signature);
        let span = self.traced.then(|| telemetry::step_span(&self.target));
        let pipeline = self.pipeline.clone();
        let (func, args, kwargs, classify, event_loop) =
            (Arc::new(func), Arc::new(args), Arc::new(kwargs), Arc::new(classify), Arc::new(event_loop));
        self.runtime.spawn(TASK_EVENTS.scope(std::cell::RefCell::new(Vec::new()), async move {
            let last: Arc<Mutex<Option<PyErr>>> = Arc::default();
            let called = pipeline.call_with_signature(signature, |_attempt| {
                let (func, args, kwargs, classify, event_loop, last) = (
                    func.clone(),
                    args.clone(),
                    kwargs.clone(),
                    classify.clone(),
                    event_loop.clone(),
                    last.clone(),
                );
                async move {
                    let failed = |py: Python<'_>, e: PyErr| {
                        let failure = failure_of(py, &classify, &e);
                        *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                        failure
                    };
                    let submitted = Python::with_gil(|py| {
                        let kwargs = kwargs.as_ref().as_ref().map(|k| k.bind(py));
                        let started = func.bind(py).call(args.bind(py), kwargs).and_then(|coro| {
                            py.import("asyncio")?
                                .call_method1("run_coroutine_threadsafe", (coro, event_loop.bind(py)))
                                .map(Bound::unbind)
                        });
                        started.map_err(|e| failed(py, e))
                    })?;
                    let mut guard = CancelOnDrop(Some(Python::with_gil(|py| submitted.clone_ref(py))));
                    let waited = tokio::task::spawn_blocking(move || {
                        Python::with_gil(|py| submitted.call_method0(py, "result"))
                    })
                    .await;
                    guard.0 = None;
                    match waited {
                        Ok(Ok(value)) => Ok(value),
                        Ok(Err(e)) => Err(Python::with_gil(|py| failed(py, e))),
                        Err(e) => {
                            Err(Failure::new(ErrorClass::CodeError, format!("the attempt's waiter: {e}")))
                        }
                    }
                }
            });
            let outcome = match span {
                Some(span) => {
                    let outcome = tracing::Instrument::instrument(called, span.clone()).await;
                    telemetry::end_span(&span, &outcome);
                    outcome
                }
                None => called.await,
            };
            let last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let events = if collect { TASK_EVENTS.with(|v| v.take()) } else { Vec::new() };
            Python::with_gil(|py| {
                let delivered = answer(py, outcome, last, &events)
                    .and_then(|tuple| event_loop.call_method1(py, "call_soon_threadsafe", (resolve, tuple)));
                if let Err(e) = delivered {
                    // The loop is closed: nobody is waiting for the answer.
                    e.print(py);
                }
            });
        }));
    }

    /// The target's name.
    #[getter]
    fn target(&self) -> &str {
        &self.target
    }

    /// The breaker's state (`closed`, `half_open`, `open`), or None without one.
    fn breaker_state(&self) -> Option<&'static str> {
        self.pipeline.breaker().map(|b| b.state().as_str())
    }

    /// The recent policy events (attempts, retries with their delay and reason,
    /// refusals, breaker transitions; the last 1024), as JSON: the same events `keel
    /// serve` journals.
    fn events_json(&self) -> PyResult<String> {
        let events = self.events.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::to_string(&*events).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// The policy time passed since the step was made, in seconds (virtual with
    /// `virtual_time`).
    fn elapsed(&self) -> f64 {
        let _in = self.runtime.enter();
        self.started.elapsed().as_secs_f64()
    }
}

impl Step {
    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }

    /// The call's signature for the loop guard, when the step has one.
    fn signature(&self, canonical: Option<&str>) -> Option<keel_core::CallSignature> {
        match (self.guarded, canonical) {
            (true, Some(c)) => Some(keel_core::CallSignature::new(&self.target, &serde_json::Value::from(c))),
            _ => None,
        }
    }

    /// `call` inside the step's `execute_tool` span, when the step is traced.
    async fn under_span<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, keel_core::CallError<Failure>>>,
    ) -> Result<T, keel_core::CallError<Failure>> {
        if !self.traced {
            return call.await;
        }
        let span = telemetry::step_span(&self.target);
        let outcome = tracing::Instrument::instrument(call, span.clone()).await;
        telemetry::end_span(&span, &outcome);
        outcome
    }
}

/// The loop guard of keel-core, for the steps of one agent session: a call repeated
/// too often with the same arguments, too many calls in a turn, too many turns, are
/// refused as `loop_detected` before they run.
#[pyclass(module = "keel._keel", frozen)]
struct LoopGuard(Arc<keel_core::LoopGuard>);

#[pymethods]
impl LoopGuard {
    /// A guard with keel-core's `loop_guard` values (JSON; checked).
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config: keel_core::LoopGuardConfig = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("loop_guard: {e}")))?;
        config.validate().map_err(|e| policy_error_under("loop_guard", e))?;
        Ok(LoopGuard(Arc::new(keel_core::LoopGuard::new(config, Arc::new(ToCall)))))
    }

    /// Starts the agent's next turn: None, or the refusal's message when the run
    /// would pass its turn cap.
    fn begin_turn(&self) -> Option<String> {
        self.0.begin_turn().err().map(|e| e.to_string())
    }
}

/// Self-correction for one decorated function: the confidence gate that learns, per
/// error kind, whether corrections pay off (shared by its calls), and the events.
#[pyclass(module = "keel._keel", frozen)]
struct Corrector {
    name: Arc<str>,
    max_rounds: u32,
    token_budget: Option<u64>,
    gate: Arc<keel_core::ConfidenceGate>,
    events: Arc<Recent>,
}

/// One call's correction rounds and token budget (keel-core's `Rounds` and `Budget`).
#[pyclass(module = "keel._keel")]
struct Rounds {
    rounds: keel_core::Rounds,
    budget: keel_core::Budget,
    events: Arc<Recent>,
}

#[pymethods]
impl Corrector {
    /// Corrections of `name`: at most `max_rounds` per call, `token_budget` tokens per
    /// call for the corrections (None: unbounded).
    #[new]
    #[pyo3(signature = (name, max_rounds, token_budget = None))]
    fn new(name: &str, max_rounds: u32, token_budget: Option<u64>) -> Self {
        Corrector {
            name: Arc::from(name),
            max_rounds,
            token_budget,
            gate: Arc::new(keel_core::ConfidenceGate::new(keel_core::GateConfig::default())),
            events: Arc::new(Recent::default()),
        }
    }

    /// A call's rounds and budget.
    fn begin(&self) -> Rounds {
        let config =
            keel_core::BudgetConfig { tokens: self.token_budget, ..keel_core::BudgetConfig::default() };
        Rounds {
            rounds: keel_core::Rounds::new(self.name.clone(), self.max_rounds),
            budget: keel_core::Budget::new(format!("correct:{}", self.name), &config, self.events.clone()),
            events: self.events.clone(),
        }
    }

    /// Whether the gate lets a correction of an error of `kind` go ahead, and its score:
    /// refused once corrections of this kind kept failing.
    fn allowed(&self, kind: &str) -> (bool, f64) {
        let v = self.gate.check(&self.gate_target(kind), ErrorClass::CodeError, 2);
        (v.allowed, v.score)
    }

    /// Records whether a correction of an error of `kind` worked.
    fn record(&self, kind: &str, succeeded: bool) {
        self.gate.record(&Arc::from(self.gate_target(kind)), ErrorClass::CodeError, 2, succeeded);
    }

    /// The recent events (correction rounds, budget refusals), as JSON.
    fn events_json(&self) -> PyResult<String> {
        let events = self.events.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::to_string(&*events).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
}

impl Corrector {
    fn gate_target(&self, kind: &str) -> String {
        format!("correct:{}:{kind}", self.name)
    }
}

#[pymethods]
impl Rounds {
    /// Whether a failure of `class` may get a correction: its disposition is to
    /// correct (`code_error`, `invalid_tool_call`, ...) and a round is left.
    fn due(&self, class: &str) -> bool {
        ErrorClass::from_str(class).is_ok_and(|c| self.rounds.due(c))
    }

    /// Counts a round taken for `class` (an event).
    fn take(&mut self, class: &str) {
        if let Ok(c) = ErrorClass::from_str(class) {
            self.rounds.take(c, &*self.events);
        }
    }

    /// Charges `tokens` a correction spent; False (nothing charged) past the budget.
    fn charge(&self, tokens: u64) -> bool {
        self.budget.charge(keel_core::BudgetKind::Tokens, tokens).is_ok()
    }

    /// Tokens left, or None without a budget.
    fn remaining(&self) -> Option<u64> {
        self.budget.remaining(keel_core::BudgetKind::Tokens)
    }

    /// Rounds taken so far.
    #[getter]
    fn used(&self) -> u32 {
        self.rounds.used()
    }
}

/// Keel's journal (the embedded SQLite file, or PostgreSQL by URL): the idempotency
/// store a journaled step claims its key in, the same store `keel serve` uses.
#[pyclass(module = "keel._keel", frozen)]
struct Journal {
    journal: Arc<dyn keel_journal::Journal>,
    runtime: OwnRuntime,
}

fn journal_error(e: keel_journal::Error) -> PyErr {
    PyRuntimeError::new_err(format!("the journal: {e}"))
}

/// A claim's answer for Python: `("won", token)`, `("done", result_json)` or
/// `("in_progress", expires_at_ms)`.
fn claim_tuple(claim: keel_journal::Claim) -> (&'static str, String) {
    match claim {
        keel_journal::Claim::Won(t) => ("won", t.token),
        keel_journal::Claim::Done(v) => ("done", v.to_string()),
        keel_journal::Claim::InProgress { expires_at_ms } => ("in_progress", expires_at_ms.to_string()),
    }
}

#[pymethods]
impl Journal {
    /// Opens the journal at `url` (`sqlite:PATH`, a plain path, or `postgres://...`);
    /// a claim not completed within `claim_ttl` seconds may be taken over (its holder
    /// is presumed dead).
    #[new]
    #[pyo3(signature = (url, claim_ttl = 300.0))]
    fn new(py: Python<'_>, url: &str, claim_ttl: f64) -> PyResult<Self> {
        if !(claim_ttl.is_finite() && (1.0..=86_400.0).contains(&claim_ttl)) {
            return Err(PyValueError::new_err(format!(
                "claim_ttl: {claim_ttl} is not between 1 and 86400 seconds"
            )));
        }
        let runtime = OwnRuntime::new("keel-journal")?;
        let options = keel_journal::JournalOptions {
            claim_ttl: Duration::from_secs_f64(claim_ttl),
            ..keel_journal::JournalOptions::default()
        };
        let url = url.to_owned();
        let journal = py
            .allow_threads(|| runtime.block_on(keel_journal::open(&url, options)))
            .map_err(journal_error)?;
        Ok(Journal { journal, runtime })
    }

    /// Claims `key` (see [`claim_tuple`]).
    fn claim(&self, py: Python<'_>, key: &str) -> PyResult<(&'static str, String)> {
        py.allow_threads(|| self.runtime.block_on(self.journal.claim(key)))
            .map(claim_tuple)
            .map_err(journal_error)
    }

    /// Takes over `key` from a holder whose claim expired.
    fn take_over(&self, py: Python<'_>, key: &str) -> PyResult<(&'static str, String)> {
        py.allow_threads(|| self.runtime.block_on(self.journal.take_over_claim(key)))
            .map(claim_tuple)
            .map_err(journal_error)
    }

    /// Stores `result_json` under the key `token` holds: later claims get it.
    fn complete(&self, py: Python<'_>, key: &str, token: &str, result_json: &str) -> PyResult<()> {
        let result: serde_json::Value = serde_json::from_str(result_json)
            .map_err(|e| PyValueError::new_err(format!("the result: {e}")))?;
        let token = keel_journal::ClaimToken { key: key.to_owned(), token: token.to_owned() };
        py.allow_threads(|| self.runtime.block_on(self.journal.complete(&token, &result)))
            .map_err(journal_error)
    }

    /// The approval the call under `key` of `tool` needs (its arguments `args_json`, as
    /// the person is shown them): asked on first use — a run of its own, waiting, that
    /// `keel approvals`, the API and the inbox list and decide — then read back.
    /// `(status, approval_id, decided_by)`: `pending`, `approved`, `denied` or
    /// `expired` (a pending one past its expiry is marked so).
    #[pyo3(signature = (key, tool, args_json, expires_after))]
    fn approval(
        &self,
        py: Python<'_>,
        key: &str,
        tool: &str,
        args_json: &str,
        expires_after: f64,
    ) -> PyResult<(String, String, Option<String>)> {
        use keel_journal::{ApprovalDecision, JournalEvent, NewEvent, RunState};
        if !(expires_after.is_finite() && expires_after > 0.0 && expires_after <= 366.0 * 86_400.0) {
            return Err(PyValueError::new_err(format!("approval expiry: {expires_after} s is out of range")));
        }
        let args: serde_json::Value = serde_json::from_str(args_json)
            .map_err(|e| PyValueError::new_err(format!("the arguments: {e}")))?;
        let name = sha256_hex(key);
        let (run_id, approval_id) = (approval_run(key), format!("apr-py-{}", &name[..20]));
        let digest = sha256_hex(&keel_core::canonical_json(&args));
        let now_ms = keel_core::Clock::wall(&keel_core::TokioClock::new())
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let journal = &self.journal;
        py.allow_threads(|| {
            self.runtime.block_on(async {
                if let Some((a, _, _)) = journal.approval(&approval_id).await? {
                    if a.status == "pending" && a.expires_at_ms <= now_ms {
                        let expired = JournalEvent::ApprovalDecided {
                            approval_id: approval_id.clone(),
                            decision: ApprovalDecision::Expired,
                            by: "keel".into(),
                        };
                        journal.append(&[NewEvent::new(&run_id, expired)]).await?;
                        return Ok(("expired".to_owned(), approval_id, Some("keel".to_owned())));
                    }
                    return Ok((a.status, approval_id, a.decided_by));
                }
                let expires_at_ms = now_ms.saturating_add((expires_after * 1000.0) as i64);
                // No name: a run no worker claims (nothing in it to drive).
                let events = [
                    JournalEvent::RunCreated {
                        name: String::new(),
                        input: serde_json::json!({"python_step": tool, "key": key}),
                    },
                    JournalEvent::RunStateChanged {
                        state: RunState::WaitingApproval,
                        reason: Some(format!("`{tool}` needs a person's approval")),
                    },
                    JournalEvent::ApprovalRequested {
                        approval_id: approval_id.clone(),
                        step: 0,
                        tool: tool.to_owned(),
                        args_digest: digest,
                        expires_at_ms,
                        args,
                    },
                ];
                journal.create_run(&run_id, &events).await?;
                Ok(("pending".to_owned(), approval_id, None))
            })
        })
        .map_err(journal_error)
    }

    /// Journals a call of `tool` under `key` as a one-step run (`keel runs list` and
    /// `show` see it): the arguments, the call's policy events (`events_json`, every
    /// attempt and retry), a self-correcting call's programs (`programs_json`: each
    /// `{program, result}` or `{program, error_class, message}`), and how it ended —
    /// `output_json`, or `error_class` and `message`.
    #[pyo3(signature = (key, tool, args_json, events_json, output_json = None, error_class = None, message = None, programs_json = None))]
    #[allow(clippy::too_many_arguments)]
    fn record_call(
        &self,
        py: Python<'_>,
        key: &str,
        tool: &str,
        args_json: &str,
        events_json: &str,
        output_json: Option<&str>,
        error_class: Option<&str>,
        message: Option<&str>,
        programs_json: Option<&str>,
    ) -> PyResult<()> {
        use keel_journal::{JournalEvent, ProgramOutcome, RunState, StepOutcome};
        let bad = |what: &str, e: serde_json::Error| PyValueError::new_err(format!("{what}: {e}"));
        let args: serde_json::Value = serde_json::from_str(args_json).map_err(|e| bad("the arguments", e))?;
        let policy: Vec<Event> = serde_json::from_str(events_json).map_err(|e| bad("the events", e))?;
        let outcome = match output_json {
            Some(o) => StepOutcome::Succeeded {
                output: serde_json::from_str(o).map_err(|e| bad("the output", e))?,
                shape: None,
            },
            None => StepOutcome::Failed {
                class: error_class
                    .and_then(|c| ErrorClass::from_str(c).ok())
                    .unwrap_or(ErrorClass::ServerError),
                message: message.unwrap_or_default().to_owned(),
            },
        };
        let done = matches!(outcome, StepOutcome::Succeeded { .. });
        let mut events = vec![
            JournalEvent::RunStateChanged { state: RunState::Running, reason: None },
            JournalEvent::StepStarted {
                step: 0,
                name: tool.to_owned(),
                target: tool.to_owned(),
                input: args.clone(),
            },
        ];
        // A self-correcting call's programs, each with how it ended.
        let programs: Vec<serde_json::Value> = match programs_json {
            Some(p) => serde_json::from_str(p).map_err(|e| bad("the programs", e))?,
            None => Vec::new(),
        };
        for (i, p) in programs.iter().enumerate() {
            let outcome = match p.get("error_class").and_then(serde_json::Value::as_str) {
                None => ProgramOutcome::Succeeded { result: p.get("result").cloned().unwrap_or_default() },
                Some(c) => ProgramOutcome::Failed {
                    class: ErrorClass::from_str(c).unwrap_or(ErrorClass::CodeError),
                    message: p
                        .get("message")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                },
            };
            events.push(JournalEvent::ProgramRecorded {
                step: 0,
                attempt: u32::try_from(i + 1).unwrap_or(u32::MAX),
                program: p.get("program").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned(),
                outcome,
            });
        }
        events.extend(policy.into_iter().map(|event| JournalEvent::Policy { step: Some(0), event }));
        events.push(JournalEvent::StepFinished { step: 0, outcome });
        events.push(JournalEvent::RunStateChanged {
            state: if done { RunState::Completed } else { RunState::Failed },
            reason: None,
        });
        let run_id = approval_run(key);
        let created = JournalEvent::RunCreated {
            name: String::new(),
            input: serde_json::json!({"python_step": tool, "key": key, "args": args}),
        };
        let journal = &self.journal;
        py.allow_threads(|| {
            self.runtime.block_on(async { create_or_append(&**journal, &run_id, created, events).await })
        })
        .map_err(journal_error)
    }

    /// The latest ticket of the call under `key`, if one was opened: `(status,
    /// ticket_id, resolution_json, resolved_by)`; the resolution is a person's guidance
    /// (`{"action": "retry" | "skip" | "abort"}`).
    fn ticket(&self, py: Python<'_>, key: &str) -> PyResult<Option<TicketState>> {
        let run_id = approval_run(key);
        let snap = py
            .allow_threads(|| self.runtime.block_on(self.journal.snapshot(&run_id)))
            .map_err(journal_error)?;
        Ok(snap
            .and_then(|s| s.tickets.into_iter().last())
            .map(|t| (t.status, t.ticket_id, t.resolution.map(|r| r.to_string()), t.resolved_by)))
    }

    /// Hands the failed call under `key` to a person: a ticket in its run (`keel
    /// tickets`, the API and the inbox list and resolve it), with `context_json` as its
    /// context package. The ticket's id.
    fn open_ticket(
        &self,
        py: Python<'_>,
        key: &str,
        tool: &str,
        error_class: &str,
        summary: &str,
        context_json: &str,
    ) -> PyResult<String> {
        use keel_journal::{JournalEvent, RunState};
        let class = ErrorClass::from_str(error_class).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let context: serde_json::Value = serde_json::from_str(context_json)
            .map_err(|e| PyValueError::new_err(format!("the context: {e}")))?;
        let run_id = approval_run(key);
        let journal = &self.journal;
        py.allow_threads(|| {
            self.runtime.block_on(async {
                let opened = journal.snapshot(&run_id).await?.map_or(0, |s| s.tickets.len());
                let ticket_id = format!("tkt-py-{}-{}", &sha256_hex(key)[..16], opened + 1);
                let events = [
                    JournalEvent::RunStateChanged {
                        state: RunState::Escalated,
                        reason: Some(format!("`{tool}` failed with {class}: a person is asked")),
                    },
                    JournalEvent::TicketOpened {
                        ticket_id: ticket_id.clone(),
                        step: Some(0),
                        class,
                        summary: summary.to_owned(),
                        context,
                    },
                ];
                let created = JournalEvent::RunCreated {
                    name: String::new(),
                    input: serde_json::json!({"python_step": tool, "key": key}),
                };
                create_or_append(&**journal, &run_id, created, events.into()).await?;
                Ok(ticket_id)
            })
        })
        .map_err(journal_error)
    }

    /// Gives the key back (the call failed before acting for good): a later call acts.
    fn release(&self, py: Python<'_>, key: &str, token: &str) -> PyResult<()> {
        let token = keel_journal::ClaimToken { key: key.to_owned(), token: token.to_owned() };
        py.allow_threads(|| self.runtime.block_on(self.journal.release_claim(&token))).map_err(journal_error)
    }
}

/// `[alerts]` of a keel.toml, running: the alert router `keel serve` runs (rules by
/// class, target and rate, incidents, PagerDuty/Slack/webhook sinks with retries),
/// fed by steps' and self-corrections' failures. Recording never waits for a sink.
#[pyclass(module = "keel._keel")]
struct Alerts {
    router: Arc<keel_telemetry::alert::AlertRouter>,
    tasks: Option<keel_telemetry::alert::AlertTasks>,
    runtime: OwnRuntime,
}

#[pymethods]
impl Alerts {
    /// Starts the router of keel.toml's `text` (its `[alerts]`; secrets from the
    /// environment, as `keel serve` reads them).
    #[staticmethod]
    fn from_toml(text: &str) -> PyResult<Alerts> {
        let doc: toml::Table = text.parse().map_err(|e| PyValueError::new_err(format!("keel.toml: {e}")))?;
        let table = doc.get("alerts").cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
        let config: keel_telemetry::alert::AlertsConfig =
            table.try_into().map_err(|e: toml::de::Error| PyValueError::new_err(format!("alerts: {e}")))?;
        let alerts = config.resolve(&|k| std::env::var(k).ok()).map_err(|e| policy_error(&e))?;
        if !alerts.is_enabled() {
            return Err(PyValueError::new_err("alerts: no sink is configured"));
        }
        let runtime = OwnRuntime::new("keel-alerts")?;
        let clock: Arc<dyn keel_core::Clock> = Arc::new(keel_core::TokioClock::new());
        let (router, tasks) = {
            let _in = runtime.enter();
            keel_telemetry::alert::spawn(alerts, clock)
        };
        Ok(Alerts { router, tasks: Some(tasks), runtime })
    }

    /// Feeds policy events (JSON, as steps report them) to the rules.
    fn record_json(&self, events_json: &str) -> PyResult<()> {
        let events: Vec<Event> =
            serde_json::from_str(events_json).map_err(|e| PyValueError::new_err(format!("events: {e}")))?;
        let _in = self.runtime.enter();
        for e in &events {
            self.router.record(e);
        }
        Ok(())
    }

    /// A failure of `error_class` on `target` that no policy event says (a
    /// self-correction that stopped).
    fn failure(&self, target: &str, error_class: &str) -> PyResult<()> {
        let class = ErrorClass::from_str(error_class).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let _in = self.runtime.enter();
        self.router.record(&Event::AttemptEnded {
            target: Arc::from(target),
            attempt: 1,
            outcome: keel_core::AttemptOutcome::Failed(class),
            latency: Duration::ZERO,
        });
        Ok(())
    }

    /// Incidents open now (after the router has seen everything recorded so far).
    fn open_incidents(&self, py: Python<'_>) -> Option<usize> {
        py.allow_threads(|| self.runtime.block_on(self.router.check()))
    }

    /// Stops the router, delivering what is queued within `grace` seconds.
    #[pyo3(signature = (grace = 5.0))]
    fn close(&mut self, py: Python<'_>, grace: f64) {
        if let Some(tasks) = self.tasks.take() {
            let grace = Duration::from_secs_f64(grace.clamp(0.0, 300.0));
            py.allow_threads(|| self.runtime.block_on(tasks.shutdown(grace)));
        }
    }
}

/// Writes `events` into the call's run: created with `created` first when it is new,
/// appended when it exists (its approval or an earlier ticket was asked in it).
async fn create_or_append(
    journal: &dyn keel_journal::Journal,
    run_id: &str,
    created: keel_journal::JournalEvent,
    events: Vec<keel_journal::JournalEvent>,
) -> keel_journal::Result<()> {
    let mut all = vec![created];
    all.extend(events.iter().cloned());
    if !journal.create_run(run_id, &all).await? {
        let more: Vec<keel_journal::NewEvent> =
            events.into_iter().map(|e| keel_journal::NewEvent::new(run_id, e)).collect();
        journal.append(&more).await?;
    }
    Ok(())
}

/// A ticket as Python reads it: status, id, resolution (JSON), who resolved it.
type TicketState = (String, String, Option<String>, Option<String>);

/// The SHA-256 of `s`, in hex.
fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The run that holds the approval of the call under `key`.
fn approval_run(key: &str) -> String {
    format!("py-{}", &sha256_hex(key)[..24])
}

/// Merges `over` into `base`, tables recursively, other values replaced: how
/// keel.toml's `[tools.NAME].policy` overrides `[defaults]` (keel-runtime's
/// `config::merge` is the reference; this crate does not link the runtime).
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The policy of `tool` in keel.toml's `text` (`[defaults]` with the tool's `policy`
/// over it; without a tool, `[defaults]`), checked, as JSON.
#[pyfunction]
#[pyo3(signature = (text, tool = None))]
fn policy_from_toml(text: &str, tool: Option<&str>) -> PyResult<String> {
    let doc: toml::Table = text.parse().map_err(|e| PyValueError::new_err(format!("keel.toml: {e}")))?;
    let mut merged = match doc.get("defaults") {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    if let Some(name) = tool {
        let t = doc
            .get("tools")
            .and_then(|t| t.get(name))
            .ok_or_else(|| PyValueError::new_err(format!("keel.toml has no tool `{name}`")))?;
        if let Some(toml::Value::Table(own)) = t.get("policy") {
            merge(&mut merged, own);
        }
    }
    let policy: PolicyConfig = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| PyValueError::new_err(format!("policy: {e}")))?;
    policy.validate().map_err(|e| policy_error(&e))?;
    serde_json::to_string(&policy).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Checks a policy (JSON): every value in its documented range, named by key.
#[pyfunction]
fn check_policy(policy_json: &str) -> PyResult<()> {
    let policy: PolicyConfig =
        serde_json::from_str(policy_json).map_err(|e| PyValueError::new_err(format!("policy: {e}")))?;
    policy.validate().map_err(|e| policy_error(&e))
}

/// The class of an HTTP status as keel-core reads a response's (429 `rate_limited`,
/// 5xx `server_error`, 401 `unauthorized`...), and the `Retry-After` it carries, in
/// seconds (a number of seconds or an HTTP date); None for a success.
#[pyfunction]
#[pyo3(signature = (status, retry_after = None))]
fn classify_http(status: u16, retry_after: Option<&str>) -> Option<(&'static str, Option<f64>)> {
    let status = http::StatusCode::from_u16(status).ok()?;
    let mut headers = http::HeaderMap::new();
    if let Some(v) = retry_after.and_then(|v| http::HeaderValue::from_str(v).ok()) {
        headers.insert(http::header::RETRY_AFTER, v);
    }
    let now = keel_core::Clock::wall(&keel_core::TokioClock::new());
    let failure = keel_core::classify::http_response(status, &headers, b"", now)?;
    Some((failure.class.as_str(), failure.retry_after.map(|d| d.as_secs_f64())))
}

/// A program with its comments and whitespace taken out (keel-core's, as agent runs
/// compare programs): two that differ only there are the same program.
#[pyfunction]
fn normalize_program(program: &str) -> String {
    keel_core::correct::normalize_program(program)
}

/// The policy keel-core uses when none is written, as JSON.
#[pyfunction]
fn default_policy() -> PyResult<String> {
    serde_json::to_string(&PolicyConfig::default()).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Every error class's name and default disposition (`retry`, `correct`, ...).
#[pyfunction]
fn classes() -> Vec<(&'static str, &'static str)> {
    ErrorClass::ALL.iter().map(|c| (c.as_str(), c.default_disposition().as_str())).collect()
}

/// The `keel._keel` module.
#[pymodule]
fn _keel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Step>()?;
    m.add_class::<Corrector>()?;
    m.add_class::<Rounds>()?;
    m.add_class::<Journal>()?;
    m.add_class::<Alerts>()?;
    m.add_class::<LoopGuard>()?;
    m.add_class::<telemetry::Telemetry>()?;
    m.add_function(wrap_pyfunction!(policy_from_toml, m)?)?;
    m.add_function(wrap_pyfunction!(default_policy, m)?)?;
    m.add_function(wrap_pyfunction!(check_policy, m)?)?;
    m.add_function(wrap_pyfunction!(classify_http, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_program, m)?)?;
    m.add_function(wrap_pyfunction!(classes, m)?)?;
    Ok(())
}
