"""Tracking against a real local MLflow store (sqlite in tmp)."""

from __future__ import annotations

import os

import pytest

from moeplat.track.logger import BatchedMLflowLogger
from moeplat.track.mlflow_run import DEFAULT_TRACKING_URI, TrackedRun, flatten, resolve_tracking_uri


def test_flatten_gives_every_leaf_its_dotted_path():
    tree = {
        "model": {"moe": {"top_k": 2, "losses": {"z_loss": None}}, "d": 1.5},
        "paths": ["a", "b"],
        "x": True,
    }
    assert flatten(tree) == {
        "model.moe.top_k": "2",
        "model.moe.losses.z_loss": "null",
        "model.d": "1.5",
        "paths": '["a", "b"]',
        "x": "True",
    }


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    here = os.path.abspath(".")
    assert resolve_tracking_uri(None, None) == f"sqlite:///{here}/mlflow.db"  # relative paths made absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/env.db")
    assert resolve_tracking_uri(None, None) == "sqlite:////data/env.db"
    assert resolve_tracking_uri(None, "http://mlflow:5000") == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:////cli.db", "http://mlflow:5000") == "sqlite:////cli.db"


@pytest.fixture
def tracked(tmp_path) -> TrackedRun:
    return TrackedRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", run_name="r")


def test_logger_batches_until_the_threshold_then_writes_everything(tracked):
    logger = BatchedMLflowLogger(tracked, flush_every=5)
    logger.log_metrics({"a": 1.0, "b": 2.0}, step=0)
    logger.log_metrics({"a": 0.5, "epoch": 0}, step=1)  # Lightning's epoch counter is not a metric
    assert tracked.metric_history("a") == []  # buffered: nothing sent yet
    logger.log_metrics({"a": 0.25, "b": 1.0}, step=2)  # 5 rows: flushed in one batch
    assert [(m.step, m.value) for m in tracked.metric_history("a")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    logger.log_metrics({"b": 0.5}, step=3)
    logger.finalize("success")  # the tail is flushed at the end
    assert [m.value for m in tracked.metric_history("b")] == [2.0, 1.0, 0.5]
    assert tracked.metric_history("epoch") == []


def test_params_over_mlflow_batch_limit_all_arrive(tracked):
    params = {f"p{i:03d}": i for i in range(250)}  # log_batch takes at most 100 params per call
    tracked.log_params(params)
    got = tracked.client.get_run(tracked.run_id).data.params
    assert len(got) == 250 and got["p249"] == "249"


def test_continuing_a_run_by_id_reopens_it(tracked):
    tracked.finish("FAILED")
    again = TrackedRun(tracked.tracking_uri, "exp", run_id=tracked.run_id)
    assert again.run_id == tracked.run_id
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    runs = again.client.search_runs([again.experiment_id])
    assert len(runs) == 1
