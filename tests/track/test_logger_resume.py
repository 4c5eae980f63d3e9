"""The logger of a resumable run (moeplat.track.logger.Resumable): rows wait for a checkpoint that
covers their step, a killed attempt's journal is settled by the next one, an attempt that ended by
itself records how far it sent. Real MLflow (SQLite); the end-to-end kill -9 tests are in
tests/train/test_kill_resume.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from moeplat.track.logger import BatchedMLflowLogger, Resumable
from moeplat.track.mlflow_run import TrackedRun


@pytest.fixture
def tracked(tmp_path) -> TrackedRun:
    return TrackedRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", run_name="r")


def history(tracked, key="loss"):
    return sorted((m.step, m.value) for m in tracked.metric_history(key))


def resumable(tmp_path, **kw) -> Resumable:
    return Resumable(journal=tmp_path / "journal.jsonl", checkpoint=tmp_path / "last.ckpt", **kw)


def test_a_row_is_sent_once_a_checkpoint_covers_its_step(tracked, tmp_path):
    logger = BatchedMLflowLogger(tracked, flush_every=1, resumable=resumable(tmp_path))
    for step in range(5):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.flush()
    assert history(tracked) == []  # no checkpoint yet: a resumed run would log them again
    logger.cover(3)
    assert history(tracked) == [(0, 0.0), (1, 1.0), (2, 2.0)]
    # once they are sent, the journal keeps the rows held: what a kill -9 leaves to the next attempt
    assert [r[2] for r in map(json.loads, (tmp_path / "journal.jsonl").read_text().splitlines())] == [3, 4]
    # Lightning logs the loss and validation of step N-1 after the checkpoint at N: covered already
    logger.log_metrics({"val": 9.0}, step=2)
    logger.flush()
    assert history(tracked, "val") == [(2, 9.0)]


def test_only_the_checkpoint_that_resume_reads_covers_steps(tracked, tmp_path):
    logger = BatchedMLflowLogger(tracked, flush_every=1, resumable=resumable(tmp_path))
    logger.log_metrics({"loss": 1.0}, step=0)
    # ModelCheckpoint writes step000002.ckpt, then last.ckpt: a kill in between resumes from the old last.ckpt
    logger.after_save_checkpoint(SimpleNamespace(_last_checkpoint_saved=str(tmp_path / "step2.ckpt")))
    assert history(tracked) == []
    last = SimpleNamespace(_last_checkpoint_saved=str(tmp_path / "last.ckpt"), _last_global_step_saved=2)
    logger.after_save_checkpoint(last)
    assert history(tracked) == [(0, 1.0)]


def test_the_next_attempt_sends_what_the_killed_one_covered_and_retrains_the_rest(
    tracked, tmp_path, monkeypatch
):
    first = BatchedMLflowLogger(tracked, flush_every=1000, resumable=resumable(tmp_path))
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    sent = tracked.log_metrics

    def killed(rows):
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(tracked, "log_metrics", killed)  # the checkpoint is written, the rows never sent
    with pytest.raises(SystemExit):
        first.cover(4)
    monkeypatch.setattr(tracked, "log_metrics", sent)
    # ...though the first row did (the same row, timestamp and all): it must not appear twice
    tracked.log_metrics([json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[0])])
    assert history(tracked) == [(0, 0.0)]

    second = BatchedMLflowLogger(tracked, flush_every=1, resumable=resumable(tmp_path))
    second.start(4)  # resumed from the checkpoint at step 4
    for step in (4, 5):  # trained again: these values count
        second.log_metrics({"loss": 10.0 + step}, step=step)
    second.finalize("success")
    assert [s for s, _ in history(tracked)] == [0, 1, 2, 3, 4, 5]
    assert dict(history(tracked))[4] == 14.0 and dict(history(tracked))[5] == 15.0


def test_an_attempt_that_ends_by_itself_sends_what_it_held_and_says_how_far(tracked, tmp_path):
    recorded = []

    def record(through):  # called before the rows can reach MLflow
        recorded.append((through, history(tracked)))

    logger = BatchedMLflowLogger(tracked, flush_every=1, resumable=resumable(tmp_path, on_uncovered=record))
    for step in range(4):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.cover(2)
    logger.finalize("failed")  # Ctrl-C or an error: what was measured reaches MLflow
    assert recorded == [({"loss": 3}, [(0, 0.0), (1, 1.0)])]
    assert [s for s, _ in history(tracked)] == [0, 1, 2, 3]

    again = BatchedMLflowLogger(
        tracked, flush_every=1, resumable=resumable(tmp_path, skip_through={"loss": 3})
    )
    again.start(2)
    for step in range(2, 6):
        again.log_metrics({"loss": 10.0 + step, "lr": 0.1}, step=step)
    again.finalize("success")
    assert history(tracked) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    # per metric: a metric the first attempt did not send at those steps is logged at all of them
    assert [s for s, _ in history(tracked, "lr")] == [2, 3, 4, 5]
