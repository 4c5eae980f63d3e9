"""A Ctrl-C (the job server's cancel) is never lost, even when Python swallows it: a
KeyboardInterrupt raised inside a garbage-collection callback is reported as "Exception ignored"
and dropped (it happened inside SQLAlchemy's weakref cleanup while MLflow opened its store, and a
cancelled job trained on until SIGKILL). moeplat.train.interrupt raises it at the next batch."""

from __future__ import annotations

import os
import signal
import time
import weakref

import lightning as L
import pytest
from mlflow import MlflowClient

from moeplat.spec import load_spec
from moeplat.train.interrupt import interrupts_recorded
from moeplat.train.run import run

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _ctrl_c_inside_a_gc_callback() -> None:
    """SIGINT delivered while a weakref callback runs: its KeyboardInterrupt is swallowed."""

    def callback(_ref):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside the callback

    obj = type("Garbage", (), {})()
    ref = weakref.ref(obj, callback)
    del obj  # the callback runs now
    assert ref() is None


def test_python_swallows_a_ctrl_c_raised_inside_a_gc_callback():
    _ctrl_c_inside_a_gc_callback()  # returns normally: the premise of moeplat.train.interrupt
    with interrupts_recorded():
        from moeplat.train.interrupt import _received

        _ctrl_c_inside_a_gc_callback()
        assert _received.is_set()  # swallowed, but recorded
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _SwallowedCtrlC(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            _ctrl_c_inside_a_gc_callback()


def test_a_swallowed_ctrl_c_still_stops_the_run_at_the_next_batch(workdir, tiny_spec_path):
    loaded = load_spec(tiny_spec_path, ["train.max_steps=40", "train.val_every=40", "train.log_every=1"])
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        run(loaded, tracking_uri=uri, progress=False, callbacks=(_SwallowedCtrlC(),))
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert r.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
    assert max(steps) < 5  # stopped at the batch after the swallowed Ctrl-C, not at step 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
