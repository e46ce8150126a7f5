#!/usr/bin/env bash
# Sourced by .ci/run: the web inbox's browser test (crates/keel-server/tests/it/browser.rs)
# needs Debian's `chromium`, `node` and `npm`, and playwright-core from the lockfile in
# crates/keel-server/tests/browser. Installs the Debian packages when missing; Playwright
# never downloads a browser (the test launches /usr/bin/chromium).

# Only what is missing: a machine's own node (not Debian's) conflicts with Debian's npm.
keel_missing=()
[ -x /usr/bin/chromium ] || keel_missing+=(chromium)
command -v node >/dev/null || keel_missing+=(nodejs)
command -v npm >/dev/null || keel_missing+=(npm)
if [ ${#keel_missing[@]} -gt 0 ]; then
  echo "== installing ${keel_missing[*]} (Debian packages)"
  keel_sudo=""
  if [ "$(id -u)" -ne 0 ]; then keel_sudo="sudo"; fi
  $keel_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $keel_sudo apt-get install -y -qq "${keel_missing[@]}" >/dev/null
  unset keel_sudo
fi
unset keel_missing
echo "== $(/usr/bin/chromium --version 2>/dev/null), node $(node --version)"
echo "== npm ci (crates/keel-server/tests/browser)"
npm ci --prefix crates/keel-server/tests/browser --no-audit --no-fund --loglevel=error
