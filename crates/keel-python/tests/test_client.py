"""`keel.Client` against a real `keel serve` (the binary scripts/test built)."""

import os
import subprocess
import threading

import pytest

import keel

AGENT, APPROVER = "agent-key-py-0123456789", "approver-key-py-0123456789"

CONFIG = """
[server]
listen = "127.0.0.1:0"
keys = [
  { name = "bot", key_env = "PY_AGENT_KEY", role = "agent" },
  { name = "alice", key_env = "PY_APPROVER_KEY", role = "approver" },
]

[storage]
url = "sqlite://DB"

[tools.stock]
kind = "command"
argv = ["printf", '{"sku": "%s", "in_stock": true}', "{{sku}}"]
params = { type = "object", required = ["sku"], properties = { sku = { type = "string", pattern = "^[A-Z0-9-]{1,32}$" } } }

[tools.wire]
kind = "command"
write = true
argv = ["printf", '{"sent": %s}', "{{amount}}"]
approval = { param = "amount", above = 100 }
params = { type = "object", required = ["amount"], properties = { amount = { type = "number" } } }
"""


@pytest.fixture()
def server(tmp_path):
    binary = os.environ.get("KEEL_BIN")
    assert binary and os.path.exists(binary), "KEEL_BIN names the keel binary"
    config = tmp_path / "keel.toml"
    config.write_text(CONFIG.replace("DB", str(tmp_path / "keel.db")))
    env = {**os.environ, "PY_AGENT_KEY": AGENT, "PY_APPROVER_KEY": APPROVER}
    proc = subprocess.Popen([binary, "--config", str(config), "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    url = []
    reader = threading.Thread(target=lambda: url.append(proc.stdout.readline()))
    reader.start()
    reader.join(timeout=30)  # the first line says where it listens (a bounded wait on an event)
    assert url and url[0].strip(), "keel serve said where it listens"
    try:
        yield url[0].split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_client_invokes_tools_and_waits_for_a_persons_approval(server):
    agent = keel.Client(server, AGENT)
    approver = keel.Client(server, APPROVER)
    out = agent.invoke("stock", {"sku": "A-1"})
    assert "A-1" in str(out)

    with pytest.raises(keel.ApprovalPending) as pending:
        agent.invoke("wire", {"amount": 500})
    approval_id = pending.value.approval_id
    assert agent.approval(approval_id)["approval"]["status"] == "pending"
    approver.decide(approval_id, approve=True)
    assert agent.wait_for_approval(approval_id, timeout=30, poll=0.05)["approval"]["status"] == "approved"
    # The same call again: the approved run's answer (a write's key is derived from
    # its arguments, so this is the same invocation, not a second wire).
    assert "500" in str(agent.invoke("wire", {"amount": 500}, wait="30s"))

    with pytest.raises(keel.StepFailed) as unknown:
        agent.invoke("ghost", {})
    assert unknown.value.error_class == "not_found"
    assert unknown.value.reference, "every error answer carries a reference"
    with pytest.raises(keel.StepFailed) as bad:
        agent.invoke("stock", {"sku": "'; rm -rf /"})
    assert bad.value.error_class == "invalid_request", "the schema's pattern refused it"
    with pytest.raises(keel.StepFailed) as forbidden:
        agent.decide(approval_id, approve=False)
    assert forbidden.value.error_class == "forbidden", "an agent key cannot decide"
