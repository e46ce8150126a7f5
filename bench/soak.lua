-- wrk script for bench/soak.sh: the shared chat body (../shared/bench/body.json or
-- $BODY_FILE) at a steady rate. Each connection waits DELAY_MS after every response,
-- so the rate is about connections × 1000 / (DELAY_MS + latency).
local f = assert(io.open(os.getenv("BODY_FILE"), "r"))
local body = f:read("*a"):gsub("%s+$", "")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local delay_ms = tonumber(os.getenv("DELAY_MS") or "50")
delay = function() return delay_ms end

done = function(summary, latency, requests)
  local s = summary
  io.write(string.format(
    "SOAK reqs=%d dur_s=%.1f rps=%.1f non2xx=%d errs=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
    s.requests, s.duration / 1e6, s.requests / (s.duration / 1e6), s.errors.status,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
