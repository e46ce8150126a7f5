#!/usr/bin/env bash
# Load `POST /api/tools/{name}/invoke` of `keel serve` (bench/serve.toml: one read-only
# http tool on the shared fake upstream) next to the same load sent straight to the
# upstream, alternating the two inside every step so machine drift hits both alike.
# Each invocation is a journaled one-step run (SQLite in a temp dir).
#
# usage: bench/serve.sh
# env: CONNS="1 50"  DURATION=10  WARMUP=3  ROUNDS=2  SHARED_BENCH=../shared/bench
#      KEEL_BIN (another build of keel, e.g. the commit before a change), KEEL_BENCH_DB
# Needs Debian's nginx and wrk (apt-get install -y nginx wrk). Prints a markdown table
# (median over rounds); raw wrk logs under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_BENCH="${SHARED_BENCH:-$(cd ../shared/bench && pwd)}"
CONNS="${CONNS:-1 50}"; DURATION="${DURATION:-10}"; WARMUP="${WARMUP:-3}"; ROUNDS="${ROUNDS:-2}"
UPSTREAM="http://127.0.0.1:18080/v1/chat/completions"
KEEL="http://127.0.0.1:4100/api/tools/complete/invoke"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/keel-serve-bench.XXXXXX")"
OUT="${OUT:-$WORK}"
mkdir -p "$OUT"

if [ -z "${KEEL_BIN:-}" ]; then cargo build --release -q -p keel-cli; fi
BIN="${KEEL_BIN:-${CARGO_TARGET_DIR:-target}/release/keel}"

# The fake upstream, unless already running (then it is left running).
NGINX_PIDFILE=""
if ! curl -sf -o /dev/null -XPOST -H 'Content-Type: application/json' \
    --data @"$SHARED_BENCH/body.json" "$UPSTREAM"; then
  PREFIX="$WORK/nginx" "$SHARED_BENCH/start_upstream.sh" > /dev/null
  NGINX_PIDFILE="$WORK/nginx/nginx.pid"
fi

export KEEL_BENCH_KEY="bench-key-$RANDOM$RANDOM$RANDOM"
# KEEL_BENCH_DB=postgres://... measures the PostgreSQL journal instead.
export KEEL_BENCH_DB="${KEEL_BENCH_DB:-sqlite://$WORK/keel.db}"
"$BIN" --config bench/serve.toml serve > "$WORK/keel.log" 2>&1 &
KEEL_PID=$!
cleanup() {
  kill "$KEEL_PID" 2>/dev/null || true
  if [ -n "$NGINX_PIDFILE" ]; then kill "$(cat "$NGINX_PIDFILE")" 2>/dev/null || true; fi
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf -o /dev/null http://127.0.0.1:4100/healthz && break
  kill -0 "$KEEL_PID" || { cat "$WORK/keel.log"; exit 1; }
  sleep 0.1
done

# Keel's request body: the upstream's body as the tool's parameters.
printf '{"params":%s}' "$(cat "$SHARED_BENCH/body.json")" > "$WORK/invoke.json"
code=$(curl -s -o "$WORK/check.json" -w '%{http_code}' -XPOST -H 'Content-Type: application/json' \
  -H "Idempotency-Key: check-$RANDOM$RANDOM" \
  -H "Authorization: Bearer $KEEL_BENCH_KEY" --data @"$WORK/invoke.json" "$KEEL")
[ "$code" = 200 ] || { echo "keel answered HTTP $code: $(cat "$WORK/check.json")" >&2; exit 1; }

load() {  # $1 conns, $2 seconds, $3 target, $4 log
  local body="$SHARED_BENCH/body.json" url="$UPSTREAM" auth=""
  if [ "$3" = keel ]; then body="$WORK/invoke.json"; url="$KEEL"; auth="$KEEL_BENCH_KEY"; fi
  local script="$SHARED_BENCH/chat.lua"
  # Keel's calls each carry a fresh Idempotency-Key, as an agent's new calls do.
  if [ "$3" = keel ]; then script="bench/invoke.lua"; fi
  BODY_FILE="$body" AUTH="$auth" MODEL="" SHARED_BENCH="$SHARED_BENCH" KEY_PREFIX="k$RANDOM$RANDOM-$1-$3" \
    wrk -t1 -c"$1" -d"${2}s" --timeout 10s --latency -s "$script" "$url" > "$4" 2>&1
}

echo "# $(date -Is) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(wrk -v 2>&1 | head -1)"
echo "round,conns,target,rps,p50_ms,p99_ms,non2xx,errors" > "$OUT/results.csv"
for r in $(seq "$ROUNDS"); do
  for c in $CONNS; do
    for t in direct keel; do
      load "$c" "$WARMUP" "$t" /dev/null
      load "$c" "$DURATION" "$t" "$OUT/r$r-c$c-$t.txt"
      line=$(grep KEELBENCH "$OUT/r$r-c$c-$t.txt")
      kv() { echo "$line" | tr ' ' '\n' | grep "^$1=" | cut -d= -f2; }
      echo "$r,$c,$t,$(kv rps),$(kv p50_ms),$(kv p99_ms),$(kv non2xx),$(kv errs)" | tee -a "$OUT/results.csv"
    done
  done
done

python3 - "$OUT/results.csv" <<'PY'
import csv, sys, statistics as st
rows = list(csv.DictReader(open(sys.argv[1])))
med = lambda c, t, f: st.median(float(r[f]) for r in rows if int(r["conns"]) == c and r["target"] == t)
bad = lambda c, t: sum(int(r["non2xx"]) + int(r["errors"]) for r in rows if int(r["conns"]) == c and r["target"] == t)
print("| load | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | non-2xx/errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for c in sorted({int(r["conns"]) for r in rows}):
    for t in ("direct", "keel"):
        add = lambda f: "" if t == "direct" else "%+.2f" % (med(c, t, f) - med(c, "direct", f))
        print("| %d conn | %s | %.0f | %.2f | %.2f | %s | %s | %d |" % (
            c, "direct to upstream" if t == "direct" else "keel serve invoke", med(c, t, "rps"),
            med(c, t, "p50_ms"), med(c, t, "p99_ms"), add("p50_ms"), add("p99_ms"), bad(c, t)))
PY
echo "runs journaled: $(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from runs').fetchone()[0])" "$WORK/keel.db" 2>/dev/null || echo '?')"
echo "results: $OUT"
