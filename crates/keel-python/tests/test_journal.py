"""Journaled steps: one key, one effect — across calls, and across a process killed
with SIGKILL at a random moment and run again. Real SQLite files, real processes."""

import asyncio
import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import keel

CHILD = r"""
import json, sqlite3, sys, time
import keel

journal = keel.Journal(sys.argv[1], claim_ttl=1)
ledger, order, window = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

def effect(order):
    # The service: records a charge once per idempotency key (as a payments API does).
    con = sqlite3.connect(ledger, timeout=10)
    con.execute("create table if not exists charges (key text primary key, order_id int)")
    con.execute("create table if not exists tries (order_id int)")
    con.execute("insert into tries values (?)", (order,))
    con.execute("insert or ignore into charges values (?, ?)", (keel.current_key(), order))
    con.commit()
    time.sleep(window)  # the answer is on its way back: a kill here leaves it unrecorded
    return {"charged": order}

charge = keel.step("charge", journal=journal, policy=keel.Policy(max_attempts=1))(effect)
print(json.dumps(charge(order)), flush=True)
"""


def ledger_rows(path, table):
    con = sqlite3.connect(path)
    try:
        return con.execute(f"select order_id from {table}").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_a_call_made_again_returns_the_stored_result_without_acting(tmp_path):
    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    calls = []

    @keel.step("charge", journal=journal)
    def charge(order, amount):
        calls.append(keel.current_key())
        return {"order": order, "amount": amount}

    assert charge(1, 20) == {"order": 1, "amount": 20}
    assert charge(1, 20) == {"order": 1, "amount": 20}, "replayed from the journal"
    assert charge(2, 20)["order"] == 2
    assert len(calls) == 2 and calls[0].startswith("py/charge/") and calls[0] != calls[1]
    assert keel.current_key() is None, "only inside a step"

    # Another process on the same file sees the same key as done.
    again = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    other = keel.step("charge", journal=again)(lambda order, amount: pytest.fail("acted twice"))
    assert other(1, 20) == {"order": 1, "amount": 20}


def test_a_failed_call_gives_its_key_back(tmp_path):
    journal = keel.Journal(str(tmp_path / "keel.db"))
    tries = []

    @keel.step("mail", journal=journal, policy=keel.Policy(max_attempts=1), key=lambda to: f"mail-{to}")
    def send(to):
        tries.append(keel.current_key())
        if len(tries) == 1:
            raise ConnectionError("relay down")
        return "sent"

    with pytest.raises(keel.StepFailed):
        send("a@example.com")
    assert send("a@example.com") == "sent", "the key was released: the retry acts"
    assert tries == ["mail-a@example.com"] * 2


def test_an_async_journaled_step_acts_once(tmp_path):
    journal = keel.Journal(str(tmp_path / "keel.db"))
    keys = []

    @keel.step("fetch", journal=journal)
    async def fetch(q):
        keys.append(keel.current_key())
        await asyncio.sleep(0)
        return [q, len(keys)]

    async def main():
        return [await fetch("x"), await fetch("x")]

    assert asyncio.run(main()) == [["x", 1], ["x", 1]], "the second call is the first's stored result"
    assert len(keys) == 1 and keys[0].startswith("py/fetch/"), "the coroutine saw its key, once"


