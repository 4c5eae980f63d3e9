#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv:
# - a PostgreSQL server: the sweep, tracking and job-server tests run against a real PostgreSQL
#   (tests/postgres.py starts a throwaway cluster from it);
# - Debian's Chromium: the browser tests and the docs screenshots drive it with playwright
#   (playwright's own browser download does not work on our machines);
# - Debian's docker-compose (v1, no engine needed): `docker-compose config` checks the team setup's
#   compose file in tests/deploy (there is no Docker engine to start it here);
# - Debian's python3.11-doc: the reStructuredText sources of the Python documentation, English prose
#   that the `python_docs` data source reads (the second domain of the mixture examples and tests);
# - Debian's slurm-wlm and munge: the SLURM bridge's tests (tests/slurm_cluster.py) start a one-node
#   cluster (munged, slurmctld, slurmd) from them and submit real batch jobs.
# Idempotent and quiet: installs only what is missing.
set -euo pipefail

have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_chromium() { [ -x /usr/bin/chromium ]; }
have_compose() { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }
have_python_docs() { [ -d /usr/share/doc/python3.11/html/_sources ]; }
have_slurm() { [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1; }
have_munge() { [ -x /usr/sbin/munged ]; }

missing=()
have_initdb || missing+=(postgresql)
have_chromium || missing+=(chromium)
have_compose || missing+=(docker-compose)
have_python_docs || missing+=(python3.11-doc)
have_slurm || missing+=(slurm-wlm)
have_munge || missing+=(munge)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing ${missing[*]} and this is not root; skipping." >&2
    echo "system-deps: install with: sudo apt-get install ${missing[*]}" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get here; install ${missing[*]} with your package manager." >&2
    exit 1
fi
echo "system-deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
have_initdb || { echo "system-deps: postgresql installed but initdb not found" >&2; exit 1; }
have_chromium || { echo "system-deps: chromium installed but /usr/bin/chromium not found" >&2; exit 1; }
have_python_docs || { echo "system-deps: python3.11-doc installed but its _sources not found" >&2; exit 1; }
have_slurm || { echo "system-deps: slurm-wlm installed but slurmctld/slurmd/sbatch not found" >&2; exit 1; }
have_munge || { echo "system-deps: munge installed but /usr/sbin/munged not found" >&2; exit 1; }
