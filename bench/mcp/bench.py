"""Added latency of an MCP `tools/call` through `keel serve`: the official `mcp`
client calls the upstream's `lookup` tool N times, straight to the upstream
(streamable HTTP) and through Keel's `/mcp` (which proxies the same upstream over
its own streamable-HTTP client), alternating rounds; prints p50/p99 of each.

    python bench.py DIRECT_URL KEEL_URL KEEL_KEY [N] [ROUNDS]
"""

import asyncio
import json
import statistics
import sys
import time

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def measure(url: str, key: str | None, tool: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx2.AsyncClient(headers=headers, timeout=30)
    async with Client(streamable_http_client(url, http_client=http)) as client:
        for j in range(20):  # warm-up; each its own arguments (Keel's loop guard refuses repeats)
            r = await client.call_tool(tool, {"sku": f"warm{j}"})
            assert not getattr(r, "is_error", getattr(r, "isError", False)), r
        times = []
        for i in range(n):
            t = time.perf_counter()
            r = await client.call_tool(tool, {"sku": f"s{i}"})
            times.append((time.perf_counter() - t) * 1000)
            assert not getattr(r, "is_error", getattr(r, "isError", False)), r
        return times


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def main() -> None:
    direct, keel, key = sys.argv[1], sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    out = {"direct": [], "keel": []}
    for _ in range(rounds):
        out["direct"] += await measure(direct, None, "lookup", n)
        out["keel"] += await measure(keel, key, "up_lookup", n)
    row = {}
    for name, xs in out.items():
        row[name] = {"p50_ms": round(statistics.median(xs), 3), "p99_ms": round(pct(xs, 0.99), 3), "n": len(xs)}
    row["added"] = {
        "p50_ms": round(row["keel"]["p50_ms"] - row["direct"]["p50_ms"], 3),
        "p99_ms": round(row["keel"]["p99_ms"] - row["direct"]["p99_ms"], 3),
    }
    print(json.dumps(row, indent=2))


asyncio.run(main())
