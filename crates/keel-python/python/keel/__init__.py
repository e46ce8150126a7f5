"""Keel for Python: keel-core's failure handling in-process.

    import keel

    @keel.step(target="payments", policy=keel.Policy(max_attempts=4, base_delay="100ms"))
    def charge(order, amount):
        return payments.post("/charge", json={"order": order, "amount": amount})

Sync and async functions alike (an async step's attempts run on your event loop,
which it never blocks; an attempt timeout cancels the coroutine). Each call runs
under the target's policies — retry with backoff (honouring
`Retry-After`), circuit breaker, attempt budget — decided by keel-core, the engine
`keel serve` runs. An exception is retried only when its class says retrying can help
(`classify`): a `ConnectionError` is, a `TypeError` (a bug) is not. A call that fails
for good raises `StepFailed` with the class and the attempts, the last exception as its
`__cause__`; a call refused by an open breaker raises `CircuitOpen` without calling
the function.

Policies are plain values, written in Python or read from the `keel.toml` a server
uses (`Policy.from_toml("keel.toml", tool="charge")`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar, Union

from . import _keel

__all__ = [
    "CLASSES",
    "Alerts",
    "ApprovalDenied",
    "ApprovalPending",
    "CircuitOpen",
    "Correction",
    "CorrectionContext",
    "CorrectionStopped",
    "Escalated",
    "Journal",
    "LoopDetected",
    "LoopGuard",
    "Policy",
    "StepFailed",
    "Telemetry",
    "classify",
    "current_key",
    "self_correct",
    "step",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Every error class Keel knows, with its default disposition (`retry`, `correct`,
#: `fallback`, `escalate`, `terminal`).
CLASSES: Dict[str, str] = dict(_keel.classes())


class StepFailed(Exception):
    """A step failed for good: its class, the attempts made, what went wrong.

    The last exception the function raised is the `__cause__`.
    """

    def __init__(self, target: str, error_class: str, attempts: int, message: str) -> None:
        super().__init__(f"{target}: {error_class} after {attempts} attempt(s): {message}")
        self.target = target
        self.error_class = error_class
        self.attempts = attempts
        self.message = message


class CircuitOpen(StepFailed):
    """The target's breaker is open: the function was not called."""


class LoopDetected(StepFailed):
    """The loop guard refused the call (the same call repeated too often, too many
    calls in a turn, too many turns): the function was not called."""


class ApprovalPending(Exception):
    """The call waits for a person: decide `approval_id` with `keel approvals approve
    ID` (or reject), the API or the inbox, then make the call again."""

    def __init__(self, target: str, approval_id: str) -> None:
        super().__init__(f"{target} waits for approval {approval_id} (keel approvals approve {approval_id})")
        self.target = target
        self.approval_id = approval_id


class Escalated(StepFailed):
    """The call failed and was handed to a person: `ticket_id` is open in the journal
    (`keel tickets resolve ID --action retry|skip|abort`, the API, the inbox). The call
    made again raises this while it is open, then acts (retry), returns None (skip)
    or raises `StepFailed` (abort)."""

    def __init__(self, target: str, ticket_id: str, message: str) -> None:
        super().__init__(target, "escalated", 0, f"ticket {ticket_id}: {message}")
        self.ticket_id = ticket_id


class ApprovalDenied(StepFailed):
    """A person denied the call (or its approval expired): the function was not called."""


#: Exception types by class, checked in order (subclasses match). Extend it per step
#: with `step(..., classes={MyError: "rate_limited"})`.
DEFAULT_TABLE: Tuple[Tuple[Type[BaseException], str], ...] = (
    (TimeoutError, "timeout"),
    (ConnectionError, "network"),
    (KeyError, "code_error"),
    (IndexError, "code_error"),
    (AttributeError, "code_error"),
    (TypeError, "code_error"),
    (NameError, "code_error"),
    (ZeroDivisionError, "code_error"),
    (ValueError, "invalid_request"),
    (PermissionError, "forbidden"),
    (FileNotFoundError, "not_found"),
)

