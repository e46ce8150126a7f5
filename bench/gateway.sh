#!/usr/bin/env bash
# Load Keel's model gateway against the shared fake upstream, next to the upstream
# itself and a plain nginx hop, with ../shared/bench/run.sh; then measure the time to
# first token Keel adds to a stream.
#
# usage: bench/gateway.sh   (run.sh's env applies: CONNS, DURATION, ROUNDS, ...)
# env: SHARED_BENCH=../shared/bench  KEEL_ADDR=127.0.0.1:4000  TTFT_N=2000  APIS_N=2000
# Needs Debian's nginx and wrk (apt-get install -y nginx wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_BENCH="${SHARED_BENCH:-$(cd ../shared/bench && pwd)}"
KEEL_ADDR="${KEEL_ADDR:-127.0.0.1:4000}"
WORK="${TMPDIR:-/tmp}/keelbench/keel"
mkdir -p "$WORK"
rm -f "$WORK"/journal.db*

cargo build --release -q -p keel-gateway --bin keel-gateway-bench
BIN="${CARGO_TARGET_DIR:-target}/release/keel-gateway-bench"

# The fake upstream and the nginx hop, unless already running.
if ! curl -sf -o /dev/null -XPOST -H 'Content-Type: application/json' \
    --data @"$SHARED_BENCH/body.json" http://127.0.0.1:18080/v1/chat/completions; then
  "$SHARED_BENCH/start_upstream.sh" > /dev/null
fi

# Keel: every call and policy event journaled to SQLite through the batched writer.
"$BIN" serve bench/keel.toml "$KEEL_ADDR" "sqlite:$WORK/journal.db" > "$WORK/keel.log" 2>&1 &
KEEL_PID=$!
trap 'kill "$KEEL_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://$KEEL_ADDR/v1/models" && break
  kill -0 "$KEEL_PID" || { cat "$WORK/keel.log"; exit 1; }
  sleep 0.1
done

"$SHARED_BENCH/run.sh" "keel=http://$KEEL_ADDR"

echo "== time to first token (sequential streams, ${TTFT_N:-2000} each way)"
"$BIN" ttft "${TTFT_N:-2000}"

echo "== each inbound API through the gateway (sequential, ${APIS_N:-2000} each, whole and streamed)"
"$BIN" apis "${APIS_N:-2000}"
