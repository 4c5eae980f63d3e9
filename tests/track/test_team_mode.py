"""Team mode: a real `mlflow server` on a real PostgreSQL with proxied artifacts, and an outage.

The server is started once for the module (creating MLflow's schema in PostgreSQL takes seconds);
the outage test kills it (SIGKILL, its whole process group) while a run is training, checks the
run finishes with its writes spooled, restarts it on the same port and database, runs
`moeplat sync` and checks every logged step arrived exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

# tests/ is on sys.path (pytest's default rootdir-relative import of tests/conftest.py).
from mlflow_server import MlflowServer
from postgres import INSTALL_HINT, Cluster, find_bin_dir

from moeplat.cli.main import main
from moeplat.track.spool import SHORT_RETRY_ENV, SPOOL_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
MOEPLAT = Path(sys.executable).parent / "moeplat"


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")
    cluster = Cluster(bin_dir)
    root = tmp_path_factory.mktemp("team")
    server = None
    try:
        cluster.init()
        cluster.start()
        cluster.create_database("mlflow_team")
        server = MlflowServer(cluster.url("mlflow_team"), root / "artifacts", root / "mlflow-server.log")
        server.start()
        yield server
    finally:
        if server is not None:
            server.kill()
        cluster.stop()


@pytest.fixture
def team_env(monkeypatch, workdir):
    """One torch thread (tiny models; a shared machine) and the short HTTP retry budget the
    spool path sets, restored after the test."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k, v in SHORT_RETRY_ENV.items():
        monkeypatch.setenv(k, v)
    return workdir


def _run(client: MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    return runs


def test_a_run_against_a_team_server_logs_params_metrics_and_artifacts(team_server, team_env):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["run", str(TINY), "--tracking-uri", team_server.uri, "--no-progress"]
        assert main([*args, "--set", "tracking.system_metrics=false"]) == 0
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(team_server.uri)
    (run,) = _run(client)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert run.data.params["model.moe.num_experts"] == "4"
    assert run.data.params["train.max_steps"] == "12"
    assert run.data.tags["moeplat.spec_name"] == "tiny"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 5, 8, 11]
    assert "val/loss" in run.data.metrics and "perf/wall_s" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/load_heatmap_layers.png" in names
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/weights.pt", "model/spec.yaml", "model/meta.json"} <= model
    local = client.download_artifacts(run.info.run_id, "model/meta.json", str(team_env))
    assert Path(local).stat().st_size > 0
    assert not list(Path("runs").glob(f"*/*/{SPOOL_FILE}"))  # nothing was spooled


def test_killing_the_server_mid_run_loses_nothing(team_server, team_env):
    client = MlflowClient(team_server.uri)
    max_steps, log_every = 300, 2
    sets = {
        "train.max_steps": max_steps, "train.log_every": log_every, "train.val_every": 150,
        "data.val_tokens": 128, "tracking.experiment": "tiny-outage",
    }  # fmt: skip
    cmd = [str(MOEPLAT), "run", str(TINY), "--tracking-uri", team_server.uri, "--no-progress"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "MOEPLAT_LOG_FLUSH_EVERY": "6", "MOEPLAT_SPOOL_RETRY_S": "3600"}
    log = team_env / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        # wait until metrics reach the server, then pull the plug while training goes on
        deadline, seen = time.monotonic() + 120, 0
        while time.monotonic() < deadline and proc.poll() is None and seen < 3:
            exp = client.get_experiment_by_name("tiny-outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            seen = len(client.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before the server was killed:\n{log.read_text()[-3000:]}"
        run_id = runs[0].info.run_id
        team_server.kill()
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = [p.parent for p in Path("runs").glob("*/*/run.json")]
    assert (run_dir / SPOOL_FILE).is_file()
    assert "moeplat sync" in log.read_text()

    team_server.start()  # same port, same PostgreSQL database
    before = client.get_metric_history(run_id, "train/loss")
    assert len(before) < max_steps // log_every  # the outage really held some back
    assert main(["sync", str(run_dir)]) == 0
    assert not (run_dir / SPOOL_FILE).exists()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(log_every - 1, max_steps, log_every))  # every step, exactly once
    for key in ("val/loss", "perf/tokens_per_s"):
        history = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(history) == len(set(history)) > 0, key
    assert "perf/wall_s" in run.data.metrics  # the end-of-run summary, sent by sync
    assert {"model/weights.pt", "model/meta.json"} <= {a.path for a in client.list_artifacts(run_id, "model")}
    assert "plots/load_heatmap_layers.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
    assert len(_run_ids(client, "tiny-outage")) == 1


def _run_ids(client: MlflowClient, experiment: str) -> list[str]:
    exp = client.get_experiment_by_name(experiment)
    return [r.info.run_id for r in client.search_runs([exp.experiment_id])]
