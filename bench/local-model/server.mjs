// A small OpenAI-compatible server for a local GGUF model on node-llama-cpp, so that
// bench/local-model/run.sh can put a real model behind Keel's gateway.
//
// usage: node server.mjs MODEL.gguf [PORT]   (PORT 0 or absent: any free port)
// env: MODEL_ID=smollm2-135m-instruct (the id /v1/models lists)  THREADS=1
// Listens on 127.0.0.1 only and prints "listening on http://127.0.0.1:PORT" once the
// model is loaded.
//
// Serves what the gateway needs of the OpenAI API and nothing more:
//   GET  /v1/models
//   POST /v1/chat/completions   non-streaming, and SSE with "stream": true
//        (chat.completion / chat.completion.chunk shapes, finish_reason "stop" or
//        "length", usage; with stream_options.include_usage a final usage chunk).
// Requests are answered one at a time (one context sequence, cleared between
// requests); others wait in line. No tools, no response_format.

import http from "node:http";
import { randomUUID } from "node:crypto";
import { getLlama, LlamaChat } from "node-llama-cpp";

const [modelPath, portArg] = process.argv.slice(2);
if (!modelPath) {
  console.error("usage: node server.mjs MODEL.gguf [PORT]");
  process.exit(2);
}
const modelId = process.env.MODEL_ID || "smollm2-135m-instruct";

// One thread by default: on a small shared machine llama.cpp's threads spin at every
// barrier, and a descheduled one stalls the rest (measured here: 2 threads on 2 busy
// cores were 2-10x slower than 1).
const threads = Number(process.env.THREADS || 1);
const llama = await getLlama({ gpu: false, maxThreads: threads });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize: 2048, threads });
const sequence = context.getSequence();
const chat = new LlamaChat({ contextSequence: sequence });

// One request at a time on the single sequence.
let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => {});
  return run;
}

function history(messages) {
  const items = [];
  for (const m of messages) {
    const text = typeof m.content === "string"
      ? m.content
      : (m.content || []).filter((p) => p.type === "text").map((p) => p.text).join("");
    if (m.role === "system" || m.role === "developer") items.push({ type: "system", text });
    else if (m.role === "assistant") items.push({ type: "model", response: [text] });
    else items.push({ type: "user", text });
  }
  items.push({ type: "model", response: [] }); // the answer to generate
  return items;
}

async function generate(req, onText) {
  await sequence.clearHistory();
  const before = sequence.tokenMeter.getState();
  const maxTokens = req.max_completion_tokens ?? req.max_tokens ?? 256;
  const res = await chat.generateResponse(history(req.messages || []), {
    maxTokens,
    temperature: req.temperature ?? 0,
    onTextChunk: onText,
  });
  const after = sequence.tokenMeter.getState();
  const prompt = after.usedInputTokens - before.usedInputTokens;
  const completion = after.usedOutputTokens - before.usedOutputTokens;
  return {
    text: res.response,
    finish: res.metadata.stopReason === "maxTokens" ? "length" : "stop",
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
  };
}

function send(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
  res.end(data);
}

function error(res, status, message, type = "invalid_request_error") {
  send(res, status, { error: { message, type, param: null, code: null } });
}

async function completions(req, res, body) {
  if (!Array.isArray(body.messages) || body.messages.length === 0) {
    return error(res, 400, "messages must be a non-empty array");
  }
  const id = `chatcmpl-${randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const base = { id, created, model: body.model || modelId, system_fingerprint: null };

  if (!body.stream) {
    const out = await serialized(() => generate(body));
    return send(res, 200, {
      ...base,
      object: "chat.completion",
      choices: [{
        index: 0,
        message: { role: "assistant", content: out.text, refusal: null },
        logprobs: null,
        finish_reason: out.finish,
      }],
      usage: out.usage,
    });
  }

  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive" });
  res.socket?.setNoDelay(true);
  const chunk = (choices, extra = {}) =>
    res.write(`data: ${JSON.stringify({ ...base, object: "chat.completion.chunk", choices, ...extra })}\n\n`);
  const delta = (d, finish = null) => chunk([{ index: 0, delta: d, logprobs: null, finish_reason: finish }]);
  try {
    const out = await serialized(() => {
      delta({ role: "assistant", content: "" });
      return generate(body, (text) => delta({ content: text }));
    });
    delta({}, out.finish);
    if (body.stream_options?.include_usage) chunk([], { usage: out.usage });
    res.end("data: [DONE]\n\n");
  } catch (e) {
    res.end(`data: ${JSON.stringify({ error: { message: String(e), type: "server_error" } })}\n\n`);
  }
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
        return await completions(req, res, body);
      }
      error(res, 404, `no route for ${req.method} ${req.url}`);
    } catch (e) {
      if (!res.headersSent) error(res, 500, String(e), "server_error");
      else res.end();
    }
  });
});

server.listen(Number(portArg || 0), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
