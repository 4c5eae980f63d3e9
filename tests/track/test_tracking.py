"""Tracking against a real local MLflow store (sqlite in tmp)."""

from __future__ import annotations

import os
import threading

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
    logger.log_metrics({"a": 0.25, "b": 1.0}, step=2)  # 5 rows: handed to the sender in one batch
    assert logger.buffered == 0
    logger.flush()  # waits for the sender
    assert [(m.step, m.value) for m in tracked.metric_history("a")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    logger.log_metrics({"b": 0.5}, step=3)
    logger.finalize("success")  # the tail is flushed at the end
    assert [m.value for m in tracked.metric_history("b")] == [2.0, 1.0, 0.5]
    assert tracked.metric_history("epoch") == []


def test_a_slow_tracking_server_never_holds_up_the_training_thread(tracked, monkeypatch):
    gate, write = threading.Event(), tracked.log_metrics
    monkeypatch.setattr(tracked, "log_metrics", lambda rows: (gate.wait(30), write(rows)))
    logger = BatchedMLflowLogger(tracked, flush_every=2)
    for step in range(6):  # three full batches while the server "hangs": none of them waits for it
        logger.log_metrics({"a": float(step)}, step=step)
    assert tracked.metric_history("a") == [] and logger.buffered == 0
    gate.set()
    logger.finalize("success")  # waits for the sender: every batch arrives, in order
    assert [(m.step, m.value) for m in tracked.metric_history("a")] == [(s, float(s)) for s in range(6)]


def test_a_failed_background_write_is_raised_on_the_next_flush(tracked, monkeypatch):
    def refuse(rows):
        raise RuntimeError("store refused the batch")

    monkeypatch.setattr(tracked, "log_metrics", refuse)
    logger = BatchedMLflowLogger(tracked, flush_every=1)
    logger.log_metrics({"a": 1.0}, step=0)  # the training thread goes on...
    with pytest.raises(RuntimeError, match="refused"):
        logger.flush()  # ...and learns of it at the next checkpoint or at the end


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
