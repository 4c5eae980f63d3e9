"""Runs and sweeps started while the tracking server is down train, spool their creation and
every write, and appear in MLflow complete once a real `mlflow server` is up and `moeplat sync`
has run. The server is down the simplest way: its port is chosen but nothing listens there yet.

A job-server job is this same `moeplat run` (moeplat.server.worker starts it with --tracking-uri
and MOEPLAT_JOB_ID); what differs is the job tag, which must travel with the spooled creation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from moeplat.cli.main import main
from moeplat.track.spool import LOCAL_ID_TAG, SPOOL_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
MOEPLAT = Path(sys.executable).parent / "moeplat"
NOTICE = "unreachable: training anyway"


@pytest.fixture
def down(workdir):
    """An `mlflow server` that is not started yet (SQLite, artifacts proxied)."""
    server = MlflowServer(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "artifacts", workdir / "mlflow.log")
    yield server
    server.kill()


def _moeplat(*args: str, job: str | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"MOEPLAT_JOB_ID": job} if job else {})}
    out = subprocess.run([str(MOEPLAT), *args], env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Traceback" not in text and "MlflowException" not in text, text[-4000:]
    return text


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _two_attempts(uri: str, runs: str, job: str | None = None) -> tuple[Path, str, str]:
    """Train 8 steps, then --resume to 12 (before anyone synced, for a spooled run)."""
    sets = ["--set", "train.log_every=1", "--set", "train.val_every=4"]
    tracking = ("--tracking-uri", uri)
    first = _moeplat("run", str(TINY), "--runs-dir", runs, "--no-progress", *tracking, *sets,
                     "--set", "train.max_steps=8", job=job)  # fmt: skip
    (run_dir,) = [p.parent for p in Path(runs).glob("tiny/*/run.json")]
    second = _moeplat("run", str(TINY), "--runs-dir", runs, "--resume", str(run_dir), "--no-progress", *sets,
                      "--set", "train.max_steps=12")  # fmt: skip
    return run_dir, first, second


def _logged(client: MlflowClient, run_id: str) -> dict:
    """What a run holds, but for what differs between two runs of the same spec (ids, times, host)."""
    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics if not k.startswith("system/"))
    return {
        "status": run.info.status,
        "name": run.info.run_name,
        "params": run.data.params,
        "steps": {k: _steps(client, run_id, k) for k in keys},
        "artifacts": sorted(
            a.path for d in ("spec", "model", "plots") for a in client.list_artifacts(run_id, d)
        ),
    }


def test_a_run_started_with_the_server_down_appears_complete_after_sync(down):
    run_dir, first, second = _two_attempts(down.uri, "runs", job="42")
    assert first.count(NOTICE) == 1, first[-3000:]
    local = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert local.startswith("local-") and (run_dir / SPOOL_FILE).is_file()
    # the --resume went on with the same local run and spool (the server was still down)
    assert "moeplat sync" in second and json.loads((run_dir / "run.json").read_text())["run_id"] == local

    down.start()
    assert main(["sync", str(run_dir)]) == 0  # to the server named in run.json
    client = MlflowClient(down.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    run_id = run.info.run_id
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run_id
    assert not (run_dir / SPOOL_FILE).exists()
    tags = run.data.tags
    assert (
        tags["moeplat.job_id"] == "42" and tags[LOCAL_ID_TAG] == local and tags["moeplat.spec_name"] == "tiny"
    )
    got = _logged(client, run_id)
    assert got["status"] == "FINISHED" and got["params"]["model.moe.top_k"] == "2"
    assert {"spec/resolved.yaml", "model/weights.pt", "plots/load_heatmap_layers.png"} <= set(
        got["artifacts"]
    )
    for key, steps in got["steps"].items():
        assert steps == sorted(set(steps)), f"{key}: a step logged twice"
    assert got["steps"]["train/loss"] == list(range(12))  # both attempts' steps, each once

    # the same two attempts with their (local) store there all along log the same things
    store = MlflowClient("sqlite:///control.db")
    control_dir, _, _ = _two_attempts(store.tracking_uri, "control-runs")
    control = _logged(store, json.loads((control_dir / "run.json").read_text())["run_id"])
    assert got["steps"].keys() == control["steps"].keys()
    for key, steps in got["steps"].items():
        assert steps == control["steps"][key], key
    assert {k: v for k, v in got.items() if k != "steps"} == {
        k: v for k, v in control.items() if k != "steps"
    }


def test_a_sweep_started_with_the_server_down_appears_with_its_trials_after_sync(down, workdir):
    sweep = workdir / "tiny-sweep.yaml"
    sweep.write_text(
        f"name: tiny-sweep\nextends: {TINY}\n"
        "overrides: {train.max_steps: 4, train.val_every: 2, train.log_every: 1}\n"
        "search:\n  model.moe.top_k: {kind: int, low: 1, high: 2}\n"
        "sampler: {kind: random}\ntrials: {n_trials: 2}\n"
    )
    out = _moeplat("sweep", str(sweep), "--tracking-uri", down.uri)
    assert out.count(NOTICE) == 3, out[-3000:]  # the parent and each trial, once

    down.start()
    assert main(["sync", "runs"]) == 0
    assert not list(Path("runs").rglob(SPOOL_FILE))
    client = MlflowClient(down.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("moeplat.kind") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["optuna.trial"] for c in children) == ["0", "1"]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["optuna.state"] == "COMPLETE"
        assert _steps(client, c.info.run_id, "train/loss") == list(range(4))
    assert "sweep/summary.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
