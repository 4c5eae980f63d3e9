"""Global-batch load balancing (losses.load_balancing.scope: global_batch, moeplat.nn.balance)
under data parallelism: 2 gloo ranks x 2 accumulation micro-batches give the loss and every
gradient of one process on the whole batch (float64), with activation checkpointing on and off,
also under expert parallelism; the micro_batch scope does not. Cases: balance_helpers.py."""

from __future__ import annotations

import balance_helpers
import ep_helpers as h
import pytest

pytestmark = pytest.mark.slow


def test_two_ranks_times_two_micro_batches_equal_one_process_on_the_whole_batch():
    cases = [
        ("case_ddp", (2, False)),
        ("case_ddp", (2, True)),  # checkpointing: the recomputed forward must not count again
        ("case_ddp", (1, True)),  # one micro-batch: f reduced inside the forward, once
        ("case_micro_batch_differs", (2,)),
        ("case_expert_parallel", (2, False)),
        ("case_expert_parallel", (2, True)),
    ]
    h.spawn(balance_helpers.run_cases, 2, cases)


def _val_loss(tmp, name: str) -> float:
    from cli_runs import mlflow_runs

    _, runs = mlflow_runs(tmp, name)
    assert len(runs) == 1
    return runs[0].data.metrics["val/loss"]


def test_moeplat_run_accumulated_and_data_parallel_equal_the_whole_batch(tmp_path):
    """`moeplat run` of the tiny spec for 4 steps, scope global_batch: batch 4 x grad_accum 2
    (one process) and 2 DDP processes x batch 2 x grad_accum 2 with activation checkpointing
    (the loader's look-ahead and the routing pre-pass in LMSystem) reach the validation loss of
    one process with batch 8; with scope micro_batch the accumulated run does not."""
    from cli_runs import finish, start_run

    # the whole validation split, whatever the batch size
    common = [
        "train.max_steps=4",
        "train.val_every=4",
        "data.val_tokens=all",
        "parallel.accelerator=cpu",
    ]
    scope = "model.moe.losses.load_balancing={coef: 0.5, scope: %s}"  # strong, to see the difference
    runs = {
        "whole": ["train.batch_size=8", scope % "global_batch"],
        "accumulated": ["train.batch_size=4", "train.grad_accum=2", scope % "global_batch"],
        "micro": ["train.batch_size=4", "train.grad_accum=2", scope % "micro_batch"],
        "ddp": [
            "train.batch_size=2",
            "train.grad_accum=2",
            "parallel.devices=2",
            "parallel.strategy.kind=ddp",
            "parallel.activation_checkpointing=true",
            scope % "global_batch",
        ],
    }
    procs = {name: start_run(tmp_path, name, [*common, *o]) for name, o in runs.items()}
    for proc in procs.values():
        finish(proc, timeout=400)
    val = {name: _val_loss(tmp_path, name) for name in runs}
    assert val["accumulated"] == pytest.approx(val["whole"], rel=1e-5), val
    assert val["ddp"] == pytest.approx(val["whole"], rel=1e-5), val
    assert val["micro"] != pytest.approx(val["whole"], rel=1e-5), val
