#!/usr/bin/env bash
# Install moeplat with the given extras into $PYTHON's environment, every dependency at the version and
# hash that requirements/lock.txt records. Used by `make setup` (and so .ci/run) and by the Dockerfile.
#
#   PYTHON=.venv/bin/python scripts/install-locked.sh [--editable] [EXTRA,EXTRA...]
#
# torch must be installed first: it is the one package outside the lock, since its CPU and CUDA builds
# are different files of one version (requirements/cpu.txt here, the Dockerfile's torch step in images).
# Its dependencies are in the lock, so they are brought to the locked versions here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
editable=() build=()
if [[ ${1:-} == --editable ]]; then
  editable=(-e) build=(editables)  # hatchling's editable builds need it
  shift
fi
pip=("$PYTHON" -m pip --disable-pip-version-check)

# pip checks the hashes of a constraints file only from 24.x on (23.x refuses hashed constraints for
# unpinned names); pinned like everything else.
"${pip[@]}" install --quiet pip==26.3

# What the project asks for, read from pyproject.toml: its dependencies, those of each extra named, and
# the build backend (moeplat itself is built without isolation, from the locked hatchling).
mapfile -t requirements < <("$PYTHON" - "${1:-}" <<'EOF'
import sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))
extras = [e for e in sys.argv[1].split(",") if e]
optional = project["project"].get("optional-dependencies", {})
unknown = [e for e in extras if e not in optional]
if unknown:
    sys.exit(f"install-locked.sh: no extra {unknown} in pyproject.toml (there are {sorted(optional)})")
wanted = project["project"]["dependencies"] + [r for e in extras for r in optional[e]]
print("\n".join([*project["build-system"]["requires"], *wanted]))
EOF
)
# With hashes in the constraints, pip installs nothing that the lock does not name with its hash.
"${pip[@]}" install --quiet -c requirements/lock.txt "${requirements[@]}" "${build[@]}"
"${pip[@]}" install --quiet --no-deps --no-build-isolation "${editable[@]}" .
"${pip[@]}" check
