"""Writing a checkpoint never changes the training state, whatever the strategy (issue 14).

For each layout, `moeplat run` of the tiny spec twice, side by side: once with a checkpoint every
2 optimizer steps (two mid-run checkpoints, at steps 2 and 4, then the last at 6) and once with a
checkpoint only at the end. Both must log the same per-step training losses and validation
losses: a checkpoint that touched the parameters, the optimizer state, the RNG streams (dropout),
the router biases (the sigmoid router's aux-loss-free bias) or the data position would show in
the steps after it. The tests that resume from a checkpoint written at the end of a run
(test_ep_run.py, test_ep_fsdp.py, tests/train) cannot see such damage: the run that wrote it had
stopped. Expert parallelism used to gather Adam's moments into the live optimizer here and
crash at the step after the first checkpoint.

Sweeps' trials and the job server's jobs run through the same `moeplat.train.run.run`, trainer
and strategies, so they share what is tested here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import finish, mlflow_runs, start_run

pytestmark = pytest.mark.slow
STEPS = 6
COMMON = [
    "parallel.accelerator=cpu",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.val_every=3",
    "train.schedule={kind: constant}",
    "model.dropout=0.1",  # draws from the torch RNG at every step
    "model.moe.router={kind: sigmoid_bias, gamma: 0.01}",  # a bias updated outside the optimizer
    "model.moe.losses={}",
    "tracking.log_model=false",
]
TWO = ["train.batch_size=4", "parallel.devices=2"]
LAYOUTS = {
    "single": ["train.batch_size=8"],
    "ddp": [*TWO, "parallel.strategy={kind: ddp}"],
    "fsdp": [*TWO, "parallel.strategy={kind: fsdp}"],
    "ep_ddp": [*TWO, "parallel.strategy={kind: expert_parallel, ep_size: 2, dense: ddp}"],
    "ep_fsdp": [*TWO, "parallel.strategy={kind: expert_parallel, ep_size: 2, dense: fsdp}"],
}


def _history(tmp: Path, name: str, key: str) -> dict[int, float]:
    client, runs = mlflow_runs(tmp, name)
    assert len(runs) == 1, name
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mid_run_checkpoints_leave_training_unchanged(tmp_path, layout):
    overrides = [*COMMON, *LAYOUTS[layout]]
    procs = {
        "midrun": start_run(tmp_path, "midrun", [*overrides, "train.checkpoint_every=2"]),
        "end": start_run(tmp_path, "end", [*overrides, f"train.checkpoint_every={STEPS}"]),
    }
    for proc in procs.values():
        finish(proc, timeout=360)

    (ckpts,) = (tmp_path / "midrun").glob("tiny/*/checkpoints")
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [
        "step000002.ckpt",
        "step000004.ckpt",
        "step000006.ckpt",
    ]
    for key, count in (("train/loss", STEPS), ("val/loss", 2)):
        midrun, end = _history(tmp_path, "midrun", key), _history(tmp_path, "end", key)
        steps = sorted(end)
        assert len(steps) == count and sorted(midrun) == steps, key
        # same layout, same arithmetic: equal to the bit, not merely close
        assert [midrun[s] for s in steps] == [end[s] for s in steps], key
