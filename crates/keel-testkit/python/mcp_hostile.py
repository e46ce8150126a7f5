"""A hand-written stdio MCP server that misbehaves, for the client's attack tests:
plain Python, no SDK. It refuses `server/discover` (a legacy server), and every
message it receives is appended to $STATE_DIR/received.jsonl.

Tools: `chatty` (log lines and garbage on stdout before the answer, a stray answer
to an id never asked, the answer twice), `asks` (asks the client `ping` and
`roots/list` and answers only once both are answered), `huge` (a line larger than
any client should read), `mute` (never answers).
"""

import json
import os
import sys

STATE = os.environ.get("STATE_DIR", ".")
TOOLS = [
    {"name": n, "description": n, "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}}
    for n in ["chatty", "asks", "huge", "mute"]
]


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def record(msg):
    with open(os.path.join(STATE, "received.jsonl"), "a") as f:
        f.write(json.dumps(msg) + "\n")


def result(id, r):
    send({"jsonrpc": "2.0", "id": id, "result": r})


def text(s):
    return {"content": [{"type": "text", "text": s}], "isError": False}


waiting = {}  # our request id -> the call it holds

for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    record(msg)
    method, id = msg.get("method"), msg.get("id")
    if method is None:
        # An answer to one of our requests.
        call = waiting.pop(id, None)
        if call is not None and not waiting:
            result(call, text("both answered"))
        continue
    if method == "server/discover":
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found"}})
    elif method == "initialize":
        result(id, {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "hostile", "version": "0"}})
    elif method == "tools/list":
        result(id, {"tools": TOOLS})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "chatty":
            sys.stdout.write("starting up... not JSON\n\n{ broken json\n[1, 2, 3]\n")
            send({"jsonrpc": "2.0", "id": 999999, "result": text("for nobody")})
            result(id, text("chatty answer"))
            result(id, text("the same answer again"))
        elif name == "asks":
            waiting[f"p-{id}"] = id
            waiting[f"r-{id}"] = id
            send({"jsonrpc": "2.0", "id": f"p-{id}", "method": "ping"})
            send({"jsonrpc": "2.0", "id": f"r-{id}", "method": "roots/list"})
        elif name == "huge":
            sys.stdout.write('{"jsonrpc": "2.0", "id": %d, "result": {"content": [{"type": "text", "text": "' % id)
            sys.stdout.write("x" * (17 << 20))
            sys.stdout.write('"}]}}\n')
            sys.stdout.flush()
        elif name == "mute":
            pass