# Names of well-known client libraries' exceptions (openai, anthropic, httpx, requests),
# matched by name so that none of them is a dependency.
_BY_NAME = {
    "RateLimitError": "rate_limited",
    "APITimeoutError": "timeout",
    "ReadTimeout": "timeout",
    "ConnectTimeout": "timeout",
    "Timeout": "timeout",
    "APIConnectionError": "network",
    "ConnectError": "network",
    "InternalServerError": "server_error",
    "AuthenticationError": "unauthorized",
    "PermissionDeniedError": "forbidden",
    "NotFoundError": "not_found",
    "BadRequestError": "invalid_request",
    "UnprocessableEntityError": "invalid_request",
    "ConflictError": "conflict",
}


def _status_and_headers(exc: BaseException) -> Tuple[Optional[int], Mapping[str, str]]:
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None) or getattr(response, "status", None)
    headers = getattr(exc, "headers", None) or getattr(response, "headers", None) or {}
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    return status, headers


def _retry_after_header(headers: Mapping[str, str]) -> Optional[str]:
    try:
        value = headers.get("retry-after") or headers.get("Retry-After")
    except AttributeError:
        return None
    return None if value is None else str(value)


def classify(
    exc: BaseException, table: Optional[Mapping[Type[BaseException], str]] = None
) -> Tuple[str, Optional[float]]:
    """The error class of `exc`, and its `Retry-After` in seconds if it carries one.

    In order: the caller's `table`, an HTTP status (`status_code` or
    `response.status_code`: 429 `rate_limited`, 5xx `server_error`, 401
    `unauthorized`...), well-known client exceptions by name, `DEFAULT_TABLE`; anything
    else is `code_error`, which is not retried (a bug does not heal by itself).
    """
    for kind, name in (table or {}).items():
        if isinstance(exc, kind):
            return name, None
    status, headers = _status_and_headers(exc)
    header = _retry_after_header(headers)
    if status is not None and 100 <= status <= 999:
        # keel-core's reading of a status and its Retry-After, as for every response.
        by_status = _keel.classify_http(status, header)
        if by_status is not None:
            return by_status
    for kind in type(exc).__mro__:
        if kind.__name__ in _BY_NAME:
            return _BY_NAME[kind.__name__], None
    for kind, name in DEFAULT_TABLE:
        if isinstance(exc, kind):
            return name, None
    return "code_error", None


