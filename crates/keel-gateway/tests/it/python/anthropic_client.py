"""The official `anthropic` package against Keel's /v1/messages: run by tests/it/python.rs.

usage: anthropic_client.py BASE_URL
Every check runs against an OpenAI-compatible model (`gpt*`) and an Anthropic-dialect
one (`claude*`) behind Keel. Each check raises on failure; the last line printed is `ok`.
"""

import sys

import anthropic
from anthropic import Anthropic

base = sys.argv[1]
client = Anthropic(base_url=base, api_key="sk-unused", max_retries=0, timeout=30)
tools = [
    {
        "name": "get_weather",
        "description": "Current weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
ask = [{"role": "user", "content": "Weather in Paris?"}]

for text_model, tool_model in (("gpt", "gpt-tools"), ("claude", "claude-tools")):
    # Plain.
    m = client.messages.create(model=text_model, max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Say hello"}])
    assert m.type == "message" and m.role == "assistant" and m.model == text_model, m
    assert [b.text for b in m.content if b.type == "text"] == ["Hello world"], m.content
    assert m.stop_reason == "end_turn" and m.usage.output_tokens > 0, m

    # Streamed, with the SDK's accumulating helper.
    with client.messages.stream(model=text_model, max_tokens=100, messages=[{"role": "user", "content": "Say hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello world", text
    assert final.content[0].text == "Hello world" and final.stop_reason == "end_turn", final
    assert final.usage.output_tokens > 0, final.usage

    # tool_use, then the second turn with its tool_result.
    m = client.messages.create(model=tool_model, max_tokens=100, tools=tools, messages=ask)
    assert m.stop_reason == "tool_use", m
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}, use
    with client.messages.stream(model=tool_model, max_tokens=100, tools=tools, messages=ask) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.input == {"city": "Paris"} and final.stop_reason == "tool_use", final
    second = ask + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C, sunny"}]},
    ]
    m = client.messages.create(model=text_model, max_tokens=100, tools=tools, messages=second)
    assert m.content[0].text == "Hello world", m

# An upstream's 429 after Keel's retries: RateLimitError; a 400: BadRequestError with its message.
for limited, bad in (("gpt-limited", "gpt-bad"), ("claude-limited", "claude-bad")):
    try:
        client.messages.create(model=limited, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    except anthropic.RateLimitError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "rate_limit_error", e.body
        assert e.body["error"]["keel_class"] == "rate_limited", e.body
    else:
        raise AssertionError(f"{limited}: the 429 must surface")
    try:
        client.messages.create(model=bad, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    except anthropic.BadRequestError as e:
        assert e.body["error"]["message"] == "max_tokens is too large", e.body
    else:
        raise AssertionError(f"{bad}: the 400 must surface")

try:
    client.messages.create(model="nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
else:
    raise AssertionError("an unknown model must be NotFoundError")

print("ok")
