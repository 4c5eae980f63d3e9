"""Global-batch load balancing with train.grad_accum 2 survives a resume: the loader's look-ahead
restarts at the checkpoint's step and the routing pre-pass replays dropout and router jitter, so a
run resumed from its step-6 checkpoint ends with exactly the uninterrupted run's validation loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow


def test_resume_mid_run_with_global_batch_balancing_and_accumulation(workdir, tiny_spec_path):
    loaded = load_spec(
        tiny_spec_path,
        [
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.checkpoint_every=6",
            "tracking.enabled=false",
            "model.dropout=0.1",
            "model.moe.router.jitter_eps=0.1",
            "model.moe.losses.load_balancing={coef: 0.1, scope: global_batch}",
        ],
    )
    straight = run(loaded, runs_root="a", progress=False)
    interrupted = Path("b") / "tiny" / "interrupted"
    shutil.copytree(straight.run_dir, interrupted)
    shutil.copy(interrupted / "checkpoints" / "step000006.ckpt", interrupted / "checkpoints" / "last.ckpt")
    resumed = run(loaded, runs_root="b", resume=str(interrupted), progress=False)
    assert resumed.steps == straight.steps == 12
    assert resumed.val_loss == straight.val_loss
