#!/usr/bin/env bash
# keel.step against tenacity (+ pybreaker) on the success path, release wheel.
# usage: bench/python/run.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET="${CARGO_TARGET_DIR:-target}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac
VENV="$TARGET/keel-py-bench-venv"
[ -x "$VENV/bin/maturin" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q maturin tenacity pybreaker; }
rm -rf "$TARGET/keel-py-bench-wheels"
"$VENV/bin/maturin" build --release --quiet -m crates/keel-python/Cargo.toml -i "$VENV/bin/python" -o "$TARGET/keel-py-bench-wheels"
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$TARGET"/keel-py-bench-wheels/keel-*.whl
"$VENV/bin/python" bench/python/bench.py "${1:-200000}"
