// An OpenAI-compatible server for a small local coder model that cannot do OpenAI tool
// calling by itself, for bench/corrections/run.sh (the correction-economics benchmark).
//
// usage: node server.mjs MODEL.gguf [PORT]   (PORT 0 or absent: any free port)
// env: MODEL_ID=qwen2.5-coder-0.5b-instruct (the id /v1/models lists)  THREADS=2
//      CONTEXT=4096 (context size)  MAX_TOKENS=512 (when a request sets none)
//      REQUEST_LOG= a file to append every request to (JSON lines)
// Listens on 127.0.0.1 only and prints "listening on http://127.0.0.1:PORT" once the
// model is loaded. Runs in bench/local-model's node-llama-cpp install (run.sh copies it
// there: node resolves `node-llama-cpp` next to the script).
//
// What it does with POST /v1/chat/completions (non-streaming only):
// - A request that offers a tool named `code` is a code turn, wrapped the way a
//   tool-calling chat template wraps a model's output:
//   * the conversation is rendered for the model: a system prompt asking for one
//     ```python fenced program that sets `result` (plus the caller's system messages),
//     the user messages as they are, each earlier `code` call as the assistant's fenced
//     program, each tool answer as a user turn `<tool_response>…</tool_response>` (the
//     way Qwen2.5's own tool template renders tool messages);
//   * the answer is prefilled with "```python\n" and generation stops at the closing
//     fence, so the model writes exactly one program;
//   * that program is returned as a `code` tool call with arguments {"program": …}
//     (finish_reason "tool_calls"), whatever it is — a half-written or nonsensical
//     program goes to the tool like any other and fails there.
//   * If the last message is a tool answer that is not an error (Keel's failed calls
//     are answered with {"error": …}), the task is done: the server answers with a
//     short text quoting the result, without calling the model (usage 0 tokens — the
//     model wrote nothing).
// - Any other request is plain chat.
// `usage` is the model's real token count: the whole prompt, as an API bills it, and the
// tokens generated. The context is kept between requests and its longest common prefix
// reused (only the rest is evaluated — faster on 2 cores); the reused part is reported
// as `prompt_tokens_details.cached_tokens`, and still counts in `prompt_tokens`.
// `temperature` is honoured; absent, decoding is greedy (0), so the first program of a
// task is the same whatever correction strategy follows. `seed` is honoured when given.
// Requests are answered one at a time (one context sequence); others wait in line.

import http from "node:http";
import { randomUUID } from "node:crypto";
import { appendFile } from "node:fs/promises";
import { getLlama, LlamaChat } from "node-llama-cpp";

const [modelPath, portArg] = process.argv.slice(2);
if (!modelPath) {
  console.error("usage: node server.mjs MODEL.gguf [PORT]");
  process.exit(2);
}
const modelId = process.env.MODEL_ID || "qwen2.5-coder-0.5b-instruct";
const threads = Number(process.env.THREADS || 2);
const contextSize = Number(process.env.CONTEXT || 4096);
const defaultMaxTokens = Number(process.env.MAX_TOKENS || 512);

const CODE_SYSTEM =
  "You are an expert Python programmer. Reply with exactly one ```python fenced code block: " +
  "a complete, self-contained Python 3 program (standard library only, no input, no printing " +
  "needed) that assigns the final answer to a variable named `result`. The program is run by " +
  "the `code` tool and `result` is checked. No explanations.";
const FENCE = "```python\n";

const llama = await getLlama({ gpu: false, build: "never", maxThreads: threads });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize, threads });
const sequence = context.getSequence();
const chat = new LlamaChat({ contextSequence: sequence });

let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => {});
  return run;
}

function textOf(m) {
  return typeof m.content === "string"
    ? m.content
    : (m.content || []).filter((p) => p.type === "text").map((p) => p.text).join("");
}

// The `program` of an assistant message's `code` calls, fenced.
function programsOf(m) {
  return (m.tool_calls || [])
    .filter((c) => c.function?.name === "code")
    .map((c) => {
      try {
        return JSON.parse(c.function.arguments).program ?? c.function.arguments;
      } catch {
        return c.function.arguments;
      }
    })
    .map((p) => `${FENCE}${String(p).trimEnd()}\n\`\`\``);
}

// The conversation as node-llama-cpp's chat history; consecutive user turns merged.
function history(messages, { code }) {
  const items = [];
  const system = messages.filter((m) => m.role === "system" || m.role === "developer").map(textOf);
  if (code) system.unshift(CODE_SYSTEM);
  if (system.length) items.push({ type: "system", text: system.join("\n\n") });
  const user = (text) => {
    const last = items[items.length - 1];
    if (last?.type === "user") last.text += `\n${text}`;
    else items.push({ type: "user", text });
  };
  for (const m of messages) {
    if (m.role === "system" || m.role === "developer") continue;
    if (m.role === "assistant") {
      const parts = [textOf(m), ...programsOf(m)].filter((t) => t && t.trim());
      items.push({ type: "model", response: [parts.join("\n")] });
    } else if (m.role === "tool") {
      user(`<tool_response>\n${textOf(m)}\n</tool_response>`);
    } else {
      user(textOf(m));
    }
  }
  return items;
}

