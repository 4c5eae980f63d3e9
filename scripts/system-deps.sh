#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv: a PostgreSQL server, because the sweep
# tests run against a real PostgreSQL storage (tests/postgres.py starts a throwaway cluster from it).
# Idempotent and quiet: does nothing when initdb is already there.
set -euo pipefail

have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if have_initdb; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: PostgreSQL (initdb) is not installed and this is not root; skipping." >&2
    echo "system-deps: install it with: sudo apt-get install postgresql" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get here; install PostgreSQL (initdb, pg_ctl) with your package manager." >&2
    exit 1
fi
echo "system-deps: installing postgresql (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_initdb || { echo "system-deps: postgresql installed but initdb not found" >&2; exit 1; }
