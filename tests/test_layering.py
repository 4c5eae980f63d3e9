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

# package -> top-level names (third-party or moeplat.<pkg>) it must never import
FORBIDDEN = {
    "spec": {
        "torch",
        "lightning",
        "mlflow",
        "optuna",
        "numpy",
        "moeplat.nn",
        "moeplat.compile",
        "moeplat.data",
        "moeplat.train",
        "moeplat.track",
        "moeplat.sweep",
        "moeplat.parallel",
        "moeplat.cli",
        "moeplat.server",
    },
    "nn": {
        "lightning",
        "mlflow",
        "optuna",
        "omegaconf",
        "pydantic",
        "moeplat.spec",
        "moeplat.compile",
        "moeplat.data",
        "moeplat.train",
        "moeplat.track",
        "moeplat.sweep",
        "moeplat.parallel",
        "moeplat.cli",
        "moeplat.server",
        "moeplat.errors",
    },
    "data": {
        "mlflow",
        "optuna",
        "moeplat.spec",
        "moeplat.nn",
        "moeplat.compile",
        "moeplat.train",
        "moeplat.track",
        "moeplat.sweep",
        "moeplat.cli",
        "moeplat.server",
    },
    "compile": {
        "mlflow",
        "optuna",
        "moeplat.train",
        "moeplat.track",
        "moeplat.sweep",
        "moeplat.cli",
        "moeplat.server",
    },
    "track": {
        "optuna",
        "moeplat.nn",
        "moeplat.compile",
        "moeplat.train",
        "moeplat.sweep",
        "moeplat.cli",
        "moeplat.server",
    },
    "train": {"optuna", "moeplat.sweep", "moeplat.cli", "moeplat.server"},
    "parallel": {"mlflow", "optuna", "moeplat.cli", "moeplat.server"},
    "cli": {"mlflow", "optuna"},
}
ONLY_IN = {"mlflow": "track", "optuna": "sweep"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violates(name: str, rule: str) -> bool:
    return name == rule or name.startswith(rule + ".")


MODULES = sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_import_rules(path: Path) -> None:
    rel = path.relative_to(ROOT)
    package = rel.parts[0] if len(rel.parts) > 1 else None
    bad = []
    for name in _imports(path):
        for rule in FORBIDDEN.get(package, ()):
            if _violates(name, rule):
                bad.append(f"{name} (rule: {package}/ never imports {rule})")
        for lib, home in ONLY_IN.items():
            if _violates(name, lib) and package != home:
                bad.append(f"{name} (only moeplat/{home}/ imports {lib})")
    assert not bad, f"{rel}: " + "; ".join(bad)


def test_rules_cover_every_package() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(FORBIDDEN), f"add import rules for {packages - set(FORBIDDEN)}"


def test_validate_path_stays_light() -> None:
    """`moeplat validate` must answer fast: the CLI and spec loading never pull torch or mlflow."""
    code = (
        "import sys, moeplat.cli.main, moeplat.spec, moeplat.spec.plan, moeplat.spec.schema;"
        "heavy = [m for m in ('torch', 'lightning', 'mlflow', 'optuna') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
