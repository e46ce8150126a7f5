#!/usr/bin/env bash
# Soak Keel's model gateway: a steady request rate for a long time, sampling the
# gateway's resident memory, to show whether it plateaus.
#
# Same gateway, config and journal as bench/gateway.sh (keel-gateway-bench serving
# bench/keel.toml, every call journaled to SQLite), against the shared fake upstream
# (nginx on 127.0.0.1:18080, started unless running). wrk drives CONNS connections,
# each pausing DELAY_MS after every response (bench/soak.lua), i.e. a steady
# ~CONNS*1000/DELAY_MS req/s. VmRSS is read from /proc/PID/status every SAMPLE_S
# seconds into rss.csv; at the end the script prints RSS at start, the plateau,
# growth per minute over the last 20 minutes (least-squares fit), requests and errors.
#
# usage: bench/soak.sh
# env: MINUTES=30  CONNS=20  DELAY_MS=50 (≈400 req/s)  SAMPLE_S=10
#      KEEL_ADDR=127.0.0.1:4200  SHARED_BENCH=../shared/bench
#      OUT=${TMPDIR:-/tmp}/keelbench/soak-<timestamp>
# Needs Debian's nginx and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_BENCH="${SHARED_BENCH:-$(cd ../shared/bench && pwd)}"
MINUTES="${MINUTES:-30}"; CONNS="${CONNS:-20}"; DELAY_MS="${DELAY_MS:-50}"; SAMPLE_S="${SAMPLE_S:-10}"
KEEL_ADDR="${KEEL_ADDR:-127.0.0.1:4200}"
OUT="${OUT:-${TMPDIR:-/tmp}/keelbench/soak-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

cargo build --release -q -p keel-gateway --bin keel-gateway-bench
BIN="${CARGO_TARGET_DIR:-target}/release/keel-gateway-bench"
cp "$BIN" "$OUT/keel-gateway-bench"  # others rebuild target/ meanwhile; soak a fixed binary

if ! curl -sf -o /dev/null -XPOST -H 'Content-Type: application/json' \
    --data @"$SHARED_BENCH/body.json" http://127.0.0.1:18080/v1/chat/completions; then
  "$SHARED_BENCH/start_upstream.sh" > /dev/null
fi

"$OUT/keel-gateway-bench" serve bench/keel.toml "$KEEL_ADDR" "sqlite:$OUT/journal.db" > "$OUT/keel.log" 2>&1 &
KEEL_PID=$!
SAMPLER_PID=
trap 'kill "$KEEL_PID" ${SAMPLER_PID:+"$SAMPLER_PID"} 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://$KEEL_ADDR/v1/models" && break
  kill -0 "$KEEL_PID" || { cat "$OUT/keel.log"; exit 1; }
  sleep 0.1
done

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$KEEL_PID/status"; }
echo "t_s,rss_kb" > "$OUT/rss.csv"
T0=$(date +%s)
echo "0,$(rss_kb)" >> "$OUT/rss.csv"  # idle, before any load
(
  while kill -0 "$KEEL_PID" 2>/dev/null; do
    sleep "$SAMPLE_S"
    echo "$(( $(date +%s) - T0 )),$(rss_kb)" >> "$OUT/rss.csv"
  done
) &
SAMPLER_PID=$!

echo "soak: $MINUTES min, $CONNS connections, ${DELAY_MS} ms pause (~$((CONNS * 1000 / DELAY_MS)) req/s), pid $KEEL_PID, out $OUT"
BODY_FILE="$SHARED_BENCH/body.json" DELAY_MS="$DELAY_MS" \
  wrk -t1 -c"$CONNS" -d"${MINUTES}m" --timeout 10s -s bench/soak.lua \
  "http://$KEEL_ADDR/v1/chat/completions" | tee "$OUT/wrk.txt"
sleep "$SAMPLE_S"
echo "$(( $(date +%s) - T0 )),$(rss_kb)" >> "$OUT/rss.csv"  # after the load stopped

JOURNALED=$(sqlite3 "$OUT/journal.db" 'select count(*) from steps' 2>/dev/null || echo "?")
python3 - "$OUT/rss.csv" "$MINUTES" "$JOURNALED" <<'PY'
import csv, sys
rows = [(int(r["t_s"]), int(r["rss_kb"])) for r in csv.DictReader(open(sys.argv[1])) if r["rss_kb"]]
minutes, journaled = float(sys.argv[2]), sys.argv[3]
load = [r for r in rows if 0 < r[0] <= minutes * 60]
mb = lambda kb: kb / 1024
idle = rows[0][1]
first = load[0][1]
last20 = [r for r in load if r[0] >= (minutes - 20) * 60] or load
n = len(last20)
mx = sum(t for t, _ in last20) / n; my = sum(v for _, v in last20) / n
sxx = sum((t - mx) ** 2 for t, _ in last20)
slope = sum((t - mx) * (v - my) for t, v in last20) / sxx if sxx else 0.0  # kB per s
plateau = sorted(v for _, v in last20)[n // 2]
print(f"RSS idle (before load)     {mb(idle):8.1f} MB")
print(f"RSS start (first sample)   {mb(first):8.1f} MB")
print(f"RSS plateau (median, last 20 min) {mb(plateau):8.1f} MB  (min {mb(min(v for _, v in last20)):.1f}, max {mb(max(v for _, v in last20)):.1f})")
print(f"RSS max under load         {mb(max(v for _, v in load)):8.1f} MB")
print(f"growth, last 20 min (fit)  {slope * 60:+8.1f} kB/min  ({n} samples)")
print(f"RSS after load stopped     {mb(rows[-1][1]):8.1f} MB")
print(f"journal step rows          {journaled}")
PY
