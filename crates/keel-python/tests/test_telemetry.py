"""`keel.Telemetry`: keel.toml's `[telemetry]` from Python — each step call an
`execute_tool` span exported over OTLP/HTTP to a real receiver on loopback (decoded
here from its protobuf), and terminal failures, stopped self-corrections and
escalations sent to a Sentry-shaped receiver as envelopes. One process per test: a
process exports its traces through one `tracing` subscriber."""

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest


@pytest.fixture()
def receiver():
    """Collects POSTed bodies by path."""
    got = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            got.setdefault(self.path, []).append(body)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", got
    server.shutdown()


# A protobuf reader for what the test needs of ExportTraceServiceRequest.
def _varint(b, i):
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return n, i


def _fields(b):
    i, out = 0, []
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((field, v))
    return out


def _value(any_value):
    for f, v in _fields(any_value):
        if f == 1:
            return v.decode()
        if f in (2, 3):
            return v
    return None


def spans_of(bodies):
    """Each span as {name, trace, id, parent, attrs, events}."""
    spans = []
    for body in bodies:
        for f1, resource_spans in _fields(body):
            for f2, scope_spans in _fields(resource_spans):
                if f2 != 2:
                    continue
                for f3, span in _fields(scope_spans):
                    if f3 != 2:
                        continue
                    s = {"attrs": {}, "events": [], "parent": b""}
                    for f, v in _fields(span):
                        if f == 1:
                            s["trace"] = v
                        elif f == 2:
                            s["id"] = v
                        elif f == 4:
                            s["parent"] = v
                        elif f == 5:
                            s["name"] = v.decode()
                        elif f == 9:
                            kv = dict(_fields(v))
                            s["attrs"][kv[1].decode()] = _value(kv.get(2, b""))
                        elif f == 11:
                            s["events"].append(dict(_fields(v)).get(2, b"").decode())
                    spans.append(s)
    return spans


def sentry_events(bodies):
    events = []
    for body in bodies:
        lines = body.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2]):
            if json.loads(header).get("type") == "event":
                events.append(json.loads(payload))
    return events


def run(tmp_path, address, body):
    config = tmp_path / "keel.toml"
    config.write_text(textwrap.dedent(f"""\
        [telemetry]
        service_name = "py-agent"
        [telemetry.otlp]
        endpoint = "http://{address}"
        [telemetry.sentry]
        dsn = "http://public@{address}/7"
        environment = "test"
        """))
    script = "import keel, pytest\ntelemetry = keel.Telemetry.from_toml(%r)\n" % str(config)
    script += textwrap.dedent(body) + "\ntelemetry.close(10)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 0, done.stderr


def test_a_steps_calls_are_execute_tool_spans_with_their_retries_and_failures(tmp_path, receiver):
    address, got = receiver
    run(tmp_path, address, """
        class Down(Exception):
            status_code = 503

        tries = []

        @keel.step("charge", policy=keel.Policy(max_attempts=3, base_delay="1ms"), telemetry=telemetry)
        def charge(amount):
            tries.append(amount)
            if len(tries) == 1:
                raise Down("unavailable")
            return "ok"

        @keel.step("lookup", telemetry=telemetry)
        def lookup(sku):
            raise ValueError("no such sku")

        assert charge(5) == "ok"
        with pytest.raises(keel.StepFailed):
            lookup("x")
        """)
    spans = spans_of(got["/v1/traces"])
    by_name = {s["name"]: s for s in spans}
    assert {"execute_tool charge", "execute_tool lookup"} <= set(by_name), sorted(by_name)
    charge = by_name["execute_tool charge"]
    assert charge["attrs"]["gen_ai.operation.name"] == "execute_tool"
    assert charge["attrs"]["gen_ai.tool.name"] == "charge"
    assert "retry scheduled" in charge["events"], charge["events"]
    assert "error.type" not in charge["attrs"], "it succeeded on its retry"
    lookup = by_name["execute_tool lookup"]
    assert lookup["attrs"]["error.type"] == "invalid_request"
    assert lookup["attrs"]["keel.error_class"] == "invalid_request"
    assert lookup["attrs"]["keel.disposition"] == "terminal"
    assert charge["trace"] != lookup["trace"], "two calls, two traces"
    # The terminal failure is a Sentry event too; the retried 503 that succeeded is not.
    events = sentry_events(got.get("/api/7/envelope/", []))
    assert [e["tags"]["keel.target"] for e in events] == ["lookup"], events
    assert events[0]["tags"]["keel.class"] == "invalid_request"
    assert events[0]["environment"] == "test"
    assert "no such sku" not in json.dumps(events), "names and classes only: no message of the call"


def test_a_stopped_self_correction_and_an_escalation_reach_sentry(tmp_path, receiver):
    address, got = receiver
    run(tmp_path, address, """
        @keel.self_correct(correct=lambda ctx: "result = {}['k']  # again", max_attempts=3,
                           telemetry=telemetry, name="solve")
        def solve(program):
            scope = {}
            exec(program, scope)
            return scope["result"]

        with pytest.raises(keel.CorrectionStopped):
            solve("result = {}['k']")

        journal = keel.Journal(%r)

        @keel.step("refund", policy=keel.Policy(max_attempts=1), journal=journal, escalate=True,
                   telemetry=telemetry)
        def refund(order):
            raise PermissionError("refunds are closed")

        with pytest.raises(keel.Escalated):
            refund("o-9")
        """ % str(tmp_path / "keel.db"))
    events = sentry_events(got.get("/api/7/envelope/", []))
    stopped = [e for e in events if e["tags"].get("keel.correction.stopped")]
    assert len(stopped) == 1, events
    assert stopped[0]["tags"]["keel.correction.stopped"] == "repeated_program"
    assert stopped[0]["tags"]["keel.class"] == "code_error"
    assert stopped[0]["tags"]["keel.target"] == "solve"
    escalations = [e for e in events if e["tags"].get("keel.ticket")]
    assert len(escalations) == 1, events
    assert escalations[0]["tags"]["keel.class"] == "forbidden"
    assert escalations[0]["tags"]["keel.ticket"].startswith("tkt-py-")
    spans = spans_of(got["/v1/traces"])
    assert any(s["name"] == "execute_tool refund" and s["attrs"].get("error.type") == "forbidden" for s in spans)


def test_a_bad_telemetry_table_is_refused_by_key(tmp_path):
    import keel

    bad = tmp_path / "bad.toml"
    bad.write_text('[telemetry.otlp]\nendpoint = "ftp://nowhere"\n')
    with pytest.raises(ValueError, match="telemetry.otlp.endpoint"):
        keel.Telemetry.from_toml(str(bad))
    empty = tmp_path / "empty.toml"
    empty.write_text("[telemetry]\n")
    with pytest.raises(ValueError, match="neither"):
        keel.Telemetry.from_toml(str(empty))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[telemetry]\nsevice_name = "x"\n')
    with pytest.raises(ValueError, match="sevice_name"):
        keel.Telemetry.from_toml(str(unknown))
