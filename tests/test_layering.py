"""Enforce the import rules of ARCHITECTURE.md ("Import direction") on every module, by AST.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moeplat"

# package -> the moeplat packages it may import (itself included); anything else under moeplat is forbidden
ALLOWED = {
    "spec": {"errors", "spec"},
    "nn": {"nn"},
    "data": {"data"},
    "compile": {
        "errors",
        "spec",
        "nn",
        "data",
        "interop",
        "compile",
    },  # interop: train.init from transformers
    "track": {"errors", "spec", "track"},
    "parallel": {"errors", "spec", "nn", "compile", "parallel"},
    "train": {"errors", "spec", "nn", "data", "compile", "parallel", "track", "train"},
    "sweep": {"errors", "spec", "train", "track", "sweep"},
    "repro": {"errors", "spec", "train", "track", "repro"},  # trains variants, reads their metrics
    "interop": {"errors", "nn", "interop"},  # transformers <-> moeplat.nn; test/extra only
    # reads finished runs: loads their model (compile, train, track), generates, evaluates, routes
    "evaluate": {"errors", "spec", "nn", "data", "compile", "interop", "track", "train", "evaluate"},
    # layer benchmarks (nn, interop peers) and the whole-step overhead (train, track)
    "bench": {"errors", "spec", "nn", "data", "compile", "interop", "train", "track", "evaluate", "bench"},
    "cli": {
        "errors",
        "spec",
        "nn",
        "data",
        "compile",
        "parallel",
        "track",
        "train",
        "sweep",
        "server",
        "bench",
        "interop",
        "evaluate",
        "repro",
        "cli",
    },
    # the job server sits at the top beside cli (which starts it): it validates and plans specs and
    # reads results; training happens in worker subprocesses, never in the server's process
    "server": {"errors", "spec", "track", "sweep", "server"},
}
# package -> third-party libraries it must never import
FORBIDDEN_LIBS = {
    "spec": {"torch", "lightning", "numpy"},  # validation answers in well under a second
    "nn": {"lightning", "omegaconf", "pydantic"},  # pure torch, usable without any spec
    "track": {"torch"},
    "server": {"torch", "lightning"},  # jobs run in subprocesses; the server stays light
}
ONLY_IN = {"mlflow": "track", "optuna": "sweep", "transformers": "interop", "lm_eval": "evaluate"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_import_rules(path: Path) -> None:
    rel = path.relative_to(ROOT)
    package = rel.parts[0] if len(rel.parts) > 1 else None
    bad = []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "moeplat" and package and len(parts) > 1 and parts[1] not in ALLOWED[package]:
            bad.append(f"{name} (moeplat/{package}/ may import only {sorted(ALLOWED[package])})")
        if parts[0] in FORBIDDEN_LIBS.get(package, ()):
            bad.append(f"{name} (moeplat/{package}/ never imports {parts[0]})")
        if parts[0] in ONLY_IN and package != ONLY_IN[parts[0]]:
            bad.append(f"{name} (only moeplat/{ONLY_IN[parts[0]]}/ imports {parts[0]})")
    assert not bad, f"{rel}: " + "; ".join(bad)


def test_rules_cover_every_package() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"add import rules for {packages - set(ALLOWED)}"


def test_validate_path_stays_light() -> None:
    """`moeplat validate` must answer fast: the CLI and spec loading never pull torch or mlflow."""
    code = (
        "import sys, moeplat.cli.main, moeplat.spec, moeplat.spec.plan, moeplat.spec.schema;"
        "heavy = [m for m in ('torch', 'lightning', 'mlflow', 'optuna') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
