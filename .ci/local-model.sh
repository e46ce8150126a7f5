#!/usr/bin/env bash
# Run by .ci/run after the tests: a real local model (SmolLM2-135M-Instruct) behind
# `keel serve`, called by the official `openai` package (bench/local-model/run.sh).
# Uses the debug `keel` the tests just built (a release build would double CI's
# compile time; the model's latency dwarfs the difference), the venv of
# .ci/python.sh, and a download cache next to the build cache. About 30 s on a
# warm build cache, under a minute with the downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac

echo "== local model end to end (bench/local-model/run.sh)"
cargo build -q -p keel-cli
KEEL_BIN="$TARGET/debug/keel" \
  KEEL_LOCAL_MODEL_CACHE="${KEEL_LOCAL_MODEL_CACHE:-$TARGET/keel-ci-local-model}" \
  bench/local-model/run.sh
