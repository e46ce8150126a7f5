"""`@keel.self_correct`: a program that failed is sent to a correction callback and
its replacement run, gated by the error's class, the attempts, the token budget and
the confidence gate; a scripted callback stands in for the model."""

import json

import pytest

import keel


def run(program):
    """Runs a program; its `result` is the answer."""
    scope = {}
    exec(program, scope)  # noqa: S102 - the program under test is the point
    return scope["result"]


class Script:
    """A correction callback answering from a list, recording what it was told."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen = []

    def __call__(self, ctx):
        self.seen.append(ctx)
        return self.answers.pop(0)


def test_a_key_error_is_corrected_on_the_second_attempt():
    fix = Script(keel.Correction("data = {'a': 1}\nresult = data['a'] + 1", tokens=40))
    solve = keel.self_correct(correct=fix, max_attempts=3, token_budget=1000)(run)
    assert solve("data = {'a': 1}\nresult = data['b'] + 1") == 2
    (ctx,) = fix.seen
    assert (ctx.error_class, ctx.kind, ctx.attempt) == ("code_error", "KeyError", 1)
    assert "KeyError" in ctx.traceback and "data['b']" in ctx.program
    rounds = [e for e in __import__("json").loads(solve.keel.events_json()) if e["type"] == "correction_round"]
    assert [r["round"] for r in rounds] == [1]


def test_an_identical_replacement_is_not_run():
    calls = []

    def counted(program):
        calls.append(program)
        return run(program)

    # The same program, with a comment and blank lines: not a new program.
    fix = Script("# fixed\nresult = 1 / 0\n\n")
    solve = keel.self_correct(correct=fix, max_attempts=5)(counted)
    with pytest.raises(keel.CorrectionStopped) as stopped:
        solve("result = 1 / 0")
    assert stopped.value.reason == "repeated_program"
    assert len(calls) == 1, "the repeated program was not run"
    assert isinstance(stopped.value.__cause__, ZeroDivisionError)


def test_the_token_budget_stops_early_with_the_partial_result():
    fix = Script(
        keel.Correction("result = undefined_a", tokens=60),
        keel.Correction("result = undefined_b", tokens=60),
        keel.Correction("result = 42", tokens=60),
    )
    solve = keel.self_correct(correct=fix, max_attempts=10, token_budget=100)(run)
    with pytest.raises(keel.CorrectionStopped) as stopped:
        solve("result = undefined_0")
    e = stopped.value
    assert e.reason == "budget_exceeded"
    assert len(fix.seen) == 2, "no correction asked for once the budget was spent"
    assert [p for p, _, _ in e.history] == ["result = undefined_0", "result = undefined_a", "result = undefined_b"]
    assert e.tokens_spent == 120, "the provider's usage, as reported"
    assert e.last_program == "result = undefined_b"


def test_a_failure_retrying_cannot_fix_is_not_sent_for_correction():
    fix = Script("result = 1")

    @keel.self_correct(correct=fix)
    def fetch(program):
        raise ConnectionError("reset by peer")

    with pytest.raises(keel.CorrectionStopped) as stopped:
        fetch("result = 0")
    assert stopped.value.reason == "not_correctable"
    assert fix.seen == []


def test_the_gate_stops_asking_for_corrections_that_never_work():
    asked = []

    def never_fixes(ctx):
        asked.append(ctx)
        return f"result = 1 / 0  # try {len(asked)}"

    solve = keel.self_correct(correct=never_fixes, max_attempts=2)(run)
    reasons = []
    for i in range(4):
        with pytest.raises(keel.CorrectionStopped) as stopped:
            solve(f"x = {i}\nresult = x / 0")
        reasons.append(stopped.value.reason)
    # Two corrections of ZeroDivisionError failed: the gate's score fell under its
    # threshold, and later calls stop at once.
    assert reasons[:2] == ["rounds_exhausted", "rounds_exhausted"]
    assert reasons[2:] == ["low_confidence", "low_confidence"]
    assert len(asked) == 2


def test_absurd_settings_are_refused():
    with pytest.raises(ValueError, match="max_attempts"):
        keel.self_correct(correct=lambda c: "", max_attempts=0)
    with pytest.raises(ValueError, match="token_budget"):
        keel.self_correct(correct=lambda c: "", token_budget=-1)


def test_with_a_journal_every_program_tried_is_in_the_run(tmp_path):
    import os
    import subprocess

    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    fix = Script("data = {'a': 1}\nresult = data['a']")
    solve = keel.self_correct(correct=fix, journal=journal, name="solve")(run)
    assert solve("data = {'a': 1}\nresult = data['zz']") == 1
    config = tmp_path / "keel.toml"
    config.write_text(f'[storage]\nurl = "sqlite://{tmp_path / "keel.db"}"\n')
    binary = os.environ["KEEL_BIN"]
    listed = subprocess.run([binary, "--config", str(config), "--json", "runs", "list"], capture_output=True,
                            text=True, check=True)
    run_id = next(r["run_id"] for r in json.loads(listed.stdout) if r["run_id"].startswith("py-"))
    shown = subprocess.run([binary, "--config", str(config), "--json", "runs", "show", run_id],
                           capture_output=True, text=True, check=True).stdout
    assert shown.count("program_recorded") == 2, shown
    assert "KeyError" in shown and "data['zz']" in shown and '"completed"' in shown
