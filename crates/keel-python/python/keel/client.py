"""`keel.Client`: a thin client for a running `keel serve`, for teams that run it.

Standard library only (`urllib`). Errors come back as the package's exceptions, with
the server's class: `StepFailed` (its `error_class`, `attempts`, the server's
`message`, and `reference` — the id support can look up), `ApprovalPending` for a call
waiting for a person.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Optional

from . import ApprovalDenied, ApprovalPending, StepFailed


class Client:
    """`Client("http://127.0.0.1:8080", key)`: the key is a `[server] keys` secret."""

    def __init__(self, base_url: str, key: str, timeout: float = 330.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the caller's server
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"{}")
            except ValueError:
                err = {}
            failure = StepFailed(path, err.get("class", "server_error"), err.get("attempts", 0),
                                 err.get("message", f"HTTP {e.code}"))
            failure.status = e.code  # type: ignore[attr-defined]
            failure.reference = err.get("reference")  # type: ignore[attr-defined]
            failure.ticket_id = err.get("ticket_id")  # type: ignore[attr-defined]
            raise failure from None

    def invoke(self, tool: str, params: Optional[dict] = None, *, idempotency_key: Optional[str] = None,
               wait: Optional[str] = None) -> Any:
        """Calls `tool` under its policies on the server; its output. A call waiting
        for approval raises `ApprovalPending` (with the run's id as `run_id`);
        `idempotency_key`: a retry of this call acts once."""
        path = f"/api/tools/{urllib.parse.quote(tool, safe='')}/invoke"
        if wait:
            path += "?" + urllib.parse.urlencode({"wait": wait})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        status, body = self._request("POST", path, {"params": params or {}}, headers)
        if status == 200:
            return body["output"]
        if body.get("approval_id"):
            pending = ApprovalPending(tool, body["approval_id"])
            pending.run_id = body.get("run_id")  # type: ignore[attr-defined]
            raise pending
        raise StepFailed(tool, "timeout", 0, f"still {body.get('state')}: poll {body.get('poll_url')}")

    def start_run(self, *, plan: Optional[dict] = None, task: Optional[str] = None) -> str:
        """Starts a plan run (`plan`: keel's plan as a dict) or an agent run (`task`); its id."""
        body: Dict[str, Any] = {"plan": plan} if plan is not None else {"task": task}
        return self._request("POST", "/api/runs", body)[1]["run_id"]

    def run(self, run_id: str) -> dict:
        """A run: its state, steps, approvals and tickets."""
        return self._request("GET", f"/api/runs/{urllib.parse.quote(run_id, safe='')}")[1]

    def approval(self, approval_id: str) -> dict:
        """An approval: its status, who asked, the arguments, who decided."""
        return self._request("GET", f"/api/approvals/{urllib.parse.quote(approval_id, safe='')}")[1]

    def decide(self, approval_id: str, approve: bool) -> dict:
        """Approves or rejects (an approver's key)."""
        verb = "approve" if approve else "reject"
        return self._request("POST", f"/api/approvals/{urllib.parse.quote(approval_id, safe='')}/{verb}", {})[1]

    def wait_for_approval(self, approval_id: str, timeout: float = 3600.0, poll: float = 1.0) -> dict:
        """Waits until a person decided `approval_id` (polling, bounded by `timeout`);
        raises `ApprovalDenied` when it was not approved."""
        give_up = time.monotonic() + timeout
        while True:
            a = self.approval(approval_id)
            status = a.get("approval", a).get("status")
            if status == "approved":
                return a
            if status not in (None, "pending"):
                raise ApprovalDenied(approval_id, "approval_denied", 0, f"approval {approval_id} is {status}")
            if time.monotonic() > give_up:
                raise StepFailed(approval_id, "timeout", 0, f"approval {approval_id} still pending")
            time.sleep(poll)
