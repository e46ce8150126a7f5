-- wrk script for durable invocations: the shared chat.lua (body, auth, the KEELBENCH
-- summary line), plus a fresh `Idempotency-Key` on every request, as an agent sends
-- for each new call (a call without a key that repeats the same arguments is refused
-- by the caller's loop guard; a repeated key is answered from its first run).
-- env: SHARED_BENCH (the folder of chat.lua), KEY_PREFIX (unique per run).
dofile((os.getenv("SHARED_BENCH") or "../shared/bench") .. "/chat.lua")
local prefix = os.getenv("KEY_PREFIX") or tostring(os.time())
local n = 0
local thread_id = 0
setup = function(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = string.format("%s-%s-%d", prefix, tostring(tid or 0), n)
  return wrk.format()
end
