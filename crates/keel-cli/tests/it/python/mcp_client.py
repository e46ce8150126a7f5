"""The official `mcp` Python package as a real client of Keel's MCP server.

Usage: mcp_client.py http URL AGENT_KEY APPROVE_URL APPROVER_KEY
       mcp_client.py stdio KEEL_BIN

Lists the tools; calls `charge` (succeeds, its upstream failing once first), calls it
again with the same arguments (must be replayed, not charged twice), calls `notify`
under a key of its own in `_meta` (replayed; refused with other arguments), calls it with a
negative amount (a classified failure), and with an amount above the approval limit
(pending approval at once), approves that and calls again (completed). Prints one JSON
object per step on stdout for the Rust test to check.
"""

import asyncio
import json
import os
import subprocess
import sys

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client


def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def summary(result):
    text = result.content[0].text if result.content else ""
    return {
        "is_error": result.is_error,
        "text": text,
        "structured": result.structured_content,
        "meta": result.meta,
    }


async def session(client, approve):
    tools = await client.list_tools()
    emit(
        "list",
        tools={
            t.name: {
                "schema": t.input_schema,
                "read_only": t.annotations.read_only_hint if t.annotations else None,
            }
            for t in tools.tools
        },
    )
    await client.send_ping()
    emit("ping")

    ok = await client.call_tool("charge", {"order": 1, "amount": 10})
    emit("charge", **summary(ok))
    again = await client.call_tool("charge", {"amount": 10, "order": 1})
    emit("charge_again", **summary(again))

    bad = await client.call_tool("charge", {"order": 2, "amount": -5})
    emit("charge_negative", **summary(bad))

    invalid = await client.call_tool("charge", {"order": "three"})
    emit("charge_invalid", **summary(invalid))

    meta = {"keel/idempotencyKey": "notify-1"}
    keyed = await client.call_tool("notify", {"to": "a"}, meta=meta)
    emit("notify_keyed", **summary(keyed))
    keyed_again = await client.call_tool("notify", {"to": "a"}, meta=meta)
    emit("notify_keyed_again", **summary(keyed_again))
    keyed_other = await client.call_tool("notify", {"to": "b"}, meta=meta)
    emit("notify_keyed_other", **summary(keyed_other))

    big = await client.call_tool("charge", {"order": 3, "amount": 150})
    emit("charge_big", **summary(big))
    approval = (big.structured_content or {}).get("approval_id")
    if approval:
        approve(approval)
        done = await client.call_tool("charge", {"order": 3, "amount": 150})
        emit("charge_big_approved", **summary(done))


async def main():
    mode = sys.argv[1]
    if mode == "http":
        url, agent, api, approver = sys.argv[2:6]

        def approve(approval_id):
            r = httpx2.post(
                f"{api}/api/approvals/{approval_id}/approve",
                headers={"Authorization": f"Bearer {approver}"},
                json={},
            )
            emit("approved", status=r.status_code)

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {agent}"}, timeout=60)
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            emit("connected", version=client.protocol_version)
            await session(client, approve)
    else:
        keel = sys.argv[2]

        def approve(approval_id):
            r = subprocess.run([keel, "approvals", "approve", approval_id], capture_output=True, text=True)
            emit("approved", status=r.returncode, stderr=r.stderr)

        params = StdioServerParameters(command=keel, args=["mcp"], env=dict(os.environ))
        async with Client(params, mode="legacy") as client:
            emit("connected", version=client.protocol_version)
            await session(client, approve)


asyncio.run(main())
