#!/usr/bin/env bash
# Load the real `keel serve` on its model-gateway path (/v1/chat/completions, API key,
# per-key limiter, request log, every call journaled to SQLite) against the shared fake
# upstream, next to the upstream itself, a plain nginx hop and — for where the time
# goes — the gateway's router alone (`keel-gateway-bench serve`), with
# ../shared/bench/run.sh in one run; then the time to first token Keel adds to a stream
# and each inbound API.
#
# usage: bench/gateway.sh   (run.sh's env applies: CONNS, DURATION, ROUNDS, ...)
# env: SHARED_BENCH=../shared/bench  ROUTER=1 (also load the router alone)  TTFT_N=2000  APIS_N=2000
# Needs Debian's nginx and wrk (apt-get install -y nginx wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_BENCH="${SHARED_BENCH:-$(cd ../shared/bench && pwd)}"
ROUTER="${ROUTER:-1}"
WORK="${TMPDIR:-/tmp}/keelbench/keel"
mkdir -p "$WORK"
rm -f "$WORK"/journal.db* "$WORK"/router.db*

cargo build --release -q -p keel-cli -p keel-gateway --bin keel --bin keel-gateway-bench
KEEL="${CARGO_TARGET_DIR:-target}/release/keel"
BIN="${CARGO_TARGET_DIR:-target}/release/keel-gateway-bench"

# The fake upstream and the nginx hop, unless already running.
if ! curl -sf -o /dev/null -XPOST -H 'Content-Type: application/json' \
    --data @"$SHARED_BENCH/body.json" http://127.0.0.1:18080/v1/chat/completions; then
  "$SHARED_BENCH/start_upstream.sh" > /dev/null
fi

# keel serve, the product: its key is sent to every target (nginx ignores it).
export KEEL_BENCH_KEY="bench-key-$RANDOM$RANDOM$RANDOM"
export KEEL_BENCH_DB="sqlite://$WORK/journal.db"
"$KEEL" --config bench/gateway-serve.toml serve > "$WORK/keel.log" 2>&1 &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
TARGETS=("keel-serve=http://127.0.0.1:4000")
if [ "$ROUTER" = 1 ]; then
  # The gateway's router alone (no auth, limiter, log or server middleware).
  "$BIN" serve bench/keel.toml 127.0.0.1:4001 "sqlite:$WORK/router.db" > "$WORK/router.log" 2>&1 &
  PIDS+=($!)
  TARGETS+=("router-alone=http://127.0.0.1:4001")
fi
for url in http://127.0.0.1:4000 http://127.0.0.1:4001; do
  [ "$url" = http://127.0.0.1:4001 ] && [ "$ROUTER" != 1 ] && continue
  for _ in $(seq 100); do
    curl -sf -o /dev/null -H "Authorization: Bearer $KEEL_BENCH_KEY" "$url/v1/models" && break
    sleep 0.1
  done
  curl -sf -o /dev/null -H "Authorization: Bearer $KEEL_BENCH_KEY" "$url/v1/models" \
    || { cat "$WORK"/*.log; exit 1; }
done

AUTH="$KEEL_BENCH_KEY" "$SHARED_BENCH/run.sh" "${TARGETS[@]}"

echo "== time to first token (sequential streams, ${TTFT_N:-2000} each way)"
"$BIN" ttft "${TTFT_N:-2000}"

echo "== each inbound API through the gateway (sequential, ${APIS_N:-2000} each, whole and streamed)"
"$BIN" apis "${APIS_N:-2000}"
