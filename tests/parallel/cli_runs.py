"""`moeplat` commands in their own processes, for the multi-process run tests (DDP, expert
parallel): a rank stuck in a collective would hang, so every wait has a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "MOEPLAT_RUN_DIR")  # never inherited from the test process


def moeplat(tmp: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "moeplat.cli.main", *args],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_run(tmp: Path, name: str, overrides: list[str], *extra: str) -> subprocess.Popen:
    """`moeplat run` of the tiny spec into tmp/<name> (runs) and tmp/<name>.db (MLflow)."""
    args = ["run", str(TINY), "--no-progress", "--tracking-uri", f"sqlite:///{tmp / name}.db"]
    args += ["--runs-dir", str(tmp / name), *extra]
    for o in overrides:
        args += ["--set", o]
    return moeplat(tmp, *args)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def mlflow_runs(tmp: Path, name: str):
    """(client, runs) of the store tmp/<name>.db."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / name}.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def copy_run(tmp: Path, src: Path, name: str) -> Path:
    """A copy of the run directory `src` (made by start_run under tmp/<source>) and of its MLflow
    store, as tmp/<name>/tiny/<same dir> and tmp/<name>.db: one resume per copy, each continuing
    its own MLflow run. `src`'s store is the .db beside its runs folder."""
    dst = tmp / name / "tiny" / src.name
    shutil.copytree(src, dst)
    state = json.loads((dst / "run.json").read_text())
    state["tracking_uri"] = f"sqlite:///{tmp / name}.db"
    (dst / "run.json").write_text(json.dumps(state))
    shutil.copy(tmp / f"{src.parents[1].name}.db", tmp / f"{name}.db")
    return dst


def resume_copies(tmp: Path, src: Path, layouts: dict[str, list[str]], start) -> dict[str, subprocess.Popen]:
    """For each name -> overrides: a copy of the run `src` (copy_run) resumed with those overrides,
    `start(tmp, name, overrides, "--resume", DIR)` being the test's own start_run wrapper."""
    return {
        name: start(tmp, name, overrides, "--resume", str(copy_run(tmp, src, name)))
        for name, overrides in layouts.items()
    }
