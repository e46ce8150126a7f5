#!/usr/bin/env bash
# Added latency of an MCP tools/call through the real `keel serve` (release build):
# the upstream is bench's Python MCP server (keel-testkit/python/mcp_upstream.py) on
# streamable HTTP; Keel proxies it as `[mcp_servers.up]`; the official `mcp` client
# calls `lookup` straight and `up_lookup` through Keel, alternating rounds.
#   bench/mcp/run.sh [N] [ROUNDS]     (KEEL_TEST_PYTHON: a python with `mcp`)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${KEEL_TEST_PYTHON:?set KEEL_TEST_PYTHON (source .ci/python.sh)}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p keel-cli
KEEL="$TARGET/release/keel"
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
UP=18931 KP=18932
STATE_DIR="$dir" "$PY" crates/keel-testkit/python/mcp_upstream.py --http $UP >"$dir/up.log" 2>&1 &
cat >"$dir/keel.toml" <<TOML
[storage]
url = "sqlite://$dir/keel.db"
[server]
keys = [{ name = "bench", key_env = "KEEL_BENCH_KEY", role = "agent" }]
rate_limit = { per_second = 1000000, burst = 1000000 }
[mcp_servers.up]
url = "http://127.0.0.1:$UP/mcp"
TOML
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$UP) 2>/dev/null && break; sleep 0.1; done
export KEEL_BENCH_KEY=bench-key-0123456789
RUST_LOG=warn "$KEEL" --config "$dir/keel.toml" serve --listen 127.0.0.1:$KP >"$dir/keel.log" 2>&1 &
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$KP) 2>/dev/null && break; sleep 0.1; done
"$PY" bench/mcp/bench.py "http://127.0.0.1:$UP/mcp" "http://127.0.0.1:$KP/mcp" "$KEEL_BENCH_KEY" "${1:-500}" "${2:-3}"
