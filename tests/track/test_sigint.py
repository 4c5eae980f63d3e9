"""Ctrl-C never lands inside an MLflow write (it could leave the SQLite store locked)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from moeplat.track.mlflow_run import TrackedRun, sigint_deferred


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the Python-level handler runs at the next bytecode boundary


def test_ctrl_c_inside_the_block_is_raised_after_it():
    finished = []
    with pytest.raises(KeyboardInterrupt), sigint_deferred():
        _ctrl_c()
        finished.append(True)  # the block was not cut
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_previous_handler_gets_the_deferred_signal():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with sigint_deferred():
            _ctrl_c()
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_tracked_run_writes_complete_before_the_interrupt(tmp_path):
    run = TrackedRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "sigint")
    original = run.client.log_batch

    def slow_log_batch(*args, **kwargs):
        _ctrl_c()  # Ctrl-C arrives in the middle of the write
        return original(*args, **kwargs)

    run.client.log_batch = slow_log_batch
    with pytest.raises(KeyboardInterrupt):
        run.log_metrics([("loss", 1.5, 3, 0)])
    run.client.log_batch = original
    assert [m.value for m in run.metric_history("loss")] == [1.5]
    run.finish("KILLED")  # the store is not left locked
    assert run.client.get_run(run.run_id).info.status == "KILLED"
