"""The official `openai` package's Responses, embeddings and models APIs against Keel:
run by tests/it/python.rs.

usage: responses.py BASE_URL
Each check raises on failure; the last line printed is `ok`.
"""

import json
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="sk-unused", max_retries=0, timeout=30)

# Plain, stateless (as Codex sends it).
r = client.responses.create(model="gpt", input="Say hello", instructions="Be brief.", store=False)
assert r.status == "completed", r
assert r.output_text == "Hello world", r
assert r.model == "gpt", r.model
assert r.usage.input_tokens == 10 and r.usage.output_tokens == 2 and r.usage.total_tokens == 12, r.usage

# Streamed: every event typed by the SDK, numbered, text once.
events = list(client.responses.create(model="gpt", input="Say hello", store=False, stream=True))
kinds = [e.type for e in events]
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert [e.sequence_number for e in events] == list(range(len(events))), events
assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world", kinds
assert events[-1].response.usage.output_tokens == 2, events[-1]

# The SDK's accumulating helper checks every item's identity from added to done.
with client.responses.stream(model="gpt", input="Say hello", store=False) as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert text == "Hello world" and final.output_text == "Hello world", final

# A function tool, whole and streamed, then the second turn with its output.
tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
ask = [{"role": "user", "content": "Weather in Paris?"}]
r = client.responses.create(model="tools", input=ask, tools=tools, tool_choice="auto", store=False, max_output_tokens=50)
call = r.output[0]
assert call.type == "function_call" and call.name == "get_weather", r.output
assert json.loads(call.arguments) == {"city": "Paris"}, call

with client.responses.stream(model="tools", input=ask, tools=tools, store=False) as stream:
    args = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
    final = stream.get_final_response()
assert json.loads(args) == {"city": "Paris"}, args
streamed_call = final.output[0]
assert streamed_call.type == "function_call" and streamed_call.call_id == call.call_id, final.output

second = ask + [
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"},
]
r = client.responses.create(model="gpt", input=second, tools=tools, store=False)
assert r.output_text == "Hello world", r

# State Keel does not keep is refused, in words.
try:
    client.responses.create(model="gpt", input="hi", previous_response_id="resp_123")
except openai.BadRequestError as e:
    assert "stateless" in e.body["message"], e.body
else:
    raise AssertionError("previous_response_id must be refused")

# An upstream's 429, retried by Keel, then the SDK's RateLimitError; a 400 with its message.
try:
    client.responses.create(model="limited", input="hi", store=False)
except openai.RateLimitError as e:
    assert e.body["keel_class"] == "rate_limited", e.body
    assert e.body["message"].startswith("slow down"), e.body
else:
    raise AssertionError("the 429 must surface")
try:
    client.responses.create(model="bad", input="hi", store=False)
except openai.BadRequestError as e:
    assert e.body["message"] == "temperature is out of range", e.body
else:
    raise AssertionError("the 400 must surface")

# Embeddings, through the model's policies.
emb = client.embeddings.create(model="embed", input=["a", "b"])
assert len(emb.data) == 2 and emb.data[0].embedding == [0.1, 0.2, 0.3], emb
assert emb.model == "embed" and emb.usage.prompt_tokens == 8, emb

# Models: found, and not found.
m = client.models.retrieve("gpt")
assert m.id == "gpt" and m.object == "model", m
try:
    client.models.retrieve("nope")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
else:
    raise AssertionError("an unknown model must be NotFoundError")

print("ok")
