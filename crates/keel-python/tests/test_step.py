"""The `keel` package, through the built wheel: keel-core's decisions on Python calls.

Time is virtual (`virtual_time=True`): backoffs take no real time and
`fn.keel.elapsed()` is the policy time that passed, so no test waits or asserts a
wall-clock duration.
"""

import os
import pathlib

import pytest

import keel

ROOT = pathlib.Path(__file__).resolve().parents[3]


class Flaky:
    """Fails with `errors` in turn, then answers `value`; counts its calls."""

    def __init__(self, errors, value="ok"):
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return (self.value, args, kwargs)


def test_transient_failures_are_retried_with_backoff_on_virtual_time():
    flaky = Flaky([ConnectionError("reset"), TimeoutError("slow")])
    fn = keel.step(
        "payments",
        policy=keel.Policy(max_attempts=3, base_delay="10s", max_delay="60s", jitter="none"),
        virtual_time=True,
    )(flaky)
    assert fn(1, amount=5) == ("ok", (1,), {"amount": 5})
    assert flaky.calls == 3
    retries = [e for e in fn.keel.events() if e["type"] == "retry_scheduled"]
    assert [r["class"] for r in retries] == ["network", "timeout"]
    # 10 s then 20 s of backoff, on the step's virtual clock.
    assert fn.keel.elapsed() >= 30.0


def test_a_bug_is_not_retried_and_is_the_cause_of_the_failure():
    flaky = Flaky([TypeError("unsupported operand")] * 5)
    fn = keel.step("math", policy=keel.Policy(max_attempts=5), virtual_time=True)(flaky)
    with pytest.raises(keel.StepFailed) as failed:
        fn()
    assert flaky.calls == 1, "retrying cannot fix a bug"
    assert failed.value.error_class == "code_error"
    assert failed.value.attempts == 1
    assert isinstance(failed.value.__cause__, TypeError)


def test_retries_are_bounded_and_exhaustion_says_so():
    flaky = Flaky([ConnectionError("down")] * 10)
    fn = keel.step("svc", policy=keel.Policy(max_attempts=3, base_delay="1s"), virtual_time=True)(flaky)
    with pytest.raises(keel.StepFailed) as failed:
        fn()
    assert flaky.calls == 3
    assert failed.value.error_class == "network"
    assert failed.value.attempts == 3
    assert "not retried" in failed.value.message


class HttpError(Exception):
    def __init__(self, status, headers=None):
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = headers or {}


def test_a_429_waits_what_retry_after_says():
    flaky = Flaky([HttpError(429, {"retry-after": "7"})])
    fn = keel.step(
        "api", policy=keel.Policy(max_attempts=2, base_delay="100ms", jitter="none"), virtual_time=True
    )(flaky)
    assert fn()[0] == "ok"
    retry = next(e for e in fn.keel.events() if e["type"] == "retry_scheduled")
    assert retry["class"] == "rate_limited"
    assert retry["reason"] == "retry_after"
    assert fn.keel.elapsed() >= 7.0


def test_classification_by_status_name_and_table():
    assert keel.classify(HttpError(503)) == ("server_error", None)
    assert keel.classify(HttpError(401)) == ("unauthorized", None)
    assert keel.classify(HttpError(429, {"Retry-After": "2"})) == ("rate_limited", 2.0)

    class RateLimitError(Exception):  # as the openai client names it
        pass

    assert keel.classify(RateLimitError())[0] == "rate_limited"

    class Quota(Exception):
        pass

    assert keel.classify(Quota(), {Quota: "budget_exceeded"})[0] == "budget_exceeded"
    assert keel.classify(RuntimeError("?"))[0] == "code_error", "unknown fails closed: not retried"
    assert set(keel.CLASSES) >= {"timeout", "rate_limited", "code_error"}


def test_an_open_breaker_refuses_without_calling():
    flaky = Flaky([ConnectionError("down")] * 100)
    policy = keel.Policy(
        max_attempts=1, breaker={"enabled": True, "min_calls": 2, "failure_ratio": 0.5, "open_for": "30s"}
    )
    fn = keel.step("mail", policy=policy, virtual_time=True)(flaky)
    for _ in range(2):
        with pytest.raises(keel.StepFailed):
            fn()
    assert fn.keel.breaker_state() == "open"
    calls = flaky.calls
    with pytest.raises(keel.CircuitOpen) as refused:
        fn()
    assert flaky.calls == calls, "the function is not called while the breaker is open"
    assert refused.value.error_class == "circuit_open"
    assert refused.value.__cause__ is None


