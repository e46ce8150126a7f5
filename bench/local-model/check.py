"""The official `openai` client against Keel with a real local model behind it.

usage: python check.py BASE_URL API_KEY   (BASE_URL like http://127.0.0.1:PORT/v1)

Three calls, each asserted and timed: a plain completion on `smollm2`, a streamed
completion on `smollm2` (with usage), and a call to `primary-down`, a model whose
upstream is not listening, which Keel answers from its fallback `smollm2` without the
client noticing. Exits non-zero on the first failed assertion.
"""

import sys
import time

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


def report(name, ms, usage, model, extra=""):
    print(
        f"{name:<10} {ms:8.0f} ms  prompt {usage.prompt_tokens:>3} + completion "
        f"{usage.completion_tokens:>3} tokens  answered by {model}{extra}"
    )


def plain(model, expect_model, expect_fallback):
    t = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=64)
    ms = (time.perf_counter() - t) * 1000
    answer = raw.parse()
    text = answer.choices[0].message.content
    assert text and text.strip(), f"{model}: empty answer: {answer}"
    assert answer.usage is not None and answer.usage.completion_tokens > 0, f"{model}: no usage: {answer}"
    assert raw.headers.get("x-keel-model") == expect_model, f"x-keel-model: {raw.headers.get('x-keel-model')}"
    assert raw.headers.get("x-keel-fallback") == expect_fallback, f"x-keel-fallback: {raw.headers}"
    assert answer.choices[0].finish_reason in ("stop", "length"), answer
    return ms, answer.usage, raw.headers, text


def streamed():
    t = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers.get("x-keel-model") == "smollm2", f"x-keel-model: {raw.headers.get('x-keel-model')}"
    ttft, parts, usage, finish, chunks = None, [], None, None, 0
    for chunk in raw.parse():
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                if ttft is None:
                    ttft = (time.perf_counter() - t) * 1000
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    ms = (time.perf_counter() - t) * 1000
    text = "".join(parts)
    assert text.strip(), "streamed: empty answer"
    assert usage is not None and usage.completion_tokens > 0, "streamed: no usage chunk"
    assert finish in ("stop", "length"), f"streamed: finish_reason {finish}"
    return ms, ttft, usage, chunks, text


ms, usage, _, text = plain("smollm2", "smollm2", "false")
report("plain", ms, usage, "smollm2")
print(f"           {text!r}")

ms, ttft, usage, chunks, text = streamed()
report("streamed", ms, usage, "smollm2", f"  first token {ttft:.0f} ms, {chunks} chunks")
print(f"           {text!r}")

ms, usage, headers, text = plain("primary-down", "smollm2", "true")
report("fallback", ms, usage, headers.get("x-keel-model"), f"  attempts {headers.get('x-keel-attempts')}")
print(f"           {text!r}")
print("local model check: ok")
