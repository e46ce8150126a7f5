#!/usr/bin/env bash
# Services the tests need, sourced by .ci/run: PostgreSQL's binaries, from which
# keel-testkit starts a throwaway server per test process (initdb into a temp dir,
# a free loopback port, stopped when the tests end). Installs Debian's `postgresql`
# when its binaries are missing; never creates or starts the system cluster.
# Set KEEL_TEST_POSTGRES_URL to use an existing server instead.

if [ -z "${KEEL_TEST_POSTGRES_URL:-}" ] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "== installing postgresql (Debian packages)"
  keel_sudo=""
  if [ "$(id -u)" -ne 0 ]; then keel_sudo="sudo"; fi
  # No main cluster, and no service started by the package scripts.
  $keel_sudo mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $keel_sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
  keel_policy_rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $keel_sudo tee /usr/sbin/policy-rc.d >/dev/null
    $keel_sudo chmod +x /usr/sbin/policy-rc.d
    keel_policy_rc=1
  fi
  $keel_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $keel_sudo apt-get install -y -qq postgresql >/dev/null
  if [ "$keel_policy_rc" -eq 1 ]; then $keel_sudo rm -f /usr/sbin/policy-rc.d; fi
  unset keel_sudo keel_policy_rc
fi
if [ -z "${KEEL_TEST_POSTGRES_URL:-}" ]; then
  echo "== postgresql binaries: $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)"
fi

# bubblewrap: the code tool's sandbox (`isolation = "auto"` uses it when it works;
# its tests run both it and the rlimits fallback). Debian's `bubblewrap`.
if ! command -v bwrap >/dev/null; then
  echo "== installing bubblewrap (Debian package)"
  keel_sudo=""
  if [ "$(id -u)" -ne 0 ]; then keel_sudo="sudo"; fi
  $keel_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $keel_sudo apt-get install -y -qq bubblewrap >/dev/null
  unset keel_sudo
fi
echo "== bubblewrap: $(bwrap --version 2>/dev/null || echo 'not available: code tools fall back to rlimits')"
