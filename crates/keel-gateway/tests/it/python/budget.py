"""The official `openai` package meets a budget refusal: run by tests/it/python.rs.

usage: budget.py BASE_URL
The client keeps its default retries (2); Keel's 429 says `x-should-retry: false`,
so the SDK must raise at once, without re-sending. The last line printed is `ok`.
"""

import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="sk-unused", timeout=30, default_headers={"x-keel-run": "sdk-run"})
messages = [{"role": "user", "content": "Say hello"}]

for stream in (False, True):
    try:
        client.chat.completions.create(model="gpt", messages=messages, stream=stream)
    except openai.RateLimitError as e:
        assert e.response.headers["x-should-retry"] == "false", e.response.headers
        assert e.body["keel_class"] == "budget_exceeded", e.body
        assert e.body["type"] == "insufficient_quota", e.body
    else:
        raise AssertionError("the budget should have refused the call")
print("ok")
