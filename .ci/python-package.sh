#!/usr/bin/env bash
# The `keel` Python package (crates/keel-python): built as an abi3 wheel with maturin,
# installed into a fresh venv, tested with pytest. Run by scripts/test.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac
TOOLS="$TARGET/keel-py-build-venv"   # maturin, reused between runs
if [ ! -x "$TOOLS/bin/maturin" ]; then
  echo "== maturin in $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.5,<2"
fi
WHEELS="$TARGET/keel-py-wheels"
rm -rf "$WHEELS"
echo "== maturin build (crates/keel-python)"
"$TOOLS/bin/maturin" build --quiet -m crates/keel-python/Cargo.toml -i "$TOOLS/bin/python" -o "$WHEELS"
# A fresh venv for the wheel, as a user's would be.
FRESH="$TARGET/keel-py-fresh-venv"
rm -rf "$FRESH"
python3 -m venv "$FRESH"
"$FRESH/bin/pip" install --quiet --disable-pip-version-check "$WHEELS"/keel-*.whl pytest
# The approval test decides from the real CLI (built by cargo test before this).
export KEEL_BIN="${KEEL_BIN:-$TARGET/debug/keel}"
echo "== pytest crates/keel-python/tests"
"$FRESH/bin/python" -m pytest -q -p no:cacheprovider crates/keel-python/tests
