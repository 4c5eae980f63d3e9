"""`moeplat` commands in their own processes, for the multi-process run tests (DDP, expert
parallel): a rank stuck in a collective would hang, so every wait has a timeout."""

from __future__ import annotations

import os
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
