"""The locked install (requirements/lock.txt, made by `make lock` with pip-compile --generate-hashes).

A fresh clone must install exactly what the suite last ran with: every requirement of pyproject.toml
(all extras, the build backend) is in the lock at a version inside its bounds, with the hashes of its
files; the environment running these tests holds the locked versions; every install path (make setup,
the Dockerfile's images) goes through the lock. Version comparisons elsewhere (the tools image) read
the lock, never whatever happens to be installed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"


@functools.cache
def locked() -> dict[str, tuple[str, list[str]]]:
    """Canonical package name -> (version, its sha256 hashes) from requirements/lock.txt."""
    text = LOCK.read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        if m := re.match(r"([A-Za-z0-9_.\-]+)==(\S+)(.*)", line):
            entries[canonicalize_name(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", m[3]))
    return entries


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    reqs += [r for extra in project["project"]["optional-dependencies"].values() for r in extra]
    lock_in = (REPO / "requirements" / "lock.in").read_text().splitlines()
    reqs += [ln.split("#")[0].strip() for ln in lock_in if ln.split("#")[0].strip() and ln[0] != "-"]
    return [Requirement(r) for r in reqs]


def test_every_requirement_is_locked_within_its_bounds_with_hashes():
    lock = locked()
    assert len(lock) > 50
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # the one package outside the lock (CPU and CUDA builds differ)
            assert name not in lock
            continue
        assert name in lock, f"{req.name} is not in requirements/lock.txt: run `make lock`"
        version, _ = lock[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} in the lock is outside pyproject's {req}: run `make lock`"
        )
    for name, (version, hashes) in lock.items():
        assert hashes, f"{name}=={version} has no hash"
    text = LOCK.read_text()
    # nothing of this machine's pip configuration leaks into the lock
    assert "--extra-index-url" not in text and "--find-links" not in text and "file://" not in text


def test_this_environment_holds_the_locked_versions():
    """What `make setup` installed is the lock (a stale .venv fails here: `make setup` reinstalls when
    the lock changes); torch is requirements/cpu.txt's pin."""
    lock = locked()
    installed = {}
    for d in importlib.metadata.distributions():  # sys.path order: the first is what imports load
        # (later ones, like setuptools/_vendor that setuptools appends once imported, are shadowed)
        installed.setdefault(canonicalize_name(d.metadata["Name"]), d.version)
    for name in ("mlflow", "optuna", "lightning", "pydantic", "transformers", "pytest", "hatchling"):
        assert name in installed, name
    wrong = {n: (v, lock[n][0]) for n, v in installed.items() if n in lock and v != lock[n][0]}
    assert not wrong, f"installed vs locked: {wrong}; run `make setup`"
    pin = re.search(r"^torch==(\S+)", (REPO / "requirements/cpu.txt").read_text(), re.M)[1]
    assert installed["torch"].split("+")[0] == pin


def test_every_install_path_goes_through_the_lock():
    make = (REPO / "Makefile").read_text()
    setup = make[make.index("$(BIN)/moeplat:") : make.index("touch $@")]
    assert "pip install --quiet --no-deps -r requirements/cpu.txt" in setup
    assert "scripts/install-locked.sh --editable" in setup
    assert "requirements/lock.txt" in setup.splitlines()[0]  # a changed lock reinstalls
    script = (REPO / "scripts/install-locked.sh").read_text()
    assert "install --quiet -c requirements/lock.txt" in script and "pip check" in script
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("RUN scripts/install-locked.sh") == 2  # the cpu and cuda images
    assert "pip install -c /tmp/lock.txt" in dockerfile  # the tools image
    assert "make test" in (REPO / ".ci/run").read_text()  # and make test runs make setup
