"""An upstream MCP server written with the official `mcp` package, for Keel's MCP
client tests: Keel starts it (stdio) or connects to it (`--http PORT`).

Tools: `lookup` (read-only; reports its pid and the names of its environment),
`whoami` (the `X-Upstream-Token` header it was called with, over HTTP),
`charge` (write-like; appends to $STATE_DIR/charges.log), `fail` (an error result
with the given text), `die` (the process exits mid-call), `slow` (reports progress
every `every` seconds, `steps` times), `quiet` (waits `seconds` without progress).
"""

import asyncio
import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

server = MCPServer("keel-test-upstream")
READ = ToolAnnotations(readOnlyHint=True)


def _meta(ctx: Context) -> dict:
    meta = getattr(ctx.request_context, "meta", None)
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return meta
    dump = getattr(meta, "model_dump", None)
    return dump(by_alias=True) if dump else {}


@server.tool(annotations=READ)
def lookup(sku: str) -> dict:
    """Stock of a SKU."""
    return {"sku": sku, "stock": 7, "pid": os.getpid(), "env": sorted(os.environ)}


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
def charge(order: str, amount: int, ctx: Context) -> dict:
    """Charges an order (write-like)."""
    key = _meta(ctx).get("keel/idempotencyKey")
    with open(os.path.join(os.environ["STATE_DIR"], "charges.log"), "a") as f:
        f.write(f"{order} {amount} {key}\n")
    return {"charged": order, "amount": amount}


@server.tool(annotations=READ)
def whoami(ctx: Context) -> dict:
    """The `X-Upstream-Token` header of the HTTP request that called it (None on stdio)."""
    request = getattr(ctx.request_context, "request", None)
    headers = getattr(request, "headers", None)
    return {"token": headers.get("x-upstream-token") if headers is not None else None}


@server.tool(annotations=READ)
def fail(message: str) -> str:
    """Fails with `message`."""
    raise ToolError(message)


@server.tool(annotations=READ)
def die() -> str:
    """Exits the server mid-call."""
    sys.stderr.write("upstream: dying on purpose\n")
    sys.stderr.flush()
    os._exit(3)


@server.tool(annotations=READ)
async def slow(steps: int, every: float, ctx: Context) -> str:
    """Reports progress `steps` times, `every` seconds apart."""
    for i in range(steps):
        await asyncio.sleep(every)
        await ctx.report_progress(i + 1, steps)
    return f"done after {steps} steps"


@server.tool(annotations=READ)
async def quiet(seconds: float) -> str:
    """Waits without a word."""
    await asyncio.sleep(seconds)
    return "late"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
