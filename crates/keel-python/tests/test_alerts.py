"""`keel.Alerts`: keel.toml's `[alerts]` fed by Python steps and self-corrections,
delivered to a real webhook receiver on loopback."""

import http.server
import json
import threading

import pytest

import keel


@pytest.fixture()
def webhook():
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append(json.loads(body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def config(tmp_path, url, rules):
    path = tmp_path / "keel.toml"
    path.write_text(f'[alerts.sinks.hook]\nkind = "webhook"\nurl = "{url}"\n\n{rules}')
    return str(path)


def test_failures_of_steps_and_stopped_corrections_open_incidents(tmp_path, webhook):
    url, received = webhook
    alerts = keel.Alerts.from_toml(config(tmp_path, url, (
        '[[alerts.rules]]\nname = "payments-down"\nclasses = ["server_error"]\nthreshold = 3\nwindow = "5m"\n\n'
        '[[alerts.rules]]\nname = "codegen"\nclasses = ["code_error"]\nthreshold = 2\nwindow = "5m"\n'
    )))

    class Down(Exception):
        status_code = 503

    @keel.step("payments", policy=keel.Policy(max_attempts=3, base_delay="1ms"), alerts=alerts)
    def charge():
        raise Down("unavailable")

    with pytest.raises(keel.StepFailed):
        charge()  # three attempts, three server_error failures: the threshold

    @keel.self_correct(correct=lambda ctx: "result = 1 / 0  # again", max_attempts=2, alerts=alerts, name="solve")
    def solve(program):
        scope = {}
        exec(program, scope)  # noqa: S102
        return scope["result"]

    for _ in range(2):
        with pytest.raises(keel.CorrectionStopped):
            solve("result = 1 / 0")
    assert alerts.open_incidents() == 2
    alerts.close(grace=10)
    rules = sorted((d["rule"], d["action"]) for d in received)
    assert rules == [("codegen", "trigger"), ("payments-down", "trigger")], received
    assert all(d["dedup_key"].startswith("keel/") for d in received)


def test_a_config_without_a_sink_is_refused(tmp_path):
    path = tmp_path / "keel.toml"
    path.write_text("[run]\n")
    with pytest.raises(ValueError, match="no sink"):
        keel.Alerts.from_toml(str(path))
    path.write_text('[alerts.sinks.hook]\nkind = "webhook"\nurl = "ftp://x"\n')
    with pytest.raises(ValueError):
        keel.Alerts.from_toml(str(path))
