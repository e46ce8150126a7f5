"""The success path of one call: plain, under keel.step, under tenacity + pybreaker
(the same policy: 3 attempts, a breaker). Prints ns per call, median of rounds."""

import itertools
import os
import statistics
import sys
import tempfile
import timeit

import keel
import pybreaker
import tenacity

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
ROUNDS = 5


def work(x):
    return x + 1


keel_step = keel.step(
    "bench", policy=keel.Policy(max_attempts=3, base_delay="100ms", breaker={"min_calls": 10, "failure_ratio": 0.5})
)(work)
breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
tenacity_step = breaker(tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential(0.1))(work))
tenacity_only = tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential(0.1))(work)

# A journaled step: every call a new key, claimed and completed in the SQLite journal
# (two durable writes), the result stored.
journal = keel.Journal(os.path.join(tempfile.mkdtemp(prefix="keel-py-bench-"), "keel.db"))
counter = itertools.count()
journaled = keel.step("bench-journaled", journal=journal, key=lambda x: f"k{next(counter)}")(work)
JOURNALED_N = 2000

rows = []
for name, fn in [
    ("plain call", work),
    ("keel.step (retry + breaker)", keel_step),
    ("tenacity.retry", tenacity_only),
    ("tenacity.retry + pybreaker", tenacity_step),
]:
    assert fn(1) == 2
    n = N if name == "plain call" else N // 10
    times = [timeit.timeit(lambda: fn(1), number=n) / n * 1e9 for _ in range(ROUNDS)]
    rows.append((name, statistics.median(times)))

times = [timeit.timeit(lambda: journaled(1), number=JOURNALED_N) / JOURNALED_N * 1e9 for _ in range(3)]
rows.append((f"keel.step with a SQLite journal (new key per call, N={JOURNALED_N})", statistics.median(times)))

base = rows[0][1]
print(f"| call (N={N // 10} per round, median of {ROUNDS}) | ns per call | added over a plain call |")
print("|---|---:|---:|")
for name, ns in rows:
    print(f"| {name} | {ns:,.0f} | {'' if name == 'plain call' else f'{ns - base:,.0f}'} |")
