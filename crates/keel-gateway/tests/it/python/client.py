"""The official `openai` package against Keel's gateway: run by tests/it/python.rs.

usage: client.py BASE_URL
Each check raises on failure; the last line printed is `ok`.
"""

import json
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="sk-unused", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Say hello"}]

# A plain completion, with Keel's headers visible to a client that looks.
raw = client.chat.completions.with_raw_response.create(model="gpt", messages=messages)
answer = raw.parse()
assert answer.choices[0].message.content == "Hello world", answer
assert answer.model == "gpt", answer.model
assert answer.usage.total_tokens == 12, answer.usage
assert raw.headers["x-keel-model"] == "gpt" and raw.headers["x-keel-fallback"] == "false", raw.headers

# A streamed completion with usage.
chunks = list(
    client.chat.completions.create(
        model="gpt", messages=messages, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "Hello world", text
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2, chunks[-1]
assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)

# A tool call, arguments validated against the tool's schema on the way.
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
answer = client.chat.completions.create(
    model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools
)
call = answer.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call
assert answer.choices[0].finish_reason == "tool_calls"

# Streamed tool calls, through the client's streaming helper: whole and valid, even
# from a stream that died inside the call's arguments (regenerated on a fallback).
for name in ["tools", "toolcut"]:
    with client.chat.completions.stream(
        model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}, (name, done)
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id == "call_1", (name, call)
    assert json.loads(call.function.arguments) == {"city": "Paris"}, (name, call)
    assert final.choices[0].finish_reason == "tool_calls", (name, final)
    # And the raw chunks of `create(stream=True)`: every arguments delta is whole JSON.
    for chunk in client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, stream=True
    ):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            assert d.function.arguments is None or json.loads(d.function.arguments) == {"city": "Paris"}, d

# A fallback the client never notices: the primary is down (503), whole and streamed.
answer = client.chat.completions.create(model="flaky", messages=messages)
assert answer.choices[0].message.content == "Hello world", answer
stream = client.chat.completions.create(model="flaky", messages=messages, stream=True)
assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello world"

# A stream cut after its first token, rescued (regenerated and spliced): one clean answer.
stream = client.chat.completions.create(model="cut", messages=messages, stream=True)
assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello world"

print("ok")
