# Sourced by .ci/run: a venv with the official `openai`, `anthropic` (pinned) and `mcp`
# packages from PyPI, for the gateway's real-client tests
# (crates/keel-gateway/tests/it/python.rs) and the MCP one (crates/keel-cli/tests/it/mcp.rs).
# Exports
# KEEL_TEST_PYTHON. The venv is kept next to the build cache and reused.
KEEL_PY_VENV="${CARGO_TARGET_DIR:-target}/keel-ci-openai-venv"
case "$KEEL_PY_VENV" in /*) ;; *) KEEL_PY_VENV="$PWD/$KEEL_PY_VENV" ;; esac
# Keep in step with ANTHROPIC in crates/keel-gateway/tests/it/python.rs.
KEEL_PY_ANTHROPIC="2.16.0"
# The MCP tests' upstream servers use mcp 2.x's `MCPServer` API: pinned, like anthropic.
KEEL_PY_MCP="2.3.0"
if [ ! -x "$KEEL_PY_VENV/bin/python" ] || ! "$KEEL_PY_VENV/bin/python" -c "
import openai, mcp, anthropic, importlib.metadata
assert anthropic.__version__ == '$KEEL_PY_ANTHROPIC', anthropic.__version__
assert importlib.metadata.version('mcp') == '$KEEL_PY_MCP'" 2>/dev/null; then
  echo "== python venv with openai, anthropic==$KEEL_PY_ANTHROPIC and mcp==$KEEL_PY_MCP ($KEEL_PY_VENV)"
  rm -rf "$KEEL_PY_VENV"
  python3 -m venv "$KEEL_PY_VENV"
  "$KEEL_PY_VENV/bin/pip" install --quiet --disable-pip-version-check openai "mcp==$KEEL_PY_MCP" "anthropic==$KEEL_PY_ANTHROPIC"
fi
export KEEL_TEST_PYTHON="$KEEL_PY_VENV/bin/python"