def test_a_process_killed_at_a_random_moment_never_charges_twice(tmp_path):
    rng = random.Random(int(os.environ.get("KEEL_PY_SEED", "7")))
    db, ledger = str(tmp_path / "keel.db"), str(tmp_path / "ledger.db")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for order in range(1, 4):
        child = subprocess.Popen([sys.executable, str(script), db, ledger, str(order), "0.4"],
                                 stdout=subprocess.PIPE)
        # Not a wait for something: the random moment of the kill is the point.
        time.sleep(rng.uniform(0.0, 0.7))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Run again until it answers: it waits out a dead holder's claim (1 s), then
        # takes the key over and acts under the same key.
        again = subprocess.run([sys.executable, str(script), db, ledger, str(order), "0"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {"charged": order}
        tries = len(ledger_rows(ledger, "tries"))
        # A third run is answered from the journal: the function does not run.
        third = subprocess.run([sys.executable, str(script), db, ledger, str(order), "0"],
                               capture_output=True, text=True, timeout=60)
        assert json.loads(third.stdout) == {"charged": order}
        assert len(ledger_rows(ledger, "tries")) == tries, "replayed, not run"
    charged = sorted(o for (o,) in ledger_rows(ledger, "charges"))
    assert charged == [1, 2, 3], "every order charged exactly once"


def keel_cli(tmp_path, *args):
    """The real `keel` binary on the same journal file (KEEL_BIN, set by scripts/test)."""
    binary = os.environ.get("KEEL_BIN")
    assert binary and os.path.exists(binary), "KEEL_BIN names the keel binary"
    config = tmp_path / "keel.toml"
    config.write_text(f'[storage]\nurl = "sqlite://{tmp_path / "keel.db"}"\n')
    out = subprocess.run([binary, "--config", str(config), *args], capture_output=True, text=True,
                         env={**os.environ, "USER": "ops"}, timeout=60)
    return out


def test_an_approval_is_decided_by_keel_approvals_in_another_process(tmp_path):
    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    acted = []

    @keel.step("charge", journal=journal, approval=lambda order, amount: amount > 100)
    def charge(order, amount):
        acted.append(order)
        return {"charged": order, "amount": amount}

    assert charge(1, 20) == {"charged": 1, "amount": 20}, "under the rule: no approval"
    with pytest.raises(keel.ApprovalPending) as pending:
        charge(2, 500)
    approval_id = pending.value.approval_id
    with pytest.raises(keel.ApprovalPending) as again:
        charge(2, 500)
    assert again.value.approval_id == approval_id, "the same call waits on the same approval"
    assert acted == [1], "nothing acted while it waits"

    listed = keel_cli(tmp_path, "--json", "approvals", "list")
    assert listed.returncode == 0, listed.stderr
    assert approval_id in listed.stdout and "charge" in listed.stdout
    approved = keel_cli(tmp_path, "approvals", "approve", approval_id)
    assert approved.returncode == 0, approved.stderr + approved.stdout

    assert charge(2, 500) == {"charged": 2, "amount": 500}
    assert charge(2, 500) == {"charged": 2, "amount": 500}, "replayed"
    assert acted == [1, 2], "approved, it acted once"

    with pytest.raises(keel.ApprovalPending) as big:
        charge(3, 900)
    rejected = keel_cli(tmp_path, "approvals", "reject", big.value.approval_id)
    assert rejected.returncode == 0, rejected.stderr + rejected.stdout
    with pytest.raises(keel.ApprovalDenied) as denied:
        charge(3, 900)
    assert "denied by ops" in str(denied.value)
    assert acted == [1, 2]


def test_a_rule_that_cannot_evaluate_asks_a_person(tmp_path):
    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")

    @keel.step("charge", journal=journal, approval=lambda order, amount: amount > 100)
    def charge(order, amount):
        return order

    with pytest.raises(keel.ApprovalPending):
        charge(1, "5000")  # a string cannot be compared with 100: fail closed
    with pytest.raises(TypeError, match="journal"):
        keel.step("x", approval=lambda: True)


def test_the_journal_on_postgresql_replays_as_sqlite_does(postgres_url):
    journal = keel.Journal(postgres_url)
    acted = []
    tag = f"{os.getpid()}-{time.time_ns()}"

    @keel.step("pg-charge", journal=journal, key=lambda order: f"{tag}/{order}")
    def charge(order):
        acted.append(order)
        return {"charged": order}

    assert charge(1) == {"charged": 1}
    # Another connection, as another process would have.
    other = keel.step("pg-charge", journal=keel.Journal(postgres_url), key=lambda order: f"{tag}/{order}")(
        lambda order: pytest.fail("acted twice")
    )
    assert other(1) == {"charged": 1}
    assert acted == [1]


def test_journaled_calls_are_runs_that_keel_runs_shows_with_their_retries(tmp_path):
    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    tries = []

    @keel.step("charge", journal=journal, policy=keel.Policy(max_attempts=3, base_delay="1ms"))
    def charge(order):
        tries.append(order)
        if len(tries) == 1:
            raise ConnectionError("reset")
        return {"charged": order}

    assert charge(9) == {"charged": 9}
    listed = keel_cli(tmp_path, "--json", "runs", "list")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    runs = runs.get("runs", runs) if isinstance(runs, dict) else runs
    ids = [r["run_id"] for r in runs if str(r.get("run_id", "")).startswith("py-")]
    assert len(ids) == 1, listed.stdout
    shown = keel_cli(tmp_path, "--json", "runs", "show", ids[0])
    assert shown.returncode == 0, shown.stderr
    assert '"completed"' in shown.stdout
    assert "retry_scheduled" in shown.stdout and "network" in shown.stdout, "the attempts are in the run"


def test_a_failure_handed_to_a_person_is_resolved_with_keel_tickets(tmp_path):
    journal = keel.Journal(f"sqlite:{tmp_path / 'keel.db'}")
    tries = []
    failing = [True]

    class Unauthorized(Exception):
        status_code = 401

    @keel.step("crm", journal=journal, escalate=True, policy=keel.Policy(max_attempts=2))
    def sync_contact(cid):
        tries.append(cid)
        if failing[0]:
            raise Unauthorized("token expired")
        return {"synced": cid}

    with pytest.raises(keel.Escalated) as escalated:
        sync_contact(7)
    ticket_id = escalated.value.ticket_id
    assert tries == [7], "unauthorized is not retried"
    with pytest.raises(keel.Escalated):
        sync_contact(7)
    assert tries == [7], "nothing acts while the ticket is open"

    listed = keel_cli(tmp_path, "--json", "tickets", "list")
    assert listed.returncode == 0 and ticket_id in listed.stdout, listed.stdout + listed.stderr
    failing[0] = False  # the person fixed the token
    resolved = keel_cli(tmp_path, "tickets", "resolve", ticket_id, "--action", "retry")
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    assert sync_contact(7) == {"synced": 7}
    assert sync_contact(7) == {"synced": 7}
    assert tries == [7, 7], "retried once, then replayed"

    # Skip: the call returns None without acting.
    failing[0] = True
    with pytest.raises(keel.Escalated) as second:
        sync_contact(8)
    assert keel_cli(tmp_path, "tickets", "resolve", second.value.ticket_id, "--action", "skip").returncode == 0
    assert sync_contact(8) is None
    assert tries == [7, 7, 8]
    with pytest.raises(TypeError, match="journal"):
        keel.step("x", escalate=True)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_journal_freed_on_keels_thread_during_an_attempt_is_dropped_safely(tmp_path):
    # Python frees an object wherever it runs: here the journal's last reference goes
    # while Keel's step thread formats an attempt's exception (its __str__).
    held = [keel.Journal(str(tmp_path / "freed.db"))]

    class Freeing(Exception):
        def __str__(self):
            held.clear()
            gc.collect()
            return "freed"

    @keel.step("free", policy=keel.Policy(max_attempts=1))
    async def fails():
        raise Freeing()

    with pytest.raises(keel.StepFailed, match="freed"):
        asyncio.run(fails())
    assert held == []
    gc.collect()