class Policy:
    """A target's policy: keel-core's `PolicyConfig`, as keel.toml writes it.

    `Policy(max_attempts=4, base_delay="100ms", max_delay="5s", attempt_timeout="2s",
    breaker={"min_calls": 5, "failure_ratio": 0.5}, retry_on=["timeout", "network"])`,
    or any table of keel.toml's `[defaults]` as keyword dicts (`retry={...}`).
    Durations are keel.toml's strings ("250ms", "5s") or seconds as numbers.
    """

    def __init__(
        self,
        *,
        max_attempts: Optional[int] = None,
        base_delay: Union[str, float, None] = None,
        max_delay: Union[str, float, None] = None,
        jitter: Optional[str] = None,
        retry_on: Optional[list] = None,
        attempt_timeout: Union[str, float, None] = None,
        retry: Optional[dict] = None,
        breaker: Optional[dict] = None,
        timeout: Optional[dict] = None,
        **tables: Any,
    ) -> None:
        config: Dict[str, Any] = json.loads(_keel.default_policy())
        for name, table in (("retry", retry), ("breaker", breaker), ("timeout", timeout), *tables.items()):
            if table is not None:
                if not isinstance(table, dict):
                    raise TypeError(f"policy `{name}` must be a dict, not {type(table).__name__}")
                config.setdefault(name, {}).update(_durations(table))
        shorthand = {
            "max_attempts": max_attempts,
            "base_delay": _duration(base_delay),
            "max_delay": _duration(max_delay),
            "jitter": jitter,
            "retry_on": retry_on,
        }
        for key, value in shorthand.items():
            if value is not None:
                config["retry"][key] = value
        if attempt_timeout is not None:
            config.setdefault("timeout", {})["attempt"] = _duration(attempt_timeout)
        self._json = json.dumps(config)
        # Checked now, by key, as keel.toml is: a bad value never waits for a call.
        _keel.check_policy(self._json)

    @classmethod
    def from_toml(cls, path: str, tool: Optional[str] = None) -> "Policy":
        """The policy keel.toml gives `tool` (`[defaults]` under its `policy`)."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        policy = cls.__new__(cls)
        policy._json = _keel.policy_from_toml(text, tool)
        return policy

    def to_dict(self) -> Dict[str, Any]:
        """The policy as keel-core reads it."""
        return json.loads(self._json)

    def __repr__(self) -> str:
        return f"keel.Policy({self._json})"


def _duration(value: Union[str, float, None]) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a duration is a string like '250ms' or seconds, not {value!r}")
    return f"{int(round(value * 1000))}ms"


def _durations(table: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (_duration(v) if k.endswith(("delay", "timeout", "attempt", "step", "open_for")) and isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in table.items()}


class Journal:
    """Keel's journal: the SQLite file `keel serve` and `keel run` use (`sqlite:PATH`, or
    a plain path), or PostgreSQL by URL. A journaled step claims an idempotency key in
    it before acting and stores its result after: a call made again — retried by the
    agent, or by a process resumed after a crash — gets the stored result instead of
    acting twice. A claim whose holder died is taken over after `claim_ttl` seconds;
    the function then runs again with the same `keel.current_key()`, which it passes to
    its service (as `Idempotency-Key`) so that the effect still happens once."""

    def __init__(self, url: str, claim_ttl: float = 300.0) -> None:
        self._journal = _keel.Journal(url, float(claim_ttl))
        self.claim_ttl = float(claim_ttl)


class Alerts:
    """keel.toml's `[alerts]`, running in this process: the rules `keel serve` runs
    (by class, target and rate; one incident per rule and key; PagerDuty, Slack and
    webhook sinks with retries), fed by the steps and self-corrections given
    `alerts=`. Recording never waits for a sink. `close()` delivers what is queued."""

    def __init__(self, handle: Any) -> None:
        self._alerts = handle

    @classmethod
    def from_toml(cls, path: str) -> "Alerts":
        with open(path, encoding="utf-8") as f:
            return cls(_keel.Alerts.from_toml(f.read()))

    def open_incidents(self) -> Optional[int]:
        """Incidents open, once everything recorded so far was counted."""
        return self._alerts.open_incidents()

    def close(self, grace: float = 5.0) -> None:
        self._alerts.close(grace)


_KEY: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("keel_key", default=None)


class LoopGuard:
    """Stops an agent that repeats itself or never ends (keel-core's loop guard, the one
    `keel serve` runs): give one guard to the steps of one agent session
    (`step(loop_guard=guard)`). A call whose target and arguments already appear
    `max_repeats - 1` times among the last `window` calls, or past `max_calls_per_turn`
    in the current turn, raises `LoopDetected` before the function runs;
    `begin_turn()` starts the next turn, and raises past `max_turns_per_run`.

    Only successful checks are counted: a refused call does not push the others out
    of the window."""

    def __init__(self, max_repeats: int = 3, window: int = 10, max_calls_per_turn: Optional[int] = None,
                 max_turns_per_run: Optional[int] = None) -> None:
        config = {"max_repeats": max_repeats, "window": window, "max_calls_per_turn": max_calls_per_turn,
                  "max_turns_per_run": max_turns_per_run}
        self._guard = _keel.LoopGuard(json.dumps(config))

    def begin_turn(self) -> None:
        refused = self._guard.begin_turn()
        if refused is not None:
            raise LoopDetected("run", "loop_detected", 0, refused)


class Telemetry:
    """keel.toml's `[telemetry]`, in this process: traces over OTLP and Sentry events, as
    `keel serve` sends them. A step given `telemetry=` is an `execute_tool {target}` span
    per call (OpenTelemetry GenAI names; `error.type`, `keel.error_class`,
    `keel.attempt` on failure; retries are span events), and its terminal failures,
    refused retries and escalations, and a self-correction's stops, are Sentry events
    tagged `keel.class`, `keel.target`, `keel.attempt`. Nothing is sent from the call's
    path: a collector or Sentry that is down costs dropped batches, never a slower
    call. One telemetry with `[telemetry.otlp]` per process. `close()` sends what is
    queued."""

    def __init__(self, handle: Any) -> None:
        self._telemetry = handle

    @classmethod
    def from_toml(cls, path: str) -> "Telemetry":
        with open(path, encoding="utf-8") as f:
            return cls(_keel.Telemetry.from_toml(f.read()))

    def flush(self) -> None:
        """Exports the finished spans still queued."""
        self._telemetry.flush()

    def close(self, grace: float = 5.0) -> None:
        self._telemetry.close(grace)


def _canonical(args: tuple, kwargs: dict) -> str:
    return json.dumps([list(args), kwargs], sort_keys=True, default=repr, separators=(",", ":"))


def current_key() -> Optional[str]:
    """The idempotency key of the journaled step running now (None outside one): pass
    it to the service the step calls, so that a call taken over after a crash is
    deduplicated there."""
    return _KEY.get()


def _derived_key(target: str, args: tuple, kwargs: dict) -> str:
    canonical = _canonical(args, kwargs)
    digest = hashlib.sha256(f"{target}\n{canonical}".encode()).hexdigest()[:32]
    return f"py/{target}/{digest}"


def _with_key(fn: Callable[..., Any], k: str) -> Callable[..., Any]:
    """`fn`, seeing `k` as `current_key()` while it runs (on whichever thread or task)."""
    if inspect.iscoroutinefunction(fn):

        async def keyed_async(*args: Any, **kwargs: Any) -> Any:
            reset = _KEY.set(k)
            try:
                return await fn(*args, **kwargs)
            finally:
                _KEY.reset(reset)

        return keyed_async

    def keyed(*args: Any, **kwargs: Any) -> Any:
        reset = _KEY.set(k)
        try:
            return fn(*args, **kwargs)
        finally:
            _KEY.reset(reset)

    return keyed


def step(
    target: Optional[str] = None,
    *,
    policy: Optional[Policy] = None,
    classes: Optional[Mapping[Type[BaseException], str]] = None,
    virtual_time: bool = False,
    journal: Optional[Journal] = None,
    key: Optional[Callable[..., str]] = None,
    approval: Optional[Callable[..., bool]] = None,
    approval_expires: float = 3600.0,
    alerts: Optional[Alerts] = None,
    escalate: Union[bool, Tuple[str, ...], list] = False,
    loop_guard: Optional[LoopGuard] = None,
    telemetry: Optional[Telemetry] = None,
) -> Callable[[F], F]:
    """Runs the decorated function under `policy` as the target `target` (default: the
    function's qualified name). `classes` maps exception types to error classes first.
    `virtual_time`: backoffs take no real time (tests); `fn.keel.elapsed()` says how
    much policy time passed.

    With `journal`, the step is idempotent: its key is `key(*args, **kwargs)` (default:
    derived from the target and the arguments), claimed before the function runs; the
    result (JSON) is stored, and a call with the same key returns it without running
    the function. A call that fails gives the key back.

    `approval(*args, **kwargs)` says whether a call needs a person's approval (a
    predicate that raises is taken as yes: a rule that cannot evaluate fails closed).
    Such a call raises `ApprovalPending` with the approval's id until a person approves
    it in the journal (`keel approvals approve ID`, the API, the inbox); then it acts,
    once. A denied or expired one raises `ApprovalDenied`. Needs `journal`.

    `escalate=True` (or a list of classes) hands a call that failed for good to a
    person: a ticket in the journal, `Escalated` raised until it is resolved. Needs
    `journal`.

    `loop_guard`: the session's `LoopGuard` checks each call (target and arguments)
    before it runs. `telemetry`: each call is a span, its failures Sentry events
    (`Telemetry`).

    The decorated function gets `.keel`, the step: `.events()`, `.breaker_state()`.
    """

    if escalate and journal is None:
        raise TypeError("keel.step: a ticket is opened and resolved in the journal: pass journal=keel.Journal(...)")
    if approval is not None and journal is None:
        raise TypeError("keel.step: an approval is asked and decided in the journal: pass journal=keel.Journal(...)")

    def wrap(fn: F) -> F:
        name = target or getattr(fn, "__qualname__", "step")
        inner_step = _Step(name, policy or Policy(), classes, virtual_time, journal, key, loop_guard, telemetry)
        inner_step._approval = approval
        inner_step._approval_expires = float(approval_expires)
        inner_step._alerts = alerts
        inner_step._escalate = escalate if escalate is True or not escalate else tuple(escalate)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def acall(*args: Any, **kwargs: Any) -> Any:
                return await inner_step.acall(fn, args, kwargs)

            acall.keel = inner_step  # type: ignore[attr-defined]
            return acall  # type: ignore[return-value]

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return inner_step(fn, args, kwargs)

        call.keel = inner_step  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap


class _Step:
    def __init__(
        self,
        target: str,
        policy: Policy,
        classes: Optional[Mapping[Type[BaseException], str]],
        virtual_time: bool,
        journal: Optional[Journal] = None,
        key: Optional[Callable[..., str]] = None,
        loop_guard: Optional[LoopGuard] = None,
        telemetry: Optional[Telemetry] = None,
    ) -> None:
        guard = loop_guard._guard if loop_guard is not None else None
        self._step = _keel.Step(target, policy._json, virtual_time, guard, telemetry is not None)
        self._guarded = loop_guard is not None
        self._telemetry = telemetry
        self._journal = journal
        self._key = key
        table = dict(classes or {})
        self._classify = lambda exc: classify(exc, table)
        self.target = target

    def __call__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._journal is None:
            return self._unwrap(self._step.call(fn, args, kwargs or None, self._classify, self._collects(),
                                                self._signature(args, kwargs)))
        k = self._key(*args, **kwargs) if self._key else _derived_key(self.target, args, kwargs)
        guided = self._guidance(k)
        if guided is not None:
            return guided[0]
        self._approved(k, args, kwargs)
        claimed = self._claim(k)
        if claimed[0] == "done":
            return json.loads(claimed[1])
        token = claimed[1]
        try:
            answer = self._step.call(_with_key(fn, k), args, kwargs or None, self._classify, True,
                                     self._signature(args, kwargs))
        except BaseException:
            self._journal._journal.release(k, token)
            raise
        try:
            result = self._record(k, token, answer)
        except StepFailed as failed:
            self._journal_run(k, args, kwargs, answer)
            self._escalate_if_asked(k, failed, args, kwargs)
            raise
        self._journal_run(k, args, kwargs, answer)
        return result

    def _guidance(self, k: str) -> Optional[Tuple[Any]]:
        """What a person said about this call's latest ticket, if it matters now: raises
        while it is open or when they aborted; `(None,)` when they skipped it; None to
        act (no ticket, or "retry")."""
        if not getattr(self, "_escalate", False):
            return None
        t = self._journal._journal.ticket(k)  # type: ignore[union-attr]
        if t is None:
            return None
        status, ticket_id, resolution, by = t
        if status == "open":
            raise Escalated(self.target, ticket_id, "the call waits for a person")
        action = json.loads(resolution or "{}").get("action")
        if action == "skip":
            return (None,)
        if action == "abort":
            raise StepFailed(self.target, "cancelled", 0, f"{by} aborted the call (ticket {ticket_id})")
        return None

    def _escalate_if_asked(self, k: str, failed: "StepFailed", args: tuple, kwargs: dict) -> None:
        escalate = getattr(self, "_escalate", False)
        if not escalate or failed.error_class == "circuit_open":
            return
        if escalate is not True and failed.error_class not in escalate:
            return
        context = {
            "what_failed": self.target,
            "error": {"class": failed.error_class, "message": failed.message},
            "attempts": failed.attempts,
            "arguments": {"args": list(args), "kwargs": kwargs},
            "suggested_actions": ["retry", "skip", "abort"],
        }
        summary = f"{self.target}: {failed.error_class} after {failed.attempts} attempt(s)"
        ticket_id = self._journal._journal.open_ticket(  # type: ignore[union-attr]
            k, self.target, failed.error_class, summary, json.dumps(context, default=repr)
        )
        if self._telemetry is not None:
            self._telemetry._telemetry.escalated(k, ticket_id, failed.error_class)
        raise Escalated(self.target, ticket_id, failed.message) from failed

    def _journal_run(self, k: str, args: tuple, kwargs: dict, answer: tuple) -> None:
        """The call as a one-step run in the journal, its attempts and retries in it
        (`keel runs list`/`show`). A journal that cannot take it loses the record, not
        the call: the result is stored already."""
        journal = self._journal._journal  # type: ignore[union-attr]
        shown = json.dumps({"args": list(args), "kwargs": kwargs}, default=repr)
        try:
            if answer[0]:
                journal.record_call(k, self.target, shown, answer[-1], output_json=json.dumps(answer[1], default=repr))
            else:
                _, error_class, _attempts, message = answer[:4]
                journal.record_call(k, self.target, shown, answer[-1], None, error_class, message)
        except Exception as e:  # noqa: BLE001 - observability, never the call's outcome
            logging.getLogger("keel").warning("the journal did not take the record of %s: %s", k, e)

    def _approved(self, k: str, args: tuple, kwargs: dict) -> bool:
        """Whether the call was approved (False: it needs no approval); raises while it
        waits or when it was denied."""
        rule = getattr(self, "_approval", None)
        if rule is None:
            return False
        try:
            needed = bool(rule(*args, **kwargs))
        except Exception:  # noqa: BLE001 - a rule that cannot evaluate fails closed
            needed = True
        if not needed:
            return False
        shown = json.dumps({"args": list(args), "kwargs": kwargs}, default=repr)
        status, approval_id, by = self._journal._journal.approval(  # type: ignore[union-attr]
            k, self.target, shown, self._approval_expires
        )
        if status == "pending":
            raise ApprovalPending(self.target, approval_id)
        if status != "approved":
            who = f"denied by {by}" if status == "denied" else "expired before it was decided"
            raise ApprovalDenied(self.target, "approval_denied", 0, f"approval {approval_id} {who}")
        return True

    def _claim(self, k: str) -> Tuple[str, str]:
        """Claims `k`: ("won", token) or ("done", result). Waits while another caller
        holds it, up to its claim's expiry, then takes it over."""
        journal = self._journal._journal  # type: ignore[union-attr]
        delay = 0.002
        give_up = time.monotonic() + self._journal.claim_ttl * 2 + 5  # type: ignore[union-attr]
        while True:
            state, value = journal.claim(k)
            if state != "in_progress":
                return state, value
            if time.time() * 1000 >= int(value):
                state, value = journal.take_over(k)
                if state != "in_progress":
                    return state, value
            if time.monotonic() > give_up:
                raise StepFailed(self.target, "conflict", 0, f"the key {k} stays claimed by another caller")
            time.sleep(delay)  # polling the journal, as its claim_or_wait does
            delay = min(delay * 2, 0.1)

    def _record(self, k: str, token: str, answer: tuple) -> Any:
        journal = self._journal._journal  # type: ignore[union-attr]
        if not answer[0]:
            journal.release(k, token)
            return self._unwrap(answer)
        try:
            payload = json.dumps(answer[1])
        except (TypeError, ValueError) as e:
            journal.release(k, token)
            raise TypeError(f"a journaled step's result is stored as JSON: {e}") from e
        journal.complete(k, token, payload)
        return self._unwrap(answer)

    async def acall(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._journal is None:
            return await self._acall(fn, args, kwargs)
        loop = asyncio.get_running_loop()
        k = self._key(*args, **kwargs) if self._key else _derived_key(self.target, args, kwargs)
        guided = await loop.run_in_executor(None, self._guidance, k)
        if guided is not None:
            return guided[0]
        await loop.run_in_executor(None, self._approved, k, args, kwargs)
        claimed = await loop.run_in_executor(None, self._claim, k)
        if claimed[0] == "done":
            return json.loads(claimed[1])
        token = claimed[1]
        try:
            answer = await self._answer(_with_key(fn, k), args, kwargs)
        except BaseException:
            await loop.run_in_executor(None, self._journal._journal.release, k, token)
            raise
        try:
            result = await loop.run_in_executor(None, self._record, k, token, answer)
        except StepFailed as failed:
            await loop.run_in_executor(None, self._journal_run, k, args, kwargs, answer)
            await loop.run_in_executor(None, self._escalate_if_asked, k, failed, args, kwargs)
            raise
        await loop.run_in_executor(None, self._journal_run, k, args, kwargs, answer)
        return result

    async def _acall(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return self._unwrap(await self._answer(fn, args, kwargs))

    async def _answer(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple:
        # The pipeline waits on the step's own thread; each attempt's coroutine runs
        # here, on this loop, which is never blocked.
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def resolve(answer: tuple) -> None:
            if not fut.done():
                fut.set_result(answer)

        self._step.call_async(fn, args, kwargs or None, self._classify, loop, resolve, self._collects(),
                              self._signature(args, kwargs))
        return await fut

    def _signature(self, args: tuple, kwargs: dict) -> Optional[str]:
        """The call's arguments for the loop guard (canonical JSON), when it has one."""
        return _canonical(args, kwargs) if self._guarded else None

    def _collects(self) -> bool:
        """Whether the call's own events are read (by the journal, alerts, Sentry)."""
        return (self._journal is not None or getattr(self, "_alerts", None) is not None
                or self._telemetry is not None)

    def _unwrap(self, answer: tuple) -> Any:
        alerts = getattr(self, "_alerts", None)
        if alerts is not None:
            alerts._alerts.record_json(answer[-1])
        if self._telemetry is not None:
            self._telemetry._telemetry.record_json(answer[-1])
        if answer[0]:
            return answer[1]
        _, error_class, attempts, message, last, _events = answer
        kind = {"circuit_open": CircuitOpen, "loop_detected": LoopDetected}.get(error_class, StepFailed)
        raise kind(self.target, error_class, attempts, message) from last

    def events(self) -> list:
        """The policy events so far, as `keel serve` journals them."""
        return json.loads(self._step.events_json())

    def breaker_state(self) -> Optional[str]:
        """`closed`, `half_open`, `open`; None when the policy has no breaker."""
        return self._step.breaker_state()

    def elapsed(self) -> float:
        """Policy time since the step was made, in seconds (virtual with `virtual_time`)."""
        return self._step.elapsed()


class Correction:
    """What a correction callback returns: the new program, and the tokens it spent
    (the provider's `usage`, e.g. `resp.usage.total_tokens`). A plain string is a
    program whose tokens are estimated — over, never under: bytes / 3 of the context
    and the program."""

    def __init__(self, program: str, tokens: Optional[int] = None) -> None:
        self.program = program
        self.tokens = tokens


class CorrectionContext:
    """What a correction callback is told about the failure it is asked to fix."""

    def __init__(self, error_class: str, error: BaseException, traceback: str, attempt: int,
                 program: str, history: list) -> None:
        #: The failure's class (`code_error`, `invalid_tool_call`, ...).
        self.error_class = error_class
        #: The exception, its type's name and message.
        self.error = error
        self.kind = type(error).__name__
        self.message = str(error)
        #: The formatted traceback.
        self.traceback = traceback
        #: 1 for the first program.
        self.attempt = attempt
        #: The program that failed.
        self.program = program
        #: Earlier (program, class, message) of this call, oldest first.
        self.history = history

    def __repr__(self) -> str:
        return f"CorrectionContext({self.kind}: {self.message!r}, attempt {self.attempt})"


class CorrectionStopped(Exception):
    """Self-correction stopped without a working program: why (`reason`: `not_correctable`,
    `rounds_exhausted`, `low_confidence`, `budget_exceeded`, `repeated_program`), and the
    partial result — every program tried with its failure (`history`), the last program
    and the tokens spent. The last failure is the `__cause__`."""

    def __init__(self, reason: str, context: CorrectionContext, tokens_spent: int) -> None:
        super().__init__(f"self-correction stopped ({reason}) after {context.attempt} attempt(s): "
                         f"{context.kind}: {context.message}")
        self.reason = reason
        self.context = context
        self.history = context.history + [(context.program, context.error_class, context.message)]
        self.last_program = context.program
        self.tokens_spent = tokens_spent


def _normalized(program: str) -> str:
    """The program without comments and whitespace (keel-core's, as agent runs compare
    programs): two that differ only there are the same program."""
    return _keel.normalize_program(program)


def self_correct(
    *,
    correct: Callable[[CorrectionContext], Union[str, Correction]],
    max_attempts: int = 3,
    token_budget: Optional[int] = None,
    classes: Optional[Mapping[Type[BaseException], str]] = None,
    name: Optional[str] = None,
    journal: Optional[Journal] = None,
    alerts: Optional[Alerts] = None,
    telemetry: Optional[Telemetry] = None,
) -> Callable[[F], F]:
    """Runs the decorated `fn(program, *args, **kwargs)`; when it raises an error the
    program can fix (its class's disposition is `correct`: `code_error` and the model
    output classes), `correct(context)` is asked for a replacement, which is run in
    its place — bounded by `max_attempts` programs in all, by `token_budget` tokens of
    corrections per call, and by keel-core's confidence gate, which learns per error
    kind whether corrections pay off and stops asking when they do not. A replacement
    identical to a program already tried is not run. Anything else stops with
    `CorrectionStopped`, which carries the partial result.

    With `journal`, every call is a run in it: each program tried and how it ended,
    the correction rounds, the outcome (`keel runs show`). With `alerts`, every stop is
    a failure of its class on the target for `[alerts]`' rules; with `telemetry`, a
    Sentry event tagged with the class, the reason (`keel.correction.stopped`) and the
    programs tried.
    """
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise ValueError(f"max_attempts: {max_attempts!r} is not a whole number of at least 1")
    if token_budget is not None and (not isinstance(token_budget, int) or token_budget < 0):
        raise ValueError(f"token_budget: {token_budget!r} is not a whole number of tokens")

    def wrap(fn: F) -> F:
        corrector = _keel.Corrector(name or getattr(fn, "__qualname__", "program"), max_attempts - 1, token_budget)
        table = dict(classes or {})

        target = name or getattr(fn, "__qualname__", "program")

        def journal_call(programs: list, outcome: Any, stopped: Optional["CorrectionStopped"]) -> None:
            if journal is None:
                return
            import uuid

            key = f"py-correct/{target}/{uuid.uuid4().hex}"
            events = "[]"  # the programs below are the call's attempts
            try:
                if stopped is None:
                    journal._journal.record_call(key, target, json.dumps({"program": programs[0]["program"]}),
                                                 events, json.dumps(outcome, default=repr), None, None,
                                                 json.dumps(programs, default=repr))
                else:
                    journal._journal.record_call(key, target, json.dumps({"program": programs[0]["program"]}),
                                                 events, None, stopped.context.error_class,
                                                 f"{stopped.reason}: {stopped.context.message}",
                                                 json.dumps(programs, default=repr))
            except Exception as e:  # noqa: BLE001 - observability, never the call's outcome
                logging.getLogger("keel").warning("the journal did not take the record of %s: %s", target, e)

        @functools.wraps(fn)
        def call(program: str, *args: Any, **kwargs: Any) -> Any:
            programs: list = []
            try:
                result = run_correcting(program, programs, *args, **kwargs)
            except CorrectionStopped as stopped:
                journal_call(programs, None, stopped)
                if alerts is not None:
                    # A correction that stopped is a failure a person may need to see.
                    alerts._alerts.failure(target, stopped.context.error_class)
                if telemetry is not None:
                    telemetry._telemetry.correction_stopped(target, stopped.context.error_class, stopped.reason,
                                                            len(programs))
                raise
            journal_call(programs, result, None)
            return result

        def run_correcting(program: str, programs: list, *args: Any, **kwargs: Any) -> Any:
            import traceback as tb

            rounds = corrector.begin()
            tried = {_normalized(program)}
            history: list = []
            spent = 0
            fixing: Optional[str] = None  # the kind the current program was written to fix
            attempt = 1
            while True:
                try:
                    result = fn(program, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - every failure is classified
                    error_class, _ = classify(exc, table)
                    programs.append({"program": program, "error_class": error_class,
                                     "message": f"{type(exc).__name__}: {exc}"})
                    ctx = CorrectionContext(error_class, exc, tb.format_exc(), attempt, program, list(history))
                    if fixing is not None:
                        corrector.record(fixing, False)
                    reason = None
                    if not rounds.due(error_class):
                        reason = "not_correctable" if CLASSES.get(error_class) != "correct" else "rounds_exhausted"
                    elif rounds.remaining() == 0:
                        reason = "budget_exceeded"
                    elif not corrector.allowed(ctx.kind)[0]:
                        reason = "low_confidence"
                    if reason:
                        raise CorrectionStopped(reason, ctx, spent) from exc
                    fix = correct(ctx)
                    fix = fix if isinstance(fix, Correction) else Correction(str(fix))
                    tokens = fix.tokens
                    if tokens is None:
                        tokens = (len(repr(ctx.message)) + len(ctx.traceback) + len(program) + len(fix.program)) // 3 + 1
                    rounds.take(error_class)
                    if not rounds.charge(int(tokens)):
                        # Spent all the same: the budget is used up, and this program is
                        # the last one run.
                        left = rounds.remaining() or 0
                        rounds.charge(left)
                    spent += int(tokens)
                    history.append((program, error_class, ctx.message))
                    if _normalized(fix.program) in tried:
                        corrector.record(ctx.kind, False)
                        stopped = CorrectionContext(error_class, exc, ctx.traceback, attempt, fix.program, history[:-1])
                        raise CorrectionStopped("repeated_program", stopped, spent) from exc
                    tried.add(_normalized(fix.program))
                    program = fix.program
                    fixing = ctx.kind
                    attempt += 1
                    continue
                if fixing is not None:
                    corrector.record(fixing, True)
                programs.append({"program": program, "result": result})
                return result

        call.keel = corrector  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap


from .client import Client  # noqa: E402 - it uses the exceptions above

__all__.append("Client")