def test_absurd_policies_are_refused_by_key():
    with pytest.raises(ValueError, match="max_attempts"):
        keel.Policy(max_attempts=0)
    with pytest.raises(ValueError, match="failure_ratio"):
        keel.Policy(breaker={"failure_ratio": 1.5})
    with pytest.raises(ValueError):
        keel.Policy(retry={"no_such_key": 1})
    with pytest.raises(TypeError):
        keel.Policy(base_delay=True)


def test_policies_come_from_the_same_keel_toml():
    path = ROOT / "examples" / "payments" / "keel.toml"
    notify = keel.Policy.from_toml(str(path), tool="notify").to_dict()
    assert notify["breaker"]["min_calls"] == 2
    assert notify["retry"]["max_attempts"] == 4, "[defaults] under the tool's own policy"
    assert keel.Policy.from_toml(str(path)).to_dict()["timeout"]["attempt"] == "5s"
    with pytest.raises(ValueError, match="no tool `ghost`"):
        keel.Policy.from_toml(str(path), tool="ghost")


def test_async_steps_retry_without_blocking_the_event_loop():
    import asyncio

    calls = []

    @keel.step("search", policy=keel.Policy(max_attempts=3, base_delay="100ms", jitter="none"))
    async def search(q):
        calls.append(q)
        if len(calls) < 3:
            raise ConnectionError("reset")
        await asyncio.sleep(0)
        return f"results for {q}"

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        answer = await search("keel")
        done.set()
        await t
        return answer, ticks

    answer, ticks = asyncio.run(main())
    assert answer == "results for keel"
    assert calls == ["keel"] * 3
    assert ticks > 5, "the loop ran other tasks through 300 ms of backoff"
    assert [e["class"] for e in search.keel.events() if e["type"] == "retry_scheduled"] == ["network"] * 2


def test_an_async_attempt_timeout_cancels_the_coroutine():
    import asyncio

    cancelled = []
    calls = []

    @keel.step("slow", policy=keel.Policy(max_attempts=2, base_delay="10ms", attempt_timeout="200ms"))
    async def slow():
        calls.append(1)
        if len(calls) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
        return "second attempt"

    assert asyncio.run(slow()) == "second attempt"
    assert cancelled == [True], "the timed-out attempt's coroutine was cancelled, not left running"
    ended = [e for e in slow.keel.events() if e["type"] == "attempt_ended"]
    assert [e["outcome"] for e in ended] == [{"failed": "timeout"}, "ok"]


def test_async_backoffs_run_on_virtual_time_too():
    import asyncio

    calls = []

    @keel.step("v", policy=keel.Policy(max_attempts=3, base_delay="10s", jitter="none"), virtual_time=True)
    async def flaky():
        calls.append(1)
        await asyncio.sleep(0.01)  # real work on the loop, while the step's clock stands still
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert asyncio.run(flaky()) == "ok"
    assert flaky.keel.elapsed() == pytest.approx(20.0, abs=0.5), "two 10 s backoffs, and no attempt timed out"


def test_an_async_step_that_fails_raises_with_the_cause():
    import asyncio

    @keel.step("broken", policy=keel.Policy(max_attempts=3))
    async def broken():
        raise KeyError("missing")

    with pytest.raises(keel.StepFailed) as failed:
        asyncio.run(broken())
    assert failed.value.error_class == "code_error"
    assert failed.value.attempts == 1
    assert isinstance(failed.value.__cause__, KeyError)


def test_the_gil_is_released_while_a_step_backs_off():
    # A real backoff (no virtual time) while another thread runs Python.
    import threading

    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    t = threading.Thread(target=spin)
    t.start()
    flaky = Flaky([ConnectionError("reset")])
    fn = keel.step("svc", policy=keel.Policy(max_attempts=2, base_delay="200ms", jitter="none"))(flaky)
    before = len(ticks)
    fn()
    stop.set()
    t.join()
    assert len(ticks) - before > 5, "another thread ran Python during the 200 ms backoff"


if os.environ.get("KEEL_PY_SHOW"):
    print(keel.__doc__)


def test_many_steps_and_threads_share_one_runtime():
    import threading

    before = len(os.listdir("/proc/self/task"))
    steps = []
    for i in range(50):
        flaky = Flaky([ConnectionError("reset")])
        steps.append(keel.step(f"svc-{i}", policy=keel.Policy(max_attempts=2, base_delay="20ms", jitter="none"))(flaky))
    results = []

    def worker(fns):
        for fn in fns:
            results.append(fn()[0])

    threads = [threading.Thread(target=worker, args=(steps[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == ["ok"] * 50, "every step retried once and answered, from 8 threads at once"
    os_threads = len(os.listdir("/proc/self/task"))
    assert os_threads - before < 10, f"{before} -> {os_threads} OS threads: none per decorated function (50)"