async function generate(req, { code }) {
  // The sequence keeps what the last request evaluated: node-llama-cpp reuses the
  // longest common prefix (the system prompt, the task, earlier exchanges of the same
  // run) and evaluates only the rest.
  const before = sequence.tokenMeter.getState();
  const items = history(req.messages, { code });
  items.push({ type: "model", response: code ? [FENCE] : [] });
  const res = await chat.generateResponse(items, {
    maxTokens: req.max_completion_tokens ?? req.max_tokens ?? defaultMaxTokens,
    temperature: req.temperature ?? 0,
    ...(req.seed !== undefined ? { seed: req.seed } : {}),
    ...(code ? { customStopTriggers: ["```"] } : {}),
  });
  const after = sequence.tokenMeter.getState();
  const evaluated = after.usedInputTokens - before.usedInputTokens;
  const completion = after.usedOutputTokens - before.usedOutputTokens;
  // The whole prompt, as an API bills it: what the context holds now, less what was
  // generated; the part reused from the last request is reported as cached.
  const prompt = Math.max(sequence.contextTokens.length - completion, evaluated);
  return {
    text: res.response,
    truncated: res.metadata.stopReason === "maxTokens",
    usage: {
      prompt_tokens: prompt,
      completion_tokens: completion,
      total_tokens: prompt + completion,
      prompt_tokens_details: { cached_tokens: prompt - evaluated },
    },
  };
}

// A tool answer that is not Keel's `{"error": …}`: the program ran and passed.
function succeeded(m) {
  if (m?.role !== "tool") return false;
  try {
    const v = JSON.parse(textOf(m));
    return !(v && typeof v === "object" && "error" in v);
  } catch {
    return true;
  }
}

function resultOf(m) {
  try {
    const v = JSON.parse(textOf(m));
    return JSON.stringify(v?.json?.result ?? v?.json ?? v);
  } catch {
    return textOf(m);
  }
}

function send(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
  res.end(data);
}

function error(res, status, message, type = "invalid_request_error") {
  send(res, status, { error: { message, type, param: null, code: null } });
}

// REQUEST_LOG=FILE: every request's messages and temperature appended as one JSON line
// (what the model was shown: Keel's gateway journals prompts only as digests).
const requestLog = process.env.REQUEST_LOG;

let served = 0;
async function completions(res, body) {
  if (!Array.isArray(body.messages) || body.messages.length === 0) {
    return error(res, 400, "messages must be a non-empty array");
  }
  if (body.stream) return error(res, 400, "this server does not stream");
  const base = {
    id: `chatcmpl-${randomUUID()}`,
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model: body.model || modelId,
    system_fingerprint: null,
  };
  const reply = (message, finish, usage) =>
    send(res, 200, {
      ...base,
      choices: [{ index: 0, message: { refusal: null, ...message }, logprobs: null, finish_reason: finish }],
      usage,
    });
  const code = (body.tools || []).some((t) => t.function?.name === "code");
  const n = ++served;
  if (requestLog) {
    const line = { n, temperature: body.temperature ?? null, code, messages: body.messages };
    await appendFile(requestLog, JSON.stringify(line) + "\n");
  }
  const t0 = Date.now();
  const last = body.messages[body.messages.length - 1];
  if (code && succeeded(last)) {
    console.log(`#${n} done: the last program passed; answered without the model`);
    return reply(
      { role: "assistant", content: `Done: the program passed its check; result = ${resultOf(last)}` },
      "stop",
      { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 },
    );
  }
  const out = await serialized(() => generate(body, { code }));
  const secs = ((Date.now() - t0) / 1000).toFixed(1);
  console.log(
    `#${n} ${code ? "code" : "chat"} t=${body.temperature ?? 0} prompt=${out.usage.prompt_tokens} ` +
      `(cached ${out.usage.prompt_tokens_details.cached_tokens}) ` +
      `completion=${out.usage.completion_tokens}${out.truncated ? " TRUNCATED" : ""} ${secs}s`,
  );
  if (!code) {
    return reply({ role: "assistant", content: out.text }, out.truncated ? "length" : "stop", out.usage);
  }
  const program = out.text.replace(/```\s*$/, "").trimEnd() + "\n";
  const call = {
    id: `call_${randomUUID().replaceAll("-", "").slice(0, 24)}`,
    type: "function",
    function: { name: "code", arguments: JSON.stringify({ program }) },
  };
  return reply({ role: "assistant", content: null, tool_calls: [call] }, "tool_calls", out.usage);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", async () => {
    try {
      if (req.method === "GET" && req.url === "/v1/models") {
        return send(res, 200, { object: "list", data: [{ id: modelId, object: "model", created: 0, owned_by: "local" }] });
      }
      if (req.method === "POST" && req.url === "/v1/chat/completions") {
        let body;
        try {
          body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        } catch {
          return error(res, 400, "request body is not JSON");
        }
        return await completions(res, body);
      }
      error(res, 404, `no route for ${req.method} ${req.url}`);
    } catch (e) {
      console.error(`error: ${e?.stack || e}`);
      if (!res.headersSent) error(res, 500, String(e), "server_error");
      else res.end();
    }
  });
});

server.listen(Number(portArg || 0), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
