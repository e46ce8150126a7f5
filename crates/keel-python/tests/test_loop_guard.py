"""`keel.LoopGuard`: keel-core's loop guard over Python steps — a call repeated with the
same arguments, too many calls in a turn, too many turns, refused before they run."""

import asyncio

import pytest

import keel


def test_the_third_identical_call_is_refused_before_it_runs_and_others_go_on():
    guard = keel.LoopGuard(max_repeats=3, window=10)
    ran = []

    @keel.step("lookup", loop_guard=guard)
    def lookup(sku, *, warehouse="eu"):
        ran.append((sku, warehouse))
        return sku

    lookup("A1", warehouse="eu")
    lookup("A1", warehouse="eu")
    with pytest.raises(keel.LoopDetected) as refused:
        lookup("A1", warehouse="eu")  # the third of one call within the window
    assert refused.value.error_class == "loop_detected"
    assert refused.value.attempts == 0
    assert "3 times within the last 10 calls" in refused.value.message
    assert isinstance(refused.value, keel.StepFailed)
    assert ran == [("A1", "eu"), ("A1", "eu")], "the refused call never ran"
    assert lookup("B2") == "B2", "another call is not a repeat"


def test_one_guard_sees_every_step_of_a_session_and_counts_calls_per_turn():
    guard = keel.LoopGuard(max_repeats=0, max_calls_per_turn=3, max_turns_per_run=2)

    @keel.step("search", loop_guard=guard)
    def search(q):
        return q

    @keel.step("fetch", loop_guard=guard)
    def fetch(url):
        return url

    guard.begin_turn()
    search("a")
    fetch("b")
    search("c")
    with pytest.raises(keel.LoopDetected, match="more than 3 calls in one turn"):
        fetch("d")
    guard.begin_turn()  # the second turn: calls count from zero
    fetch("d")
    with pytest.raises(keel.LoopDetected, match="more than 2 turns in one run"):
        guard.begin_turn()


def test_an_async_step_is_guarded_too():
    guard = keel.LoopGuard(max_repeats=2, window=5)
    calls = []

    @keel.step("notify", loop_guard=guard)
    async def notify(user):
        calls.append(user)
        return "sent"

    async def main():
        assert await notify("ann") == "sent"
        with pytest.raises(keel.LoopDetected):
            await notify("ann")

    asyncio.run(main())
    assert calls == ["ann"]


def test_a_refusal_is_journaled_with_the_call(tmp_path):
    journal = keel.Journal(str(tmp_path / "keel.db"))
    guard = keel.LoopGuard(max_repeats=2, window=5)
    keys = iter(["k1", "k2"])

    @keel.step("charge", loop_guard=guard, journal=journal, key=lambda order: next(keys))
    def charge(order):
        return {"charged": order}

    assert charge("o-1") == {"charged": "o-1"}
    with pytest.raises(keel.LoopDetected):
        charge("o-1")  # another key, the same call: the guard, not the journal, stops it


def test_absurd_values_are_refused_by_key():
    with pytest.raises(ValueError, match="loop_guard.max_repeats"):
        keel.LoopGuard(max_repeats=1)
    with pytest.raises(ValueError, match="loop_guard.max_calls_per_turn"):
        keel.LoopGuard(max_calls_per_turn=0)
    with pytest.raises(ValueError, match="loop_guard.window"):
        keel.LoopGuard(window=10**6)
    with pytest.raises(ValueError):
        keel.LoopGuard(max_repeats=-1)
