#!/usr/bin/env bash
# Sourced by .ci/run: the web inbox's browser test (crates/keel-server/tests/it/browser.rs)
# needs Debian's `chromium`, `node` and `npm`, and playwright-core from the lockfile in
# crates/keel-server/tests/browser. Installs the Debian packages when missing; Playwright
# never downloads a browser (the test launches /usr/bin/chromium).

if [ ! -x /usr/bin/chromium ] || ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== installing chromium, nodejs and npm (Debian packages)"
  keel_sudo=""
  if [ "$(id -u)" -ne 0 ]; then keel_sudo="sudo"; fi
  $keel_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $keel_sudo apt-get install -y -qq chromium nodejs npm >/dev/null
  unset keel_sudo
fi
echo "== $(/usr/bin/chromium --version 2>/dev/null), node $(node --version)"
echo "== npm ci (crates/keel-server/tests/browser)"
npm ci --prefix crates/keel-server/tests/browser --no-audit --no-fund --loglevel=error
