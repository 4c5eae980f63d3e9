"""SIGUSR1, SLURM's warning before a time limit or preemption (moeplat.train.interrupt): the run
writes last.ckpt at the next optimizer step, stops at the batch after it, closes its MLflow run
and is resumable; resumed, it continues from exactly that step into the same MLflow run, each
metric step logged once. (The SLURM side -- the batch script's trap and requeue -- is in
tests/server/test_slurm_bridge.py.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient
from resume_checks import step_counts

from moeplat.spec import load_spec
from moeplat.train import interrupt
from moeplat.train.run import run


class _Usr1At(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_sigusr1_checkpoints_stops_and_the_run_resumes_there(workdir, tiny_spec_path):
    max_steps = 10
    sets = [
        f"train.max_steps={max_steps}",
        "train.val_every=5",
        "train.log_every=1",
        "train.checkpoint_every=1000",
    ]
    loaded = load_spec(tiny_spec_path, sets)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        run(loaded, tracking_uri=uri, progress=False, callbacks=(_Usr1At(3),))
    assert interrupt.preempted()  # `moeplat run` exits PREEMPTED_EXIT (75), not 130
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    (run_dir,) = Path("runs/tiny").iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # the step after the signal, not a periodic checkpoint
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert r.info.status == "KILLED"

    result = run(loaded, resume=str(run_dir), tracking_uri=uri, progress=False)
    assert result.run_id == r.info.run_id and result.steps == max_steps
    counts = step_counts(client, r.info.run_id)
    assert sorted(counts["train/loss"]) == list(range(max_steps))
    assert all(n == 1 for c in counts.values() for n in c.values())  # each step once
    assert client.get_run(r.info.run_id).info.status == "FINISHED"
