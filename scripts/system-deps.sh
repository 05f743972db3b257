#!/usr/bin/env bash
# The Debian packages the test suite drives: Chromium (browser tests of the report and the labelling app) and
# PostgreSQL's server binaries (the labelling app's PostgreSQL tests start a throwaway cluster with them).
# Installs them when it can (root, or sudo without a password); otherwise stops at once with the command to run.
set -euo pipefail
have_chromium() { command -v chromium >/dev/null; }
have_postgres() { command -v pg_ctl >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
missing=()
have_chromium || missing+=(chromium)
have_postgres || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
install="apt-get install -y ${missing[*]}"
if [ "${EUID:-$(id -u)}" -eq 0 ]; then sudo=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"
else
  echo "make test needs the Debian packages: ${missing[*]}. Install them with: sudo $install" >&2
  exit 1
fi
echo "installing ${missing[*]} (Debian packages the tests need)"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
