"""The official `mcp` Python package as a real client of Keel's MCP server.

Usage: mcp_client.py ERA http URL AGENT_KEY APPROVE_URL APPROVER_KEY
       mcp_client.py ERA stdio KEEL_BIN

ERA is `legacy` (the initialize handshake, 2025-11-25) or `auto` (the client's
default: it probes `server/discover` and, finding it, speaks 2026-07-28).

Lists the tools; calls `charge` (succeeds, its upstream failing once first), calls it
again with the same arguments (must be replayed, not charged twice), calls `notify`
under a key of its own in `_meta` (replayed; refused with other arguments), repeats one
call with no key until the loop guard stops it, calls `charge` with a
negative amount (a classified failure), and with an amount above the approval limit
(pending approval at once), approves that and calls again (completed). Prints one JSON
object per step on stdout for the Rust test to check.

In `auto` the approval is the 2026-07-28 input-required round trip instead: driven by
hand first (answered input_required; "accept" without an approval is asked again; a
tampered requestState is refused; approved in Keel, the retry with the state gets the
result), then by the client's own driver with an elicitation callback playing the
person (who approves in Keel, rejects in Keel, or declines to wait).
"""

import asyncio
import json
import os
import subprocess
import sys

import httpx2
import mcp_types as types
from mcp import Client, MCPError, StdioServerParameters
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


async def session(client, approve, modern, decide):
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
    if not modern:
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

    # An agent looping on one call that acts anew: Keel's loop guard stops the third.
    loops = [summary(await client.call_tool("notify", {"to": "loop"})) for _ in range(3)]
    emit("notify_loop", calls=loops)

    if modern:
        if "routed" in {t.name for t in tools.tools}:
            # Its x-mcp-header arguments are mirrored into Mcp-Param-* headers by the
            # client, which Keel checks against the body.
            args = {"region": " Grüße, 世界 ", "count": 3, "deep": {"flag": True}}
            try:
                emit("routed", **summary(await client.call_tool("routed", args)))
            except MCPError as e:
                emit("routed", code=e.code, message=e.error.message)
        await input_required(client, approve, decide)
        return
    big = await client.call_tool("charge", {"order": 3, "amount": 150})
    emit("charge_big", **summary(big))
    approval = (big.structured_content or {}).get("approval_id")
    if approval:
        approve(approval)
        done = await client.call_tool("charge", {"order": 3, "amount": 150})
        emit("charge_big_approved", **summary(done))


def asked(result):
    """An InputRequiredResult, summed up."""
    if not isinstance(result, types.InputRequiredResult):
        return {"result_type": "complete", **summary(result)}
    (key, request), *rest = (result.input_requests or {}).items()
    return {
        "result_type": result.result_type,
        "key": key,
        "more": len(rest),
        "method": request.method,
        "mode": request.params.mode,
        "message": request.params.message,
        "approval_id": (result.meta or {}).get("keel/approvalId"),
        "has_state": isinstance(result.request_state, str),
    }


# What the person does when the client shows Keel's form, set per call.
person = {"then": "accept", "seen": []}


async def on_elicit(context, params):
    approval = (params.meta or {}).get("keel/approvalId")
    person["seen"].append({"message": params.message, "approval_id": approval})
    action = person["then"]
    if action == "approve":
        person["decide"](approval, True)
        action = "accept"
    elif action == "reject":
        person["decide"](approval, False)
        action = "accept"
    return types.ElicitResult(action=action)


async def input_required(client, approve, decide):
    args = {"order": 3, "amount": 150}
    accept = {"keel.approval": types.ElicitResult(action="accept")}

    # By hand, through the session, to see each round.
    first = await client.session.call_tool("charge", args, allow_input_required=True)
    emit("charge_big", **asked(first))
    again = await client.session.call_tool(
        "charge", args, input_responses=accept, request_state=first.request_state, allow_input_required=True
    )
    emit("charge_big_accepted_unapproved", **asked(again))
    try:
        await client.session.call_tool(
            "charge", args, input_responses=accept, request_state=again.request_state + "x", allow_input_required=True
        )
        emit("charge_big_tampered", code=None)
    except MCPError as e:
        emit("charge_big_tampered", code=e.code, message=e.error.message)
    try:
        await client.session.call_tool(
            "charge", {"order": 3, "amount": 151}, input_responses=accept, request_state=again.request_state,
            allow_input_required=True,
        )
        emit("charge_big_other_args", code=None)
    except MCPError as e:
        emit("charge_big_other_args", code=e.code, message=e.error.message)
    approve(asked(first)["approval_id"])
    done = await client.session.call_tool(
        "charge", args, input_responses=accept, request_state=again.request_state, allow_input_required=True
    )
    emit("charge_big_approved", **asked(done))

    # The client's own driver, the person answering Keel's form.
    person["decide"] = decide
    for step, order, then in [
        ("charge_auto_approved", 4, "approve"),
        ("charge_auto_rejected", 5, "reject"),
        ("charge_auto_declined", 6, "decline"),
    ]:
        person["then"], person["seen"] = then, []
        result = await client.call_tool("charge", {"order": order, "amount": 200})
        emit(step, seen=person["seen"], **summary(result))


async def main():
    era, mode = sys.argv[1], sys.argv[2]
    modern = era == "auto"
    callbacks = {"mode": era, "elicitation_callback": on_elicit} if modern else {"mode": era}
    if mode == "http":
        url, agent, api, approver = sys.argv[3:7]

        def decide(approval_id, yes):
            verb = "approve" if yes else "reject"
            r = httpx2.post(
                f"{api}/api/approvals/{approval_id}/{verb}",
                headers={"Authorization": f"Bearer {approver}"},
                json={},
            )
            emit("approved" if yes else "rejected", status=r.status_code)

        def approve(approval_id):
            decide(approval_id, True)

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {agent}"}, timeout=60)
        async with Client(streamable_http_client(url, http_client=http), **callbacks) as client:
            connected(client)
            await session(client, approve, modern, decide)
    else:
        keel = sys.argv[3]

        def decide(approval_id, yes):
            verb = "approve" if yes else "reject"
            r = subprocess.run([keel, "approvals", verb, approval_id], capture_output=True, text=True)
            emit("approved" if yes else "rejected", status=r.returncode, stderr=r.stderr)

        def approve(approval_id):
            decide(approval_id, True)

        params = StdioServerParameters(command=keel, args=["mcp"], env=dict(os.environ))
        async with Client(params, **callbacks) as client:
            connected(client)
            await session(client, approve, modern, decide)


def connected(client):
    info = client.server_info
    emit(
        "connected",
        version=client.protocol_version,
        server=info.name if info else None,
        instructions=client.instructions,
    )


asyncio.run(main())
