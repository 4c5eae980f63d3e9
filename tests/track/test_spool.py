"""The spool: writes a TrackedRun cannot send go to disk in order and are replayed exactly once.

The outage is simulated by a client whose writes raise the error MLflow raises for a dead server
(a requests ConnectionError wrapped in an MlflowException); the store behind it is a real one.
The real server-killed-mid-run case is tests/track/test_team_mode.py."""

from __future__ import annotations

import json

import pytest
import requests
from mlflow.exceptions import MlflowException

from moeplat.cli.main import main
from moeplat.track.logger import BatchedMLflowLogger
from moeplat.track.mlflow_run import TrackedRun
from moeplat.track.spool import SPOOL_FILE, Spool, is_unreachable


def _dead_server_error() -> MlflowException:
    try:
        raise requests.exceptions.ConnectionError("Connection refused")
    except requests.exceptions.ConnectionError as e:
        try:
            raise MlflowException(f"API request failed with exception {e}")  # as rest_utils does
        except MlflowException as wrapped:
            return wrapped


class Outage:
    """Makes the run's client fail like an unreachable server while `down` is True."""

    def __init__(self, client, monkeypatch):
        self.down, self.attempts = False, 0
        for name in (
            "log_batch",
            "update_run",
            "set_terminated",
            "log_text",
            "log_artifact",
            "log_artifacts",
        ):
            monkeypatch.setattr(client, name, self._wrap(getattr(client, name)))

    def _wrap(self, real):
        def write(*args, **kwargs):
            if self.down:
                self.attempts += 1
                raise _dead_server_error()
            return real(*args, **kwargs)

        return write


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


@pytest.fixture
def tracked(tmp_path, run_dir, monkeypatch):
    monkeypatch.setattr(TrackedRun, "RETRY_S", 0.0)  # retry at every write
    return TrackedRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", run_name="r", spool=run_dir / SPOOL_FILE)


def steps(tracked, key):
    return [(m.step, m.value) for m in tracked.metric_history(key)]


def test_unreachable_is_told_from_a_rejected_request():
    assert is_unreachable(_dead_server_error())
    assert is_unreachable(requests.exceptions.ReadTimeout("slow"))
    assert not is_unreachable(MlflowException("INVALID_PARAMETER_VALUE: bad metric"))
    assert not is_unreachable(ValueError("x"))


def test_writes_during_an_outage_are_spooled_then_replayed_in_order(tracked, run_dir, monkeypatch):
    outage = Outage(tracked.client, monkeypatch)
    logger = BatchedMLflowLogger(tracked, flush_every=2)
    # logger.flush() waits for the sender thread, so that the metrics and the tags written from
    # this thread reach the spool in a known order
    logger.log_metrics({"loss": 3.0, "lr": 0.1}, step=0)  # sent
    logger.flush()
    outage.down = True
    logger.log_metrics({"loss": 2.0, "lr": 0.2}, step=1)  # spooled, no exception
    logger.flush()
    tracked.set_tags({"phase": "outage"})
    logger.log_metrics({"loss": 1.0, "lr": 0.3}, step=2)  # spooled after the others
    logger.flush()
    spooled = [r["op"] for r in Spool(run_dir / SPOOL_FILE).records()]
    assert spooled == ["metrics", "tags", "metrics"]
    assert steps(tracked, "loss") == [(0, 3.0)]
    outage.down = False
    logger.log_metrics({"loss": 0.5, "lr": 0.4}, step=3)  # replays the spool first, then sends
    logger.flush()
    assert steps(tracked, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert tracked.client.get_run(tracked.run_id).data.tags["phase"] == "outage"
    assert not (run_dir / SPOOL_FILE).exists()


def test_while_down_the_server_is_tried_at_most_once_per_retry_wait(tracked, monkeypatch):
    outage = Outage(tracked.client, monkeypatch)
    monkeypatch.setattr(TrackedRun, "RETRY_S", 3600.0)
    outage.down = True
    for step in range(10):
        tracked.log_metrics([("loss", 1.0, step, 1000 + step)])
    assert outage.attempts == 1  # the other nine went straight to disk: training is not held up
    assert len(Spool(tracked.spool.path).records()) == 10


def test_a_failed_final_flush_leaves_the_spool_and_sync_sends_it_once(tracked, run_dir, monkeypatch, capsys):
    (run_dir / "run.json").write_text(
        json.dumps({"run_id": tracked.run_id, "tracking_uri": tracked.tracking_uri})
    )
    outage = Outage(tracked.client, monkeypatch)
    outage.down = True
    tracked.log_params({"model.moe.top_k": 2})
    tracked.log_metrics([("loss", 1.5, 7, 1234)])
    tracked.log_text("hello\n", "notes/hello.txt")
    tracked.finish("FINISHED")
    assert tracked.spool_pending()
    assert [r["op"] for r in Spool(run_dir / SPOOL_FILE).records()] == [
        "params",
        "metrics",
        "text",
        "terminate",
    ]
    assert tracked.client.get_run(tracked.run_id).info.status == "RUNNING"

    # a sync cut off after two records: the unsent tail stays, and the next sync sends it
    records = Spool(run_dir / SPOOL_FILE).records()
    sent = []

    def flaky(record):
        if len(sent) == 2:
            raise _dead_server_error()
        sent.append(record)

    with pytest.raises(MlflowException):
        Spool(run_dir / SPOOL_FILE).replay(flaky)
    assert Spool(run_dir / SPOOL_FILE).records() == records[2:]
    # the first two were "sent" by the fake only: a full sync now, where a real replay of
    # the metric row twice must not duplicate it
    Spool(run_dir / SPOOL_FILE)._rewrite(records[:2] + records)
    assert main(["sync", str(run_dir)]) == 0
    assert "synced 6 spooled writes" in capsys.readouterr().out
    run = tracked.client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.moe.top_k"] == "2"
    assert steps(tracked, "loss") == [(7, 1.5)]  # once, though sent twice
    assert [a.path for a in tracked.client.list_artifacts(tracked.run_id, "notes")] == ["notes/hello.txt"]
    assert not (run_dir / SPOOL_FILE).exists()
    assert main(["sync", str(run_dir)]) == 0  # idempotent: nothing left
    assert "nothing to sync" in capsys.readouterr().out


def test_sync_of_a_directory_that_is_not_a_run_is_a_usage_error(tmp_path, capsys):
    assert main(["sync", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_resuming_while_the_server_is_away_spools_the_reopening(tracked, run_dir, monkeypatch):
    from mlflow import MlflowClient

    tracked.finish("KILLED")
    real = MlflowClient.update_run

    def dead(self, *args, **kwargs):
        raise _dead_server_error()

    monkeypatch.setattr(MlflowClient, "update_run", dead)
    again = TrackedRun(tracked.tracking_uri, "exp", run_id=tracked.run_id, spool=run_dir / SPOOL_FILE)
    assert again.run_id == tracked.run_id  # the same run, never a new one
    assert [r["op"] for r in again.spool.records()] == ["status"]
    monkeypatch.setattr(MlflowClient, "update_run", real)
    again.log_metrics([("loss", 0.1, 20, 5000)])  # the server is back: the reopening goes first
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    assert steps(again, "loss") == [(20, 0.1)]
    assert len(again.client.search_runs([again.experiment_id])) == 1
